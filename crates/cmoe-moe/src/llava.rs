//! LLaVA-1.5 as a [`MoeHost`]: its LLaMA decoder's SwiGLU MLPs carry the experts, PTL pools the
//! question after the image tokens, and a task's routers generate with LLaVA's KV cache.

use burn::tensor::{Tensor, backend::Backend};
use cmoe_llava::llama::{LlamaMlp, MlpOverride};
use cmoe_llava::{GenerationConfig, Llava, LlavaError, LlavaInput, generate_with};

use crate::error::MoeError;
use crate::host::{FfnHook, GatedFfn, ModelInput, MoeHost};
use crate::learner::ContinualLearner;
use crate::model::CmoeModel;

/// LLaVA with MoE-LoRA experts in every decoder layer.
pub type LlavaCmoe<B> = CmoeModel<B, Llava<B>>;

/// A continual run over a frozen LLaVA.
pub type LlavaLearner<B> = ContinualLearner<B, Llava<B>>;

impl<B: Backend> GatedFfn<B> for LlamaMlp<B> {
    fn widths(&self) -> [usize; 2] {
        self.gate_proj.weight.dims()
    }

    fn gate(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.gate_proj.forward(x)
    }

    fn up(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.up_proj.forward(x)
    }

    fn down(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.down_proj.forward(x)
    }

    fn activate(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.activation.forward(x)
    }
}

/// An [`FfnHook`] seen as LLaMA's MLP override.
struct OnLlama<'a, B: Backend>(&'a dyn FfnHook<B>);

impl<B: Backend> MlpOverride<B> for OnLlama<'_, B> {
    fn forward(&self, layer: usize, base: &LlamaMlp<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        self.0.forward(layer, base, x)
    }
}

impl<B: Backend> MoeHost<B> for Llava<B> {
    fn ffn_widths(&self) -> Vec<[usize; 2]> {
        let layers = &self.language_model.model.layers;
        layers.iter().map(|layer| layer.mlp.widths()).collect()
    }

    fn forward_hidden(
        &self,
        input: ModelInput<B>,
        hook: Option<&dyn FfnHook<B>>,
    ) -> Result<Tensor<B, 3>, MoeError> {
        let hook = hook.map(OnLlama);
        let mlp = hook.as_ref().map(|h| h as &dyn MlpOverride<B>);
        Ok(self.forward_hidden_with(input.into(), None, mlp)?)
    }

    fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        self.language_model.logits(hidden)
    }

    /// After the last `<image>` token before `last` (the question follows the image), or 0.
    fn question_start(&self, ids: &[i64], last: usize) -> usize {
        let image = self.image_token_index as i64;
        ids[..=last]
            .iter()
            .rposition(|&id| id == image)
            .map_or(0, |p| (p + 1).min(last))
    }
}

impl<B: Backend> LlavaCmoe<B> {
    /// Generates answers with task `task`'s routers (KV-cached; see [`cmoe_llava::generate`]).
    pub fn generate(
        &self,
        input: ModelInput<B>,
        task: usize,
        config: &GenerationConfig,
    ) -> Result<Vec<Vec<u32>>, MoeError> {
        let routed = self.routed(task, false, input.real_tokens())?;
        let hook = OnLlama(&routed);
        Ok(generate_with(
            &self.base,
            input.into(),
            config,
            Some(&hook),
        )?)
    }
}

impl<B: Backend> From<LlavaInput<B>> for ModelInput<B> {
    fn from(input: LlavaInput<B>) -> Self {
        Self {
            input_ids: input.input_ids,
            pixel_values: input.pixel_values,
            attention_mask: input.attention_mask,
        }
    }
}

impl<B: Backend> From<ModelInput<B>> for LlavaInput<B> {
    fn from(input: ModelInput<B>) -> Self {
        Self {
            input_ids: input.input_ids,
            pixel_values: input.pixel_values,
            attention_mask: input.attention_mask,
        }
    }
}

impl From<LlavaError> for MoeError {
    fn from(err: LlavaError) -> Self {
        Self::Host(Box::new(err))
    }
}
