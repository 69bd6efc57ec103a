//! LLaVA-CMoE's continual core, generic over Burn backends.
//!
//! - [`baselines`]: the regularisation baselines EWC and LwF, as penalties on a stage.
//! - [`checkpoint`]: checkpoints of a training stage in flight, to resume a crashed stage.
//! - [`data_parallel`]: a stage's steps spread over several devices.
//! - [`fingerprint`]: parameter digests for bit-identity checks.
//! - [`lora`]: a LoRA expert (paper Eq. 1's `B_i A_i`).
//! - [`learner`]: a continual run task by task (PGKE, VAE, bank), saved and reloaded whole.
//! - [`loss`]: the four-term objective and the answer-only cross-entropy.
//! - [`model`]: LLaVA with an MoE-LoRA FFN in every decoder layer, run with a chosen task's router.
//! - [`router`]: per-task routers and the per-layer router bank.
//! - [`source`]: where a stage's batches come from (in memory, or streamed by a caller).
//! - [`moe_ffn`]: the MoE-LoRA FFN layer with sparse token dispatch.
//! - [`pgke`]: Probe-Guided Knowledge Extension's statistics, threshold and expansion plan.
//! - [`ptl`]: the Probabilistic Task Locator (per-task VAEs, primitive bank, arg-max z-score).
//! - [`stages`]: freezing, the training loop, and PGKE's probe / statistics / expansion steps.
//! - [`state`]: saving / loading the whole continual state, and per-task adapter packs.

pub mod baselines;
pub mod checkpoint;
pub mod data_parallel;
pub mod fingerprint;
pub mod learner;
pub mod lora;
pub mod loss;
pub mod model;
pub mod moe_ffn;
pub mod noise;
pub mod pgke;
pub mod ptl;
pub mod router;
pub mod source;
pub mod stages;
pub mod state;

pub use learner::ContinualLearner;
pub use lora::{LoraExpert, LoraExpertConfig};
pub use model::{CmoeModel, MoeConfig};
pub use moe_ffn::{FfnExpert, FfnTargets, LayerRouting, MoeLoraFfn, MoeLoraFfnConfig};
pub use ptl::{PtlConfig, PtlFeature, TaskLocator, TaskLocatorConfig, TaskVae, TaskVaeConfig};
pub use router::{RouterBank, TaskRouter, TaskRouterConfig};
