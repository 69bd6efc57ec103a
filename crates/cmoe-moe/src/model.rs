//! LLaVA with MoE-LoRA FFNs: the frozen base model plus one [`MoeLoraFfn`] per decoder layer,
//! run with the router of a chosen task.

use std::cell::RefCell;

use burn::module::Module;
use burn::tensor::{DType, Int, Tensor, TensorData, backend::Backend};
use cmoe_llava::llama::{LlamaMlp, MlpOverride};
use cmoe_llava::{GenerationConfig, Llava, LlavaError, LlavaInput, generate_with};
use serde::{Deserialize, Serialize};

use crate::moe_ffn::{FfnTargets, LayerRouting, MoeLoraFfn};

/// Shape of the experts (paper defaults: rank 64, alpha 128, 8 initial experts, top-2).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MoeConfig {
    /// LoRA rank `r`.
    pub rank: usize,
    /// LoRA alpha (`scale = alpha / r`).
    pub alpha: f64,
    /// LoRA dropout on expert inputs.
    pub dropout: f64,
    /// Experts per token.
    pub top_k: usize,
    /// Experts per layer trained by the first task.
    pub initial_experts: usize,
    /// Projections carrying experts.
    pub targets: FfnTargets,
}

impl MoeConfig {
    /// A layer of `n_experts` fresh experts (and a first router) for an FFN of these widths.
    pub fn init_layer<B: Backend>(
        &self,
        hidden: usize,
        intermediate: usize,
        n_experts: usize,
        device: &B::Device,
    ) -> MoeLoraFfn<B> {
        MoeLoraFfn::new(
            hidden,
            intermediate,
            n_experts,
            self.rank,
            self.alpha,
            self.dropout,
            self.top_k,
            self.targets,
            device,
        )
    }
}

impl Default for MoeConfig {
    fn default() -> Self {
        Self {
            rank: 64,
            alpha: 128.0,
            dropout: 0.05,
            top_k: 2,
            initial_experts: 8,
            targets: FfnTargets::default(),
        }
    }
}

/// The continual model.
#[derive(Module, Debug)]
pub struct CmoeModel<B: Backend> {
    /// The base LLaVA, frozen.
    pub base: Llava<B>,
    /// `moe[layer]`: that decoder layer's experts and router bank.
    pub moe: Vec<MoeLoraFfn<B>>,
}

/// Logits and what every MoE layer's routing did.
#[derive(Debug, Clone)]
pub struct CmoeOutput<B: Backend> {
    /// `[batch, seq, vocab]`.
    pub logits: Tensor<B, 3>,
    /// One entry per decoder layer, in order.
    pub routing: Vec<LayerRouting<B>>,
}

impl<B: Backend> CmoeModel<B> {
    /// Wraps `base` (frozen) with the first task's experts and router in every layer.
    pub fn new(base: Llava<B>, config: &MoeConfig, device: &B::Device) -> Self {
        let layers = &base.language_model.model.layers;
        let moe = layers
            .iter()
            .map(|layer| {
                let [hidden, intermediate] = layer.mlp.gate_proj.weight.dims();
                config.init_layer(hidden, intermediate, config.initial_experts, device)
            })
            .collect();
        Self {
            base: base.no_grad(),
            moe,
        }
    }

    /// Number of tasks with routers.
    pub fn num_tasks(&self) -> usize {
        self.moe.first().map_or(0, |l| l.routers.num_tasks())
    }

    /// Experts per layer.
    pub fn experts_per_layer(&self) -> Vec<usize> {
        self.moe.iter().map(|l| l.experts.len()).collect()
    }

    /// Forward with task `task`'s routers.
    pub fn forward(&self, input: LlavaInput<B>, task: usize) -> Result<CmoeOutput<B>, LlavaError> {
        let routed = self.routed(task, true)?;
        let hidden = self.base.forward_hidden_with(input, None, Some(&routed))?;
        let logits = self.base.language_model.logits(hidden);
        Ok(CmoeOutput {
            logits,
            routing: routed.routing.into_inner(),
        })
    }

    /// Generates answers with task `task`'s routers (KV-cached; see [`cmoe_llava::generate`]).
    pub fn generate(
        &self,
        input: LlavaInput<B>,
        task: usize,
        config: &GenerationConfig,
    ) -> Result<Vec<Vec<u32>>, LlavaError> {
        let routed = self.routed(task, false)?;
        generate_with(&self.base, input, config, Some(&routed))
    }

    /// The MLP hook that runs every layer's MoE with task `task`'s routers.
    fn routed(&self, task: usize, record: bool) -> Result<RoutedMlp<'_, B>, LlavaError> {
        if task >= self.num_tasks() {
            return Err(LlavaError::Input(format!(
                "task {task} has no router ({} tasks)",
                self.num_tasks()
            )));
        }
        Ok(RoutedMlp {
            layers: &self.moe,
            task,
            routing: RefCell::new(Vec::new()),
            record,
        })
    }

    /// PTL's feature `F_end`: the frozen base model's (no experts) last-layer hidden state at
    /// the last position, `[batch, hidden]` (prompts are left-padded, so it is the last prompt
    /// token of every row).
    pub fn task_features(&self, input: LlavaInput<B>) -> Result<Tensor<B, 2>, LlavaError> {
        let hidden = self.base.forward_hidden(input, None)?.cast(DType::F32);
        let [b, s, d] = hidden.dims();
        Ok(hidden.slice([0..b, s - 1..s, 0..d]).reshape([b, d]))
    }

    /// [`Self::task_features`] read at `positions[row]` instead of the last position: with a
    /// causal decoder, the feature of a training sequence at its last prompt token.
    pub fn task_features_at(
        &self,
        input: LlavaInput<B>,
        positions: &[usize],
    ) -> Result<Tensor<B, 2>, LlavaError> {
        let hidden = self.base.forward_hidden(input, None)?.cast(DType::F32);
        let [b, s, d] = hidden.dims();
        if positions.len() != b || positions.iter().any(|&p| p >= s) {
            return Err(LlavaError::Input(format!(
                "feature positions {positions:?} do not fit a batch of {b} x {s}"
            )));
        }
        let rows: Vec<i64> = positions
            .iter()
            .enumerate()
            .map(|(row, &p)| (row * s + p) as i64)
            .collect();
        let index = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [b]), &hidden.device());
        Ok(hidden.reshape([b * s, d]).select(0, index))
    }
}

/// The [`MlpOverride`] that runs each layer's MoE with one task's router and records routing.
struct RoutedMlp<'a, B: Backend> {
    layers: &'a [MoeLoraFfn<B>],
    task: usize,
    routing: RefCell<Vec<LayerRouting<B>>>,
    /// Whether to keep each call's routing (training and statistics do; generation does not).
    record: bool,
}

impl<B: Backend> MlpOverride<B> for RoutedMlp<'_, B> {
    fn forward(&self, layer: usize, base: &LlamaMlp<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let (out, routing) = self.layers[layer].forward(base, x, self.task);
        if self.record {
            self.routing.borrow_mut().push(routing);
        }
        out
    }
}
