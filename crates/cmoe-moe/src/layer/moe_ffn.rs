//! The MoE-LoRA FFN layer (paper Eq. 1) around a frozen gated FFN ([`GatedFfn`]).
//!
//! For a token `x` and the selected task's router `G`: `g = G x`, the top-k logits are
//! softmax-normalised into weights `w'`, and each targeted projection `W0` (gate, up, down by
//! default) becomes `W0 x + sum_i w'_i * scale * B_i A_i x`, the three projections sharing one
//! routing decision per token.
//!
//! The top-k choice, the weights and the load-balancing loss are computed on the device. Two
//! dispatches give the same function ([`Dispatch`]): [`Dispatch::Masked`] runs every expert's
//! `A` on every token as one product and applies the routing weights on the rank side, so that
//! nothing is read back to the host (GPU backends); [`Dispatch::Grouped`] reads the routing back
//! and runs each expert on its own tokens only, so that its cost grows with `k`, not with the
//! number of experts (CPU backends, where a read-back costs nothing).

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::{
    Bool, DType, IndexingUpdateOp, Int, Tensor, TensorData, activation, backend::Backend,
};
use serde::{Deserialize, Serialize};

use crate::host::GatedFfn;
use crate::layer::{LoraExpert, LoraExpertConfig};
use crate::layer::{RouterBank, TaskRouter, TaskRouterConfig};
use crate::train::noise;

/// How a layer's tokens reach its experts. Both give the layer's function (tested against
/// [`MoeLoraFfn::forward_dense`] on every backend); they differ in cost and in what they keep
/// for the backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Dispatch {
    /// Per projection, `((x [A_1 .. A_E]) * w) [B_1; ..; B_E]`: one `[d_in, E r]` product, the
    /// routing weights (zero for the experts a token did not choose) applied per rank, one
    /// `[E r, d_out]` product. Nothing is read back to the host, two launches per projection,
    /// and autodiff keeps only `[tokens, E r]` tensors besides the input. The GPU path.
    #[default]
    Masked,
    /// The tokens routed to each expert are gathered, run through that expert alone and
    /// scatter-added back, weighted on the output side: `E / k` times less expert arithmetic
    /// than [`Self::Masked`], but the routing is read back to the host once per layer and each
    /// expert is a few small launches. The CPU path (flex, ndarray).
    Grouped,
}

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
            dispatch: Dispatch::default(),
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
    /// How tokens reach the experts (not saved with the layer: a choice of the backend).
    #[module(skip)]
    pub dispatch: Dispatch,
}

/// What one MoE layer's routing did on a batch, on the device (read it with
/// [`LayerRouting::counts`], or [`RoutingCounts::read`] for many layers at once).
#[derive(Debug, Clone)]
pub struct LayerRouting<B: Backend> {
    /// Switch-Transformer load-balancing loss `N_e * sum_i f_i P_i` (differentiable through `P`).
    pub aux_loss: Tensor<B, 1>,
    /// `[N_e]`: per expert of the router, how many real tokens had it among their top-k.
    pub selections: Tensor<B, 1>,
    /// `[1]`: real tokens routed.
    pub tokens: Tensor<B, 1>,
}

/// Routing counts read back to the host: per expert, the tokens that chose it, and the tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingCounts {
    /// Per expert of the router: real tokens that had it among their top-k.
    pub selections: Vec<u64>,
    /// Real tokens routed.
    pub tokens: u64,
}

impl<B: Backend> LayerRouting<B> {
    /// The counts, read back to the host (one read).
    pub fn counts(&self) -> RoutingCounts {
        RoutingCounts::read(std::slice::from_ref(self)).remove(0)
    }
}

impl RoutingCounts {
    /// The counts of every layer of `routing`, in one read from the device.
    pub fn read<B: Backend>(routing: &[LayerRouting<B>]) -> Vec<RoutingCounts> {
        let Some(first) = routing.first() else {
            return Vec::new();
        };
        let parts: Vec<Tensor<B, 1>> = routing
            .iter()
            .flat_map(|r| [r.tokens.clone(), r.selections.clone()])
            .map(|t| t.cast(DType::F32))
            .collect();
        let device = first.tokens.device();
        let all: Vec<f32> = Tensor::cat(parts, 0)
            .to_device(&device)
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32 counts");
        let mut at = 0;
        routing
            .iter()
            .map(|r| {
                let [experts] = r.selections.dims();
                let count = |v: f32| v.round() as u64;
                let counts = RoutingCounts {
                    tokens: count(all[at]),
                    selections: all[at + 1..at + 1 + experts]
                        .iter()
                        .map(|&v| count(v))
                        .collect(),
                };
                at += 1 + experts;
                counts
            })
            .collect()
    }
}

/// The routing decision for a batch of tokens `[n, d]` against `N_e` experts, on the device.
struct Routes<B: Backend> {
    /// `[n, N_e]` router logits (tracked: the router trains through them).
    logits: Tensor<B, 2>,
    /// `[n, N_e]` the softmax of each row's top-k logits, zero for the other experts.
    weights: Tensor<B, 2>,
    /// `[n, N_e]` whether an expert is among the row's top-k.
    selected: Tensor<B, 2, Bool>,
    /// `[n, N_e]` whether an expert is the row's first choice.
    first: Tensor<B, 2, Bool>,
}

impl<B: Backend> MoeLoraFfn<B> {
    /// Routes the rows of `x` `[n, d]` (f32) with `router`: the top-k experts of each row and
    /// their softmax weights, all on the device.
    fn route(&self, router: &TaskRouter<B>, x: Tensor<B, 2>) -> Routes<B> {
        let n_experts = router.num_experts();
        let k = self.top_k.clamp(1, n_experts);
        let logits = router.logits(x);
        let (selected, first) = top_k_mask(logits.clone().detach(), k);
        let outside = selected.clone().bool_not();
        let weights = activation::softmax(logits.clone().mask_fill(outside, f32::NEG_INFINITY), 1);
        Routes {
            logits,
            weights,
            selected,
            first,
        }
    }

    /// The routing statistics and the load-balancing loss `N_e * sum_i f_i P_i` over the rows
    /// `real` marks (`[n, 1]`, 1 for a real token, 0 for padding; `None`: every row), on the
    /// device: `f_i` is the share of real tokens whose first choice is expert `i` (a constant),
    /// `P_i` the mean router probability of expert `i` over the real tokens.
    fn routing_on_device(
        &self,
        routes: &Routes<B>,
        real: Option<&Tensor<B, 2>>,
    ) -> LayerRouting<B> {
        let [n, n_experts] = routes.logits.dims();
        let device = routes.logits.device();
        let mut selected = routes.selected.clone().float();
        let mut first = routes.first.clone().float();
        let probs = activation::softmax(routes.logits.clone(), 1);
        let (tokens, mean_prob) = match real {
            Some(real) => {
                selected = selected * real.clone();
                first = first * real.clone();
                let tokens = real.clone().sum();
                let mean =
                    (probs * real.clone()).sum_dim(0) / tokens.clone().clamp_min(1.0).unsqueeze();
                (tokens, mean)
            }
            None => (Tensor::full([1], n as f64, &device), probs.mean_dim(0)),
        };
        let f = first.sum_dim(0) / tokens.clone().clamp_min(1.0).unsqueeze();
        let aux_loss = (f * mean_prob).sum() * n_experts as f64;
        LayerRouting {
            aux_loss,
            selections: selected.sum_dim(0).reshape([n_experts]),
            tokens,
        }
    }

    /// The FFN output for `x` `[batch, seq, hidden]` with task `task`'s router, and what the
    /// routing did. `real` (`[batch * seq, 1]`, row-major, 1 for a real token and 0 for
    /// padding; `None`: every token) marks the tokens that are not padding: only those reach
    /// the experts and count in the routing statistics and the aux loss; a padding token gets
    /// the frozen FFN's output. LoRA dropout draws one mask per layer input (the one gate and
    /// up read, the one down reads), which every expert on that input shares.
    pub fn forward(
        &self,
        ffn: &(impl GatedFfn<B> + ?Sized),
        x: Tensor<B, 3>,
        task: usize,
        real: Option<&Tensor<B, 2>>,
    ) -> (Tensor<B, 3>, LayerRouting<B>) {
        let [b, s, d] = x.dims();
        if let Some(real) = real {
            assert_eq!(real.dims(), [b * s, 1], "one padding flag per token");
        }
        let flat = x.reshape([b * s, d]);
        // Routers and experts compute in f32 whatever the frozen base's dtype (bf16 / f16 for
        // a large model); their contributions are cast back to it.
        let flat32 = flat.clone().cast(DType::F32);
        let routes = self.route(self.routers.get(task), flat32.clone());
        let (out, routing) = match self.dispatch {
            Dispatch::Masked => {
                let routing = self.routing_on_device(&routes, real);
                (
                    self.forward_masked(ffn, flat, flat32, routes, real),
                    routing,
                )
            }
            Dispatch::Grouped => self.forward_grouped(ffn, flat, flat32, routes, real),
        };
        (out.reshape([b, s, d]), routing)
    }

    /// [`Dispatch::Masked`]: per projection, all the router's experts in two products, the
    /// routing weights applied on the rank side.
    fn forward_masked(
        &self,
        ffn: &(impl GatedFfn<B> + ?Sized),
        flat: Tensor<B, 2>,
        flat32: Tensor<B, 2>,
        routes: Routes<B>,
        real: Option<&Tensor<B, 2>>,
    ) -> Tensor<B, 2> {
        let [n, n_experts] = routes.weights.dims();
        let experts = &self.experts[..n_experts];
        let weights = match real {
            Some(real) => routes.weights * real.clone(),
            None => routes.weights,
        } * self.scale;
        let Some(rank) = experts.first().and_then(FfnExpert::rank) else {
            return ffn.down(ffn.activate(ffn.gate(flat.clone())) * ffn.up(flat));
        };
        // `[n, N_e]` to `[n, N_e * r]`: each expert's weight on each of its ranks.
        let per_rank = weights
            .unsqueeze_dim::<3>(2)
            .expand([n, n_experts, rank])
            .reshape([n, n_experts * rank]);
        let delta = |input: &Tensor<B, 2>, part: fn(&FfnExpert<B>) -> Option<&LoraExpert<B>>| {
            let parts: Option<Vec<&LoraExpert<B>>> = experts.iter().map(part).collect();
            parts.map(|parts| masked_delta(input.clone(), &parts, per_rank.clone()))
        };
        let add = |base: Tensor<B, 2>, delta: Option<Tensor<B, 2>>| match delta {
            Some(delta) => {
                let dtype = base.dtype();
                base + delta.cast(dtype)
            }
            None => base,
        };
        let input = noise::dropout(&self.dropout, flat32);
        let gate = add(ffn.gate(flat.clone()), delta(&input, |e| e.gate.as_ref()));
        let up = add(ffn.up(flat), delta(&input, |e| e.up.as_ref()));
        let hidden = ffn.activate(gate) * up;
        let input = noise::dropout(&self.dropout, hidden.clone().cast(DType::F32));
        add(ffn.down(hidden), delta(&input, |e| e.down.as_ref()))
    }

    /// [`Dispatch::Grouped`]: the routing read back, each expert run on its own rows.
    fn forward_grouped(
        &self,
        ffn: &(impl GatedFfn<B> + ?Sized),
        flat: Tensor<B, 2>,
        flat32: Tensor<B, 2>,
        routes: Routes<B>,
        real: Option<&Tensor<B, 2>>,
    ) -> (Tensor<B, 2>, LayerRouting<B>) {
        let (groups, routing) = self.groups(&routes, real);
        let input = noise::dropout(&self.dropout, flat32);
        let gate = ffn.gate(flat.clone());
        let gate = self.add_grouped(gate, &input, &groups, |e| e.gate.as_ref());
        let up = ffn.up(flat);
        let up = self.add_grouped(up, &input, &groups, |e| e.up.as_ref());
        let hidden = ffn.activate(gate) * up;
        let input = noise::dropout(&self.dropout, hidden.clone().cast(DType::F32));
        let down = ffn.down(hidden);
        let down = self.add_grouped(down, &input, &groups, |e| e.down.as_ref());
        (down, routing)
    }

    /// Reads the routing back: per expert, the real rows routed to it and their weights times
    /// the LoRA scale (`None` for an expert no token chose), and the routing statistics.
    fn groups(
        &self,
        routes: &Routes<B>,
        real: Option<&Tensor<B, 2>>,
    ) -> (Vec<Option<Group<B>>>, LayerRouting<B>) {
        let [n, n_experts] = routes.weights.dims();
        let device = routes.weights.device();
        let read_bools =
            |t: Tensor<B, 2, Bool>| -> Vec<bool> { t.into_data().iter::<bool>().collect() };
        let selected = read_bools(routes.selected.clone());
        let first = read_bools(routes.first.clone());
        let real: Option<Vec<bool>> = real
            .map(|r| r.to_data().iter::<f32>().map(|v| v != 0.0).collect())
            .filter(|r: &Vec<bool>| r.iter().any(|&keep| !keep));
        let is_real = |row: usize| real.as_ref().is_none_or(|r| r[row]);
        let mut rows = vec![Vec::new(); n_experts];
        let mut top1 = vec![0u64; n_experts];
        for row in (0..n).filter(|&row| is_real(row)) {
            for e in 0..n_experts {
                if selected[row * n_experts + e] {
                    rows[e].push(row as i64);
                }
                if first[row * n_experts + e] {
                    top1[e] += 1;
                }
            }
        }
        let index = |v: &[i64]| {
            Tensor::<B, 1, Int>::from_data(TensorData::new(v.to_vec(), [v.len()]), &device)
        };
        let groups = rows
            .iter()
            .enumerate()
            .map(|(e, rows)| {
                (!rows.is_empty()).then(|| {
                    let rows = index(rows);
                    let weights = routes
                        .weights
                        .clone()
                        .slice([0..n, e..e + 1])
                        .select(0, rows.clone())
                        * self.scale;
                    Group { rows, weights }
                })
            })
            .collect();
        // aux = N_e * sum_i f_i * P_i over the real tokens: f from top-1 counts (constant), P
        // the mean router probability.
        let (logits, tokens) = match &real {
            Some(real) => {
                let kept: Vec<i64> = (0..n).filter(|&r| real[r]).map(|r| r as i64).collect();
                let count = kept.len();
                (routes.logits.clone().select(0, index(&kept)), count)
            }
            None => (routes.logits.clone(), n),
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
        let selections: Vec<f32> = rows.iter().map(|r| r.len() as f32).collect();
        let routing = LayerRouting {
            aux_loss,
            selections: Tensor::from_data(TensorData::new(selections, [n_experts]), &device),
            tokens: Tensor::from_data(TensorData::new(vec![tokens as f32], [1]), &device),
        };
        (groups, routing)
    }

    /// `out` `[n, width]` plus, for each expert with routed rows, its LoRA pair `part` on those
    /// rows of `input` (already dropped out), weighted on the output side, scatter-added. The
    /// rows are gathered per projection: the gradients then sum in the order the CPU runs have
    /// always used, so their results stay bit-identical.
    fn add_grouped(
        &self,
        mut out: Tensor<B, 2>,
        input: &Tensor<B, 2>,
        groups: &[Option<Group<B>>],
        part: fn(&FfnExpert<B>) -> Option<&LoraExpert<B>>,
    ) -> Tensor<B, 2> {
        for (expert, group) in self.experts.iter().zip(groups) {
            let (Some(lora), Some(Group { rows, weights })) = (part(expert), group) else {
                continue;
            };
            let x = input.clone().select(0, rows.clone());
            let delta = (lora.delta(x) * weights.clone()).cast(out.dtype());
            out = out.select_assign(0, rows.clone(), delta, IndexingUpdateOp::Add);
        }
        out
    }

    /// The same function computed densely (every expert on every token, one product each,
    /// weighted by the full top-k softmax): the reference both dispatches are tested against.
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
        let (values, _) = logits.clone().sort_descending_with_indices(1);
        let kth = values.slice([0..b * s, k - 1..k]); // the k-th largest logit
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

/// The rows one expert receives under [`Dispatch::Grouped`] and their weights.
struct Group<B: Backend> {
    /// Row indices into the flattened tokens.
    rows: Tensor<B, 1, Int>,
    /// Routing weight times the LoRA scale, `[rows, 1]`.
    weights: Tensor<B, 2>,
}

impl<B: Backend> FfnExpert<B> {
    /// The LoRA rank of this expert's pairs (`None` when it targets no projection).
    fn rank(&self) -> Option<usize> {
        [&self.gate, &self.up, &self.down]
            .into_iter()
            .flatten()
            .next()
            .map(|lora| lora.lora_a.dims()[1])
    }
}

/// `sum_e w_e (x A_e) B_e` for every expert `e` of `parts` as two products: `x [A_1 .. A_E]`
/// `[n, E r]`, times `per_rank` (each expert's routing weight and the LoRA scale, repeated over
/// its ranks), times `[B_1; ..; B_E]`.
fn masked_delta<B: Backend>(
    x: Tensor<B, 2>,
    parts: &[&LoraExpert<B>],
    per_rank: Tensor<B, 2>,
) -> Tensor<B, 2> {
    let a = Tensor::cat(parts.iter().map(|p| p.lora_a.val()).collect(), 1);
    let b = Tensor::cat(parts.iter().map(|p| p.lora_b.val()).collect(), 0);
    (x.matmul(a) * per_rank).matmul(b)
}

/// Per row of `logits` `[n, N_e]` (not tracked), the `k` largest entries as a mask, and the
/// largest one as a mask, by `k` arg-max passes on the device (Burn 0.21's `argtopk` is not
/// implemented on every backend, and its sort reads the tensor back to the host).
fn top_k_mask<B: Backend>(
    logits: Tensor<B, 2>,
    k: usize,
) -> (Tensor<B, 2, Bool>, Tensor<B, 2, Bool>) {
    let [n, n_experts] = logits.dims();
    let columns = Tensor::<B, 1, Int>::arange(0..n_experts as i64, &logits.device())
        .reshape([1, n_experts])
        .expand([n, n_experts]);
    let choose = |remaining: &Tensor<B, 2>| {
        let best = remaining.clone().argmax(1).expand([n, n_experts]);
        columns.clone().equal(best)
    };
    let first = choose(&logits);
    let mut selected = first.clone();
    let mut remaining = logits;
    for _ in 1..k {
        remaining = remaining.mask_fill(selected.clone(), f32::NEG_INFINITY);
        selected = selected.bool_or(choose(&remaining));
    }
    (selected, first)
}
