//! The CoIN benchmark (Chen et al., 2024) as LLaVA-CMoE uses it.
//!
//! - [`format`]: CoIN's files: LLaVA conversation JSON for training, test JSON, result JSONL.
//! - [`mini`]: Mini-CoIN, eight synthetic tasks in CoIN's formats, generated from a seed.
//! - [`normalize`]: the EvalAI / VQA answer normalisation (TextVQA, VQAv2-style accuracy).
//! - [`score`]: one scorer per task type, following CoIN's eval scripts; correct by default,
//!   CoIN's exact behaviour (quirks included) with [`score::Compat::Coin`].

pub mod error;
pub mod format;
pub mod mini;
pub mod normalize;
pub mod score;

pub use error::CoinError;
