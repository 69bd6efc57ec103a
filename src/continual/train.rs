//! Training a run: the devices, the initial phase, each task (PGKE's expansion, its
//! checkpointed stage, its evaluation), and multitask training.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use burn::module::Module;
use burn::tensor::backend::Backend;
use cmoe_coin::format::{TestRecord, write_json, write_jsonl};
use cmoe_coin::mini::{self};
use cmoe_coin::score::TaskType;
use cmoe_llava::GenerationConfig;
use cmoe_moe::LlavaCmoe;
use cmoe_moe::TaskLocator;
use cmoe_moe::baselines::{Ewc, Lwf};
use cmoe_moe::learner::{Placement, Stage, TaskRecipe};
use cmoe_moe::train::TaskSource;
use cmoe_moe::train::checkpoint::{self, StageCheckpoints};
use cmoe_moe::train::{Penalty, StageConfig, StageError};
use cmoe_moe::{InferenceModel, LlavaLearner};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::config::{InitChoice, Method, PlanChoice, RouterChoice, RunConfig};
use super::devices::training_devices;
use super::eval::{Evaluator, zero_shot};
use super::folder::{
    EWC_FILE, ExpandedTask, Progress, RunLock, data_dir, image_root, read_run_file,
    save_checkpoint, start_or_resume, train_path,
};
use super::report::{Report, make_report, write_report};
use super::runtime::{AD, Runtime};
use super::stage_log::StageLog;
use crate::backend::{BackendTask, dispatch_for};
use crate::dataset::CoinEncoder;
use crate::loader::{SampleProblem, StreamSettings, StreamedTask, default_workers, load_test_set};
use crate::observer::RunObserver;

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
    /// Receives the run's progress ([`crate::observer::Silent`] ignores it).
    pub observer: Arc<dyn RunObserver>,
}

impl BackendTask for TrainTask {
    type Output = anyhow::Result<Report>;

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<Report> {
        run::<B>(self, &device)
    }
}

/// Trains (or resumes) the run `task` describes, task by task, and writes its report.
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
        observer,
    } = task;
    let observer = &*observer;
    // EWC's and LwF's penalties are computed on one device (the stage refuses more).
    let most_replicas = match config.method {
        Method::Ewc | Method::Lwf => 1,
        _ => config.accumulation.max(1),
    };
    config.check()?;
    let devices = training_devices::<B>(&devices, &backend, device, most_replicas)?;
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
    // Held until this function returns (or the process dies): one run per folder.
    let _lock = RunLock::acquire(&dir)?;
    let mut progress = start_or_resume(&config, &dir, resume)?;
    let (names, types): (Vec<String>, Vec<TaskType>) = config.task_list()?.into_iter().unzip();
    if progress.completed == names.len() {
        // A finished run (resumed with the same settings, which `start_or_resume` checked):
        // nothing is left to train, so its report is written again from its progress. This is
        // how `cargo xtask compare` reuses a run only when it was made with the same settings.
        observer.note(&format!(
            "{}: every task is done; its report is written again from its progress",
            dir.display()
        ));
        let report = make_report(&config, &progress, names);
        write_report(&report, &dir)?;
        return Ok(report);
    }
    progress.backend = backend;

    // The data: the user's CoIN folder, or Mini-CoIN generated once per run folder,
    // deterministically from its seed.
    let data_dir = data_dir(&config, &dir);
    if config.data_root.is_none() && !data_dir.join("mini-coin.json").exists() {
        observer.note(&format!("generating Mini-CoIN in {}", data_dir.display()));
        mini::generate(&config.data, &data_dir, |_| {})?;
    }
    let init_data = match config.init {
        InitChoice::Phase => Some(init_data_path(&config, &data_dir)?),
        InitChoice::FirstTask => None,
    };
    let Runtime {
        base,
        pad,
        generation,
        encoder,
    } = Runtime::<B>::load(&config, image_root(&config, &data_dir), device)?;
    let encoder = Arc::new(encoder);
    let (tests, test_problems) = load_tests(&encoder, &data_dir, &names, &config, observer)?;
    progress.test_problems = test_problems;
    let end = stop_after.map_or(names.len(), |n| n.min(names.len()));
    check_train_files(&data_dir, &names[progress.completed.min(end)..end])?;

    let mut run = Run {
        config: &config,
        dir: &dir,
        data_dir,
        names,
        types,
        tests,
        settings: Settings {
            config: &config,
            encoder: &encoder,
            pad,
            device,
            observer,
        },
        generation,
        progress,
        stop_after_expansion,
        stop_at_step,
        observer,
    };
    // Zero-shot: the base model on every task before anything trains (once per run).
    if run.progress.zero_shot.len() != run.names.len() {
        run.zero_shot(&burn::module::AutodiffModule::valid(&base))?;
    }
    let (mut learner, mut ewc) = run.learner(base, &devices)?;
    if let Some(path) = &init_data
        && !run.progress.initialised
    {
        learner = run.initial_phase(learner, &mut ewc, path)?;
    }
    if config.method == Method::Multitask {
        return run_multitask(learner, &mut run);
    }
    for t in run.progress.completed..end {
        learner = run.task(t, learner, &mut ewc)?;
    }
    if run.progress.completed < run.names.len() {
        anyhow::bail!(
            "stopped after task {} of {} as asked; continue with --resume",
            run.progress.completed,
            run.names.len()
        );
    }
    let report = make_report(&config, &run.progress, run.names);
    write_report(&report, &dir)?;
    Ok(report)
}

/// Every task's test set, and the questions each left out.
type TestSets = (Vec<Vec<TestRecord>>, Vec<Vec<SampleProblem>>);

/// The test sets of `names` under `data_dir` (their records: images are decoded when a batch
/// of questions is answered).
fn load_tests(
    encoder: &CoinEncoder,
    data_dir: &Path,
    names: &[String],
    config: &RunConfig,
    observer: &dyn RunObserver,
) -> anyhow::Result<TestSets> {
    let mut tests = Vec::with_capacity(names.len());
    let mut problems_per_task = Vec::with_capacity(names.len());
    for name in names {
        let path = data_dir.join("Instructions").join(name).join("test.json");
        let (records, problems) = load_test_set(encoder, &path, config.bad_samples)?;
        if !problems.is_empty() {
            observer.note(&format!(
                "{}: {} questions left out",
                path.display(),
                problems.len()
            ));
        }
        tests.push(records);
        problems_per_task.push(problems);
    }
    Ok((tests, problems_per_task))
}

/// Reads the training file of every task in `names` before the first step: a missing,
/// malformed or empty one stops the run now, not after the tasks before it have trained.
fn check_train_files(data_dir: &Path, names: &[String]) -> anyhow::Result<()> {
    for name in names {
        let path = train_path(data_dir, name);
        let (records, _) = cmoe_coin::format::read_train_lenient(&path)?;
        if records.is_empty() {
            anyhow::bail!("{}: no training sample", path.display());
        }
    }
    Ok(())
}

/// A run in progress: its settings, folder, tasks and test sets, and what it has measured.
pub(super) struct Run<'a, B: Backend> {
    pub(super) config: &'a RunConfig,
    pub(super) dir: &'a Path,
    pub(super) data_dir: PathBuf,
    pub(super) names: Vec<String>,
    pub(super) types: Vec<TaskType>,
    pub(super) tests: Vec<Vec<TestRecord>>,
    pub(super) settings: Settings<'a, B>,
    pub(super) generation: GenerationConfig,
    pub(super) progress: Progress,
    /// Stop once this task (1-based) has been expanded and checkpointed.
    stop_after_expansion: Option<usize>,
    /// Stop while checkpointing this (task, step) (1-based task).
    stop_at_step: Option<(usize, usize)>,
    /// Receives the run's progress.
    pub(super) observer: &'a dyn RunObserver,
}

impl<B: Backend> Run<'_, B> {
    fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn stage_dir(&self) -> PathBuf {
        self.dir.join("stage")
    }

    /// Writes `progress.json` (the measurements of a run still going).
    pub(super) fn save_progress(&self) -> anyhow::Result<()> {
        Ok(write_json(&self.dir.join("progress.json"), &self.progress)?)
    }

    /// An evaluator of `model` with this run's settings.
    pub(super) fn evaluator<'m>(
        &'m self,
        model: &'m LlavaCmoe<B>,
        locator: &'m TaskLocator<B>,
    ) -> Evaluator<'m, B> {
        Evaluator {
            model,
            locator,
            config: self.config,
            encoder: self.settings.encoder,
            pad: self.settings.pad,
            generation: &self.generation,
            device: self.settings.device,
            observer: self.observer,
        }
    }

    /// The zero-shot row: the base model on every task, before anything trains.
    fn zero_shot(&mut self, base: &cmoe_llava::Llava<B>) -> anyhow::Result<()> {
        self.observer
            .note("zero-shot: the base model on every task");
        self.progress.zero_shot = zero_shot(
            base,
            &self.tests,
            &self.names,
            &self.types,
            (
                self.settings.encoder,
                self.settings.pad,
                &self.generation,
                self.config,
            ),
            &self.dir.join("predictions").join("zero-shot"),
            self.settings.device,
            self.observer,
        )?;
        self.save_progress()
    }

    /// The learner (fresh, or the checkpoint of a resumed run) on `devices`, and online EWC's
    /// state for `--method ewc`.
    fn learner(
        &self,
        base: cmoe_llava::Llava<AD<B>>,
        devices: &[B::Device],
    ) -> anyhow::Result<(LlavaLearner<AD<B>>, Option<Ewc<AD<B>>>)> {
        let (config, progress, device) = (self.config, &self.progress, self.settings.device);
        AD::<B>::seed(device, config.seed); // the first task's fresh experts
        let resumed = progress.initialised || progress.completed > 0 || progress.expanded.is_some();
        let mut learner = if resumed {
            self.observer.note(&format!(
                "resuming after task {} of {}",
                progress.completed,
                self.names.len()
            ));
            LlavaLearner::load(base, &self.state_dir(), device)?
        } else {
            LlavaLearner::new(base, config.effective_moe(), config.ptl, device)
        };
        learner.model.set_dispatch(dispatch_for::<B>());
        if devices.len() > 1 {
            let replicas = devices.iter().filter(|&d| d == &devices[0]).count();
            if replicas == devices.len() {
                self.observer.note(&format!(
                    "data-parallel: {replicas} replicas on {:?}, one thread each",
                    devices[0]
                ));
            } else {
                self.observer.note(&format!(
                    "data-parallel over {} devices: {devices:?}",
                    devices.len()
                ));
            }
            learner = learner.on_devices(devices.to_vec());
        }
        // Online EWC's Fisher lives beside the state (its anchor is the saved model itself).
        let mut ewc = (config.method == Method::Ewc)
            .then(|| Ewc::<AD<B>>::new(config.ewc.lambda, config.ewc.gamma));
        if let Some(ewc) = &mut ewc {
            let fisher = self.state_dir().join(EWC_FILE);
            if resumed && fisher.exists() {
                ewc.load(&fisher, &learner.model)?;
            }
        }
        Ok((learner, ewc))
    }

    /// The initial phase: the initial experts (every baseline's adapters) trained on the
    /// initialisation data `path`, before any task; checkpointed.
    fn initial_phase(
        &mut self,
        learner: LlavaLearner<AD<B>>,
        ewc: &mut Option<Ewc<AD<B>>>,
        path: &Path,
    ) -> anyhow::Result<LlavaLearner<AD<B>>> {
        let (config, device) = (self.config, self.settings.device);
        let shared = config.method.shared_router();
        let started = Instant::now();
        let init_seed = config.seed ^ 0x1417_1A15;
        AD::<B>::seed(device, init_seed);
        let mut rng = StdRng::seed_from_u64(init_seed);
        self.observer
            .note(&format!("initial phase: {}", path.display()));
        let data = self.settings.open(path, &mut rng)?;
        let stage = self
            .settings
            .stage(steps(config, data.train().len()), init_seed);
        let mut observer = StageLog::new(self.observer);
        let learner = if shared {
            learner.train_shared(Stage::Initial, &data, &stage, None, |e| observer.event(e))?
        } else {
            learner.learn_initial(&data, &stage, |e| observer.event(e))?
        };
        observer.finish();
        self.consolidate(ewc, &learner, &data)?;
        let progress = &mut self.progress;
        progress.initialised = true;
        progress.initial_params = if shared {
            learner.model.moe.iter().map(Module::num_params).sum()
        } else {
            learner.initial_params()
        };
        progress.initial_seconds = started.elapsed().as_secs_f64();
        self.observer.note(&format!(
            "  initial phase: {:.0} s, {} parameters",
            progress.initial_seconds, progress.initial_params
        ));
        save_checkpoint(&learner, ewc.as_ref(), &self.progress, &self.state_dir())?;
        self.save_progress()?;
        Ok(learner)
    }

    /// Online EWC's consolidation on `data` after a stage (nothing for the other methods).
    fn consolidate(
        &self,
        ewc: &mut Option<Ewc<AD<B>>>,
        learner: &LlavaLearner<AD<B>>,
        data: &StreamedTask<AD<B>>,
    ) -> anyhow::Result<()> {
        if let Some(ewc) = ewc {
            ewc.consolidate(
                &learner.model,
                &mut *data.train(),
                self.config.ewc.fisher_batches,
            )?;
        }
        Ok(())
    }

    /// Task `t`: trained (a shared-router baseline's stage, or PGKE's expansion and the
    /// task's checkpointed stage), then every task so far evaluated; checkpointed.
    fn task(
        &mut self,
        t: usize,
        learner: LlavaLearner<AD<B>>,
        ewc: &mut Option<Ewc<AD<B>>>,
    ) -> anyhow::Result<LlavaLearner<AD<B>>> {
        let config = self.config;
        let started = Instant::now();
        // Everything random in task t (batch order, new parameters, dropout, ablation draws)
        // depends on (seed, t) only, so a resumed run continues exactly as an unbroken one.
        let task_seed = config.seed ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        AD::<B>::seed(self.settings.device, task_seed);
        let mut rng = StdRng::seed_from_u64(task_seed);
        self.observer.note(&format!(
            "task {}/{}: {}",
            t + 1,
            self.names.len(),
            self.names[t]
        ));
        let data = self
            .settings
            .open(&train_path(&self.data_dir, &self.names[t]), &mut rng)?;
        let shared = config.method.shared_router();
        // A training stage of this task that stopped at a checkpoint: the problems its
        // loading had met (the batches before the checkpoint are not read again).
        if let Some((found, at)) = checkpoint::find(&self.stage_dir())?
            && at.task == t
            && !shared
        {
            self.observer.note(&format!(
                "  resuming the training stage at step {}",
                at.step
            ));
            data.restore(read_run_file(&found.join("train_data.json"))?)?;
        }
        let recipe = self.recipe(&data, task_seed);
        let mut observer = StageLog::new(self.observer);
        let learner = if shared {
            self.train_shared(t, learner, ewc, &data, &recipe, &mut observer)?
        } else {
            self.expand_and_train(t, learner, &data, &recipe, task_seed, &mut observer)?
        };
        observer.finish();
        let progress = &mut self.progress;
        progress.train_data.truncate(t);
        progress.train_data.push(data.report());
        progress.final_loss.push(observer.final_loss());
        // A run resumed from a progress file written before the share was recorded.
        progress.final_trained_share.resize(t, None);
        progress
            .final_trained_share
            .push(Some(observer.final_trained_share()));
        progress
            .trainable_params_per_task
            .push(learner.trainable_params(t, shared));
        progress
            .experts_per_layer
            .push(learner.model.experts_per_layer());
        progress.plans = learner.meta.plans.clone();
        self.evaluate_after(t, &learner, &mut rng)?;
        self.progress
            .seconds_per_task
            .push(started.elapsed().as_secs_f64());
        self.progress.completed = t + 1;
        save_checkpoint(&learner, ewc.as_ref(), &self.progress, &self.state_dir())?;
        self.save_progress()?;
        // The task's stage checkpoints are behind it now.
        let _ = std::fs::remove_dir_all(self.stage_dir());
        Ok(learner)
    }

    /// The recipe of a task whose training data is `data`: PGKE's (or an ablation's)
    /// placement and the probe and training stages at the run's settings.
    fn recipe(&self, data: &StreamedTask<AD<B>>, task_seed: u64) -> TaskRecipe {
        let config = self.config;
        let stage = self
            .settings
            .stage(steps(config, data.train().len()), task_seed ^ 0x57A6E);
        TaskRecipe {
            probe_experts: config.probe_experts,
            alpha: config.alpha,
            placement: match config.plan {
                PlanChoice::Pgke => Placement::Probe,
                PlanChoice::EveryLayer => Placement::EveryLayer,
                PlanChoice::Random => Placement::RandomLayers { seed: config.seed },
                PlanChoice::NoExtension => Placement::Unfrozen,
            },
            per_layer: config.experts_per_layer,
            router_columns: config.new_router_columns,
            probe_stage: StageConfig {
                lr: config.probe_lr,
                steps: steps(config, data.probe_train().len()),
                ..stage
            },
            stage,
        }
    }

    /// A shared-router baseline's stage on task `t`, with EWC's or LwF's penalty.
    fn train_shared(
        &self,
        t: usize,
        learner: LlavaLearner<AD<B>>,
        ewc: &mut Option<Ewc<AD<B>>>,
        data: &StreamedTask<AD<B>>,
        recipe: &TaskRecipe,
        observer: &mut StageLog<'_>,
    ) -> anyhow::Result<LlavaLearner<AD<B>>> {
        let config = self.config;
        // LwF distils towards the model as it is before this task (none before the first
        // task without an initial phase).
        let lwf = (config.method == Method::Lwf && (t > 0 || self.progress.initialised))
            .then(|| Lwf::new(&learner.model, config.lwf.alpha, config.lwf.temperature));
        let penalty: Option<&dyn Penalty<AD<B>>> = match (&*ewc, &lwf) {
            (Some(ewc), _) if ewc.is_active() => Some(ewc),
            (_, Some(lwf)) => Some(lwf),
            _ => None,
        };
        let learner = learner.learn_shared(data, &recipe.stage, penalty, |e| observer.event(e))?;
        self.consolidate(ewc, &learner, data)?;
        Ok(learner)
    }

    /// PGKE's expansion for task `t`, checkpointed (a resumed run finds it and goes on), then
    /// the task's training stage, checkpointed every `checkpoint_every` steps.
    fn expand_and_train(
        &mut self,
        t: usize,
        learner: LlavaLearner<AD<B>>,
        data: &StreamedTask<AD<B>>,
        recipe: &TaskRecipe,
        task_seed: u64,
        observer: &mut StageLog<'_>,
    ) -> anyhow::Result<LlavaLearner<AD<B>>> {
        let (expanded, first) = match self.progress.expanded.take() {
            Some(done) if done.task == t => {
                self.observer
                    .note(&format!("  resuming after the expansion of task {}", t + 1));
                (learner, done.first)
            }
            _ => {
                let (expanded, first) =
                    learner.expand_for_task(data, recipe, |e| observer.event(e))?;
                if expanded.meta.plans.last().is_some_and(|p| p.task == t) {
                    self.progress.expanded = Some(ExpandedTask {
                        task: t,
                        first: first.clone(),
                    });
                    save_checkpoint(&expanded, None, &self.progress, &self.state_dir())?;
                    self.save_progress()?;
                    self.progress.expanded = None;
                    if self.stop_after_expansion == Some(t + 1) {
                        anyhow::bail!(
                            "stopped after the expansion of task {} as asked; continue with \
                             --resume",
                            t + 1
                        );
                    }
                }
                (expanded, first)
            }
        };
        // The training stage's randomness (dropout, new VAE) depends on (seed, t, step) only,
        // whether or not the run was resumed at a checkpoint.
        AD::<B>::seed(self.settings.device, task_seed ^ 0x7EA1);
        let stop_at_step = self.stop_at_step;
        let mut extra = |next: &Path, step: usize| -> Result<(), StageError> {
            write_json(&next.join("train_data.json"), &data.report())
                .map_err(|e| StageError::Data(format!("{e:#}")))?;
            if stop_at_step == Some((t + 1, step)) {
                return Err(StageError::Data(format!(
                    "stopped while checkpointing step {step} of task {} as asked; continue \
                     with --resume",
                    t + 1
                )));
            }
            Ok(())
        };
        let stage_dir = self.stage_dir();
        let checkpoints = StageCheckpoints {
            dir: &stage_dir,
            every: self.config.checkpoint_every,
            extra: &mut extra,
        };
        Ok(
            expanded.train_task_checkpointed(first, data, recipe, Some(checkpoints), |e| {
                observer.event(e)
            })?,
        )
    }

    /// After task `t`: every task so far through the inference router, and task `t` with its
    /// own router as well (Immediate); the answers under `predictions/after-<t>-<task>/`.
    fn evaluate_after(
        &mut self,
        t: usize,
        learner: &LlavaLearner<AD<B>>,
        rng: &mut StdRng,
    ) -> anyhow::Result<()> {
        let (config, names, types) = (self.config, &self.names, &self.types);
        let shared = config.method.shared_router();
        let InferenceModel { model, locator } = learner.valid();
        let evaluator = self.evaluator(&model, &locator);
        let answers_dir =
            self.dir
                .join("predictions")
                .join(format!("after-{}-{}", t + 1, names[t]));
        let mut row = vec![None; names.len()];
        let mut confusion = vec![vec![0usize; names.len()]; names.len()];
        for i in 0..=t {
            let (accuracy, chosen, predictions) =
                evaluator.evaluate(t, i, &self.tests[i], types[i], config.router, rng)?;
            for c in chosen {
                confusion[i][c] += 1;
            }
            // The answers in CoIN's result format, for `cmoe score` and for reading.
            write_jsonl(
                &answers_dir.join(format!("{}.jsonl", names[i])),
                &predictions,
            )?;
            self.observer
                .note(&format!("  {:<10} {accuracy:6.2}", names[i]));
            row[i] = Some(accuracy);
        }
        let via_router = row[t].unwrap_or_default();
        // Immediate: the task's own router (the same evaluation when the inference router
        // is the task's own anyway).
        if !shared && config.router != RouterChoice::Oracle {
            let (accuracy, _, predictions) =
                evaluator.evaluate(t, t, &self.tests[t], types[t], RouterChoice::Oracle, rng)?;
            write_jsonl(
                &answers_dir.join(format!("{}.own-router.jsonl", names[t])),
                &predictions,
            )?;
            self.observer.note(&format!(
                "  {:<10} {accuracy:6.2} (own router: Immediate)",
                names[t]
            ));
            row[t] = Some(accuracy);
        }
        self.progress.accuracy.push(row);
        self.progress.diagonal_via_router.push(via_router);
        self.progress.ptl_confusion = confusion;
        Ok(())
    }
}

/// Optimiser steps of `epochs` passes over `batches` micro-batches.
pub(super) fn steps(config: &RunConfig, batches: usize) -> usize {
    (config.epochs * batches)
        .div_ceil(config.accumulation.max(1))
        .max(1)
}

/// What opening training data and building its stage need.
pub(super) struct Settings<'a, B: Backend> {
    pub(super) config: &'a RunConfig,
    pub(super) encoder: &'a Arc<CoinEncoder>,
    pub(super) pad: u32,
    pub(super) device: &'a B::Device,
    /// Hears of samples left out.
    pub(super) observer: &'a dyn RunObserver,
}

impl<B: Backend> Settings<'_, B> {
    /// A training set streamed from `paths` (concatenated), in an order drawn from `rng`.
    pub(super) fn open_all(
        &self,
        paths: &[PathBuf],
        rng: &mut StdRng,
    ) -> anyhow::Result<StreamedTask<AD<B>>> {
        let config = self.config;
        let settings = StreamSettings {
            batch: config.batch,
            probe_fraction: config.probe_fraction,
            workers: default_workers(),
            pad: self.pad,
            policy: config.bad_samples,
            seed: rng.random(),
        };
        let task = StreamedTask::open_all(self.encoder.clone(), paths, settings, self.device)?;
        let report = task.report();
        if !report.problems.is_empty() {
            let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
            self.observer
                .note(&format!("  {}: {}", names.join(", "), report.summary()));
        }
        Ok(task)
    }

    /// [`Self::open_all`] for one file.
    pub(super) fn open(
        &self,
        path: &Path,
        rng: &mut StdRng,
    ) -> anyhow::Result<StreamedTask<AD<B>>> {
        self.open_all(&[path.to_path_buf()], rng)
    }

    /// A training stage of `steps` steps at the run's learning rate, reseeded from `seed`.
    pub(super) fn stage(&self, steps: usize, seed: u64) -> StageConfig {
        StageConfig {
            lr: self.config.lr,
            router_lr_scale: self.config.router_lr_scale,
            warmup_ratio: 0.03,
            steps,
            accumulation: self.config.accumulation.max(1),
            weight_decay: 0.0,
            loss: Default::default(),
            seed: Some(seed),
        }
    }
}

/// The initial phase's data: `init_data`, else Mini-CoIN's generated initialisation set.
pub(super) fn init_data_path(config: &RunConfig, data_dir: &Path) -> anyhow::Result<PathBuf> {
    if let Some(path) = &config.init_data {
        return Ok(path.clone());
    }
    let generated = data_dir.join(mini::INIT_FOLDER).join("train.json");
    if config.data_root.is_none() && generated.exists() {
        return Ok(generated);
    }
    anyhow::bail!(
        "the initial phase (init = \"phase\", the default) needs initialisation data: set \
         `init_data` to a training file that is none of the tasks (e.g. the base model's own \
         instruction mix), or pass --init first-task to let the first task train the initial \
         experts{}",
        if config.data_root.is_none() {
            format!(" ({} is missing)", generated.display())
        } else {
            String::new()
        }
    )
}

/// Multitask MoELoRA (the upper bound of Table 1): one stage over every task's training data
/// at once (as many steps as the tasks' stages together), then every task evaluated.
fn run_multitask<B: Backend>(
    mut learner: LlavaLearner<AD<B>>,
    run: &mut Run<'_, B>,
) -> anyhow::Result<Report> {
    let (config, names) = (run.config, &run.names);
    if run.progress.completed < names.len() {
        let started = Instant::now();
        let seed = config.seed ^ 0x3017_1A5C;
        AD::<B>::seed(run.settings.device, seed);
        let mut rng = StdRng::seed_from_u64(seed);
        run.observer
            .note(&format!("all {} tasks at once", names.len()));
        let paths: Vec<PathBuf> = names.iter().map(|n| train_path(&run.data_dir, n)).collect();
        let data = run.settings.open_all(&paths, &mut rng)?;
        let stage = run
            .settings
            .stage(steps(config, data.train().len()), seed ^ 0x57A6E);
        let mut observer = StageLog::new(run.observer);
        learner = learner.learn_shared(&data, &stage, None, |e| observer.event(e))?;
        observer.finish();
        let InferenceModel { model, locator } = learner.valid();
        let evaluator = run.evaluator(&model, &locator);
        let mut row = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let test = &run.tests[i];
            let (accuracy, _, predictions) =
                evaluator.evaluate(0, i, test, run.types[i], RouterChoice::Oracle, &mut rng)?;
            write_jsonl(
                &run.dir
                    .join("predictions/multitask")
                    .join(format!("{name}.jsonl")),
                &predictions,
            )?;
            run.observer.note(&format!("  {name:<10} {accuracy:6.2}"));
            row.push(Some(accuracy));
        }
        let progress = Progress {
            diagonal_via_router: row.iter().map(|a| a.unwrap_or_default()).collect(),
            accuracy: vec![row],
            train_data: vec![data.report()],
            final_loss: vec![observer.final_loss()],
            final_trained_share: vec![Some(observer.final_trained_share())],
            trainable_params_per_task: vec![learner.trainable_params(0, true)],
            experts_per_layer: vec![learner.model.experts_per_layer()],
            seconds_per_task: vec![started.elapsed().as_secs_f64()],
            completed: names.len(),
            ..run.progress.clone()
        };
        run.progress = progress;
        save_checkpoint(&learner, None, &run.progress, &run.dir.join("state"))?;
        run.save_progress()?;
    }
    let report = make_report(config, &run.progress, run.names.clone());
    write_report(&report, run.dir)?;
    Ok(report)
}
