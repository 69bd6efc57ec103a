//! LLaVA-CMoE's continual core, generic over Burn backends.
//!
//! - [`lora`]: a LoRA expert (paper Eq. 1's `B_i A_i`).
//! - [`router`]: per-task routers and the per-layer router bank.
//! - [`moe_ffn`]: the MoE-LoRA FFN layer with sparse token dispatch.
//! - [`pgke`]: Probe-Guided Knowledge Extension's statistics, threshold and expansion plan.
//! - [`ptl`]: the Probabilistic Task Locator (per-task VAEs, primitive bank, arg-max z-score).

pub mod lora;
pub mod moe_ffn;
pub mod pgke;
pub mod ptl;
pub mod router;
