//! What a stage is given and what it hands back: its optimiser settings, where it starts, its
//! checkpoints and an extra penalty term.

use burn::module::Module;
use burn::tensor::Tensor;
use burn::tensor::backend::AutodiffBackend;

use super::{AnswerTargets, LossWeights, OptimState, TrainBatch};
use crate::error::StageError;
use crate::layer::MoeLoraFfn;
use crate::model::CmoeModel;
use crate::ptl::VaeFit;

fn one() -> usize {
    1
}

fn unit() -> f64 {
    1.0
}

/// Optimiser settings of one stage (paper: AdamW, warmup 0.03 then cosine).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StageConfig {
    /// Peak learning rate (paper: 2e-4, probes 3e-4).
    pub lr: f64,
    /// The routers' peak learning rate as a multiple of `lr` (1: one learning rate for
    /// experts and routers, as in the paper).
    #[serde(default = "unit")]
    pub router_lr_scale: f64,
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
    /// When set, the backend is reseeded from (seed, step) before every step, so that a stage
    /// resumed at a step draws (dropout, the VAE's reparameterisation) what an unbroken one
    /// would.
    #[serde(default)]
    pub seed: Option<u64>,
}

/// What a stage in flight holds besides the model and the VAE: the optimiser steps done, how
/// far its batch source was read, and both optimisers' state. With the model, the VAE and its feature memory it is everything
/// [`train_stage_with`](super::train_stage_with) needs to continue as if it had not stopped.
pub struct StageState<B: AutodiffBackend> {
    /// Optimiser steps done.
    pub step: usize,
    /// Batches of the source's pass order used up by those steps: `step x accumulation`, plus
    /// any batch a streamed source passed over because none of its samples could be loaded.
    /// A resumed stage skips these.
    pub batches_read: usize,
    /// The experts' and routers' AdamW state, keyed by each parameter's position in the model
    /// (a reloaded model's parameter ids differ from the saved one's).
    pub optim: OptimState<B>,
    /// The VAE's AdamW state, keyed the same way.
    pub vae_optim: OptimState<B>,
}

/// A stage in flight at a checkpoint.
pub struct StageSnapshot<'a, B: AutodiffBackend, H: Module<B>> {
    /// The model after `state.step` steps.
    pub model: &'a CmoeModel<B, H>,
    /// The VAE and its feature memory, for a stage that fits one.
    pub vae: Option<&'a VaeFit<B>>,
    /// Steps and optimiser state.
    pub state: StageState<B>,
}

/// An extra term of a stage's objective beside `CE + lambda KL + eta rec + kappa aux`: a
/// baseline's regulariser (EWC's penalty, LwF's distillation; see [`crate::baselines`]).
pub trait Penalty<B: AutodiffBackend>: Sync {
    /// The weighted term for one micro-batch, from the MoE layers being trained, the batch, its
    /// answer positions and the model's logits there (`[answers, vocab]`).
    fn term(
        &self,
        moe: &[MoeLoraFfn<B>],
        batch: &TrainBatch<B>,
        answers: &AnswerTargets,
        logits: &Tensor<B, 2>,
    ) -> Result<Tensor<B, 1>, StageError>;
}

/// Where a stage starts, on which devices it runs, when it checkpoints, and any regulariser
/// added to its objective.
pub struct StageControl<'a, B: AutodiffBackend, H: Module<B>> {
    /// A stage to continue (its model and VAE are the ones passed in); `None`: from step 0.
    pub resume: Option<StageState<B>>,
    /// The devices to train on, data-parallel ([`crate::train`]); the first must be
    /// the model's. Empty: the model's device alone.
    pub devices: &'a [B::Device],
    /// Every how many steps `save` gets a [`StageSnapshot`] (0: never; never after the last
    /// step, which the caller saves as it likes).
    pub every: usize,
    /// Receives the snapshots.
    pub save: Option<&'a mut SaveSnapshot<'a, B, H>>,
    /// A regulariser added to every micro-batch's loss (one device only).
    pub penalty: Option<&'a dyn Penalty<B>>,
}

/// A receiver of [`StageSnapshot`]s.
pub type SaveSnapshot<'a, B, H> = dyn FnMut(StageSnapshot<'_, B, H>) -> Result<(), StageError> + 'a;

impl<'a, B: AutodiffBackend, H: Module<B>> StageControl<'a, B, H> {
    /// From step 0, on the model's device, no checkpoints.
    pub fn none() -> Self {
        Self::on(&[])
    }

    /// From step 0, on `devices` (see [`Self::devices`]), no checkpoints.
    pub fn on(devices: &'a [B::Device]) -> Self {
        Self {
            resume: None,
            devices,
            every: 0,
            save: None,
            penalty: None,
        }
    }

    /// These controls with `penalty` added to the objective.
    pub fn with_penalty(self, penalty: Option<&'a dyn Penalty<B>>) -> Self {
        Self { penalty, ..self }
    }
}
