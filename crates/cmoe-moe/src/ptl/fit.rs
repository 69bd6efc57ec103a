//! Fitting a task's VAE: in the stage's loss on the frozen base's features, then alone over
//! the feature memory; the task's primitive-bank entry.

use burn::optim::{GradientsParams, Optimizer};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};

use super::{BankEntry, FeatureMemory, PtlConfig, PtlFeature, StackedVaes, TaskVae};
use crate::host::MoeHost;
use crate::model::CmoeModel;
use crate::train::{LossWeights, StageError, TrainBatch, adamw};

/// The task VAE trained in the same loss as the experts (paper Eq. 6's KL and rec terms).
#[derive(Debug, Clone)]
pub struct VaeFit<B: AutodiffBackend> {
    /// The VAE being fitted.
    pub vae: TaskVae<B>,
    /// The base features of the batches the stage went through ([`batch_features`], computed
    /// when a batch is first met), the most recent ones.
    pub memory: FeatureMemory<B>,
    /// Its settings (draws per feature, learning rate).
    pub config: PtlConfig,
}

impl<B: AutodiffBackend> VaeFit<B> {
    /// A fresh VAE for features of width `width`, with an empty feature memory.
    pub fn new(config: PtlConfig, width: usize, device: &B::Device) -> Self {
        Self {
            vae: config.init_vae(width, device),
            memory: FeatureMemory::new(config.feature_memory.max(config.bank_instances)),
            config,
        }
    }
}

/// Trains the VAE alone for `fit.config.fit_epochs` passes over the features in its memory
/// (AdamW, constant learning rate: `fit.config.lr`, else `lr`), minimising
/// `rec + (lambda / eta) KL` (the objective's VAE terms with their relative weight).
pub fn fit_vae<B: AutodiffBackend>(
    mut fit: VaeFit<B>,
    lr: f64,
    weights: &LossWeights,
) -> VaeFit<B> {
    let mut optim = adamw(0.0).init();
    let lr = fit.config.lr.unwrap_or(lr);
    let kl_weight = if weights.rec > 0.0 {
        weights.kl / weights.rec
    } else {
        1.0
    };
    let batches: Vec<_> = fit.memory.batches().cloned().collect();
    for _ in 0..fit.config.fit_epochs {
        for features in batches.iter().cloned() {
            let loss = fit.vae.loss(features, fit.config.n_rep);
            let total = loss.rec + loss.kl * kl_weight;
            let grads = GradientsParams::from_grads(total.backward(), &fit.vae);
            fit.vae = optim.step(lr, fit.vae, grads);
        }
    }
    fit
}

/// PTL's input for one batch (at `position` of its pass, for errors): the frozen base model's
/// `feature` of each row's prompt (equal, with a causal decoder, to the feature of the prompt
/// alone), detached.
pub fn batch_features<B: Backend, H: MoeHost<B>>(
    model: &CmoeModel<B, H>,
    batch: &TrainBatch<B>,
    position: usize,
    feature: PtlFeature,
) -> Result<Tensor<B, 2>, StageError> {
    let positions = batch
        .last_prompt_positions()
        .ok_or(StageError::NoLabels(position))?;
    Ok(model
        .task_features_at(batch.input.clone(), &positions, feature)?
        .detach())
}

/// The primitive-bank entry of a task: statistics of its VAE's scores (with the fixed scoring
/// draws) on the last `config.bank_instances` training instances in `memory`.
pub fn bank_entry<B: Backend>(
    vae: &TaskVae<B>,
    memory: &FeatureMemory<B>,
    config: &PtlConfig,
) -> Result<BankEntry, StageError> {
    let recent = memory
        .recent(config.bank_instances)
        .ok_or(StageError::NoData)?;
    let scorer = StackedVaes::new(&[vae], config.locator().scoring_draws(&recent.device()));
    let scores: Vec<f64> = scorer
        .log_likelihoods(recent)
        .into_data()
        .iter::<f64>()
        .collect();
    Ok(BankEntry::from_scores(&scores))
}
