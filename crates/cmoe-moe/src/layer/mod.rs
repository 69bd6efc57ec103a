//! The MoE-LoRA layer of paper Eq. 1: LoRA experts, per-task routers and their bank, and the
//! layer that runs a frozen SwiGLU FFN with its experts (top-k routing on the device, masked or
//! grouped dispatch, the load-balancing aux loss).

mod lora;
mod moe_ffn;
mod router;

pub use lora::{LoraExpert, LoraExpertConfig};
pub use moe_ffn::{
    Dispatch, FfnExpert, FfnTargets, LayerRouting, MoeLoraFfn, MoeLoraFfnConfig, RoutingCounts,
};
pub use router::{RouterBank, TaskRouter, TaskRouterConfig};
