//! A run's settings: the method, its routing and expansion choices, the presets, and the
//! settings file merged over a preset (`RunConfig`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use cmoe_coin::mini::{MiniCoinConfig, TASKS};
use cmoe_coin::score::TaskType;
use cmoe_moe::layer::FfnTargets;
use cmoe_moe::model::MoeConfig;
use cmoe_moe::pgke::{ExpansionMode, NewRouterColumns};
use cmoe_moe::ptl::{PtlConfig, PtlFeature};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::loader::BadSamples;
use crate::pipeline::Precision;

/// Who learns the stream (paper Table 1's rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// LLaVA-CMoE: PGKE expansion, per-task routers, PTL.
    Cmoe,
    /// Sequential LoRA: one LoRA pair on the FFN projections `lora_targets` (the paper's is
    /// on up_proj only, Table 8), retrained on every task.
    Lora,
    /// CoIN's MoELoRA: a fixed set of experts and one shared router, trained on every task.
    Moelora,
    /// MoELoRA with online EWC's penalty (`[ewc]`).
    Ewc,
    /// MoELoRA with LwF's distillation towards the model before each task (`[lwf]`).
    Lwf,
    /// MoELoRA trained on all tasks at once: the upper-bound row of Table 1 (not continual).
    Multitask,
}

impl Method {
    /// Whether the method trains one shared router (every baseline) rather than a router per
    /// task (LLaVA-CMoE).
    pub fn shared_router(self) -> bool {
        self != Method::Cmoe
    }

    /// The name the paper's tables use.
    pub fn paper_name(self) -> &'static str {
        match self {
            Method::Cmoe => "LLaVA-CMoE",
            Method::Lora => "LoRA",
            Method::Moelora => "MoELoRA",
            Method::Ewc => "EWC",
            Method::Lwf => "LwF",
            Method::Multitask => "Multitask MoELoRA",
        }
    }
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
    /// The same number of experts in every layer (ablation, Table 2 right).
    EveryLayer,
    /// As many layers as PGKE picks, chosen at random (ablation, Table 2 right).
    Random,
    /// "w/o extension" (ablation, Table 2 left): no new experts; every expert trains again
    /// on each task under the task's own router.
    NoExtension,
}

/// How the initial experts (and every baseline's adapters) start (`--init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum InitChoice {
    /// Their own phase on initialisation data that is none of the tasks (`init_data`; for
    /// Mini-CoIN the pretraining mixture of descriptions), then PGKE for every task (paper).
    #[default]
    Phase,
    /// The first task trains them and PGKE starts with the second (this project's behaviour
    /// before the initial phase existed).
    FirstTask,
}

/// Online EWC's settings (`--method ewc`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EwcSettings {
    /// `lambda`, the penalty's weight.
    pub lambda: f64,
    /// `gamma`, the share of the earlier tasks' Fisher kept at each consolidation.
    pub gamma: f64,
    /// Training batches the Fisher of a task is estimated on (at most one pass).
    pub fisher_batches: usize,
}

impl Default for EwcSettings {
    fn default() -> Self {
        Self {
            lambda: 1e4,
            gamma: 1.0,
            fisher_batches: 50,
        }
    }
}

/// LwF's settings (`--method lwf`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LwfSettings {
    /// `alpha`, the distillation term's weight.
    pub alpha: f64,
    /// `T`, the softmax temperature.
    pub temperature: f64,
}

impl Default for LwfSettings {
    fn default() -> Self {
        Self {
            alpha: 1.0,
            temperature: 2.0,
        }
    }
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

pub(super) fn one() -> usize {
    1
}

fn unit() -> f64 {
    1.0
}

pub(super) fn one_expert() -> ExpansionMode {
    ExpansionMode::Fixed(1)
}

/// The paper's LoRA baseline adapts up_proj only (Table 8).
pub(super) fn paper_lora_targets() -> FfnTargets {
    FfnTargets {
        gate: false,
        up: true,
        down: false,
    }
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
    /// Expert settings (rank, alpha, dropout for every method; `--method lora` always has one
    /// expert, top-1, on `lora_targets`).
    pub moe: MoeConfig,
    /// The projections sequential LoRA adapts (paper Table 8: up_proj only).
    #[serde(default = "paper_lora_targets")]
    pub lora_targets: FfnTargets,
    /// Experts PGKE adds to each selected layer (paper: 1).
    #[serde(default = "one_expert")]
    pub experts_per_layer: ExpansionMode,
    /// How the initial experts start.
    #[serde(default)]
    pub init: InitChoice,
    /// The initial phase's data: a training file in LLaVA conversation format (images under
    /// `image_root`); default for Mini-CoIN: the generated `Initialisation/train.json`.
    #[serde(default)]
    pub init_data: Option<PathBuf>,
    /// `--method ewc`'s settings.
    #[serde(default)]
    pub ewc: EwcSettings,
    /// `--method lwf`'s settings.
    #[serde(default)]
    pub lwf: LwfSettings,
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
    /// The routers' learning rate as a multiple of the experts' in every stage (1: the
    /// paper's single learning rate).
    #[serde(default = "unit")]
    pub router_lr_scale: f64,
    /// How a new expert's router column starts: `random` (the paper) or `copy-source`, the
    /// probe router's column of the expert it copies.
    #[serde(default)]
    pub new_router_columns: NewRouterColumns,
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
        let moe = MoeConfig {
            rank: 16,
            alpha: 32.0,
            dropout: 0.05,
            top_k: 2,
            initial_experts: 4,
            ..MoeConfig::default()
        };
        let base = Self {
            model: PathBuf::from("assets/llava-mini"),
            data: MiniCoinConfig {
                train_per_task: 1500,
                test_per_task: 100,
                init_samples: 400,
                ..MiniCoinConfig::default()
            },
            method,
            router: RouterChoice::Ptl,
            plan: PlanChoice::Pgke,
            order: TaskOrder::Normal,
            tasks: Vec::new(),
            seed: 0,
            moe,
            lora_targets: paper_lora_targets(),
            experts_per_layer: one_expert(),
            init: InitChoice::Phase,
            init_data: None,
            ewc: EwcSettings::default(),
            lwf: LwfSettings::default(),
            ptl: PtlConfig {
                hidden: 128,
                latent: 16,
                n_rep: 8,
                bank_instances: 200,
                lr: Some(1e-3),
                fit_epochs: 20,
                feature_memory: 4096,
                seed: 0x5EED,
                feature: PtlFeature::Last,
            },
            // A step of 8 samples as two micro-batches of 4: one per core on a CPU backend.
            batch: 4,
            accumulation: 2,
            base_dtype: Precision::F32,
            checkpoint_every: 25,
            epochs: 2,
            lr: 1e-3,
            probe_lr: 1.5e-3,
            router_lr_scale: 1.0,
            new_router_columns: NewRouterColumns::Random,
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
                    init_samples: 16,
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

    /// Refuses settings no run can use, naming the setting and its value (a TOML file or a
    /// flag may set any of them).
    pub fn check(&self) -> anyhow::Result<()> {
        let positive = [
            ("batch", self.batch),
            ("accumulation", self.accumulation),
            ("epochs", self.epochs),
            ("eval_batch", self.eval_batch),
            ("max_new_tokens", self.max_new_tokens),
            ("probe_experts", self.probe_experts),
            ("moe.rank", self.moe.rank),
            ("moe.top_k", self.moe.top_k),
            ("moe.initial_experts", self.moe.initial_experts),
            ("ptl.hidden", self.ptl.hidden),
            ("ptl.latent", self.ptl.latent),
            ("ptl.n_rep", self.ptl.n_rep),
            ("ptl.bank_instances", self.ptl.bank_instances),
            ("data.train_per_task", self.data.train_per_task),
            ("data.test_per_task", self.data.test_per_task),
        ];
        for (name, value) in positive {
            if value == 0 {
                anyhow::bail!("setting {name} = 0: it must be at least 1");
            }
        }
        let rates = [
            ("lr", Some(self.lr)),
            ("probe_lr", Some(self.probe_lr)),
            ("router_lr_scale", Some(self.router_lr_scale)),
            ("ptl.lr", self.ptl.lr),
            ("moe.alpha", Some(self.moe.alpha)),
        ];
        for (name, value) in rates {
            if let Some(v) = value
                && !(v > 0.0 && v.is_finite())
            {
                anyhow::bail!("setting {name} = {v}: it must be a positive number");
            }
        }
        if self.moe.top_k > self.moe.initial_experts {
            anyhow::bail!(
                "setting moe.top_k = {} is more than moe.initial_experts = {}: a token cannot \
                 be routed to more experts than a layer has",
                self.moe.top_k,
                self.moe.initial_experts
            );
        }
        let fractions = [
            ("moe.dropout", self.moe.dropout, 0.0..1.0),
            (
                "probe_fraction",
                self.probe_fraction,
                f64::MIN_POSITIVE..1.0 + f64::EPSILON,
            ),
        ];
        for (name, value, range) in fractions {
            if !range.contains(&value) {
                anyhow::bail!(
                    "setting {name} = {value}: it must lie in [{}, {})",
                    range.start,
                    range.end
                );
            }
        }
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            anyhow::bail!("setting alpha = {}: it must be a number >= 0", self.alpha);
        }
        check_image_size(self.data.image_size)
    }

    /// The expert settings the method trains with: `moe`, except that sequential LoRA always
    /// has one expert (top-1) on `lora_targets`, whatever `moe` says.
    pub fn effective_moe(&self) -> MoeConfig {
        match self.method {
            Method::Lora => MoeConfig {
                initial_experts: 1,
                top_k: 1,
                targets: self.lora_targets,
                ..self.moe
            },
            _ => self.moe,
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
        if self.method == Method::Cmoe && self.experts_per_layer != one_expert() {
            name += &format!("-experts-{}", String::from(self.experts_per_layer));
        }
        if self.method == Method::Cmoe && self.ptl.feature != PtlFeature::Last {
            name += &format!("-ptl-{}", word(serde_json::json!(self.ptl.feature)));
        }
        if self.method == Method::Cmoe && self.new_router_columns != NewRouterColumns::Random {
            name += &format!(
                "-columns-{}",
                word(serde_json::json!(self.new_router_columns))
            );
        }
        if self.init != InitChoice::Phase {
            name += &format!("-init-{}", word(serde_json::json!(self.init)));
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
pub(super) fn merge_settings(
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

/// The Mini-CoIN image sizes the generator draws: 16 to 1024 pixels a side.
pub fn check_image_size(size: u32) -> anyhow::Result<()> {
    if !(16..=1024).contains(&size) {
        anyhow::bail!("Mini-CoIN image size {size}: it must be 16 to 1024 pixels");
    }
    Ok(())
}
