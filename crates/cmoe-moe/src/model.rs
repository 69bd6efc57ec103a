//! A frozen host model with MoE-LoRA FFNs: the base plus one [`MoeLoraFfn`] per FFN block, run
//! with the router of a chosen task.

use std::cell::{Cell, RefCell};

use burn::module::Module;
use burn::tensor::{DType, Int, Tensor, TensorData, backend::Backend};
use serde::{Deserialize, Serialize};

use crate::error::MoeError;
use crate::host::{FfnHook, GatedFfn, ModelInput, MoeHost};
use crate::layer::{Dispatch, FfnTargets, LayerRouting, MoeLoraFfn, MoeLoraFfnConfig};
use crate::ptl::{Location, PtlFeature, TaskLocator};
use crate::train::AnswerTargets;

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
    /// The configuration of a layer of `experts` experts shaped like these settings, for an
    /// FFN of widths `d_model` / `d_ff`.
    pub fn layer(&self, d_model: usize, d_ff: usize, experts: usize) -> MoeLoraFfnConfig {
        MoeLoraFfnConfig::new(d_model, d_ff)
            .with_experts(experts)
            .with_rank(self.rank)
            .with_alpha(self.alpha)
            .with_dropout(self.dropout)
            .with_top_k(self.top_k)
            .with_targets(self.targets)
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

/// The continual model: a frozen host `H` (LLaVA, or any [`MoeHost`]) and the experts and
/// routers of each of its FFN blocks.
#[derive(Module, Debug)]
pub struct CmoeModel<B: Backend, H: Module<B>> {
    /// The host model, frozen.
    pub base: H,
    /// `moe[layer]`: that FFN block's experts and router bank.
    pub moe: Vec<MoeLoraFfn<B>>,
}

/// Logits and what every MoE layer's routing did.
#[derive(Debug, Clone)]
pub struct CmoeOutput<B: Backend, const D: usize = 3> {
    /// `[batch, seq, vocab]` ([`CmoeModel::forward`]) or `[answers, vocab]`
    /// ([`CmoeModel::forward_answers`]).
    pub logits: Tensor<B, D>,
    /// One entry per decoder layer, in order.
    pub routing: Vec<LayerRouting<B>>,
}

impl<B: Backend, H: Module<B>> CmoeModel<B, H> {
    /// Number of tasks with routers.
    pub fn num_tasks(&self) -> usize {
        self.moe.first().map_or(0, |l| l.routers.num_tasks())
    }

    /// Whether the initial experts were trained in their own phase (every layer then keeps
    /// that phase's router, which the first task's extends).
    pub fn has_initial_router(&self) -> bool {
        self.moe
            .first()
            .is_some_and(|l| l.routers.initial.is_some())
    }

    /// Experts per layer.
    pub fn experts_per_layer(&self) -> Vec<usize> {
        self.moe.iter().map(|l| l.experts.len()).collect()
    }

    /// Sets how every MoE layer sends tokens to its experts: [`Dispatch::Masked`] (the
    /// default; nothing read back to the host: GPU backends) or [`Dispatch::Grouped`]
    /// (cheaper arithmetic: CPU backends). Not saved with the state.
    pub fn set_dispatch(&mut self, dispatch: Dispatch) {
        for layer in &mut self.moe {
            layer.dispatch = dispatch;
        }
    }
}

impl<B: Backend, H: MoeHost<B>> CmoeModel<B, H> {
    /// Wraps `base` (frozen) with the first task's experts and router in every FFN block.
    pub fn new(base: H, config: &MoeConfig, device: &B::Device) -> Self {
        let moe = base
            .ffn_widths()
            .into_iter()
            .map(|[d_model, d_ff]| {
                config
                    .layer(d_model, d_ff, config.initial_experts)
                    .init(device)
            })
            .collect();
        Self {
            base: base.no_grad(),
            moe,
        }
    }

    /// Forward with task `task`'s routers. Padding positions (attention mask 0) are not sent
    /// to the experts and do not count in the routing statistics or the aux loss.
    pub fn forward(&self, input: ModelInput<B>, task: usize) -> Result<CmoeOutput<B>, MoeError> {
        let (hidden, routing) = self.hidden(input, task)?;
        Ok(CmoeOutput {
            logits: self.base.logits(hidden),
            routing,
        })
    }

    /// [`Self::forward`] with logits at the answer positions only (`[answers, vocab]`): what
    /// the training objective reads, without the vocabulary head and softmax elsewhere.
    pub fn forward_answers(
        &self,
        input: ModelInput<B>,
        task: usize,
        answers: &AnswerTargets,
    ) -> Result<CmoeOutput<B, 2>, MoeError> {
        let (hidden, routing) = self.hidden(input, task)?;
        let picked = answers.select(hidden).unsqueeze_dim::<3>(0);
        let logits = self.base.logits(picked);
        let [_, n, vocab] = logits.dims();
        Ok(CmoeOutput {
            logits: logits.reshape([n, vocab]),
            routing,
        })
    }

    /// The final hidden states with task `task`'s routers, and the routing of every layer.
    fn hidden(
        &self,
        input: ModelInput<B>,
        task: usize,
    ) -> Result<(Tensor<B, 3>, Vec<LayerRouting<B>>), MoeError> {
        let routed = self.routed(task, true, input.real_tokens())?;
        let hidden = self.base.forward_hidden(input, Some(&routed))?;
        Ok((hidden, routed.routing.into_inner()))
    }

    /// The FFN hook that runs every layer's MoE with task `task`'s routers; `real` marks the
    /// first pass's non-padding tokens (`[batch * seq, 1]`, 1 or 0, as
    /// [`ModelInput::real_tokens`] gives them); `record` keeps each layer's routing.
    pub fn routed(
        &self,
        task: usize,
        record: bool,
        real: Option<Tensor<B, 2>>,
    ) -> Result<RoutedFfn<'_, B>, MoeError> {
        if task >= self.num_tasks() {
            return Err(MoeError::Input(format!(
                "task {task} has no router ({} tasks)",
                self.num_tasks()
            )));
        }
        Ok(RoutedFfn {
            layers: &self.moe,
            task,
            routing: RefCell::new(Vec::new()),
            record,
            real,
            first_pass_done: Cell::new(false),
        })
    }

    /// Which task each prompt (image + question, left-padded, no answer) belongs to, by
    /// `locator` on the prompts' features, with every task's scores.
    pub fn locate(
        &self,
        locator: &TaskLocator<B>,
        prompts: ModelInput<B>,
    ) -> Result<Location, MoeError> {
        let features = self.task_features(prompts, locator.feature())?;
        locator
            .locate(features)
            .ok_or_else(|| MoeError::Input("no task has been learned yet".into()))
    }

    /// PTL's feature of prompts (image + question, left-padded, no answer), `[batch, width]`:
    /// from the frozen base model (no experts), at the last position (the last prompt token of
    /// every row) or pooled over the question ([`PtlFeature`]).
    pub fn task_features(
        &self,
        input: ModelInput<B>,
        feature: PtlFeature,
    ) -> Result<Tensor<B, 2>, MoeError> {
        let [b, s] = input.input_ids.dims();
        self.task_features_at(input, &vec![s - 1; b], feature)
    }

    /// [`Self::task_features`] with each row's last prompt token at `positions[row]`: with a
    /// causal decoder, the feature of a training sequence (prompt and answer) equals that of
    /// its prompt alone.
    pub fn task_features_at(
        &self,
        input: ModelInput<B>,
        positions: &[usize],
        feature: PtlFeature,
    ) -> Result<Tensor<B, 2>, MoeError> {
        let [b, s] = input.input_ids.dims();
        if positions.len() != b || positions.iter().any(|&p| p >= s) {
            return Err(MoeError::Input(format!(
                "feature positions {positions:?} do not fit a batch of {b} x {s}"
            )));
        }
        // The ids and mask are read back for the pooled feature only.
        let (input_ids, attention_mask) = match feature {
            PtlFeature::Last => (None, None),
            PtlFeature::Mean | PtlFeature::Both => {
                (Some(input.input_ids.clone()), input.attention_mask.clone())
            }
        };
        let hidden = self.base.forward_hidden(input, None)?.cast(DType::F32);
        let [_, _, d] = hidden.dims();
        let device = hidden.device();
        let last = || {
            let rows: Vec<i64> = positions
                .iter()
                .enumerate()
                .map(|(row, &p)| (row * s + p) as i64)
                .collect();
            let index = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [b]), &device);
            hidden.clone().reshape([b * s, d]).select(0, index)
        };
        let mean = || {
            // Per row, equal weights on the question's real tokens: from where the host says
            // the question starts (LLaVA: after the image) up to the last prompt token.
            let ids: Vec<i64> = input_ids
                .clone()
                .map(|t| t.into_data().iter::<i64>().collect())
                .unwrap_or_default();
            let mask: Option<Vec<i64>> = attention_mask
                .clone()
                .map(|m| m.into_data().iter::<i64>().collect());
            let mut weights = vec![0f32; b * s];
            for (row, &end) in positions.iter().enumerate() {
                let start = self.base.question_start(&ids[row * s..(row + 1) * s], end);
                let real = |p: usize| mask.as_ref().is_none_or(|m| m[row * s + p] != 0);
                let span: Vec<usize> = (start..=end).filter(|&p| real(p)).collect();
                for &p in &span {
                    weights[row * s + p] = 1.0 / span.len() as f32;
                }
            }
            let weights = Tensor::<B, 3>::from_data(TensorData::new(weights, [b, 1, s]), &device);
            weights.matmul(hidden.clone()).reshape([b, d])
        };
        Ok(match feature {
            PtlFeature::Last => last(),
            PtlFeature::Mean => mean(),
            PtlFeature::Both => Tensor::cat(vec![last(), mean()], 1),
        })
    }
}

/// The [`FfnHook`] that runs each layer's MoE with one task's router and records routing.
pub struct RoutedFfn<'a, B: Backend> {
    layers: &'a [MoeLoraFfn<B>],
    task: usize,
    routing: RefCell<Vec<LayerRouting<B>>>,
    /// Whether to keep each call's routing (training and statistics do; generation does not).
    record: bool,
    /// Which tokens of the first pass through the decoder (the whole sequence; a generation's
    /// prompt) are not padding (`[batch * seq, 1]`, 1 or 0); `None`: all. Later passes
    /// (generated tokens) are all real.
    real: Option<Tensor<B, 2>>,
    /// Whether the first pass has gone through every layer.
    first_pass_done: Cell<bool>,
}

impl<B: Backend> FfnHook<B> for RoutedFfn<'_, B> {
    fn forward(&self, layer: usize, ffn: &dyn GatedFfn<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let real = (!self.first_pass_done.get())
            .then_some(self.real.as_ref())
            .flatten();
        if layer + 1 == self.layers.len() {
            self.first_pass_done.set(true);
        }
        let (out, routing) = self.layers[layer].forward(ffn, x, self.task, real);
        if self.record {
            self.routing.borrow_mut().push(routing);
        }
        out
    }
}
