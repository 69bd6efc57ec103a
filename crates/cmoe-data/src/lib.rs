//! Inputs of LLaVA-1.5: images, tokens and prompts.
//!
//! - [`image`]: CLIP preprocessing (pad-to-square, shortest-edge resize with Pillow-exact
//!   resampling, center crop, rescale, normalise) from `preprocessor_config.json`.
//! - [`tokenizer`]: the model directory's `tokenizer.json`, checked against the model's
//!   image-token id and vocabulary; `<image>` expansion.
//! - [`bpe`]: training a byte-level BPE `tokenizer.json` for a small LLaVA.
//! - [`prompt`]: the vicuna_v1 / LLaVA-1.5 conversation template and answer-only label masking.

pub mod bpe;
pub mod error;
pub mod image;
pub mod prompt;
pub mod tokenizer;

pub use error::DataError;
pub use image::{ImageProcessorConfig, PixelValues};
pub use prompt::{Conversation, IGNORE_INDEX, TrainingExample};
pub use tokenizer::LlavaTokenizer;
