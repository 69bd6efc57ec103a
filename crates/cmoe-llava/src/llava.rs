//! LLaVA-1.5: CLIP features of the selected layer -> projector -> spliced into the token
//! embeddings at the `<image>` positions -> LLaMA. The module tree mirrors HF's checkpoint:
//! `vision_tower`, `multi_modal_projector`, `language_model`.

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

use crate::cache::KvCache;
use crate::config::{FeatureSelectStrategy, LlavaConfig};
use crate::error::LlavaError;
use crate::llama::{LlamaForCausalLm, MlpOverride};
use crate::projector::MultiModalProjector;
use crate::vision::ClipVisionTower;

/// `LlavaForConditionalGeneration`.
#[derive(Module, Debug)]
pub struct Llava<B: Backend> {
    /// The CLIP vision tower.
    pub vision_tower: ClipVisionTower<B>,
    /// CLIP width to LLaMA width.
    pub multi_modal_projector: MultiModalProjector<B>,
    /// The language model.
    pub language_model: LlamaForCausalLm<B>,
    /// Id of the `<image>` token.
    pub image_token_index: u32,
    /// CLIP hidden-state indices read (0 = embeddings), concatenated when several.
    pub feature_layers: Vec<usize>,
    /// Whether the CLS token is dropped.
    pub feature_strategy: FeatureSelectStrategy,
    /// Input resolution of the vision tower.
    pub image_size: usize,
}

/// A batch of model inputs.
#[derive(Debug, Clone)]
pub struct LlavaInput<B: Backend> {
    /// Token ids `[batch, seq]`, with each `<image>` already expanded to the image-token count.
    pub input_ids: Tensor<B, 2, Int>,
    /// Images `[n_images, 3, size, size]`, in the order their `<image>` runs appear (row-major).
    pub pixel_values: Option<Tensor<B, 4>>,
    /// `[batch, seq]`, 1 for real tokens and 0 for padding; all ones when `None`.
    pub attention_mask: Option<Tensor<B, 2, Int>>,
}

impl LlavaConfig {
    /// Builds a randomly initialised LLaVA of this shape (weights are usually imported after).
    pub fn init<B: Backend>(&self, device: &B::Device) -> Llava<B> {
        Llava {
            vision_tower: self.vision_config.init(device),
            multi_modal_projector: self.init_projector(device),
            language_model: self.text_config.init(self.tied_embeddings(), device),
            image_token_index: self.image_token_index,
            feature_layers: self.vision_feature_layers(),
            feature_strategy: self.vision_feature_select_strategy,
            image_size: self.vision_config.image_size,
        }
    }
}

impl<B: Backend> Llava<B> {
    /// Projected image features `[n_images, image_tokens, text_hidden]` (HF's `get_image_features`).
    pub fn image_features(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
        let states = self
            .vision_tower
            .hidden_states(pixel_values, &self.feature_layers);
        let features = Tensor::cat(states, 2);
        let features = match self.feature_strategy {
            FeatureSelectStrategy::Full => features,
            FeatureSelectStrategy::Default => {
                let [n, t, d] = features.dims();
                features.slice([0..n, 1..t, 0..d])
            }
        };
        self.multi_modal_projector.forward(features)
    }

    /// Token embeddings with the image features spliced in at the `<image>` positions.
    pub fn input_embeddings(
        &self,
        input_ids: Tensor<B, 2, Int>,
        pixel_values: Option<Tensor<B, 4>>,
    ) -> Result<Tensor<B, 3>, LlavaError> {
        let device = input_ids.device();
        let [batch, seq] = input_ids.dims();
        let ids = ids_to_host(&input_ids);
        let vocab = self.language_model.model.embed_tokens.weight.dims()[0];
        if let Some(bad) = ids.iter().find(|&&id| id < 0 || id as usize >= vocab) {
            return Err(LlavaError::Input(format!(
                "token id {bad} is outside the vocabulary of {vocab}"
            )));
        }
        let image_token = self.image_token_index as i64;
        let n_image_positions = ids.iter().filter(|&&id| id == image_token).count();
        let Some(pixel_values) = pixel_values else {
            if n_image_positions > 0 {
                return Err(LlavaError::Input(format!(
                    "{n_image_positions} <image> tokens but no image was given"
                )));
            }
            return Ok(self.language_model.embed(input_ids));
        };
        let [n_images, channels, h, w] = pixel_values.dims();
        if (h, w) != (self.image_size, self.image_size) || channels != 3 {
            return Err(LlavaError::Input(format!(
                "pixel values are [{n_images}, {channels}, {h}, {w}], the vision tower takes [n, 3, {s}, {s}]",
                s = self.image_size
            )));
        }
        let features = self.image_features(pixel_values);
        let [_, per_image, hidden] = features.dims();
        if n_image_positions != n_images * per_image {
            return Err(LlavaError::Input(format!(
                "{n_image_positions} <image> tokens (id {image_token}) for {n_images} image(s) of \
                 {per_image} tokens each: expand each <image> to {per_image} tokens"
            )));
        }
        // Gather from [text embeddings; image features]: text rows keep their place, image
        // positions take the next image-feature row in order.
        let text_ids: Vec<i64> = ids
            .iter()
            .map(|&id| if id == image_token { 0 } else { id })
            .collect();
        let text = self
            .language_model
            .embed(int_tensor(text_ids, [batch, seq], &device))
            .reshape([batch * seq, hidden]);
        let mut next_image_row = (batch * seq) as i64;
        let index: Vec<i64> = ids
            .iter()
            .enumerate()
            .map(|(p, &id)| {
                if id == image_token {
                    next_image_row += 1;
                    next_image_row - 1
                } else {
                    p as i64
                }
            })
            .collect();
        let rows = Tensor::cat(
            vec![text, features.reshape([n_images * per_image, hidden])],
            0,
        );
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(index, [batch * seq]), &device);
        Ok(rows.select(0, index).reshape([batch, seq, hidden]))
    }

    /// Last hidden states `[batch, seq, hidden]` of the decoder (after the final norm).
    ///
    /// With a cache, `attention_mask` covers the cached positions and the new ones.
    pub fn forward_hidden(
        &self,
        input: LlavaInput<B>,
        cache: Option<&mut KvCache<B>>,
    ) -> Result<Tensor<B, 3>, LlavaError> {
        self.forward_hidden_with(input, cache, None)
    }

    /// [`Self::forward_hidden`] with the decoder's MLPs computed by `mlp` (e.g. MoE adapters).
    pub fn forward_hidden_with(
        &self,
        input: LlavaInput<B>,
        cache: Option<&mut KvCache<B>>,
        mlp: Option<&dyn MlpOverride<B>>,
    ) -> Result<Tensor<B, 3>, LlavaError> {
        let [batch, seq] = input.input_ids.dims();
        let device = input.input_ids.device();
        let keys = cache.as_ref().map_or(0, |c| c.len()) + seq;
        let mask = input
            .attention_mask
            .unwrap_or_else(|| Tensor::ones([batch, keys], &device));
        if mask.dims() != [batch, keys] {
            return Err(LlavaError::Input(format!(
                "attention mask is {:?}; with {} cached positions and input ids [{batch}, {seq}] it must be [{batch}, {keys}]",
                mask.dims(),
                keys - seq
            )));
        }
        let embeds = self.input_embeddings(input.input_ids, input.pixel_values)?;
        Ok(self
            .language_model
            .forward_hidden_with(embeds, mask, cache, mlp))
    }

    /// Logits `[batch, seq, vocab]` for a batch without cache.
    pub fn forward(&self, input: LlavaInput<B>) -> Result<Tensor<B, 3>, LlavaError> {
        let hidden = self.forward_hidden(input, None)?;
        Ok(self.language_model.logits(hidden))
    }

    /// Number of decoder layers (the size of a [`KvCache`]).
    pub fn num_decoder_layers(&self) -> usize {
        self.language_model.model.layers.len()
    }
}

/// Reads an int tensor back to the host as `i64`.
pub(crate) fn ids_to_host<B: Backend, const D: usize>(ids: &Tensor<B, D, Int>) -> Vec<i64> {
    ids.to_data().iter::<i64>().collect()
}

/// Builds an int tensor from host values.
pub(crate) fn int_tensor<B: Backend, const D: usize>(
    values: Vec<i64>,
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D, Int> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

#[cfg(test)]
mod tests {
    use burn::module::Module;

    use crate::LlavaConfig;

    type B = burn_flex::Flex;

    #[test]
    fn parameter_counts_match_the_built_module() {
        for json in [
            // GQA, biases everywhere, two concatenated feature layers, tied head.
            r#"{"text_config": {"hidden_size": 32, "intermediate_size": 40, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50,
                "attention_bias": true, "mlp_bias": true, "tie_word_embeddings": true},
               "vision_config": {"hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 3,
                "num_attention_heads": 2, "image_size": 16, "patch_size": 4},
               "vision_feature_layer": [-2, 1], "image_token_index": 49}"#,
            // Plain LLaVA-1.5 layout, projector without bias.
            r#"{"text_config": {"hidden_size": 24, "intermediate_size": 30, "num_hidden_layers": 1,
                "num_attention_heads": 3, "vocab_size": 40},
               "vision_config": {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
                "num_attention_heads": 2, "image_size": 8, "patch_size": 4},
               "multimodal_projector_bias": false, "image_token_index": 39}"#,
        ] {
            let config = LlavaConfig::from_json_str(json, "test").unwrap();
            let model = config.init::<B>(&Default::default());
            assert_eq!(
                model.num_params(),
                config.parameter_counts().total,
                "{json}"
            );
        }
    }
}
