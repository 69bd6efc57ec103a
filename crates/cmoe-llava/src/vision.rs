//! The CLIP vision tower (`CLIPVisionModel`), with HF's module names so that checkpoint keys
//! map onto fields one to one: `vision_model.embeddings`, `vision_model.pre_layrnorm`,
//! `vision_model.encoder.layers.{i}`, `vision_model.post_layernorm`.

use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Tensor, backend::Backend};

use crate::attention::scaled_dot_product;
use crate::config::{Activation, VisionConfig};

/// Patch embedding (a strided convolution without bias), the CLS token and learned positions.
#[derive(Module, Debug)]
pub struct ClipVisionEmbeddings<B: Backend> {
    /// The learned CLS token, `[hidden]`.
    pub class_embedding: Param<Tensor<B, 1>>,
    /// `patch_size x patch_size` convolution with stride `patch_size`.
    pub patch_embedding: Conv2d<B>,
    /// One learned vector per position (CLS + patches).
    pub position_embedding: Embedding<B>,
}

impl<B: Backend> ClipVisionEmbeddings<B> {
    /// `[batch, channels, size, size]` pixels to `[batch, 1 + patches, hidden]` tokens.
    pub fn forward(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 3> {
        let [batch, ..] = pixel_values.dims();
        // Pixels come as f32; the tower may hold bf16 / f16 weights.
        let pixel_values = pixel_values.cast(self.patch_embedding.weight.val().dtype());
        let patches = self.patch_embedding.forward(pixel_values); // [b, d, g, g]
        let [_, hidden, gh, gw] = patches.dims();
        let patches = patches.reshape([batch, hidden, gh * gw]).swap_dims(1, 2);
        let cls = self
            .class_embedding
            .val()
            .reshape([1, 1, hidden])
            .expand([batch, 1, hidden]);
        let tokens = Tensor::cat(vec![cls, patches], 1);
        tokens + self.position_embedding.weight.val().unsqueeze_dim(0)
    }
}

/// Multi-head self-attention without a mask (every patch sees every patch).
#[derive(Module, Debug)]
pub struct ClipAttention<B: Backend> {
    /// Query projection.
    pub q_proj: Linear<B>,
    /// Key projection.
    pub k_proj: Linear<B>,
    /// Value projection.
    pub v_proj: Linear<B>,
    /// Output projection.
    pub out_proj: Linear<B>,
    /// Number of heads.
    pub num_heads: usize,
}

impl<B: Backend> ClipAttention<B> {
    /// `[batch, tokens, hidden]` to the same shape.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let [b, s, d] = x.dims();
        let heads = |t: Tensor<B, 3>| {
            t.reshape([b, s, self.num_heads, d / self.num_heads])
                .swap_dims(1, 2)
        };
        let q = heads(self.q_proj.forward(x.clone()));
        let k = heads(self.k_proj.forward(x.clone()));
        let v = heads(self.v_proj.forward(x));
        let out = scaled_dot_product(q, k, v, None);
        self.out_proj
            .forward(out.swap_dims(1, 2).reshape([b, s, d]))
    }
}

/// The two-layer MLP of a CLIP block.
#[derive(Module, Debug)]
pub struct ClipMlp<B: Backend> {
    /// `hidden -> intermediate`.
    pub fc1: Linear<B>,
    /// `intermediate -> hidden`.
    pub fc2: Linear<B>,
    /// Activation between them (quick_gelu for CLIP).
    pub activation: Activation,
}

impl<B: Backend> ClipMlp<B> {
    /// `[.., hidden]` to `[.., hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.fc2
            .forward(self.activation.forward(self.fc1.forward(x)))
    }
}

/// A pre-norm transformer block.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: Backend> {
    /// Attention.
    pub self_attn: ClipAttention<B>,
    /// Norm before attention.
    pub layer_norm1: LayerNorm<B>,
    /// MLP.
    pub mlp: ClipMlp<B>,
    /// Norm before the MLP.
    pub layer_norm2: LayerNorm<B>,
}

impl<B: Backend> ClipEncoderLayer<B> {
    /// One block: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x));
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }
}

/// The stack of blocks.
#[derive(Module, Debug)]
pub struct ClipEncoder<B: Backend> {
    /// The blocks, in order.
    pub layers: Vec<ClipEncoderLayer<B>>,
}

/// `CLIPVisionTransformer`.
#[derive(Module, Debug)]
pub struct ClipVisionTransformer<B: Backend> {
    /// Patch + position embeddings.
    pub embeddings: ClipVisionEmbeddings<B>,
    /// LayerNorm before the encoder (HF's spelling).
    pub pre_layrnorm: LayerNorm<B>,
    /// The encoder blocks.
    pub encoder: ClipEncoder<B>,
    /// Final LayerNorm. It is part of the checkpoint, but LLaVA reads hidden states before it.
    pub post_layernorm: LayerNorm<B>,
}

/// `CLIPVisionModel`: the tower LLaVA reads its image features from.
#[derive(Module, Debug)]
pub struct ClipVisionTower<B: Backend> {
    /// The transformer.
    pub vision_model: ClipVisionTransformer<B>,
}

impl VisionConfig {
    /// Builds a randomly initialised tower of this shape.
    pub fn init<B: Backend>(&self, device: &B::Device) -> ClipVisionTower<B> {
        let d = self.hidden_size;
        let norm = || {
            LayerNormConfig::new(d)
                .with_epsilon(self.layer_norm_eps)
                .init(device)
        };
        let linear = |i, o| LinearConfig::new(i, o).init(device);
        let num_positions = self.num_patches() + 1;
        let embeddings = ClipVisionEmbeddings {
            class_embedding: burn::module::Initializer::Normal {
                mean: 0.0,
                std: 0.02,
            }
            .init([d], device),
            patch_embedding: Conv2dConfig::new(
                [self.num_channels, d],
                [self.patch_size, self.patch_size],
            )
            .with_stride([self.patch_size, self.patch_size])
            .with_bias(false)
            .init(device),
            position_embedding: EmbeddingConfig::new(num_positions, d).init(device),
        };
        let layers = (0..self.num_hidden_layers)
            .map(|_| ClipEncoderLayer {
                self_attn: ClipAttention {
                    q_proj: linear(d, d),
                    k_proj: linear(d, d),
                    v_proj: linear(d, d),
                    out_proj: linear(d, d),
                    num_heads: self.num_attention_heads,
                },
                layer_norm1: norm(),
                mlp: ClipMlp {
                    fc1: linear(d, self.intermediate_size),
                    fc2: linear(self.intermediate_size, d),
                    activation: self.hidden_act,
                },
                layer_norm2: norm(),
            })
            .collect();
        ClipVisionTower {
            vision_model: ClipVisionTransformer {
                embeddings,
                pre_layrnorm: norm(),
                encoder: ClipEncoder { layers },
                post_layernorm: norm(),
            },
        }
    }
}

impl<B: Backend> ClipVisionTower<B> {
    /// The hidden states at the requested indices (0 = after `pre_layrnorm`, i = after block i),
    /// as HF's `output_hidden_states` numbers them. Blocks past the deepest requested index
    /// are not run.
    pub fn hidden_states(
        &self,
        pixel_values: Tensor<B, 4>,
        indices: &[usize],
    ) -> Vec<Tensor<B, 3>> {
        let model = &self.vision_model;
        let deepest = indices.iter().copied().max().unwrap_or(0);
        let mut x = model
            .pre_layrnorm
            .forward(model.embeddings.forward(pixel_values));
        let mut states = vec![None; indices.len()];
        for depth in 0..=deepest {
            if depth > 0 {
                x = model.encoder.layers[depth - 1].forward(x);
            }
            for (slot, &index) in states.iter_mut().zip(indices) {
                if index == depth {
                    *slot = Some(x.clone());
                }
            }
        }
        states
            .into_iter()
            .map(|s| s.expect("every index <= deepest"))
            .collect()
    }
}
