//! The continual runner behind `cargo xtask train`: a stream of Mini-CoIN tasks learned one
//! after the other by LLaVA-CMoE or a baseline, every task seen so far evaluated after each one
//! (greedy generation, the CoIN scorers), checkpoints after every task and its evaluation, and
//! the report (`report.json`, `report.md`) at the end.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use burn::backend::Autodiff;
use burn::prelude::DeviceOps;
use burn::tensor::backend::{Backend, DeviceId};
use cmoe_coin::format::{Prediction, TestRecord, write_json, write_jsonl};
use cmoe_coin::mini::{self, MiniCoinConfig, TASKS};
use cmoe_coin::score::{Compat, TaskType, score};
use cmoe_data::prompt::Conversation;
use cmoe_llava::{GenerationConfig, Sampling};
use cmoe_moe::checkpoint::{self, StageCheckpoints};
use cmoe_moe::learner::{ContinualLearner, LearnEvent, Placement, Stage, TaskLocator, TaskRecipe};
use cmoe_moe::model::{CmoeModel, MoeConfig};
use cmoe_moe::pgke::ExpansionMode;
use cmoe_moe::ptl::PtlConfig;
use cmoe_moe::source::TaskSource;
use cmoe_moe::stages::{StageConfig, StageError};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::backend::{BackendKind, BackendTask};
use crate::dataset::{CoinEncoder, Encoded, collate_prompts};
use crate::loader::{
    BadSamples, LoadReport, SampleProblem, StreamSettings, StreamedTask, default_workers,
    load_test_set,
};
use crate::pipeline::{LlavaPipeline, Precision};
use crate::plots::heatmap;
use crate::progress::{progress, tick};

/// Who learns the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// LLaVA-CMoE: PGKE expansion, per-task routers, PTL.
    Cmoe,
    /// Sequential LoRA on the FFN (one expert, one router, retrained on every task).
    Lora,
    /// CoIN's MoELoRA: a fixed set of experts and one shared router, trained on every task.
    Moelora,
}

/// Which router answers a test question (LLaVA-CMoE only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RouterChoice {
    /// The Probabilistic Task Locator (the method).
    Ptl,
    /// The last trained task's router (ablation).
    Last,
    /// A random learned task's router (ablation).
    Random,
    /// The true task's router (an upper bound, not a method).
    Oracle,
}

/// Where a new task's experts go (LLaVA-CMoE only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PlanChoice {
    /// PGKE.
    Pgke,
    /// The same number of experts in every layer (ablation).
    EveryLayer,
    /// As many layers as PGKE picks, chosen at random (ablation).
    Random,
}

/// The order of the tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TaskOrder {
    /// CoIN's order.
    Normal,
    /// CoIN's order reversed.
    Reverse,
    /// A seeded permutation.
    Random,
}

/// Size presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// The full Mini-CoIN run.
    Default,
    /// Tiny sizes: the whole pipeline in a few minutes (what CI runs).
    Smoke,
}

fn one() -> usize {
    1
}

/// Everything that defines a run (saved as `run.json`; `--resume` requires the same).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// The small LLaVA in HF layout.
    pub model: PathBuf,
    /// Mini-CoIN sizes and seed.
    pub data: MiniCoinConfig,
    /// Who learns.
    pub method: Method,
    /// Inference routing (cmoe).
    pub router: RouterChoice,
    /// Expansion placement (cmoe).
    pub plan: PlanChoice,
    /// Task order (applied to `tasks`).
    pub order: TaskOrder,
    /// The tasks to learn, in their normal order; empty: CoIN's eight ([`TASKS`]).
    #[serde(default)]
    pub tasks: Vec<TaskSpec>,
    /// Seed of batching, ablation choices and the model's fresh parameters.
    pub seed: u64,
    /// Expert settings (for lora: one expert, top-1).
    pub moe: MoeConfig,
    /// Locator settings.
    pub ptl: PtlConfig,
    /// Samples per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimiser step (gradient accumulation); the global batch is
    /// `batch x accumulation`.
    #[serde(default = "one")]
    pub accumulation: usize,
    /// The dtype of the frozen base model (bf16 for a 7B base on one GPU); experts, routers
    /// and VAEs train in f32 whatever it is.
    #[serde(default)]
    pub base_dtype: Precision,
    /// Every how many optimiser steps a task's training stage checkpoints (0: only after the
    /// expansion and after the task). A resumed run continues from the last one.
    #[serde(default)]
    pub checkpoint_every: usize,
    /// Passes over each task's training set.
    pub epochs: usize,
    /// Peak learning rate of a task's training.
    pub lr: f64,
    /// Peak learning rate of the probe stage.
    pub probe_lr: f64,
    /// Share of the training set in each PGKE subset (probe training, statistics).
    pub probe_fraction: f64,
    /// `N_p`.
    pub probe_experts: usize,
    /// PGKE's threshold factor.
    pub alpha: f64,
    /// Questions per generation batch.
    pub eval_batch: usize,
    /// Most generated tokens per answer.
    pub max_new_tokens: usize,
    /// A CoIN-format data folder to learn instead of generating Mini-CoIN: it holds
    /// `Instructions/<Task>/train.json` and `test.json` for the tasks of [`TASKS`].
    #[serde(default)]
    pub data_root: Option<PathBuf>,
    /// The folder the records' image paths are relative to (default: `<data>/images`).
    #[serde(default)]
    pub image_root: Option<PathBuf>,
    /// What to do with a sample whose record or image is unusable.
    #[serde(default)]
    pub bad_samples: BadSamples,
}

impl RunConfig {
    /// A preset for `method`, with the shipped model.
    pub fn preset(preset: Preset, method: Method) -> Self {
        let moe = match method {
            Method::Lora => MoeConfig {
                rank: 16,
                alpha: 32.0,
                dropout: 0.05,
                top_k: 1,
                initial_experts: 1,
                ..MoeConfig::default()
            },
            Method::Cmoe | Method::Moelora => MoeConfig {
                rank: 16,
                alpha: 32.0,
                dropout: 0.05,
                top_k: 2,
                initial_experts: 4,
                ..MoeConfig::default()
            },
        };
        let base = Self {
            model: PathBuf::from("assets/llava-mini"),
            data: MiniCoinConfig {
                train_per_task: 400,
                test_per_task: 60,
                ..MiniCoinConfig::default()
            },
            method,
            router: RouterChoice::Ptl,
            plan: PlanChoice::Pgke,
            order: TaskOrder::Normal,
            tasks: Vec::new(),
            seed: 0,
            moe,
            ptl: PtlConfig {
                hidden: 128,
                latent: 16,
                n_rep: 8,
                bank_instances: 200,
                lr: Some(1e-3),
                fit_epochs: 20,
                feature_memory: 4096,
                seed: 0x5EED,
            },
            batch: 8,
            accumulation: 1,
            base_dtype: Precision::F32,
            checkpoint_every: 25,
            epochs: 2,
            lr: 1e-3,
            probe_lr: 1.5e-3,
            probe_fraction: 0.1,
            probe_experts: 2,
            alpha: 0.8,
            eval_batch: 16,
            max_new_tokens: 24,
            data_root: None,
            image_root: None,
            bad_samples: BadSamples::Skip,
        };
        match preset {
            Preset::Default => base,
            Preset::Smoke => Self {
                data: MiniCoinConfig {
                    train_per_task: 16,
                    test_per_task: 8,
                    ..base.data
                },
                ptl: PtlConfig {
                    bank_instances: 16,
                    ..base.ptl
                },
                epochs: 1,
                probe_fraction: 0.25,
                eval_batch: 8,
                max_new_tokens: 12,
                ..base
            },
        }
    }

    /// These settings with those of a TOML file over them. Its keys are [`RunConfig`]'s fields
    /// (tables `moe`, `ptl` and `data` for the nested ones); a key that is not a setting is an
    /// error naming it, so that a typo never goes unnoticed.
    pub fn with_file(self, path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let file: toml::Table =
            toml::from_str(&text).with_context(|| format!("{}: malformed TOML", path.display()))?;
        let mut merged = serde_json::to_value(&self)?;
        merge_settings(&mut merged, serde_json::to_value(file)?, "")
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        serde_json::from_value(merged).with_context(|| format!("{}: bad setting", path.display()))
    }

    /// The default run name: the data folder's name (or else the preset) and the method, then
    /// every setting that differs from the method's defaults (`default-cmoe`,
    /// `default-cmoe-plan-every-layer`, `CoIN-cmoe`, ...).
    pub fn default_name(&self, preset: Preset) -> String {
        let word = |v: serde_json::Value| v.as_str().unwrap_or("?").to_string();
        // A user's data folder names the run (`CoIN-cmoe`), else the preset (`default-cmoe`).
        let data = self
            .data_root
            .as_deref()
            .and_then(Path::file_name)
            .map(|f| f.to_string_lossy().into_owned());
        let mut name = format!(
            "{}-{}",
            data.unwrap_or_else(|| word(serde_json::json!(preset))),
            word(serde_json::json!(self.method))
        );
        if self.router != RouterChoice::Ptl {
            name += &format!("-router-{}", word(serde_json::json!(self.router)));
        }
        if self.plan != PlanChoice::Pgke {
            name += &format!("-plan-{}", word(serde_json::json!(self.plan)));
        }
        if self.order != TaskOrder::Normal {
            name += &format!("-order-{}", word(serde_json::json!(self.order)));
        }
        if self.seed != 0 {
            name += &format!("-seed-{}", self.seed);
        }
        name
    }

    /// The tasks' names and scoring types in training order: `tasks` (or CoIN's eight) put in
    /// `order`. A task without a type must be one of CoIN's names.
    pub fn task_list(&self) -> anyhow::Result<Vec<(String, TaskType)>> {
        let mut tasks: Vec<(String, TaskType)> = if self.tasks.is_empty() {
            TASKS.iter().map(|&(n, t)| (n.to_string(), t)).collect()
        } else {
            self.tasks
                .iter()
                .map(|spec| {
                    let coin = TASKS.iter().find(|(n, _)| *n == spec.name).map(|t| t.1);
                    spec.kind
                        .or(coin)
                        .map(|t| (spec.name.clone(), t))
                        .ok_or_else(|| {
                            anyhow::anyhow!(
                                "task `{}` is not one of CoIN's ({}): give its `type`",
                                spec.name,
                                TASKS.map(|t| t.0).join(", ")
                            )
                        })
                })
                .collect::<anyhow::Result<_>>()?
        };
        if let Some((name, _)) = tasks
            .iter()
            .enumerate()
            .find(|(i, (name, _))| tasks[..*i].iter().any(|(n, _)| n == name))
            .map(|(_, task)| task)
        {
            anyhow::bail!("task `{name}` is listed twice");
        }
        match self.order {
            TaskOrder::Normal => {}
            TaskOrder::Reverse => tasks.reverse(),
            TaskOrder::Random => tasks.shuffle(&mut StdRng::seed_from_u64(self.seed ^ 0x0DE)),
        }
        Ok(tasks)
    }
}

/// A task of the stream: its folder under `Instructions/` and how its answers are scored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// The folder name under `Instructions/`.
    pub name: String,
    /// The scoring type; default: that of the CoIN task of this name.
    #[serde(rename = "type", default)]
    pub kind: Option<TaskType>,
}

/// Writes every value of `overrides` over `settings`, recursing into tables; a key that
/// `settings` lacks is an error naming its path.
fn merge_settings(
    settings: &mut serde_json::Value,
    overrides: serde_json::Value,
    at: &str,
) -> Result<(), String> {
    let serde_json::Value::Object(overrides) = overrides else {
        *settings = overrides;
        return Ok(());
    };
    for (key, value) in overrides {
        let path = if at.is_empty() {
            key.clone()
        } else {
            format!("{at}.{key}")
        };
        let slot = settings
            .get_mut(&key)
            .ok_or_else(|| format!("unknown setting `{path}`"))?;
        if slot.is_object() {
            merge_settings(slot, value, &path)?;
        } else {
            *slot = value;
        }
    }
    Ok(())
}

/// What has been done so far (`progress.json`): the resume point and every measurement.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Tasks trained and evaluated.
    pub completed: usize,
    /// `accuracy[t][i]`: task `i` after training task `t` (positions in training order).
    pub accuracy: Vec<Vec<Option<f64>>>,
    /// Per task, the parameters it trained.
    pub trainable_params_per_task: Vec<usize>,
    /// Per task, the experts in each layer after it.
    pub experts_per_layer: Vec<Vec<usize>>,
    /// After the last evaluation: `confusion[true][chosen]` counts of the routing decision.
    pub ptl_confusion: Vec<Vec<usize>>,
    /// Per task, the seconds spent training and evaluating it.
    pub seconds_per_task: Vec<f64>,
    /// Per task, the mean loss of the last 10 % of training steps.
    pub final_loss: Vec<f64>,
    /// Per task, the training samples used and those left out.
    #[serde(default)]
    pub train_data: Vec<LoadReport>,
    /// Per task, the test questions left out (missing or unreadable images).
    #[serde(default)]
    pub test_problems: Vec<Vec<SampleProblem>>,
    /// The backend the run trains on.
    #[serde(default)]
    pub backend: String,
    /// The task whose PGKE expansion is done and saved in `state/` but whose training is not:
    /// a resumed run continues with its training stage.
    #[serde(default)]
    pub expanded: Option<ExpandedTask>,
}

/// A task checkpointed between PGKE's expansion and its training stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpandedTask {
    /// Its position in the run.
    pub task: usize,
    /// Per layer, the index of its first new expert.
    pub first: Vec<usize>,
}

/// The run's report (`report.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Method name.
    pub method: Method,
    /// Inference routing and placement (cmoe).
    pub router: RouterChoice,
    /// See `router`.
    pub plan: PlanChoice,
    /// Task names in training order.
    pub tasks: Vec<String>,
    /// `accuracy[t][i]` (percent), null where task `i` was not trained yet.
    pub accuracy: Vec<Vec<Option<f64>>>,
    /// `a[i][i]`.
    pub immediate: Vec<f64>,
    /// `a[T][i]`.
    pub last: Vec<f64>,
    /// Mean of `immediate`.
    pub mean_immediate: f64,
    /// Mean of `last`.
    pub mean_last: f64,
    /// `1/(T-1) sum_{i<T} (a[T][i] - a[i][i])` (the paper's).
    pub bwt: f64,
    /// The same sum divided by `T` (CoIN's tables).
    pub bwt_coin: f64,
    /// Parameters each task trained.
    pub trainable_params_per_task: Vec<usize>,
    /// Per task, experts per layer after it.
    pub experts_per_layer: Vec<Vec<usize>>,
    /// `ptl_confusion[true][chosen]` after the last task.
    pub ptl_confusion: Vec<Vec<usize>>,
    /// Share of test questions routed to their own task's router after the last task.
    pub ptl_accuracy: f64,
    /// Seconds, all tasks.
    pub wall_seconds: f64,
    /// The backend it ran on.
    pub backend: String,
    /// The run's seed.
    pub seed: u64,
    /// Per task, the training samples used and those left out.
    #[serde(default)]
    pub train_data: Vec<LoadReport>,
    /// Per task, the test questions left out (missing or unreadable images).
    #[serde(default)]
    pub test_problems: Vec<Vec<SampleProblem>>,
    /// The whole configuration.
    pub config: RunConfig,
}

/// Runs (or resumes) a continual run in `dir` on the backend it is given.
pub struct TrainTask {
    /// The run's settings.
    pub config: RunConfig,
    /// The run's folder (`runs/<name>`).
    pub dir: PathBuf,
    /// Continue from `dir/progress.json` and `dir/state`.
    pub resume: bool,
    /// Backend name for the report.
    pub backend: String,
    /// Stop after this many tasks, as if the run were killed there (to exercise `--resume`).
    pub stop_after: Option<usize>,
    /// Stop once task `n` (1-based) has been expanded and checkpointed, before its training.
    pub stop_after_expansion: Option<usize>,
    /// Stop while writing the training-stage checkpoint of (task, step) (1-based task), before
    /// it replaces the previous one, as if killed there.
    pub stop_at_step: Option<(usize, usize)>,
    /// Indices of the devices to train on, data-parallel (the first holds the model); empty:
    /// the backend's default device.
    pub devices: Vec<usize>,
}

impl BackendTask for TrainTask {
    type Output = anyhow::Result<Report>;

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<Report> {
        run::<B>(self, &device)
    }
}

type AD<B> = Autodiff<B>;

/// The devices `indices` name on backend `B` (`backend` is its name), of the default device's
/// kind; `[default]` when none are named.
fn training_devices<B: Backend>(
    indices: &[usize],
    backend: &str,
    default: &B::Device,
) -> anyhow::Result<Vec<B::Device>> {
    if indices.is_empty() {
        return Ok(vec![default.clone()]);
    }
    if indices.len() > 1 && backend == BackendKind::Wgpu.name() {
        anyhow::bail!(
            "--devices: Burn 0.21's wgpu backend cannot copy tensors between devices (only its \
             CUDA backend can), so data-parallel training needs --backend cuda"
        );
    }
    let kind = default.to_id().type_id;
    let available = B::device_count(kind);
    let mut seen = Vec::new();
    for &index in indices {
        if index >= available {
            anyhow::bail!(
                "--devices: there is no device {index}; backend {backend} has {available} device(s)"
            );
        }
        if seen.contains(&index) {
            anyhow::bail!("--devices: device {index} is named twice");
        }
        seen.push(index);
    }
    Ok(indices
        .iter()
        .map(|&index| B::Device::from_id(DeviceId::new(kind, index as u16)))
        .collect())
}

fn run<B: Backend>(task: TrainTask, device: &B::Device) -> anyhow::Result<Report> {
    let TrainTask {
        config,
        dir,
        resume,
        backend,
        stop_after,
        stop_after_expansion,
        stop_at_step,
        devices,
    } = task;
    let devices = training_devices::<B>(&devices, &backend, device)?;
    if devices.len() > config.accumulation.max(1) {
        anyhow::bail!(
            "--devices: {} devices need at least as many micro-batches per step; set \
             `accumulation` to {} or more in the config (it is {})",
            devices.len(),
            devices.len(),
            config.accumulation
        );
    }
    let device = &devices[0];
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let run_json = dir.join("run.json");
    let progress_json = dir.join("progress.json");
    let mut progress: Progress = if resume && progress_json.exists() {
        let saved: RunConfig = serde_json::from_str(&std::fs::read_to_string(&run_json)?)
            .with_context(|| format!("{}: malformed run config", run_json.display()))?;
        if saved != config {
            anyhow::bail!(
                "{}: the run was started with other settings; resume it with the same \
                 arguments or start a new --name",
                run_json.display()
            );
        }
        // The checkpoint's own copy (saved with the state, in one swap) is the resume point.
        let state_dir = dir.join("state");
        let previous = state_dir.with_extension("old");
        if !state_dir.exists() && previous.exists() {
            // Killed in the middle of a swap: the previous checkpoint is whole.
            std::fs::rename(&previous, &state_dir)
                .with_context(|| format!("cannot restore {}", previous.display()))?;
        }
        let checkpoint = state_dir.join("progress.json");
        let path = if checkpoint.exists() {
            checkpoint
        } else {
            progress_json.clone()
        };
        read_run_file(&path)?
    } else {
        if progress_json.exists() {
            anyhow::bail!(
                "{} already holds a run; continue it with --resume or choose another --name",
                dir.display()
            );
        }
        write_json(&run_json, &config)?;
        Progress::default()
    };

    progress.backend = backend;

    // The data: the user's CoIN folder, or Mini-CoIN generated once per run folder,
    // deterministically from its seed.
    let data_dir = data_dir(&config, &dir);
    if config.data_root.is_none() && !data_dir.join("mini-coin.json").exists() {
        eprintln!("generating Mini-CoIN in {}", data_dir.display());
        mini::generate(&config.data, &data_dir, |_| {})?;
    }
    let image_root = image_root(&config, &data_dir);
    let (names, types): (Vec<String>, Vec<TaskType>) = config.task_list()?.into_iter().unzip();

    let Runtime {
        base,
        pad,
        generation,
        encoder,
    } = Runtime::<B>::load(&config, image_root, device)?;
    let encoder = Arc::new(encoder);
    let mut tests: Vec<(Vec<TestRecord>, Vec<Encoded>)> = Vec::new();
    let mut test_problems = Vec::new();
    for name in &names {
        let path = data_dir.join("Instructions").join(name).join("test.json");
        let (records, prompts, problems) = load_test_set(&encoder, &path, config.bad_samples)?;
        if !problems.is_empty() {
            eprintln!("{}: {} questions left out", path.display(), problems.len());
        }
        tests.push((records, prompts));
        test_problems.push(problems);
    }
    progress.test_problems = test_problems;

    let state_dir = dir.join("state");
    let stage_dir = dir.join("stage");
    AD::<B>::seed(device, config.seed); // the first task's fresh experts
    let mut learner = if progress.completed > 0 || progress.expanded.is_some() {
        eprintln!(
            "resuming after task {} of {}",
            progress.completed,
            names.len()
        );
        ContinualLearner::load(base, &state_dir, device)?
    } else {
        ContinualLearner::new(base, config.moe, config.ptl, device)
    };
    if devices.len() > 1 {
        eprintln!("data-parallel over {} devices: {devices:?}", devices.len());
        learner = learner.on_devices(devices.clone());
    }
    let shared = config.method != Method::Cmoe;

    let end = stop_after.map_or(names.len(), |n| n.min(names.len()));
    for t in progress.completed..end {
        let started = Instant::now();
        // Everything random in task t (batch order, new parameters, dropout, ablation draws)
        // depends on (seed, t) only, so a resumed run continues exactly as an unbroken one.
        let task_seed = config.seed ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        AD::<B>::seed(device, task_seed);
        let mut rng = StdRng::seed_from_u64(task_seed);
        let name = &names[t];
        eprintln!("task {}/{}: {name}", t + 1, names.len());
        let data = open_task::<AD<B>>(&config, &encoder, &data_dir, name, pad, &mut rng, device)?;
        // A training stage of this task that stopped at a checkpoint: the problems its
        // loading had met (the batches before the checkpoint are not read again).
        if let Some((found, at)) = checkpoint::find(&stage_dir)?
            && at.task == t
            && !shared
        {
            eprintln!("  resuming the training stage at step {}", at.step);
            data.restore(read_run_file(&found.join("train_data.json"))?)?;
        }
        // Optimiser steps of `epochs` passes over `batches` micro-batches.
        let steps = |batches: usize| {
            (config.epochs * batches)
                .div_ceil(config.accumulation.max(1))
                .max(1)
        };
        let train_steps = steps(data.train().len());
        let stage = StageConfig {
            lr: config.lr,
            warmup_ratio: 0.03,
            steps: train_steps,
            accumulation: config.accumulation.max(1),
            weight_decay: 0.0,
            loss: Default::default(),
            seed: Some(task_seed ^ 0x57A6E),
        };
        let recipe = TaskRecipe {
            probe_experts: config.probe_experts,
            alpha: config.alpha,
            placement: match config.plan {
                PlanChoice::Pgke => Placement::Probe(ExpansionMode::ProbeCount),
                PlanChoice::EveryLayer => Placement::EveryLayer {
                    add: config.probe_experts,
                },
                PlanChoice::Random => Placement::RandomLayers {
                    add: config.probe_experts,
                    seed: config.seed,
                },
            },
            probe_stage: StageConfig {
                lr: config.probe_lr,
                steps: steps(data.probe_train().len()),
                ..stage
            },
            stage,
        };
        let mut observer = StageBars::default();
        learner = if shared {
            learner.learn_shared(&data, &recipe.stage, |e| observer.event(e))?
        } else {
            // PGKE's expansion, checkpointed (state swap-in, then progress) for every task
            // after the first; a resumed run finds it and goes on with the training stage.
            let (expanded, first) = match progress.expanded.take() {
                Some(done) if done.task == t => {
                    eprintln!("  resuming after the expansion of task {}", t + 1);
                    (learner, done.first)
                }
                _ => {
                    let (expanded, first) =
                        learner.expand_for_task(&data, &recipe, |e| observer.event(e))?;
                    if t > 0 {
                        progress.expanded = Some(ExpandedTask {
                            task: t,
                            first: first.clone(),
                        });
                        save_checkpoint(&expanded, &progress, &state_dir)?;
                        write_json(&progress_json, &progress)?;
                        progress.expanded = None;
                        if stop_after_expansion == Some(t + 1) {
                            anyhow::bail!(
                                "stopped after the expansion of task {} as asked; continue \
                                 with --resume",
                                t + 1
                            );
                        }
                    }
                    (expanded, first)
                }
            };
            // The training stage's randomness (dropout, new VAE) depends on (seed, t, step)
            // only, whether or not the run was resumed at a checkpoint.
            AD::<B>::seed(device, task_seed ^ 0x7EA1);
            let mut extra = |next: &Path, step: usize| -> Result<(), StageError> {
                write_json(&next.join("train_data.json"), &data.report())
                    .map_err(|e| StageError::Data(format!("{e:#}")))?;
                if stop_at_step == Some((t + 1, step)) {
                    return Err(StageError::Data(format!(
                        "stopped while checkpointing step {step} of task {} as asked; \
                         continue with --resume",
                        t + 1
                    )));
                }
                Ok(())
            };
            let checkpoints = StageCheckpoints {
                dir: &stage_dir,
                every: config.checkpoint_every,
                extra: &mut extra,
            };
            expanded.train_task_checkpointed(first, &data, &recipe, Some(checkpoints), |e| {
                observer.event(e)
            })?
        };
        observer.finish();
        progress.train_data.truncate(t);
        progress.train_data.push(data.report());
        progress.final_loss.push(observer.final_loss());
        progress
            .trainable_params_per_task
            .push(learner.trainable_params(t, shared));
        progress
            .experts_per_layer
            .push(learner.model.experts_per_layer());

        // Evaluate every task seen so far.
        let (model, locator) = learner.valid();
        let evaluator = Evaluator {
            model: &model,
            locator: &locator,
            config: &config,
            encoder: &encoder,
            pad,
            generation: &generation,
            device,
        };
        let mut row = vec![None; names.len()];
        let mut confusion = vec![vec![0usize; names.len()]; names.len()];
        for i in 0..=t {
            let (accuracy, chosen, predictions) =
                evaluator.evaluate(t, i, &tests[i], types[i], &mut rng)?;
            for c in chosen {
                confusion[i][c] += 1;
            }
            // The answers in CoIN's result format, for `cmoe score` and for reading.
            let answers = dir
                .join("predictions")
                .join(format!("after-{}-{}", t + 1, name))
                .join(format!("{}.jsonl", names[i]));
            write_jsonl(&answers, &predictions)?;
            eprintln!("  {:<10} {accuracy:6.2}", names[i]);
            row[i] = Some(accuracy);
        }
        progress.accuracy.push(row);
        progress.ptl_confusion = confusion;
        progress
            .seconds_per_task
            .push(started.elapsed().as_secs_f64());
        progress.completed = t + 1;
        save_checkpoint(&learner, &progress, &state_dir)?;
        write_json(&progress_json, &progress)?;
        // The task's stage checkpoints are behind it now.
        let _ = std::fs::remove_dir_all(&stage_dir);
    }

    if progress.completed < names.len() {
        anyhow::bail!(
            "stopped after task {} of {} as asked; continue with --resume",
            progress.completed,
            names.len()
        );
    }
    let report = make_report(&config, &progress, names);
    write_report(&report, &dir)?;
    Ok(report)
}

/// `report.json`, `report.md` and the plots in `dir`.
fn write_report(report: &Report, dir: &Path) -> anyhow::Result<()> {
    write_json(&dir.join("report.json"), report)?;
    std::fs::write(dir.join("report.md"), report_markdown(report))
        .with_context(|| format!("cannot write {}", dir.join("report.md").display()))?;
    report_plots(report, dir)
}

/// Reads a JSON file a run wrote, naming the file in every error.
fn read_run_file<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {} (is this a run folder?)", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: malformed", path.display()))
}

/// Rebuilds a run's report (`report.json`, `report.md`, plots) from its `run.json` and
/// `progress.json`; a run still going (or killed) gets the report of the tasks done so far.
pub fn rebuild_report(dir: &Path) -> anyhow::Result<Report> {
    let config: RunConfig = read_run_file(&dir.join("run.json"))?;
    let progress: Progress = read_run_file(&dir.join("progress.json"))?;
    if progress.completed == 0 {
        anyhow::bail!("{}: no task has been completed yet", dir.display());
    }
    let names = config
        .task_list()?
        .into_iter()
        .take(progress.completed)
        .map(|(name, _)| name)
        .collect();
    let report = make_report(&config, &progress, names);
    write_report(&report, dir)?;
    Ok(report)
}

/// The data folder of a run: the user's CoIN folder or the generated Mini-CoIN.
fn data_dir(config: &RunConfig, run_dir: &Path) -> PathBuf {
    config
        .data_root
        .clone()
        .unwrap_or_else(|| run_dir.join("data"))
}

/// The folder the records' image paths are relative to (default: `<data>/images`).
fn image_root(config: &RunConfig, data_dir: &Path) -> PathBuf {
    config
        .image_root
        .clone()
        .unwrap_or_else(|| data_dir.join("images"))
}

/// Share of questions routed to their own task: the diagonal of `confusion[true][chosen]`
/// over its total (0 when nothing was routed).
fn location_accuracy(confusion: &[Vec<usize>]) -> f64 {
    let routed: usize = confusion.iter().flatten().sum();
    let right: usize = (0..confusion.len()).map(|i| confusion[i][i]).sum();
    right as f64 / routed.max(1) as f64
}

/// Accuracy of a run's latest state on every task it has learned (`eval.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    /// Learned tasks, in training order.
    pub tasks: Vec<String>,
    /// Accuracy per task (percent).
    pub accuracy: Vec<f64>,
    /// Mean of `accuracy`.
    pub mean: f64,
    /// `ptl_confusion[true][chosen]`.
    pub ptl_confusion: Vec<Vec<usize>>,
    /// Share of questions routed to their own task.
    pub ptl_accuracy: f64,
    /// Questions left out per task (missing or unreadable images).
    pub test_problems: Vec<Vec<SampleProblem>>,
}

/// Evaluates a run's saved state on the test sets of every task it has learned, writing the
/// answers (`eval/<task>.jsonl`) and `eval.json`.
pub struct EvalTask {
    /// The run folder.
    pub dir: PathBuf,
}

impl BackendTask for EvalTask {
    type Output = anyhow::Result<EvalReport>;

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<EvalReport> {
        let dir = self.dir;
        let config: RunConfig = read_run_file(&dir.join("run.json"))?;
        let data = data_dir(&config, &dir);
        let Runtime {
            base,
            pad,
            generation,
            encoder,
        } = Runtime::<B>::load(&config, image_root(&config, &data), &device)?;
        let learner = ContinualLearner::load(base, &dir.join("state"), &device)?;
        let learned = learner.tasks_learned();
        if learned == 0 {
            anyhow::bail!("{}: no task has been learned yet", dir.display());
        }
        let tasks: Vec<(String, TaskType)> =
            config.task_list()?.into_iter().take(learned).collect();
        let (model, locator) = learner.valid();
        let evaluator = Evaluator {
            model: &model,
            locator: &locator,
            config: &config,
            encoder: &encoder,
            pad,
            generation: &generation,
            device: &device,
        };
        let mut rng = StdRng::seed_from_u64(config.seed);
        let mut report = EvalReport {
            tasks: Vec::new(),
            accuracy: Vec::new(),
            mean: 0.0,
            ptl_confusion: vec![vec![0; learned]; learned],
            ptl_accuracy: 0.0,
            test_problems: Vec::new(),
        };
        for (i, (name, task_type)) in tasks.into_iter().enumerate() {
            let path = data.join("Instructions").join(&name).join("test.json");
            let (records, prompts, problems) = load_test_set(&encoder, &path, config.bad_samples)?;
            let (accuracy, chosen, predictions) =
                evaluator.evaluate(learned - 1, i, &(records, prompts), task_type, &mut rng)?;
            for c in chosen {
                report.ptl_confusion[i][c] += 1;
            }
            write_jsonl(
                &dir.join("eval").join(format!("{name}.jsonl")),
                &predictions,
            )?;
            eprintln!("  {name:<10} {accuracy:6.2}");
            report.tasks.push(name);
            report.accuracy.push(accuracy);
            report.test_problems.push(problems);
        }
        report.mean = report.accuracy.iter().sum::<f64>() / learned as f64;
        report.ptl_accuracy = location_accuracy(&report.ptl_confusion);
        write_json(&dir.join("eval.json"), &report)?;
        Ok(report)
    }
}

/// `accuracy.png`, `ptl_confusion.png`, `experts_per_layer.png`, `trainable_params.png`.
fn report_plots(r: &Report, dir: &Path) -> anyhow::Result<()> {
    let tasks = &r.tasks;
    heatmap(
        &dir.join("accuracy.png"),
        "accuracy (row: after training, column: task)",
        tasks,
        tasks,
        &r.accuracy,
        100.0,
        0,
    )?;
    let counts = |m: &[Vec<usize>]| -> Vec<Vec<Option<f64>>> {
        m.iter()
            .map(|row| row.iter().map(|&v| Some(v as f64)).collect())
            .collect()
    };
    let routed = counts(&r.ptl_confusion);
    let most = routed
        .iter()
        .flatten()
        .flatten()
        .fold(0.0f64, |a, &b| a.max(b));
    heatmap(
        &dir.join("ptl_confusion.png"),
        "task location (row: true task, column: router chosen)",
        tasks,
        tasks,
        &routed,
        most,
        0,
    )?;
    let experts = counts(&r.experts_per_layer);
    let layers: Vec<String> = (0..r.experts_per_layer.first().map_or(0, Vec::len))
        .map(|l| format!("L{l}"))
        .collect();
    let most = experts
        .iter()
        .flatten()
        .flatten()
        .fold(0.0f64, |a, &b| a.max(b));
    heatmap(
        &dir.join("experts_per_layer.png"),
        "experts per layer after each task",
        tasks,
        &layers,
        &experts,
        most,
        0,
    )?;
    let params: Vec<Vec<Option<f64>>> = r
        .trainable_params_per_task
        .iter()
        .map(|&p| vec![Some(p as f64 / 1e3)])
        .collect();
    let most = params
        .iter()
        .flatten()
        .flatten()
        .fold(0.0f64, |a, &b| a.max(b));
    heatmap(
        &dir.join("trainable_params.png"),
        "trained params (k)",
        tasks,
        &["k".to_string()],
        &params,
        most,
        0,
    )
}

/// What training, evaluation and `cmoe ask` take from the run's model directory.
struct Runtime<B: Backend> {
    /// The base model (with autodiff, for training).
    base: cmoe_llava::Llava<AD<B>>,
    /// The padding id.
    pad: u32,
    /// Greedy answers of at most `max_new_tokens`.
    generation: GenerationConfig,
    /// The model's tokenizer and processor; images under `image_root`.
    encoder: CoinEncoder,
}

impl<B: Backend> Runtime<B> {
    fn load(config: &RunConfig, image_root: PathBuf, device: &B::Device) -> anyhow::Result<Self> {
        let pipe = LlavaPipeline::<AD<B>>::load_in(&config.model, config.base_dtype, device)?;
        let pad = pipe.config.pad_token_id.unwrap_or(0);
        Ok(Self {
            generation: GenerationConfig {
                max_new_tokens: config.max_new_tokens,
                eos_token_ids: pipe.config.text_config.eos_token_id.clone(),
                pad_token_id: pad,
                sampling: Sampling::Greedy,
            },
            encoder: CoinEncoder {
                tokenizer: pipe.tokenizer,
                processor: pipe.processor,
                conversation: Conversation::vicuna_v1(),
                tokens_per_image: pipe.config.image_tokens_per_image(),
                image_root,
            },
            pad,
            base: pipe.model,
        })
    }
}

/// What [`AskTask`] answers.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// The task whose router answered.
    pub task: String,
    /// Every learned task's z-score, in training order (empty for shared-router baselines).
    pub z_scores: Vec<(String, f64)>,
    /// The generated answer.
    pub text: String,
}

/// Answers a question about an image with a finished (or partial) run: PTL picks the task,
/// its router answers.
pub struct AskTask {
    /// The run folder (`run.json`, `state/`).
    pub dir: PathBuf,
    /// The image.
    pub image: PathBuf,
    /// The question, in the task's instruction style.
    pub question: String,
}

impl BackendTask for AskTask {
    type Output = anyhow::Result<Answer>;

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<Answer> {
        let config: RunConfig = read_run_file(&self.dir.join("run.json"))?;
        let Runtime {
            base,
            pad,
            generation,
            encoder,
        } = Runtime::<B>::load(&config, PathBuf::new(), &device)?;
        let learner = ContinualLearner::load(base, &self.dir.join("state"), &device)?;
        let learned = learner.tasks_learned();
        if learned == 0 {
            anyhow::bail!("{}: no task has been learned yet", self.dir.display());
        }
        let names: Vec<String> = config
            .task_list()?
            .into_iter()
            .take(learned)
            .map(|(name, _)| name)
            .collect();
        let (model, locator) = learner.valid();
        let record = TestRecord {
            question_id: cmoe_coin::format::QuestionId("ask".into()),
            image: self.image.display().to_string(),
            text: self.question,
            answer: None,
            answers: None,
            answer_bbox: None,
            size: None,
        };
        let prompt = [encoder.encode_prompt(&record)?];
        let (task, z_scores) = if config.method == Method::Cmoe {
            let location = locator.locate(&model, collate_prompts::<B>(&prompt, pad, &device))?;
            let z = names
                .iter()
                .cloned()
                .zip(location.z_scores[0].clone())
                .collect();
            (location.tasks[0], z)
        } else {
            (0, Vec::new())
        };
        let ids = model.generate(
            collate_prompts::<B>(&prompt, pad, &device),
            task,
            &generation,
        )?;
        Ok(Answer {
            task: names[task].clone(),
            z_scores,
            text: encoder.tokenizer.decode(&ids[0])?.trim().to_string(),
        })
    }
}

/// Saves the learner and the progress it belongs to next to the previous checkpoint and swaps
/// them in together, so that a crash leaves one complete, consistent checkpoint.
fn save_checkpoint<B: burn::tensor::backend::AutodiffBackend>(
    learner: &ContinualLearner<B>,
    progress: &Progress,
    state_dir: &Path,
) -> anyhow::Result<()> {
    let next = state_dir.with_extension("next");
    let old = state_dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&next);
    learner.save(&next)?;
    write_json(&next.join("progress.json"), progress)?;
    if state_dir.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(state_dir, &old)?;
    }
    std::fs::rename(&next, state_dir)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// A task's training set, streamed from its file (`train.json`, else `train.jsonl`) in an
/// order drawn from `rng`.
fn open_task<B: Backend>(
    config: &RunConfig,
    encoder: &Arc<CoinEncoder>,
    data_dir: &Path,
    name: &str,
    pad: u32,
    rng: &mut StdRng,
    device: &B::Device,
) -> anyhow::Result<StreamedTask<B>> {
    let task_dir = data_dir.join("Instructions").join(name);
    let path = match task_dir.join("train.json") {
        json if !json.exists() && task_dir.join("train.jsonl").exists() => {
            task_dir.join("train.jsonl")
        }
        json => json,
    };
    let settings = StreamSettings {
        batch: config.batch,
        probe_fraction: config.probe_fraction,
        workers: default_workers(),
        pad,
        policy: config.bad_samples,
        seed: rng.random(),
    };
    let task = StreamedTask::open(encoder.clone(), &path, settings, device)?;
    let report = task.report();
    if !report.problems.is_empty() {
        eprintln!("  {}: {}", path.display(), report.summary());
    }
    Ok(task)
}

/// What answering test questions with a learned state needs.
struct Evaluator<'a, B: Backend> {
    model: &'a CmoeModel<B>,
    locator: &'a TaskLocator<B>,
    config: &'a RunConfig,
    encoder: &'a CoinEncoder,
    pad: u32,
    generation: &'a GenerationConfig,
    device: &'a B::Device,
}

/// One evaluation: the accuracy, the router chosen for each question, and the answers.
type Evaluation = (f64, Vec<usize>, Vec<Prediction>);

impl<B: Backend> Evaluator<'_, B> {
    /// Accuracy on task `i` after training task `t`, the router chosen for each question, and
    /// the answers.
    fn evaluate(
        &self,
        t: usize,
        i: usize,
        (records, prompts): &(Vec<TestRecord>, Vec<Encoded>),
        task_type: TaskType,
        rng: &mut StdRng,
    ) -> anyhow::Result<Evaluation> {
        let Self {
            model,
            locator,
            config,
            encoder,
            pad,
            generation,
            device,
        } = *self;
        let shared = config.method != Method::Cmoe;
        let bar = progress(records.len() as u64, "evaluate");
        let mut predictions = Vec::with_capacity(records.len());
        let mut chosen_all = Vec::with_capacity(records.len());
        for (records, prompts) in records
            .chunks(config.eval_batch)
            .zip(prompts.chunks(config.eval_batch))
        {
            let chosen: Vec<usize> = if shared {
                vec![0; records.len()]
            } else {
                match config.router {
                    RouterChoice::Ptl => {
                        locator
                            .locate(model, collate_prompts::<B>(prompts, pad, device))?
                            .tasks
                    }
                    RouterChoice::Last => vec![t; records.len()],
                    RouterChoice::Random => (0..records.len())
                        .map(|_| rng.random_range(0..=t))
                        .collect(),
                    RouterChoice::Oracle => vec![i; records.len()],
                }
            };
            // One generation per router chosen in this batch.
            let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
            for (row, &c) in chosen.iter().enumerate() {
                groups.entry(c).or_default().push(row);
            }
            let mut texts = vec![String::new(); records.len()];
            for (router, rows) in groups {
                let group: Vec<Encoded> = rows.iter().map(|&r| prompts[r].clone()).collect();
                let outputs = model.generate(
                    collate_prompts::<B>(&group, pad, device),
                    router,
                    generation,
                )?;
                for (&row, ids) in rows.iter().zip(outputs) {
                    texts[row] = encoder.tokenizer.decode(&ids)?.trim().to_string();
                }
            }
            for (record, text) in records.iter().zip(texts) {
                predictions.push(Prediction {
                    question_id: record.question_id.clone(),
                    text,
                });
            }
            chosen_all.extend(chosen);
            bar.inc(records.len() as u64);
        }
        bar.finish_and_clear();
        let s = score(task_type, records, &predictions, Compat::Correct)?;
        Ok((s.accuracy, chosen_all, predictions))
    }
}

/// Progress bars for the training stages of one task, and the losses they saw.
#[derive(Default)]
struct StageBars {
    bar: Option<indicatif::ProgressBar>,
    /// `(step, cross-entropy)` of the current stage's steps run by this process.
    losses: Vec<(usize, f64)>,
    /// The current stage's length.
    steps: usize,
}

impl StageBars {
    fn event(&mut self, event: LearnEvent<'_>) {
        match event {
            LearnEvent::StageStarted { stage, steps, done } => {
                self.finish();
                let name = match stage {
                    Stage::Probe => "probe",
                    Stage::Train => "train",
                };
                self.losses.clear();
                self.steps = steps;
                let bar = progress(steps as u64, name);
                bar.set_position(done as u64);
                self.bar = Some(bar);
            }
            LearnEvent::Step { step, loss, .. } => {
                self.losses.push((step, loss.ce));
                if let Some(bar) = &self.bar {
                    let message =
                        format!("ce {:.3} aux {:.3} rec {:.2}", loss.ce, loss.aux, loss.rec);
                    tick(bar, message);
                }
            }
            LearnEvent::Planned(plan) => {
                let layers: Vec<String> = plan
                    .layers
                    .iter()
                    .map(|l| format!("layer {} +{}", l.layer, l.add))
                    .collect();
                eprintln!(
                    "  PGKE plan: {}",
                    if layers.is_empty() {
                        "no new experts".into()
                    } else {
                        layers.join(", ")
                    }
                );
            }
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    /// Mean cross-entropy of the last 10 % of the training stage's steps (of those this
    /// process ran, when the stage was resumed inside them).
    fn final_loss(&self) -> f64 {
        let from = self.steps - (self.steps / 10).max(1).min(self.steps);
        let tail: Vec<f64> = self
            .losses
            .iter()
            .filter(|(step, _)| *step >= from)
            .map(|(_, ce)| *ce)
            .collect();
        tail.iter().sum::<f64>() / tail.len().max(1) as f64
    }
}

/// The report's numbers from the accuracy matrix.
pub fn make_report(config: &RunConfig, progress: &Progress, tasks: Vec<String>) -> Report {
    let t = progress.accuracy.len();
    let a = |row: usize, col: usize| progress.accuracy[row][col].unwrap_or(0.0);
    let immediate: Vec<f64> = (0..t).map(|i| a(i, i)).collect();
    let last: Vec<f64> = (0..t).map(|i| a(t - 1, i)).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let forgetting: f64 = (0..t.saturating_sub(1))
        .map(|i| a(t - 1, i) - a(i, i))
        .sum();
    Report {
        method: config.method,
        router: config.router,
        plan: config.plan,
        tasks,
        accuracy: progress.accuracy.clone(),
        mean_immediate: mean(&immediate),
        mean_last: mean(&last),
        immediate,
        last,
        bwt: if t > 1 {
            forgetting / (t - 1) as f64
        } else {
            0.0
        },
        bwt_coin: if t > 0 { forgetting / t as f64 } else { 0.0 },
        trainable_params_per_task: progress.trainable_params_per_task.clone(),
        experts_per_layer: progress.experts_per_layer.clone(),
        ptl_confusion: progress.ptl_confusion.clone(),
        ptl_accuracy: location_accuracy(&progress.ptl_confusion),
        wall_seconds: progress.seconds_per_task.iter().sum(),
        backend: progress.backend.clone(),
        seed: config.seed,
        train_data: progress.train_data.clone(),
        test_problems: progress.test_problems.clone(),
        config: config.clone(),
    }
}

/// `report.md`: the paper's Table 1 (immediate / last per task) and Table 9 (the matrix).
pub fn report_markdown(r: &Report) -> String {
    let mut md = format!(
        "# Mini-CoIN: {:?} (router {:?}, plan {:?})\n\n",
        r.method, r.router, r.plan
    );
    let header = |first: &str| {
        format!(
            "| {first} | {} | Mean |\n|---|{}---|\n",
            r.tasks.join(" | "),
            "---|".repeat(r.tasks.len())
        )
    };
    let cells = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.2}"))
            .collect::<Vec<_>>()
            .join(" | ")
    };
    md += "## Accuracy (Table 1)\n\n";
    md += &header("");
    md += &format!(
        "| Immediate | {} | {:.2} |\n",
        cells(&r.immediate),
        r.mean_immediate
    );
    md += &format!("| Last | {} | {:.2} |\n\n", cells(&r.last), r.mean_last);
    md += &format!(
        "BWT {:.2} (paper: 1/(T-1)); {:.2} with CoIN's 1/T.\n\n",
        r.bwt, r.bwt_coin
    );
    md += "## Accuracy after each task (Table 9; row t: after training task t)\n\n";
    md += &format!(
        "| after \\ on | {} |\n|---|{}\n",
        r.tasks.join(" | "),
        "---|".repeat(r.tasks.len())
    );
    for (t, row) in r.accuracy.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .map(|c| c.map_or("-".into(), |x| format!("{x:.2}")))
            .collect();
        md += &format!("| {} | {} |\n", r.tasks[t], cells.join(" | "));
    }
    md += &format!(
        "\n## Task location after the last task (rows: true task, columns: router chosen)\n\nAccuracy {:.1} %.\n\n| true \\ chosen | {} |\n|---|{}\n",
        100.0 * r.ptl_accuracy,
        r.tasks.join(" | "),
        "---|".repeat(r.tasks.len())
    );
    for (t, row) in r.ptl_confusion.iter().enumerate() {
        let cells: Vec<String> = row.iter().map(usize::to_string).collect();
        md += &format!("| {} | {} |\n", r.tasks[t], cells.join(" | "));
    }
    md += "\n## Parameters and experts\n\n| task | trainable parameters | experts per layer |\n|---|---|---|\n";
    for (t, name) in r
        .tasks
        .iter()
        .enumerate()
        .take(r.trainable_params_per_task.len())
    {
        md += &format!(
            "| {name} | {} | {:?} |\n",
            r.trainable_params_per_task[t], r.experts_per_layer[t]
        );
    }
    md += &format!(
        "\nWall time {:.0} s on {}, seed {}.\n",
        r.wall_seconds, r.backend, r.seed
    );
    md
}
