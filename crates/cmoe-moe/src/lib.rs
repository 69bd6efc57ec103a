//! LLaVA-CMoE's continual core, generic over Burn backends and over the frozen model it extends
//! (the *host*: LLaVA by default, or any Burn model that implements [`MoeHost`]). Each part of
//! the paper lives in one module:
//!
//! - [`host`]: what the core needs from a host (its gated FFN blocks, hidden states, logits).
//! - [`layer`]: Eq. 1, the MoE-LoRA layer (LoRA experts, per-task routers and their bank, the
//!   FFN with top-k routing on the device, masked or grouped dispatch, and the load-balancing
//!   aux loss).
//! - [`pgke`]: Probe-Guided Knowledge Extension (probes, activation statistics, threshold,
//!   plan, expansion).
//! - [`ptl`]: the Probabilistic Task Locator (per-task VAEs, their fitting, the primitive bank,
//!   location by arg-max z-score).
//! - [`train`]: batches and their sources, the stage loop on the four-term objective, freezing,
//!   optimiser state, stage checkpoints, data parallel.
//! - [`learner`]: Alg. 1, a continual run task by task, orchestrating the above; saved and
//!   reloaded whole.
//! - [`model`]: a host with an MoE-LoRA FFN in every FFN block, run with a chosen task's
//!   router.
//! - [`llava`] (feature `llava`, on by default): LLaVA-1.5 as a host, and generation.
//! - [`state`]: the continual state and per-task adapter packs on disk.
//! - [`baselines`]: the regularisation baselines EWC and LwF, as penalties on a stage.
//! - [`fingerprint`]: parameter digests for bit-identity checks.
//! - [`error`]: what can go wrong (running, saving, a stage), naming the file or input at fault.

pub mod baselines;
pub mod error;
pub mod fingerprint;
pub mod host;
pub mod layer;
pub mod learner;
#[cfg(feature = "llava")]
pub mod llava;
pub mod model;
pub mod pgke;
pub mod ptl;
pub mod state;
pub mod train;

pub use error::{MoeError, StageError};
pub use host::{AutodiffHost, FfnHook, GatedFfn, ModelInput, MoeHost};
pub use layer::{
    Dispatch, FfnExpert, FfnTargets, LayerRouting, LoraExpert, LoraExpertConfig, MoeLoraFfn,
    MoeLoraFfnConfig, RouterBank, RoutingCounts, TaskRouter, TaskRouterConfig,
};
pub use learner::{ContinualLearner, InferenceModel};
#[cfg(feature = "llava")]
pub use llava::{LlavaCmoe, LlavaLearner};
pub use model::{CmoeModel, MoeConfig};
pub use pgke::ExpansionPlan;
pub use ptl::{PtlConfig, PtlFeature, TaskLocator, TaskLocatorConfig, TaskVae, TaskVaeConfig};
pub use train::{StageConfig, TrainBatch};
