//! The LLaMA decoder (`LlamaForCausalLM`): RMSNorm, RoPE (rotate_half), grouped-query
//! attention with a KV cache, SwiGLU MLP. Field names follow HF's keys:
//! `model.embed_tokens`, `model.layers.{i}.self_attn.{q,k,v,o}_proj`,
//! `model.layers.{i}.mlp.{gate,up,down}_proj`, `model.norm`, `lm_head`.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, RmsNorm, RmsNormConfig};
use burn::tensor::{Bool, DType, Int, Tensor, backend::Backend};

use crate::attention::scaled_dot_product;
use crate::cache::{KvCache, LayerCache};
use crate::config::{Activation, TextConfig};
use crate::rope::RopeTables;

/// Grouped-query self-attention.
#[derive(Module, Debug)]
pub struct LlamaAttention<B: Backend> {
    /// `hidden -> heads * head_dim`.
    pub q_proj: Linear<B>,
    /// `hidden -> kv_heads * head_dim`.
    pub k_proj: Linear<B>,
    /// `hidden -> kv_heads * head_dim`.
    pub v_proj: Linear<B>,
    /// `heads * head_dim -> hidden`.
    pub o_proj: Linear<B>,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
}

impl<B: Backend> LlamaAttention<B> {
    /// Attends `x` `[batch, seq, hidden]` to the cached keys plus its own; `mask` is
    /// `[batch, heads, seq, keys]`, true where attention is forbidden.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: Tensor<B, 4, Bool>,
        cache: Option<&mut LayerCache<B>>,
    ) -> Tensor<B, 3> {
        let [b, s, _] = x.dims();
        // Heads are split as `[b, s, heads, head_dim]` (contiguous), rotated there, then
        // moved to `[b, heads, s, head_dim]` for attention.
        let split = |t: Tensor<B, 3>, heads| t.reshape([b, s, heads, self.head_dim]);
        let q = rope
            .apply(split(self.q_proj.forward(x.clone()), self.num_heads))
            .swap_dims(1, 2);
        let k = rope
            .apply(split(self.k_proj.forward(x.clone()), self.num_kv_heads))
            .swap_dims(1, 2);
        let v = split(self.v_proj.forward(x), self.num_kv_heads).swap_dims(1, 2);
        let (k, v) = match cache {
            Some(cache) => cache.append(k, v),
            None => (k, v),
        };
        let k = self.repeat_kv(k);
        let v = self.repeat_kv(v);
        let out = scaled_dot_product(q, k, v, Some(mask));
        self.o_proj.forward(
            out.swap_dims(1, 2)
                .reshape([b, s, self.num_heads * self.head_dim]),
        )
    }

    /// `[b, kv_heads, keys, d]` to `[b, heads, keys, d]`, each KV head serving a group of queries.
    fn repeat_kv(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let groups = self.num_heads / self.num_kv_heads;
        if groups == 1 {
            return x;
        }
        let [b, h, n, d] = x.dims();
        x.unsqueeze_dim::<5>(2)
            .expand([b, h, groups, n, d])
            .reshape([b, h * groups, n, d])
    }
}

/// The SwiGLU MLP: `down(act(gate(x)) * up(x))`.
#[derive(Module, Debug)]
pub struct LlamaMlp<B: Backend> {
    /// `hidden -> intermediate`, activated.
    pub gate_proj: Linear<B>,
    /// `hidden -> intermediate`.
    pub up_proj: Linear<B>,
    /// `intermediate -> hidden`.
    pub down_proj: Linear<B>,
    /// The gate's activation (SiLU).
    pub activation: Activation,
}

impl<B: Backend> LlamaMlp<B> {
    /// `[.., hidden]` to `[.., hidden]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = self.activation.forward(self.gate_proj.forward(x.clone()));
        self.down_proj.forward(gate * self.up_proj.forward(x))
    }
}

/// A pre-norm decoder block.
#[derive(Module, Debug)]
pub struct LlamaDecoderLayer<B: Backend> {
    /// Attention.
    pub self_attn: LlamaAttention<B>,
    /// MLP.
    pub mlp: LlamaMlp<B>,
    /// Norm before attention.
    pub input_layernorm: RmsNorm<B>,
    /// Norm before the MLP.
    pub post_attention_layernorm: RmsNorm<B>,
}

impl<B: Backend> LlamaDecoderLayer<B> {
    /// One block: `x + attn(norm(x))`, then `x + mlp(norm(x))`; `mlp` replaces the block's
    /// MLP when given (with the block's index).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        rope: &RopeTables<B>,
        mask: Tensor<B, 4, Bool>,
        cache: Option<&mut LayerCache<B>>,
        mlp: Option<(usize, &dyn MlpOverride<B>)>,
    ) -> Tensor<B, 3> {
        let h = self.self_attn.forward(
            rms_norm(&self.input_layernorm, x.clone()),
            rope,
            mask,
            cache,
        );
        let x = x + h;
        let normed = rms_norm(&self.post_attention_layernorm, x.clone());
        let out = match mlp {
            Some((index, mlp)) => mlp.forward(index, &self.mlp, normed),
            None => self.mlp.forward(normed),
        };
        x + out
    }
}

/// Replaces the decoder's MLP computation, layer by layer: the hook through which
/// Mixture-of-LoRA-Experts adapters wrap the frozen FFN without copying the decoder.
pub trait MlpOverride<B: Backend> {
    /// The MLP output of decoder layer `layer` for `x` `[batch, seq, hidden]` (already
    /// normalised); `base` is that layer's own (frozen) MLP.
    fn forward(&self, layer: usize, base: &LlamaMlp<B>, x: Tensor<B, 3>) -> Tensor<B, 3>;
}

/// `LlamaModel`: embeddings, blocks and the final norm.
#[derive(Module, Debug)]
pub struct LlamaModel<B: Backend> {
    /// Token embeddings.
    pub embed_tokens: Embedding<B>,
    /// The blocks.
    pub layers: Vec<LlamaDecoderLayer<B>>,
    /// Final RMSNorm.
    pub norm: RmsNorm<B>,
    /// RoPE base.
    pub rope_theta: f64,
}

/// `LlamaForCausalLM`.
#[derive(Module, Debug)]
pub struct LlamaForCausalLm<B: Backend> {
    /// The decoder.
    pub model: LlamaModel<B>,
    /// Output projection; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Linear<B>>,
}

impl TextConfig {
    /// Builds a randomly initialised decoder of this shape.
    pub fn init<B: Backend>(
        &self,
        tied_embeddings: bool,
        device: &B::Device,
    ) -> LlamaForCausalLm<B> {
        let d = self.hidden_size;
        let (heads, kv_heads, hd) = (
            self.num_attention_heads,
            self.num_kv_heads(),
            self.head_dim(),
        );
        let linear = |i, o, bias| LinearConfig::new(i, o).with_bias(bias).init(device);
        let norm = || {
            RmsNormConfig::new(d)
                .with_epsilon(self.rms_norm_eps)
                .init(device)
        };
        let layers = (0..self.num_hidden_layers)
            .map(|_| LlamaDecoderLayer {
                self_attn: LlamaAttention {
                    q_proj: linear(d, heads * hd, self.attention_bias),
                    k_proj: linear(d, kv_heads * hd, self.attention_bias),
                    v_proj: linear(d, kv_heads * hd, self.attention_bias),
                    o_proj: linear(heads * hd, d, self.attention_bias),
                    num_heads: heads,
                    num_kv_heads: kv_heads,
                    head_dim: hd,
                },
                mlp: LlamaMlp {
                    gate_proj: linear(d, self.intermediate_size, self.mlp_bias),
                    up_proj: linear(d, self.intermediate_size, self.mlp_bias),
                    down_proj: linear(self.intermediate_size, d, self.mlp_bias),
                    activation: self.hidden_act,
                },
                input_layernorm: norm(),
                post_attention_layernorm: norm(),
            })
            .collect();
        LlamaForCausalLm {
            model: LlamaModel {
                embed_tokens: EmbeddingConfig::new(self.vocab_size, d).init(device),
                layers,
                norm: norm(),
                rope_theta: self.rope_theta(),
            },
            lm_head: (!tied_embeddings).then(|| linear(d, self.vocab_size, false)),
        }
    }
}

impl<B: Backend> LlamaForCausalLm<B> {
    /// Token ids `[batch, seq]` to embeddings `[batch, seq, hidden]`.
    pub fn embed(&self, input_ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        self.model.embed_tokens.forward(input_ids)
    }

    /// Runs the blocks and the final norm on `embeds` `[batch, seq, hidden]`.
    ///
    /// `attention_mask` `[batch, keys]` (1 = real token, 0 = padding) covers the cached keys and
    /// the new ones; positions are counted over real tokens only, so left padding is handled
    /// as HF's `generate` does. Returns the last hidden states `[batch, seq, hidden]`.
    pub fn forward_hidden(
        &self,
        embeds: Tensor<B, 3>,
        attention_mask: Tensor<B, 2, Int>,
        cache: Option<&mut KvCache<B>>,
    ) -> Tensor<B, 3> {
        self.forward_hidden_with(embeds, attention_mask, cache, None)
    }

    /// [`Self::forward_hidden`] with every block's MLP computed by `mlp`.
    pub fn forward_hidden_with(
        &self,
        embeds: Tensor<B, 3>,
        attention_mask: Tensor<B, 2, Int>,
        mut cache: Option<&mut KvCache<B>>,
        mlp: Option<&dyn MlpOverride<B>>,
    ) -> Tensor<B, 3> {
        let [_, seq, _] = embeds.dims();
        let head_dim = self.model.layers[0].self_attn.head_dim;
        let heads = self.model.layers[0].self_attn.num_heads;
        let kv_heads = self.model.layers[0].self_attn.num_kv_heads;
        let positions = positions_from_mask(attention_mask.clone(), seq);
        let rope = RopeTables::new(
            positions,
            head_dim,
            self.model.rope_theta,
            &[heads, kv_heads],
            embeds.dtype(),
        );
        let mask = attention_block_mask(attention_mask, seq, heads);
        let mut x = embeds;
        for (i, layer) in self.model.layers.iter().enumerate() {
            let entry = cache.as_deref_mut().map(|c| c.layer_mut(i));
            x = layer.forward(x, &rope, mask.clone(), entry, mlp.map(|m| (i, m)));
        }
        rms_norm(&self.model.norm, x)
    }

    /// Hidden states `[batch, seq, hidden]` to logits `[batch, seq, vocab]`.
    pub fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => {
                let weight = self.model.embed_tokens.weight.val(); // [vocab, hidden]
                hidden.matmul(weight.transpose().unsqueeze_dim(0))
            }
        }
    }
}

/// RMSNorm as HF's `LlamaRMSNorm` computes it in half precision: the normalisation in f32, the
/// result cast back to the input's dtype, then the weight. In f32 it is Burn's [`RmsNorm`]
/// (which divides by the root mean square where HF multiplies by its inverse: equal to a few
/// f32 ulps, and kept so that f32 results stay what they were).
pub fn rms_norm<B: Backend, const D: usize>(norm: &RmsNorm<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let dtype = x.dtype();
    if dtype == DType::F32 {
        return norm.forward(x);
    }
    let x = x.cast(DType::F32);
    let inverse_rms = (x.clone().square().mean_dim(D - 1) + norm.epsilon)
        .sqrt()
        .recip();
    (x * inverse_rms).cast(dtype) * norm.gamma.val().unsqueeze()
}

/// Positions of the last `seq` keys: the number of real tokens before each one (HF's
/// `cumsum(mask) - 1`, clamped at 0 for padding).
fn positions_from_mask<B: Backend>(mask: Tensor<B, 2, Int>, seq: usize) -> Tensor<B, 2, Int> {
    let [batch, keys] = mask.dims();
    let positions = (mask.cumsum(1) - 1).clamp_min(0);
    positions.slice([0..batch, keys - seq..keys])
}

/// The boolean attention mask `[batch, heads, seq, keys]` (true = forbidden) for `seq` new
/// queries at the end of `keys`: causal, padding keys hidden. A query never loses its own key,
/// so padding rows are not fully masked (which would give NaN); their outputs are never read.
fn attention_block_mask<B: Backend>(
    key_mask: Tensor<B, 2, Int>,
    seq: usize,
    heads: usize,
) -> Tensor<B, 4, Bool> {
    let device = key_mask.device();
    let [batch, keys] = key_mask.dims();
    let offset = (keys - seq) as i64;
    let key_index = Tensor::<B, 1, Int>::arange(0..keys as i64, &device).reshape([1, 1, keys]);
    let query_index =
        Tensor::<B, 1, Int>::arange(offset..offset + seq as i64, &device).reshape([1, seq, 1]);
    let future = key_index.clone().greater(query_index.clone()); // [1, seq, keys]
    let own = key_index.equal(query_index);
    let padding = key_mask.equal_elem(0).reshape([batch, 1, keys]);
    let masked = future
        .expand([batch, seq, keys])
        .bool_or(padding.expand([batch, seq, keys]))
        .bool_and(own.bool_not().expand([batch, seq, keys]));
    // Materialised once per pass (every layer reuses it): a broadcast view would be copied
    // by each layer's masking.
    masked.unsqueeze_dim::<4>(1).repeat_dim(1, heads)
}
