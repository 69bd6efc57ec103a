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
//!
//! The main stage of every task also fits the task's VAE in the same loss ([`train_stage_with`]),
//! on the frozen base's features ([`base_features`]), and [`bank_entry`] then scores the task's
//! last training instances for the primitive bank.

use std::ops::Range;

use burn::module::{AutodiffModule, Module, ModuleMapper, Param};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};
use cmoe_llava::{LlavaError, LlavaInput};

use crate::loss::{LossTerms, LossValues, LossWeights, causal_lm_loss};
use crate::model::CmoeModel;
use crate::moe_ffn::FfnExpert;
use crate::pgke::{ActivationStats, ExpansionPlan};
use crate::ptl::{BankEntry, PtlConfig, StackedVaes, TaskVae};

/// Model inputs and per-position labels (`-100`: no loss).
#[derive(Debug, Clone)]
pub struct TrainBatch<B: Backend> {
    /// The inputs.
    pub input: LlavaInput<B>,
    /// `[batch, seq]` labels.
    pub labels: Tensor<B, 2, Int>,
}

impl<B: Backend> TrainBatch<B> {
    /// Per row, the position of the last prompt token (the one before the first labelled
    /// position): where PTL reads its feature.
    pub fn last_prompt_positions(&self) -> Option<Vec<usize>> {
        let [rows, seq] = self.labels.dims();
        let labels: Vec<i64> = self.labels.to_data().iter::<i64>().collect();
        (0..rows)
            .map(|r| {
                let row = &labels[r * seq..(r + 1) * seq];
                row.iter()
                    .position(|&l| l != crate::loss::IGNORE_INDEX)
                    .filter(|&first| first > 0)
                    .map(|first| first - 1)
            })
            .collect()
    }
}

fn one() -> usize {
    1
}

/// Optimiser settings of one stage (paper: AdamW, warmup 0.03 then cosine).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageConfig {
    /// Peak learning rate (paper: 2e-4, probes 3e-4).
    pub lr: f64,
    /// Fraction of steps spent warming up linearly.
    pub warmup_ratio: f64,
    /// Optimiser steps.
    pub steps: usize,
    /// Micro-batches per optimiser step, their gradients summed (gradient accumulation: the
    /// paper's global batch 128 from smaller micro-batches); 1 for none.
    #[serde(default = "one")]
    pub accumulation: usize,
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

/// The task VAE trained in the same loss as the experts (paper Eq. 6's KL and rec terms).
#[derive(Debug, Clone)]
pub struct VaeFit<B: AutodiffBackend> {
    /// The VAE being fitted.
    pub vae: TaskVae<B>,
    /// Per batch (same order as the stage's batches), the base features `[rows, d]`.
    pub features: Vec<Tensor<B, 2>>,
    /// Its settings (draws per feature, learning rate).
    pub config: PtlConfig,
}

/// Optimises the trainable parameters for `config.steps` steps over `batches` (cycled) with
/// task `task`'s routers on `CE + kappa * aux`; `on_step` sees every step's loss terms.
pub fn train_stage<B: AutodiffBackend>(
    model: CmoeModel<B>,
    task: usize,
    batches: &[TrainBatch<B>],
    config: &StageConfig,
    on_step: impl FnMut(usize, &LossValues),
) -> Result<CmoeModel<B>, StageError> {
    train_stage_with(model, None, task, batches, config, on_step).map(|(model, _)| model)
}

/// [`train_stage`] on the full objective `CE + lambda KL + eta rec + kappa aux` when `vae` is
/// given: the VAE's parameters are disjoint from the experts', each set has its own AdamW
/// state, and both step on the gradients of one backward pass.
pub fn train_stage_with<B: AutodiffBackend>(
    mut model: CmoeModel<B>,
    mut vae: Option<VaeFit<B>>,
    task: usize,
    batches: &[TrainBatch<B>],
    config: &StageConfig,
    mut on_step: impl FnMut(usize, &LossValues),
) -> Result<(CmoeModel<B>, Option<VaeFit<B>>), StageError> {
    if batches.is_empty() {
        return Err(StageError::NoData);
    }
    if let Some(fit) = &vae {
        assert_eq!(
            fit.features.len(),
            batches.len(),
            "one feature batch per batch"
        );
    }
    let adamw = AdamWConfig::new().with_weight_decay(config.weight_decay);
    let mut optim = adamw.init();
    let mut vae_optim = adamw.init();
    let micro = config.accumulation.max(1);
    for step in 0..config.steps {
        let lr = learning_rate(step, config.steps, config.lr, config.warmup_ratio);
        let mut model_grads = GradientsAccumulator::<CmoeModel<B>>::new();
        let mut vae_grads = GradientsAccumulator::<TaskVae<B>>::new();
        let mut mean = LossValues::default();
        // Batch `step * micro + k` of the cycle, for each micro-batch `k` of this step.
        for index in (step * micro..(step + 1) * micro).map(|i| i % batches.len()) {
            let batch = &batches[index];
            let out = model.forward(batch.input.clone(), task)?;
            let ce = causal_lm_loss(out.logits, batch.labels.clone())
                .ok_or(StageError::NoLabels(index))?;
            let layers = out.routing.len().max(1) as f64;
            let aux = out
                .routing
                .into_iter()
                .map(|r| r.aux_loss)
                .reduce(|a, b| a + b)
                .map_or_else(|| ce.zeros_like(), |sum| sum / layers);
            let (kl, rec) = match &vae {
                Some(fit) => {
                    let loss = fit.vae.loss(fit.features[index].clone(), fit.config.n_rep);
                    (loss.kl, loss.rec)
                }
                None => (ce.zeros_like(), ce.zeros_like()),
            };
            let terms = LossTerms::new(ce, kl, rec, aux, config.loss);
            let values = terms.values();
            if !values.total.is_finite() {
                return Err(StageError::NonFinite {
                    step,
                    value: values.total,
                    lr,
                });
            }
            mean.add_scaled(&values, 1.0 / micro as f64);
            // The step's loss is the mean over its micro-batches.
            let total = if micro > 1 {
                terms.total / micro as f64
            } else {
                terms.total
            };
            let mut grads = total.backward();
            model_grads.accumulate(&model, GradientsParams::from_module(&mut grads, &model));
            if let Some(fit) = &vae {
                vae_grads.accumulate(&fit.vae, GradientsParams::from_module(&mut grads, &fit.vae));
            }
        }
        on_step(step, &mean);
        model = optim.step(lr, model, model_grads.grads());
        if let Some(mut fit) = vae.take() {
            let vae_lr = fit.config.lr.map_or(lr, |peak| {
                learning_rate(step, config.steps, peak, config.warmup_ratio)
            });
            fit.vae = vae_optim.step(vae_lr, fit.vae, vae_grads.grads());
            vae = Some(fit);
        }
    }
    Ok((model, vae))
}

/// Trains the VAE alone for `fit.config.fit_epochs` passes over its cached features (AdamW,
/// constant learning rate: `fit.config.lr`, else `lr`), minimising `rec + (lambda / eta) KL`
/// (the objective's VAE terms with their relative weight).
pub fn fit_vae<B: AutodiffBackend>(
    mut fit: VaeFit<B>,
    lr: f64,
    weights: &LossWeights,
) -> VaeFit<B> {
    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let lr = fit.config.lr.unwrap_or(lr);
    let kl_weight = if weights.rec > 0.0 {
        weights.kl / weights.rec
    } else {
        1.0
    };
    for _ in 0..fit.config.fit_epochs {
        for features in fit.features.clone() {
            let loss = fit.vae.loss(features, fit.config.n_rep);
            let total = loss.rec + loss.kl * kl_weight;
            let grads = GradientsParams::from_grads(total.backward(), &fit.vae);
            fit.vae = optim.step(lr, fit.vae, grads);
        }
    }
    fit
}

/// PTL's inputs for a stage: per batch, the frozen base model's feature at each row's last
/// prompt token (equal, with a causal decoder, to the feature of the prompt alone), detached.
pub fn base_features<B: Backend>(
    model: &CmoeModel<B>,
    batches: &[TrainBatch<B>],
) -> Result<Vec<Tensor<B, 2>>, StageError> {
    batches
        .iter()
        .enumerate()
        .map(|(i, batch)| {
            let positions = batch
                .last_prompt_positions()
                .ok_or(StageError::NoLabels(i))?;
            Ok(model
                .task_features_at(batch.input.clone(), &positions)?
                .detach())
        })
        .collect()
}

/// The primitive-bank entry of a task: statistics of its VAE's scores (with the fixed scoring
/// draws) on the last `config.bank_instances` training instances of a stage that went through
/// `steps` batches of `features` (one entry per batch, visited cyclically as [`train_stage`]
/// does: optimiser steps x accumulation).
pub fn bank_entry<B: Backend>(
    vae: &TaskVae<B>,
    features: &[Tensor<B, 2>],
    steps: usize,
    config: &PtlConfig,
) -> BankEntry {
    let device = features[0].device();
    let scorer = StackedVaes::new(&[vae], config.scoring_draws(&device));
    let mut recent = Vec::new();
    let mut rows = 0;
    for step in (0..steps.max(1)).rev() {
        let batch = features[step % features.len()].clone();
        rows += batch.dims()[0];
        recent.push(batch);
        if rows >= config.bank_instances || recent.len() >= features.len() {
            break;
        }
    }
    let scores: Vec<f64> = scorer
        .log_likelihoods(Tensor::cat(recent, 0))
        .into_data()
        .iter::<f64>()
        .take(config.bank_instances.max(1))
        .collect();
    BankEntry::from_scores(&scores)
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
