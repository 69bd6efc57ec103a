//! The MoE-LoRA layer of paper Eq. 1: LoRA experts, per-task routers and their bank, and the
//! layer that runs a frozen SwiGLU FFN with its experts (sparse top-k dispatch, the
//! load-balancing aux loss).

mod lora;
mod moe_ffn;
mod router;

pub use lora::{LoraExpert, LoraExpertConfig};
pub use moe_ffn::{FfnExpert, FfnTargets, LayerRouting, MoeLoraFfn, MoeLoraFfnConfig};
pub use router::{RouterBank, TaskRouter, TaskRouterConfig};
