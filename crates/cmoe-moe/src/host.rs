//! What the continual core needs from the frozen model it extends (the *host*): a decoder whose
//! FFN blocks can be wrapped, layer by layer, by MoE-LoRA experts.
//!
//! LLaVA is one host ([`crate::llava`], behind the default `llava` feature). Any Burn model with
//! gated FFNs can be another: implement [`GatedFfn`] for its FFN block and [`MoeHost`] for the
//! model (`examples/custom_model.rs` does it for a small text transformer in ~100 lines).

use burn::module::{AutodiffModule, Module, ModuleDisplay};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};

use crate::error::MoeError;

/// A batch of model inputs.
#[derive(Debug, Clone)]
pub struct ModelInput<B: Backend> {
    /// Token ids `[batch, seq]` (for LLaVA, each `<image>` already expanded to the image-token
    /// count).
    pub input_ids: Tensor<B, 2, Int>,
    /// Images `[n_images, channels, height, width]` for hosts that read them; `None` for text.
    pub pixel_values: Option<Tensor<B, 4>>,
    /// `[batch, seq]`, 1 for real tokens and 0 for padding; all ones when `None`.
    pub attention_mask: Option<Tensor<B, 2, Int>>,
}

impl<B: Backend> ModelInput<B> {
    /// Text-only input without padding.
    pub fn tokens(input_ids: Tensor<B, 2, Int>) -> Self {
        Self {
            input_ids,
            pixel_values: None,
            attention_mask: None,
        }
    }

    /// The same input on `device`.
    pub fn to_device(self, device: &B::Device) -> Self {
        Self {
            input_ids: self.input_ids.to_device(device),
            pixel_values: self.pixel_values.map(|p| p.to_device(device)),
            attention_mask: self.attention_mask.map(|m| m.to_device(device)),
        }
    }

    /// Per token (row-major), whether it is real rather than padding: `[batch * seq, 1]`, 1 for
    /// a real token and 0 for padding, computed on the device; `None` when the input has no
    /// attention mask.
    pub fn real_tokens(&self) -> Option<Tensor<B, 2>> {
        let mask = self.attention_mask.as_ref()?;
        let [b, s] = mask.dims();
        Some(mask.clone().not_equal_elem(0).float().reshape([b * s, 1]))
    }
}

impl<B: AutodiffBackend> ModelInput<B> {
    /// The same input without autodiff.
    pub fn inner(self) -> ModelInput<B::InnerBackend> {
        ModelInput {
            input_ids: self.input_ids.inner(),
            pixel_values: self.pixel_values.map(Tensor::inner),
            attention_mask: self.attention_mask.map(Tensor::inner),
        }
    }
}

/// A frozen gated FFN block, `down(activate(gate(x)) * up(x))` (SwiGLU in LLaMA, GEGLU
/// elsewhere): the three projections experts attach to (paper Eq. 1), on flattened tokens
/// `[tokens, width]`.
pub trait GatedFfn<B: Backend> {
    /// `[d_model, d_ff]`: the block's input and intermediate widths.
    fn widths(&self) -> [usize; 2];
    /// The gate projection, `d_model -> d_ff`.
    fn gate(&self, x: Tensor<B, 2>) -> Tensor<B, 2>;
    /// The up projection, `d_model -> d_ff`.
    fn up(&self, x: Tensor<B, 2>) -> Tensor<B, 2>;
    /// The down projection, `d_ff -> d_model`.
    fn down(&self, x: Tensor<B, 2>) -> Tensor<B, 2>;
    /// The gate's activation.
    fn activate(&self, x: Tensor<B, 2>) -> Tensor<B, 2>;
}

/// Replaces the host's FFN computation, layer by layer: how the MoE layers run inside the
/// host's forward pass without copying its decoder.
pub trait FfnHook<B: Backend> {
    /// The FFN output of layer `layer` for `x` `[batch, seq, d_model]` (already normalised);
    /// `ffn` is that layer's own frozen FFN.
    fn forward(&self, layer: usize, ffn: &dyn GatedFfn<B>, x: Tensor<B, 3>) -> Tensor<B, 3>;
}

/// A frozen model the continual core extends: its FFN blocks get MoE-LoRA experts, its final
/// hidden states feed PTL, its logits the objective.
pub trait MoeHost<B: Backend>: Module<B> + ModuleDisplay + Sync {
    /// `[d_model, d_ff]` of every FFN block, in layer order (one MoE layer each).
    fn ffn_widths(&self) -> Vec<[usize; 2]>;

    /// The final hidden states `[batch, seq, d_model]` (after the last norm), with every FFN
    /// block computed by `hook` when given (it is called once per block per pass, in order).
    fn forward_hidden(
        &self,
        input: ModelInput<B>,
        hook: Option<&dyn FfnHook<B>>,
    ) -> Result<Tensor<B, 3>, MoeError>;

    /// The vocabulary logits of hidden states `[batch, seq, d_model]`.
    fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3>;

    /// Where the question starts in `ids` (one row) for a prompt that ends at `last`: the first
    /// position PTL's pooled feature reads. Default 0; LLaVA starts after the image tokens.
    fn question_start(&self, ids: &[i64], last: usize) -> usize {
        let _ = (ids, last);
        0
    }
}

/// A host that trains under autodiff: its inner (inference) module is a host too.
pub trait AutodiffHost<B: AutodiffBackend>:
    MoeHost<B> + AutodiffModule<B, InnerModule: MoeHost<B::InnerBackend>>
{
}

impl<B: AutodiffBackend, H> AutodiffHost<B> for H where
    H: MoeHost<B> + AutodiffModule<B, InnerModule: MoeHost<B::InnerBackend>>
{
}
