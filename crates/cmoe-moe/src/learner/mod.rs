//! A continual run over a stream of tasks (paper Alg. 1): the model, every task's VAE, the
//! primitive bank and the PGKE plans, advanced one task at a time by
//! [`ContinualLearner::learn_task`], saved and reloaded whole, and queried without task labels
//! through a [`TaskLocator`].

use std::path::Path;

use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};

use crate::error::MoeError;
use crate::host::AutodiffHost;
use crate::model::{CmoeModel, MoeConfig};
use crate::pgke::{
    ExpansionPlan, PlanSource, activation_stats, add_probes, expand, new_expert_ranges,
};
use crate::ptl::{PrimitiveBank, PtlConfig, TaskLocator, TaskVae, VaeFit, bank_entry, fit_vae};
use crate::state::{ContinualMeta, ContinualTensors};
use crate::train::checkpoint::{self, StageCheckpoints};
use crate::train::{
    BatchSource, Penalty, SaveSnapshot, StageConfig, StageControl, StageError, StageSnapshot,
    set_trainable, train_stage_with,
};
pub use crate::train::{TaskData, TaskSource};

mod recipe;
use recipe::place;
pub use recipe::{LearnEvent, Placement, Stage, TaskRecipe};

/// The whole continual state during training.
#[derive(Debug)]
pub struct ContinualLearner<B: AutodiffBackend, H: AutodiffHost<B>> {
    /// Base model and every layer's experts and routers.
    pub model: CmoeModel<B, H>,
    /// `vaes[t]`: task `t`'s VAE.
    pub vaes: Vec<TaskVae<B>>,
    /// Config, bank, plans and where each task's experts start.
    pub meta: ContinualMeta,
    /// The devices the training stages run on, data-parallel ([`crate::train`]); the
    /// first is the model's. Empty: the model's device alone. Not saved.
    pub devices: Vec<B::Device>,
}

impl<B: AutodiffBackend, H: AutodiffHost<B>> ContinualLearner<B, H> {
    /// A learner with no task learned yet: `base` frozen, the first task's experts fresh.
    pub fn new(base: H, config: MoeConfig, ptl: PtlConfig, device: &B::Device) -> Self {
        Self {
            model: CmoeModel::new(base, &config, device),
            vaes: Vec::new(),
            meta: ContinualMeta {
                config,
                ptl,
                bank: PrimitiveBank::default(),
                plans: Vec::new(),
                first_expert: Vec::new(),
            },
            devices: Vec::new(),
        }
    }

    /// The learner with its stages spread over `devices` (see [`Self::devices`]); the model
    /// and VAEs move to the first.
    pub fn on_devices(self, devices: Vec<B::Device>) -> Self {
        let Some(main) = devices.first() else {
            return Self { devices, ..self };
        };
        Self {
            model: self.model.fork(main),
            vaes: self.vaes.into_iter().map(|vae| vae.fork(main)).collect(),
            meta: self.meta,
            devices,
        }
    }

    /// Tasks learned so far.
    pub fn tasks_learned(&self) -> usize {
        self.meta.first_expert.len()
    }

    /// Learns the next task. After [`Self::learn_initial`], every task runs PGKE (probes,
    /// statistics, plan, expansion; paper Alg. 1); without it the first task trains the
    /// initial experts itself and PGKE starts with the second. Then the task's experts,
    /// router and VAE train on `CE + lambda KL + eta rec + kappa aux`, and its bank entry is
    /// recorded. Nothing that belongs to an earlier task changes. The same as
    /// [`Self::expand_for_task`] then [`Self::train_task`], between which a caller may
    /// checkpoint.
    pub fn learn_task(
        self,
        data: &impl TaskSource<B>,
        recipe: &TaskRecipe,
        mut observe: impl FnMut(LearnEvent<'_>),
    ) -> Result<Self, StageError> {
        let (learner, first) = self.expand_for_task(data, recipe, &mut observe)?;
        learner.train_task(first, data, recipe, observe)
    }

    /// The first half of [`Self::learn_task`]: PGKE's probe stage, statistics, plan and
    /// expansion (the plan is recorded), or for [`Placement::Unfrozen`] the task's router
    /// alone; the first task without an initial phase has nothing to expand. Returns the
    /// learner and, per layer, the index of the first expert the task trains. The learner can
    /// be saved and reloaded here; [`Self::train_task`] continues.
    pub fn expand_for_task(
        self,
        data: &impl TaskSource<B>,
        recipe: &TaskRecipe,
        mut observe: impl FnMut(LearnEvent<'_>),
    ) -> Result<(Self, Vec<usize>), StageError> {
        let Self {
            mut model,
            vaes,
            mut meta,
            devices,
        } = self;
        let task = meta.first_expert.len();
        let layers = model.moe.len();
        if task == 0 && !model.has_initial_router() {
            return Ok((
                Self {
                    model,
                    vaes,
                    meta,
                    devices,
                },
                vec![0; layers],
            ));
        }
        if recipe.placement == Placement::Unfrozen {
            let plan = ExpansionPlan::uniform(task, PlanSource::Unfrozen, [], 0, 0);
            observe(LearnEvent::Planned(&plan));
            let before = model.experts_per_layer();
            model = expand(model, task, &before, &plan, recipe.router_columns)?;
            meta.plans.push(plan);
            let learner = Self {
                model,
                vaes,
                meta,
                devices,
            };
            return Ok((learner, vec![0; layers]));
        }
        let (probed, before) = add_probes(model, task, recipe.probe_experts)?;
        let probes = new_expert_ranges(&probed, &before);
        let probed = set_trainable(probed, task, &probes);
        let stage = &recipe.probe_stage;
        let (probed, _) = observed_stage(
            Stage::Probe,
            (probed, None),
            task,
            &mut *data.probe_train(),
            stage,
            StageControl::on(&devices),
            &mut observe,
        )?;
        let stats = activation_stats(&probed, task, &mut *data.probe_eval())?;
        let plan = place(recipe, task, &stats, &before);
        observe(LearnEvent::Planned(&plan));
        let model = expand(probed, task, &before, &plan, recipe.router_columns)?;
        meta.plans.push(plan);
        Ok((
            Self {
                model,
                vaes,
                meta,
                devices,
            },
            before,
        ))
    }

    /// The initial phase (paper: the initial experts are trained first, on initialisation
    /// data that is none of the tasks): every initial expert and a router train on `data`
    /// with `CE + kappa aux`; the router is then kept as the layers' initial router, which the
    /// first task's router extends. Only before the first task.
    pub fn learn_initial(
        self,
        data: &impl TaskSource<B>,
        stage: &StageConfig,
        mut observe: impl FnMut(LearnEvent<'_>),
    ) -> Result<Self, StageError> {
        if self.tasks_learned() > 0 || self.model.has_initial_router() {
            return Err(StageError::Config(
                "the initial phase comes before the first task, once".into(),
            ));
        }
        let Self {
            model,
            vaes,
            meta,
            devices,
        } = self;
        let everything: Vec<_> = model.experts_per_layer().iter().map(|&n| 0..n).collect();
        let model = set_trainable(model, 0, &everything);
        let (mut model, _) = observed_stage(
            Stage::Initial,
            (model, None),
            0,
            &mut *data.train(),
            stage,
            StageControl::on(&devices),
            &mut observe,
        )?;
        for layer in &mut model.moe {
            let router = layer.routers.routers.remove(0);
            layer.routers.initial = Some(router);
        }
        let model = set_trainable(model, 0, &vec![0..0; everything.len()]);
        Ok(Self {
            model,
            vaes,
            meta,
            devices,
        })
    }

    /// The second half of [`Self::learn_task`]: the experts from `first` on (per layer), the
    /// task's router and its VAE train together, then the task's bank entry is recorded.
    pub fn train_task(
        self,
        first: Vec<usize>,
        data: &impl TaskSource<B>,
        recipe: &TaskRecipe,
        observe: impl FnMut(LearnEvent<'_>),
    ) -> Result<Self, StageError> {
        self.train_task_checkpointed(first, data, recipe, None, observe)
    }

    /// [`Self::train_task`] with checkpoints of the stage in flight: it continues from the
    /// checkpoint in `checkpoints.dir` if that belongs to this task, and writes one every
    /// `checkpoints.every` steps (see [`crate::train::checkpoint`]). The checkpoint folder is left in
    /// place; a later task ignores it.
    pub fn train_task_checkpointed(
        self,
        first: Vec<usize>,
        data: &impl TaskSource<B>,
        recipe: &TaskRecipe,
        checkpoints: Option<StageCheckpoints<'_>>,
        mut observe: impl FnMut(LearnEvent<'_>),
    ) -> Result<Self, StageError> {
        // The VAE reads the base's last hidden state (at the last prompt token, pooled, or
        // both).
        let width = self
            .meta
            .ptl
            .feature
            .width(self.widths().first().map_or(0, |w| w.0));
        let device = self.model.devices().into_iter().next().unwrap_or_default();
        let Self {
            mut model,
            mut vaes,
            mut meta,
            devices,
        } = self;
        let task = meta.first_expert.len();
        let experts = model.experts_per_layer();
        if first.len() != experts.len() || first.iter().zip(&experts).any(|(f, n)| f > n) {
            return Err(StageError::Model(MoeError::Input(format!(
                "first new experts {first:?} do not fit a model with experts {experts:?}"
            ))));
        }
        let stage = &recipe.stage;
        let mut fit = Some(VaeFit::new(meta.ptl, width, &device));
        let resume = match &checkpoints {
            Some(c) => checkpoint::load(c.dir, task, &first, stage, &mut model, &mut fit)?,
            None => None,
        };
        let trainable = new_expert_ranges(&model, &first);
        let model = set_trainable(model, task, &trainable);
        let first_new = &first;
        let mut saver = checkpoints.map(|StageCheckpoints { dir, every, extra }| {
            let save = move |snapshot: StageSnapshot<'_, B, H>| {
                checkpoint::save(dir, task, first_new, stage, snapshot, &mut *extra)
            };
            (every, save)
        });
        let control = StageControl {
            resume,
            devices: &devices,
            every: saver.as_ref().map_or(0, |(every, _)| *every),
            save: saver
                .as_mut()
                .map(|(_, save)| save as &mut SaveSnapshot<'_, B, H>),
            penalty: None,
        };
        let (model, fit) = observed_stage(
            Stage::Train,
            (model, fit),
            task,
            &mut *data.train(),
            stage,
            control,
            &mut observe,
        )?;
        let fit = fit.expect("train_stage_with returns the VAE it was given");
        let fit = fit_vae(fit, stage.lr, &stage.loss);
        let entry = bank_entry(&fit.vae, &fit.memory, &meta.ptl)?;
        meta.bank.entries.push(entry);
        meta.first_expert.push(first);
        vaes.push(fit.vae);
        Ok(Self {
            model,
            vaes,
            meta,
            devices,
        })
    }

    /// The baselines' step (sequential LoRA, CoIN's MoELoRA, EWC, LwF): every expert and the
    /// one shared router (router 0) train on the task with `CE + kappa aux` plus `penalty`
    /// (EWC's, LwF's); nothing grows, no VAE. The task is recorded as learned.
    pub fn learn_shared(
        self,
        data: &impl TaskSource<B>,
        stage: &StageConfig,
        penalty: Option<&dyn Penalty<B>>,
        observe: impl FnMut(LearnEvent<'_>),
    ) -> Result<Self, StageError> {
        let mut learner = self.train_shared(Stage::Train, data, stage, penalty, observe)?;
        learner
            .meta
            .first_expert
            .push(vec![0; learner.model.moe.len()]);
        Ok(learner)
    }

    /// [`Self::learn_shared`]'s training without recording a task: a baseline's initial phase
    /// ([`Stage::Initial`]) or its step on a task.
    pub fn train_shared(
        self,
        which: Stage,
        data: &impl TaskSource<B>,
        stage: &StageConfig,
        penalty: Option<&dyn Penalty<B>>,
        mut observe: impl FnMut(LearnEvent<'_>),
    ) -> Result<Self, StageError> {
        let Self {
            model,
            vaes,
            meta,
            devices,
        } = self;
        let everything: Vec<_> = model.experts_per_layer().iter().map(|&n| 0..n).collect();
        let model = set_trainable(model, 0, &everything);
        let (model, _) = observed_stage(
            which,
            (model, None),
            0,
            &mut *data.train(),
            stage,
            StageControl::on(&devices).with_penalty(penalty),
            &mut observe,
        )?;
        Ok(Self {
            model,
            vaes,
            meta,
            devices,
        })
    }

    /// Parameters the initial phase trained: every initial expert and the initial routers (0
    /// without an initial phase).
    pub fn initial_params(&self) -> usize {
        let first_task = self.meta.first_expert.first();
        self.model
            .moe
            .iter()
            .enumerate()
            .filter_map(|(l, layer)| {
                let router = layer.routers.initial.as_ref()?;
                let end = first_task.map_or(layer.experts.len(), |f| f[l]);
                let experts: usize = layer.experts[..end].iter().map(Module::num_params).sum();
                Some(experts + router.num_params())
            })
            .sum()
    }

    /// Parameters task `task` trained: its experts (from `first_expert[task]`, or every expert
    /// for a shared-router baseline), its router and its VAE.
    pub fn trainable_params(&self, task: usize, shared: bool) -> usize {
        let first = &self.meta.first_expert[task];
        let end = |layer: usize, n: usize| {
            self.meta
                .first_expert
                .get(task + 1)
                .map_or(n, |next| next[layer])
        };
        let router = if shared { 0 } else { task };
        let mut total = 0;
        for (l, layer) in self.model.moe.iter().enumerate() {
            let n = layer.experts.len();
            let range = if shared { 0..n } else { first[l]..end(l, n) };
            total += layer.experts[range]
                .iter()
                .map(Module::num_params)
                .sum::<usize>();
            total += layer.routers.get(router).num_params();
        }
        total + self.vaes.get(task).map_or(0, Module::num_params)
    }

    /// `(d_model, d_ff)` of every FFN block of the host.
    fn widths(&self) -> Vec<(usize, usize)> {
        let widths = self.model.base.ffn_widths();
        widths.into_iter().map(|[d, d_ff]| (d, d_ff)).collect()
    }

    /// Saves everything but the base model to `dir` (see [`crate::state`]).
    pub fn save(&self, dir: &Path) -> Result<(), MoeError> {
        let tensors = ContinualTensors {
            moe: self.model.moe.clone(),
            vaes: self.vaes.clone(),
        };
        tensors.save(&self.meta, &self.widths(), dir)
    }

    /// Reloads a state saved by [`Self::save`] on top of `base`, which must be the model it was
    /// trained on (layer count and FFN widths are checked).
    pub fn load(base: H, dir: &Path, device: &B::Device) -> Result<Self, MoeError> {
        let (tensors, meta) = ContinualTensors::load(dir, device)?;
        let learner = Self {
            model: CmoeModel {
                base: base.no_grad(),
                moe: tensors.moe,
            },
            vaes: tensors.vaes,
            meta,
            devices: Vec::new(),
        };
        let widths = learner.widths();
        let fits = learner.model.moe.len() == widths.len()
            && learner
                .model
                .moe
                .iter()
                .zip(&widths)
                .all(|(layer, &(h, _))| {
                    layer
                        .routers
                        .routers
                        .iter()
                        .all(|r| r.weight.dims()[0] == h)
                });
        if !fits {
            return Err(MoeError::io(
                &dir.join("state.json"),
                format!(
                    "the state has {} MoE layers that do not fit this base model ({} layers of \
                     widths {widths:?})",
                    learner.model.moe.len(),
                    widths.len()
                ),
            ));
        }
        Ok(learner)
    }

    /// The inference copy: model and locator without autodiff.
    pub fn valid(&self) -> InferenceModel<B::InnerBackend, H::InnerModule> {
        let model = self.model.valid();
        let vaes: Vec<_> = self.vaes.iter().map(AutodiffModule::valid).collect();
        let device = model.devices().into_iter().next().unwrap_or_default();
        let locator = self
            .meta
            .ptl
            .locator()
            .init(&vaes, self.meta.bank.clone(), &device);
        InferenceModel { model, locator }
    }
}

/// What a learner answers with ([`ContinualLearner::valid`]): the model with every task's
/// router, and PTL's locator that picks the router of an unlabelled question.
#[derive(Debug)]
pub struct InferenceModel<B: Backend, H: Module<B>> {
    /// The base, the experts and every task's routers, without autodiff.
    pub model: CmoeModel<B, H>,
    /// Every task's VAE and bank entry.
    pub locator: TaskLocator<B>,
}

/// [`train_stage_with`] on `start` (model and VAE) reported to `observe` as stage `which`: its
/// start (with the steps a resumed stage has done), then every step's loss terms.
fn observed_stage<B: AutodiffBackend, H: AutodiffHost<B>>(
    which: Stage,
    start: (CmoeModel<B, H>, Option<VaeFit<B>>),
    task: usize,
    source: &mut dyn BatchSource<B>,
    config: &StageConfig,
    control: StageControl<'_, B, H>,
    observe: &mut impl FnMut(LearnEvent<'_>),
) -> Result<(CmoeModel<B, H>, Option<VaeFit<B>>), StageError> {
    observe(LearnEvent::StageStarted {
        stage: which,
        steps: config.steps,
        done: control.resume.as_ref().map_or(0, |r| r.step),
    });
    let (model, vae) = start;
    train_stage_with(model, vae, task, source, config, control, |step, loss| {
        observe(LearnEvent::Step {
            stage: which,
            step,
            loss,
        })
    })
}
