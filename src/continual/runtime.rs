//! What training, evaluation and `cmoe ask` load from a run's model directory.

use std::path::PathBuf;

use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use cmoe_data::prompt::Conversation;
use cmoe_llava::{GenerationConfig, Sampling};

use super::config::RunConfig;

use crate::dataset::CoinEncoder;
use crate::pipeline::LlavaPipeline;

/// The autodiff backend a run trains on.
pub(super) type AD<B> = Autodiff<B>;

/// What training, evaluation and `cmoe ask` take from the run's model directory.
pub(super) struct Runtime<B: Backend> {
    /// The base model (with autodiff, for training).
    pub(super) base: cmoe_llava::Llava<AD<B>>,
    /// The padding id.
    pub(super) pad: u32,
    /// Greedy answers of at most `max_new_tokens`.
    pub(super) generation: GenerationConfig,
    /// The model's tokenizer and processor; images under `image_root`.
    pub(super) encoder: CoinEncoder,
}

impl<B: Backend> Runtime<B> {
    pub(super) fn load(
        config: &RunConfig,
        image_root: PathBuf,
        device: &B::Device,
    ) -> anyhow::Result<Self> {
        let pipe = LlavaPipeline::<AD<B>>::load_in(&config.model, config.base_dtype, device)?;
        let pad = pipe.config.pad_token_id.unwrap_or(0);
        Ok(Self {
            generation: GenerationConfig {
                max_new_tokens: config.max_new_tokens,
                eos_token_ids: pipe.config.text_config.eos_token_id.clone(),
                pad_token_id: pad,
                sampling: Sampling::Greedy,
            },
            encoder: CoinEncoder {
                tokenizer: pipe.tokenizer,
                processor: pipe.processor,
                conversation: Conversation::vicuna_v1(),
                tokens_per_image: pipe.config.image_tokens_per_image(),
                image_root,
            },
            pad,
            base: pipe.model,
        })
    }
}
