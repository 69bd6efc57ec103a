//! LLaVA-CMoE's continual core, generic over Burn backends. Each part of the paper lives in
//! one module:
//!
//! - [`layer`]: Eq. 1, the MoE-LoRA layer (LoRA experts, per-task routers and their bank, the
//!   FFN with sparse top-k dispatch and the load-balancing aux loss).
//! - [`pgke`]: Probe-Guided Knowledge Extension (probes, activation statistics, threshold,
//!   plan, expansion).
//! - [`ptl`]: the Probabilistic Task Locator (per-task VAEs, their fitting, the primitive bank,
//!   location by arg-max z-score).
//! - [`train`]: batches and their sources, the stage loop on the four-term objective, freezing,
//!   optimiser state, stage checkpoints, data parallel.
//! - [`learner`]: Alg. 1, a continual run task by task, orchestrating the above; saved and
//!   reloaded whole.
//! - [`model`]: LLaVA with an MoE-LoRA FFN in every decoder layer, run with a chosen task's
//!   router.
//! - [`state`]: the continual state and per-task adapter packs on disk.
//! - [`baselines`]: the regularisation baselines EWC and LwF, as penalties on a stage.
//! - [`fingerprint`]: parameter digests for bit-identity checks.

pub mod baselines;
pub mod fingerprint;
pub mod layer;
pub mod learner;
pub mod model;
pub mod pgke;
pub mod ptl;
pub mod state;
pub mod train;

pub use layer::{
    FfnExpert, FfnTargets, LayerRouting, LoraExpert, LoraExpertConfig, MoeLoraFfn,
    MoeLoraFfnConfig, RouterBank, TaskRouter, TaskRouterConfig,
};
pub use learner::ContinualLearner;
pub use model::{CmoeModel, MoeConfig};
pub use pgke::ExpansionPlan;
pub use ptl::{PtlConfig, PtlFeature, TaskLocator, TaskLocatorConfig, TaskVae, TaskVaeConfig};
pub use train::{StageConfig, TrainBatch};
