//! The training stages of one task, generic over `B: AutodiffBackend`: freezing, the optimiser
//! loop, and PGKE's probe / statistics / expansion steps.
//!
//! Task 0 trains the initial experts and router_0. Each later task t:
//! 1. [`add_probes`]: `N_p` probe experts per layer (the mean of the layer's experts) and a
//!    probe router = router_{t-1} + random columns; only probes and that router train
//!    ([`train_stage`] on the probe subset).
//! 2. [`activation_stats`] on a disjoint eval subset; [`crate::pgke::plan_from_stats`].
//! 3. [`expand`]: probes dropped, each selected layer gets its new experts (copies of the most
//!    activated expert), router_t = router_{t-1} + random columns; only those train.

use std::ops::Range;

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use cmoe_llava::{LlavaError, LlavaInput};

use crate::loss::{LossTerms, LossValues, LossWeights, causal_lm_loss};
use crate::model::CmoeModel;
use crate::moe_ffn::FfnExpert;
use crate::pgke::{ActivationStats, ExpansionPlan};

/// Model inputs and per-position labels (`-100`: no loss).
#[derive(Debug, Clone)]
pub struct TrainBatch<B: Backend> {
    /// The inputs.
    pub input: LlavaInput<B>,
    /// `[batch, seq]` labels.
    pub labels: Tensor<B, 2, Int>,
}

/// Optimiser settings of one stage (paper: AdamW, warmup 0.03 then cosine).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StageConfig {
    /// Peak learning rate (paper: 2e-4, probes 3e-4).
    pub lr: f64,
    /// Fraction of steps spent warming up linearly.
    pub warmup_ratio: f64,
    /// Optimiser steps.
    pub steps: usize,
    /// AdamW weight decay.
    pub weight_decay: f32,
    /// Weights of the auxiliary terms.
    pub loss: LossWeights,
}

/// Why a stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Bad inputs.
    #[error(transparent)]
    Model(#[from] LlavaError),
    /// A batch without any answer token.
    #[error("batch {0} has no labelled position")]
    NoLabels(usize),
    /// The loss diverged.
    #[error("loss is {value} at step {step} (lr {lr}): training diverged")]
    NonFinite {
        /// Step.
        step: usize,
        /// The loss.
        value: f64,
        /// Learning rate at that step.
        lr: f64,
    },
    /// Nothing to train on.
    #[error("a stage needs at least one batch")]
    NoData,
}

/// Learning rate at `step` of `total`: linear warmup to `peak`, then cosine to zero.
pub fn learning_rate(step: usize, total: usize, peak: f64, warmup_ratio: f64) -> f64 {
    let warmup = ((total as f64 * warmup_ratio).ceil() as usize).max(1);
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}

/// Freezes every expert and router, then makes trainable task `task`'s router and, per layer,
/// the experts in `trainable[layer]`.
pub fn set_trainable<B: AutodiffBackend>(
    mut model: CmoeModel<B>,
    task: usize,
    trainable: &[Range<usize>],
) -> CmoeModel<B> {
    for (layer, range) in model.moe.iter_mut().zip(trainable) {
        let experts = std::mem::take(&mut layer.experts);
        layer.experts = experts
            .into_iter()
            .enumerate()
            .map(|(i, e)| require_grad(e, range.contains(&i)))
            .collect();
        let routers = std::mem::take(&mut layer.routers.routers);
        layer.routers.routers = routers
            .into_iter()
            .enumerate()
            .map(|(t, r)| require_grad(r, t == task))
            .collect();
    }
    model
}

/// Sets whether every float parameter of `module` takes gradients.
fn require_grad<B: Backend, M: Module<B>>(module: M, on: bool) -> M {
    struct RequireGrad(bool);
    impl<B: Backend> ModuleMapper<B> for RequireGrad {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            if param.is_require_grad() == self.0 {
                param
            } else {
                param.set_require_grad(self.0)
            }
        }
    }
    module.map(&mut RequireGrad(on))
}

/// Optimises the trainable parameters for `config.steps` steps over `batches` (cycled) with
/// task `task`'s routers; `on_step` sees every step's loss terms.
pub fn train_stage<B: AutodiffBackend>(
    mut model: CmoeModel<B>,
    task: usize,
    batches: &[TrainBatch<B>],
    config: &StageConfig,
    mut on_step: impl FnMut(usize, &LossValues),
) -> Result<CmoeModel<B>, StageError> {
    if batches.is_empty() {
        return Err(StageError::NoData);
    }
    let mut optim = AdamWConfig::new()
        .with_weight_decay(config.weight_decay)
        .init();
    for step in 0..config.steps {
        let index = step % batches.len();
        let batch = &batches[index];
        let out = model.forward(batch.input.clone(), task)?;
        let ce =
            causal_lm_loss(out.logits, batch.labels.clone()).ok_or(StageError::NoLabels(index))?;
        let layers = out.routing.len().max(1) as f64;
        let aux = out
            .routing
            .into_iter()
            .map(|r| r.aux_loss)
            .reduce(|a, b| a + b)
            .map_or_else(|| ce.zeros_like(), |sum| sum / layers);
        let zero = ce.zeros_like();
        let terms = LossTerms::new(ce, zero.clone(), zero, aux, config.loss);
        let values = terms.values();
        let lr = learning_rate(step, config.steps, config.lr, config.warmup_ratio);
        if !values.total.is_finite() {
            return Err(StageError::NonFinite {
                step,
                value: values.total,
                lr,
            });
        }
        on_step(step, &values);
        let grads = GradientsParams::from_grads(terms.total.backward(), &model);
        model = optim.step(lr, model, grads);
    }
    Ok(model)
}

/// PGKE step 1: `n_probe` probe experts per layer (each the mean of the layer's experts) and
/// the probe router for `task` = router_{task-1} + `n_probe` random columns. Returns the model
/// and the expert counts before probing.
pub fn add_probes<B: Backend>(
    mut model: CmoeModel<B>,
    task: usize,
    n_probe: usize,
) -> (CmoeModel<B>, Vec<usize>) {
    let before = model.experts_per_layer();
    for layer in &mut model.moe {
        assert_eq!(
            layer.routers.num_tasks(),
            task,
            "probing task {task} needs routers 0..{task}"
        );
        let mean = FfnExpert::mean(&layer.experts.iter().collect::<Vec<_>>());
        for _ in 0..n_probe {
            layer.experts.push(mean.duplicate());
        }
        let probe_router = layer.routers.get(task - 1).extended(n_probe);
        layer.routers.routers.push(probe_router);
    }
    (model, before)
}

/// PGKE step 2: per layer, how often each expert is among a token's top-k under `task`'s router.
pub fn activation_stats<B: Backend>(
    model: &CmoeModel<B>,
    task: usize,
    inputs: &[LlavaInput<B>],
) -> Result<ActivationStats, LlavaError> {
    let mut stats = ActivationStats::default();
    for input in inputs {
        let out = model.forward(input.clone(), task)?;
        for (layer, routing) in out.routing.iter().enumerate() {
            stats.record(layer, &routing.selections, routing.tokens);
        }
    }
    Ok(stats)
}

/// PGKE step 3: drops the probes and the probe router (layers had `before[layer]` experts),
/// adds each planned layer's experts as copies of `init_from`, and creates router_task =
/// router_{task-1} + one random column per new expert.
pub fn expand<B: Backend>(
    mut model: CmoeModel<B>,
    task: usize,
    before: &[usize],
    plan: &ExpansionPlan,
) -> CmoeModel<B> {
    for (index, layer) in model.moe.iter_mut().enumerate() {
        let grow = plan.layers.iter().find(|l| l.layer == index);
        let new: Vec<FfnExpert<B>> = grow
            .map(|g| {
                (0..g.add)
                    .map(|_| layer.experts[g.init_from].duplicate())
                    .collect()
            })
            .unwrap_or_default();
        layer.experts.truncate(before[index]);
        if layer.routers.num_tasks() > task {
            layer.routers.routers.truncate(task); // the probe router
        }
        let router = layer.routers.get(task - 1).extended(new.len());
        layer.experts.extend(new);
        layer.routers.routers.push(router);
    }
    model
}

/// The experts a task trains: from `first[layer]` (the count before the task) to the end.
pub fn new_expert_ranges<B: Backend>(model: &CmoeModel<B>, first: &[usize]) -> Vec<Range<usize>> {
    model
        .experts_per_layer()
        .iter()
        .zip(first)
        .map(|(&n, &f)| f..n)
        .collect()
}

/// The inference copy of a model (no autodiff).
pub fn inference<B: AutodiffBackend>(model: &CmoeModel<B>) -> CmoeModel<B::InnerBackend> {
    model.valid()
}
