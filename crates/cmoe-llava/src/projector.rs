//! The multimodal projector: `linear_1 -> GELU -> linear_2`, CLIP width to LLaMA width.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Tensor, backend::Backend};

use crate::config::{Activation, LlavaConfig};

/// `LlavaMultiModalProjector`.
#[derive(Module, Debug)]
pub struct MultiModalProjector<B: Backend> {
    /// `vision_hidden * n_feature_layers -> text_hidden`.
    pub linear_1: Linear<B>,
    /// `text_hidden -> text_hidden`.
    pub linear_2: Linear<B>,
    /// Activation between the two (exact GELU in LLaVA-1.5).
    pub activation: Activation,
}

impl<B: Backend> MultiModalProjector<B> {
    /// `[.., vision features]` to `[.., text hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.linear_2
            .forward(self.activation.forward(self.linear_1.forward(x)))
    }
}

impl LlavaConfig {
    /// Builds a randomly initialised projector for this config.
    pub fn init_projector<B: Backend>(&self, device: &B::Device) -> MultiModalProjector<B> {
        let input = self.vision_config.hidden_size * self.vision_feature_layer.len();
        let hidden = self.text_config.hidden_size;
        let bias = self.multimodal_projector_bias;
        MultiModalProjector {
            linear_1: LinearConfig::new(input, hidden)
                .with_bias(bias)
                .init(device),
            linear_2: LinearConfig::new(hidden, hidden)
                .with_bias(bias)
                .init(device),
            activation: self.projector_hidden_act,
        }
    }
}
