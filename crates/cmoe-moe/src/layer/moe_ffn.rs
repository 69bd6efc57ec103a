//! The MoE-LoRA FFN layer (paper Eq. 1) around a frozen gated FFN ([`GatedFfn`]).
//!
//! For a token `x` and the selected task's router `G`: `g = G x`, the top-k logits are
//! softmax-normalised into weights `w'`, and each targeted projection `W0` (gate, up, down by
//! default) becomes `W0 x + sum_i w'_i * scale * B_i A_i x`, the three projections sharing one
//! routing decision per token. Dispatch is sparse: the tokens routed to each expert are gathered,
//! run through that expert only, and scatter-added back, so the cost grows with `k`, not with
//! the number of experts.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{
    DType, IndexingUpdateOp, Int, Tensor, TensorData, activation, backend::Backend,
};
use serde::{Deserialize, Serialize};

use crate::host::GatedFfn;
use crate::layer::{LoraExpert, LoraExpertConfig};
use crate::layer::{RouterBank, TaskRouter, TaskRouterConfig};
use crate::train::noise;

/// Which projections of the FFN carry experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FfnTargets {
    /// The gate projection.
    pub gate: bool,
    /// The up projection.
    pub up: bool,
    /// The down projection.
    pub down: bool,
}

impl Default for FfnTargets {
    fn default() -> Self {
        Self {
            gate: true,
            up: true,
            down: true,
        }
    }
}

/// One expert of an FFN layer: a LoRA pair on each targeted projection.
#[derive(Module, Debug)]
pub struct FfnExpert<B: Backend> {
    /// On the gate projection (`d_model -> d_ff`).
    pub gate: Option<LoraExpert<B>>,
    /// On the up projection (`d_model -> d_ff`).
    pub up: Option<LoraExpert<B>>,
    /// On the down projection (`d_ff -> d_model`).
    pub down: Option<LoraExpert<B>>,
}

impl<B: Backend> FfnExpert<B> {
    /// A trainable copy (new parameter ids).
    pub fn duplicate(&self) -> Self {
        Self {
            gate: self.gate.as_ref().map(LoraExpert::duplicate),
            up: self.up.as_ref().map(LoraExpert::duplicate),
            down: self.down.as_ref().map(LoraExpert::duplicate),
        }
    }

    /// The element-wise mean of `experts`.
    pub fn mean(experts: &[&FfnExpert<B>]) -> Self {
        let part = |f: fn(&FfnExpert<B>) -> Option<&LoraExpert<B>>| {
            let parts: Option<Vec<&LoraExpert<B>>> = experts.iter().map(|e| f(e)).collect();
            parts.map(|p| LoraExpert::mean(&p))
        };
        Self {
            gate: part(|e| e.gate.as_ref()),
            up: part(|e| e.up.as_ref()),
            down: part(|e| e.down.as_ref()),
        }
    }
}

/// Configuration of a [`MoeLoraFfn`] around a gated FFN `d_model -> d_ff -> d_model`
/// (defaults: the paper's rank 64, alpha 128, top-2, 8 experts, experts on all three
/// projections).
#[derive(Config, Debug)]
pub struct MoeLoraFfnConfig {
    /// Width of the FFN's input and output.
    pub d_model: usize,
    /// Width of the FFN's intermediate layer.
    pub d_ff: usize,
    /// Experts the layer starts with (task 0's router scores them all).
    #[config(default = 8)]
    pub experts: usize,
    /// LoRA rank `r`.
    #[config(default = 64)]
    pub rank: usize,
    /// LoRA alpha (`scale = alpha / r`).
    #[config(default = 128.0)]
    pub alpha: f64,
    /// LoRA dropout on each expert's input.
    #[config(default = 0.05)]
    pub dropout: f64,
    /// Experts per token.
    #[config(default = 2)]
    pub top_k: usize,
    /// Projections carrying experts.
    #[config(default = "FfnTargets::default()")]
    pub targets: FfnTargets,
}

impl MoeLoraFfnConfig {
    /// A layer with [`Self::experts`] fresh experts and task 0's router.
    pub fn init<B: Backend>(&self, device: &B::Device) -> MoeLoraFfn<B> {
        MoeLoraFfn {
            experts: (0..self.experts)
                .map(|_| self.init_expert(device))
                .collect(),
            routers: TaskRouterConfig::new(self.d_model, self.experts).init_bank(device),
            dropout: DropoutConfig::new(self.dropout).init(),
            scale: self.alpha / self.rank as f64,
            top_k: self.top_k,
        }
    }

    /// One fresh expert: a LoRA pair on each targeted projection.
    pub fn init_expert<B: Backend>(&self, device: &B::Device) -> FfnExpert<B> {
        let lora = |d_input, d_output| {
            LoraExpertConfig::new(d_input, d_output)
                .with_rank(self.rank)
                .init(device)
        };
        let (d, d_ff, targets) = (self.d_model, self.d_ff, self.targets);
        FfnExpert {
            gate: targets.gate.then(|| lora(d, d_ff)),
            up: targets.up.then(|| lora(d, d_ff)),
            down: targets.down.then(|| lora(d_ff, d)),
        }
    }
}

/// The experts and per-task routers of one decoder layer's FFN.
#[derive(Module, Debug)]
pub struct MoeLoraFfn<B: Backend> {
    /// Every expert this layer has, oldest first; new tasks append.
    pub experts: Vec<FfnExpert<B>>,
    /// One router per task.
    pub routers: RouterBank<B>,
    /// LoRA dropout on each expert's input.
    pub dropout: Dropout,
    /// `alpha / r`.
    pub scale: f64,
    /// Experts per token.
    pub top_k: usize,
}

/// What one MoE layer's routing did on a batch.
#[derive(Debug, Clone)]
pub struct LayerRouting<B: Backend> {
    /// Switch-Transformer load-balancing loss `N_e * sum_i f_i P_i` (differentiable through `P`).
    pub aux_loss: Tensor<B, 1>,
    /// Per expert of the router: how many tokens selected it among their top-k.
    pub selections: Vec<u64>,
    /// Tokens routed.
    pub tokens: u64,
}

/// The rows one expert receives and their weights.
struct Dispatch<B: Backend> {
    /// Row indices into the flattened tokens.
    rows: Tensor<B, 1, Int>,
    /// Routing weight times the LoRA scale, `[rows, 1]`.
    weights: Tensor<B, 2>,
}

/// The routing decision for a batch of tokens.
struct Routes<B: Backend> {
    /// Softmax weights of the top-k experts, flattened `[n * k]` (token-major).
    weights: Tensor<B, 1>,
    /// Per expert: the tokens routed to it and their slots in `weights`.
    groups: Vec<(Vec<i64>, Vec<i64>)>,
}

impl<B: Backend> MoeLoraFfn<B> {
    /// Routes the rows of `x` `[n, d]`; only the rows `real` marks (all when `None`) are sent
    /// to experts and counted in the statistics and the aux loss: padding takes no part.
    fn route(
        &self,
        router: &TaskRouter<B>,
        x: Tensor<B, 2>,
        real: Option<&[bool]>,
    ) -> (Routes<B>, LayerRouting<B>) {
        let [n, _] = x.dims();
        let n_experts = router.num_experts();
        let k = self.top_k.min(n_experts);
        let logits = router.logits(x);
        let (top_logits, top_index) = top_k(logits.clone(), k);
        let weights = activation::softmax(top_logits, 1).reshape([n * k]);
        let index: Vec<i64> = top_index.into_data().iter::<i64>().collect();
        let is_real = |row: usize| real.is_none_or(|r| r[row]);
        let mut groups = vec![(Vec::new(), Vec::new()); n_experts];
        let mut top1 = vec![0u64; n_experts];
        let mut selections = vec![0u64; n_experts];
        for (slot, &e) in index.iter().enumerate() {
            if !is_real(slot / k) {
                continue;
            }
            let e = e as usize;
            groups[e].0.push((slot / k) as i64);
            groups[e].1.push(slot as i64);
            selections[e] += 1;
            if slot % k == 0 {
                top1[e] += 1;
            }
        }
        // aux = N_e * sum_i f_i * P_i over the real tokens: f from top-1 counts (constant), P
        // the mean router probability.
        let device = logits.device();
        let (logits, tokens) = match real.filter(|r| r.iter().any(|&keep| !keep)) {
            Some(real) => {
                let rows: Vec<i64> = (0..n).filter(|&r| real[r]).map(|r| r as i64).collect();
                let count = rows.len();
                let rows = Tensor::<B, 1, Int>::from_data(TensorData::new(rows, [count]), &device);
                (logits.select(0, rows), count)
            }
            None => (logits, n),
        };
        let aux_loss = if tokens == 0 {
            Tensor::zeros([1], &device)
        } else {
            let mean_prob = activation::softmax(logits, 1)
                .mean_dim(0)
                .reshape([n_experts]);
            let f: Vec<f32> = top1.iter().map(|&c| c as f32 / tokens as f32).collect();
            let f = Tensor::<B, 1>::from_data(TensorData::new(f, [n_experts]), &device);
            (f * mean_prob).sum() * n_experts as f64
        };
        (
            Routes { weights, groups },
            LayerRouting {
                aux_loss,
                selections,
                tokens: tokens as u64,
            },
        )
    }

    /// Per expert, the rows routed to it (an index tensor) and their routing weights times
    /// the LoRA scale `[rows, 1]`; `None` for an expert no token chose.
    fn dispatch(&self, routes: &Routes<B>, device: &B::Device) -> Vec<Option<Dispatch<B>>> {
        routes
            .groups
            .iter()
            .map(|(tokens, slots)| {
                if tokens.is_empty() {
                    return None;
                }
                let index = |v: &Vec<i64>| {
                    Tensor::<B, 1, Int>::from_data(TensorData::new(v.clone(), [v.len()]), device)
                };
                let weights = routes
                    .weights
                    .clone()
                    .select(0, index(slots))
                    .unsqueeze_dim::<2>(1)
                    * self.scale;
                Some(Dispatch {
                    rows: index(tokens),
                    weights,
                })
            })
            .collect()
    }

    /// `out` `[n, width]` plus, for each expert with routed rows, its LoRA pair `part` on those
    /// rows of `input` (already dropped out), weighted, scatter-added.
    fn add_expert_deltas(
        &self,
        mut out: Tensor<B, 2>,
        input: &Tensor<B, 2>,
        dispatch: &[Option<Dispatch<B>>],
        part: fn(&FfnExpert<B>) -> Option<&LoraExpert<B>>,
    ) -> Tensor<B, 2> {
        for (expert, routed) in self.experts.iter().zip(dispatch) {
            let (Some(lora), Some(Dispatch { rows, weights })) = (part(expert), routed) else {
                continue;
            };
            let x = input.clone().select(0, rows.clone());
            let delta = (lora.delta(x) * weights.clone()).cast(out.dtype());
            out = out.select_assign(0, rows.clone(), delta, IndexingUpdateOp::Add);
        }
        out
    }

    /// The FFN output for `x` `[batch, seq, hidden]` with task `task`'s router, and what the
    /// routing did. `real` (row-major `[batch * seq]`, `None`: every token) marks the tokens
    /// that are not padding: only those reach the experts and count in the routing statistics
    /// and the aux loss; a padding token gets the frozen FFN's output. LoRA dropout draws one
    /// mask per layer input (the one gate and up read, the one down reads), which every expert
    /// on that input shares.
    pub fn forward(
        &self,
        ffn: &(impl GatedFfn<B> + ?Sized),
        x: Tensor<B, 3>,
        task: usize,
        real: Option<&[bool]>,
    ) -> (Tensor<B, 3>, LayerRouting<B>) {
        let [b, s, d] = x.dims();
        if let Some(real) = real {
            assert_eq!(real.len(), b * s, "one padding flag per token");
        }
        let flat = x.reshape([b * s, d]);
        // Routers and experts compute in f32 whatever the frozen base's dtype (bf16 / f16 for
        // a large model); their contributions are cast back to it.
        let flat32 = flat.clone().cast(DType::F32);
        let (routes, routing) = self.route(self.routers.get(task), flat32.clone(), real);
        let dispatch = self.dispatch(&routes, &flat.device());
        let input = noise::dropout(&self.dropout, flat32);
        let gate = ffn.gate(flat.clone());
        let gate = self.add_expert_deltas(gate, &input, &dispatch, |e| e.gate.as_ref());
        let up = ffn.up(flat);
        let up = self.add_expert_deltas(up, &input, &dispatch, |e| e.up.as_ref());
        let hidden = ffn.activate(gate) * up;
        let input = noise::dropout(&self.dropout, hidden.clone().cast(DType::F32));
        let down = ffn.down(hidden);
        let down = self.add_expert_deltas(down, &input, &dispatch, |e| e.down.as_ref());
        (down.reshape([b, s, d]), routing)
    }

    /// The same function computed densely (every expert on every token, weighted by the full
    /// top-k softmax): the reference the sparse dispatch is tested against.
    pub fn forward_dense(
        &self,
        ffn: &(impl GatedFfn<B> + ?Sized),
        x: Tensor<B, 3>,
        task: usize,
    ) -> Tensor<B, 3> {
        let [b, s, d] = x.dims();
        let flat = x.reshape([b * s, d]);
        let router = self.routers.get(task);
        let n_experts = router.num_experts();
        let k = self.top_k.min(n_experts);
        let logits = router.logits(flat.clone());
        let kth = top_k(logits.clone(), k).0.slice([0..b * s, k - 1..k]); // k-th largest logit
        let outside = logits.clone().lower(kth.expand([b * s, n_experts]));
        let weights = activation::softmax(logits.mask_fill(outside, f32::NEG_INFINITY), 1);
        let dense = |base: Tensor<B, 2>,
                     input: &Tensor<B, 2>,
                     part: fn(&FfnExpert<B>) -> Option<&LoraExpert<B>>| {
            let mut out = base;
            for (e, expert) in self.experts.iter().take(n_experts).enumerate() {
                if let Some(lora) = part(expert) {
                    let w = weights.clone().slice([0..b * s, e..e + 1]) * self.scale;
                    out = out + lora.delta(input.clone()) * w;
                }
            }
            out
        };
        let gate = dense(ffn.gate(flat.clone()), &flat, |e| e.gate.as_ref());
        let up = dense(ffn.up(flat.clone()), &flat, |e| e.up.as_ref());
        let hidden = ffn.activate(gate) * up;
        let down = dense(ffn.down(hidden.clone()), &hidden, |e| e.down.as_ref());
        down.reshape([b, s, d])
    }
}

/// The `k` largest entries of each row and their columns, largest first (`k` may equal the row
/// length, which Burn's `topk` does not allow).
fn top_k<B: Backend>(x: Tensor<B, 2>, k: usize) -> (Tensor<B, 2>, Tensor<B, 2, Int>) {
    let [n, _] = x.dims();
    let (values, index) = x.sort_descending_with_indices(1);
    (values.slice([0..n, 0..k]), index.slice([0..n, 0..k]))
}
