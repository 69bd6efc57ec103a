//! LLaVA-CMoE on Burn.
//!
//! This facade re-exports the workspace crates and holds what needs a concrete backend:
//! the backend choice ([`backend`]), tensor file helpers ([`tensor_io`]) and the pipelines the
//! `cmoe` CLI and `cargo xtask` drive ([`pipeline`], [`bench`]), a run's memory planned from
//! its shapes ([`memory_plan`]) and checked by measurement ([`memory_proxy`], [`alloc_meter`]),
//! the transformers parity check the GPU check runs ([`parity`]), and CoIN records to batches
//! ([`dataset`]), the small LLaVA's pretraining ([`pretrain`]), how well a base follows
//! instructions ([`instruction_accuracy`]) and the continual runner ([`continual`]), which
//! report their progress to a [`observer::RunObserver`] and print nothing themselves.
//!
//! - [`llava`] (`cmoe-llava`): the LLaVA-1.5 model, HF import, generation.
//! - [`data`] (`cmoe-data`): image preprocessing, tokenizer, prompt templates.
//! - [`moe`] (`cmoe-moe`): the continual core (MoE-LoRA layers, router bank, PGKE, PTL).
//! - [`coin`] (`cmoe-coin`): CoIN's formats and scorers.

pub mod alloc_meter;
pub mod backend;
pub mod bench;
pub mod continual;
pub mod dataset;
pub mod instruction_accuracy;
pub mod loader;
pub mod memory_plan;
pub mod memory_proxy;
pub mod observer;
pub mod parity;
pub mod pipeline;
pub mod plots;
pub mod pretrain;
pub mod tensor_io;

pub use cmoe_coin as coin;
pub use cmoe_data as data;
pub use cmoe_llava as llava;
pub use cmoe_moe as moe;
