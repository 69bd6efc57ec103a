//! LLaVA-1.5 for Burn, generic over `B: Backend`.
//!
//! - [`config`]: HF `config.json` with transformers' defaults.
//! - [`vision`], [`projector`], [`llama`], [`rope`], [`cache`]: the model, module by module,
//!   named after HF's keys so that checkpoints load without a remapping table; [`attention`]:
//!   the attention both towers run (softmax in f32 in half precision, as transformers).
//! - [`llava`]: the whole model, image-token splicing and the forward pass.
//! - [`import`]: safetensors weight import (single or sharded; fp16 / bf16 / f32).
//! - [`generation`]: greedy and top-p sampling with the KV cache.
//! - [`export`]: a model written back in the HF layout.

pub mod activation;
pub mod attention;
pub mod cache;
pub mod config;
pub mod error;
pub mod export;
pub mod generation;
pub mod import;
pub mod llama;
pub mod llava;
pub mod projector;
pub mod rope;
pub mod vision;

pub use config::LlavaConfig;
pub use error::LlavaError;
pub use generation::{GenerationConfig, Sampling, generate, generate_with};
pub use import::{Checkpoint, load_llava, open_checkpoint};
pub use llava::{Llava, LlavaInput};
