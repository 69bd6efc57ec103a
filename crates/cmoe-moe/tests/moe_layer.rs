//! The MoE-LoRA FFN layer: both dispatches against the dense definition (padding included),
//! the single-expert case against plain LoRA, routers that never change when a layer grows,
//! and experts on an FFN that is not LLaMA's.

use burn::tensor::{Distribution, Tensor, TensorData, Tolerance};
use cmoe_llava::llama::LlamaMlp;
use cmoe_moe::GatedFfn;
use cmoe_moe::layer::{Dispatch, FfnExpert, MoeLoraFfn, MoeLoraFfnConfig};
use cmoe_test_support::{randomize_experts, small_mlp, small_moe_layer};

type B = burn_flex::Flex;

fn base_mlp(device: &burn_flex::FlexDevice) -> LlamaMlp<B> {
    small_mlp(device)
}

fn layer(n_experts: usize, top_k: usize, device: &burn_flex::FlexDevice) -> MoeLoraFfn<B> {
    small_moe_layer(n_experts, top_k, device)
}

#[test]
fn both_dispatches_equal_the_dense_definition() {
    let device = Default::default();
    let base = base_mlp(&device);
    for dispatch in [Dispatch::Masked, Dispatch::Grouped] {
        for (n_experts, k) in [(8, 2), (5, 1), (4, 4), (16, 3)] {
            let mut layer = layer(n_experts, k, &device);
            layer.dispatch = dispatch;
            let x = Tensor::<B, 3>::random([3, 7, 32], Distribution::Normal(0.0, 1.0), &device);
            let (out, routing) = layer.forward(&base, x.clone(), 0, None);
            let dense = layer.forward_dense(&base, x, 0);
            out.into_data()
                .assert_approx_eq::<f32>(&dense.into_data(), Tolerance::absolute(1e-5));
            let counts = routing.counts();
            assert_eq!(counts.tokens, 21, "{dispatch:?}");
            assert_eq!(counts.selections.len(), n_experts);
            assert_eq!(counts.selections.iter().sum::<u64>(), 21 * k as u64);
        }
    }
}

#[test]
fn both_dispatches_agree_on_padding_statistics_and_gradients() {
    use burn::backend::Autodiff;
    type A = Autodiff<B>;
    let device = Default::default();
    let base = small_mlp::<A>(&device);
    // Rows 0-4 real, 5-6 padding, in each of 2 sequences.
    let real: Vec<f32> = (0..14).map(|i| if i % 7 < 5 { 1.0 } else { 0.0 }).collect();
    let real = Tensor::<A, 2>::from_data(TensorData::new(real, [14, 1]), &device);
    let x = Tensor::<A, 3>::random([2, 7, 32], Distribution::Normal(0.0, 1.0), &device);
    let shared = small_moe_layer::<A>(6, 2, &device);
    let run = |dispatch| {
        let mut layer = shared.clone();
        layer.dispatch = dispatch;
        let (out, routing) = layer.forward(&base, x.clone(), 0, Some(&real));
        let loss = out.sum() + routing.aux_loss.clone();
        let grads = loss.backward();
        let router = layer.routers.get(0).weight.grad(&grads).unwrap();
        let expert = layer.experts[0]
            .down
            .as_ref()
            .unwrap()
            .lora_b
            .grad(&grads)
            .unwrap();
        let aux: f32 = routing.aux_loss.clone().into_scalar();
        (routing.counts(), aux, router, expert)
    };
    let masked = run(Dispatch::Masked);
    let grouped = run(Dispatch::Grouped);
    assert_eq!(masked.0, grouped.0);
    assert_eq!(masked.0.tokens, 10);
    assert!(
        (masked.1 - grouped.1).abs() < 1e-5,
        "aux {} vs {}",
        masked.1,
        grouped.1
    );
    masked
        .2
        .into_data()
        .assert_approx_eq::<f32>(&grouped.2.into_data(), Tolerance::absolute(1e-4));
    masked
        .3
        .into_data()
        .assert_approx_eq::<f32>(&grouped.3.into_data(), Tolerance::absolute(1e-4));
}

#[test]
fn one_expert_with_top_k_all_is_plain_lora() {
    let device = Default::default();
    let base = base_mlp(&device);
    let layer = layer(1, 1, &device);
    let x = Tensor::<B, 3>::random([2, 5, 32], Distribution::Normal(0.0, 1.0), &device);
    let (out, _) = layer.forward(&base, x.clone(), 0, None);

    let e: &FfnExpert<B> = &layer.experts[0];
    let flat = x.reshape([10, 32]);
    let lora = |part: &cmoe_moe::layer::LoraExpert<B>, x: Tensor<B, 2>| {
        x.matmul(part.lora_a.val()).matmul(part.lora_b.val()) * layer.scale
    };
    let gate = base.gate_proj.forward(flat.clone()) + lora(e.gate.as_ref().unwrap(), flat.clone());
    let up = base.up_proj.forward(flat.clone()) + lora(e.up.as_ref().unwrap(), flat);
    let h = burn::tensor::activation::silu(gate) * up;
    let expected =
        (base.down_proj.forward(h.clone()) + lora(e.down.as_ref().unwrap(), h)).reshape([2, 5, 32]);
    out.into_data()
        .assert_approx_eq::<f32>(&expected.into_data(), Tolerance::absolute(1e-5));
}

#[test]
fn growing_a_layer_never_changes_an_older_task() {
    let device = Default::default();
    let base = base_mlp(&device);
    let mut layer = layer(4, 2, &device);
    let x = Tensor::<B, 3>::random([2, 6, 32], Distribution::Normal(0.0, 1.0), &device);
    let (before, _) = layer.forward(&base, x.clone(), 0, None);
    let old_router: TensorData = layer.routers.get(0).weight.val().into_data();

    // Task 1: two more experts (copies, then changed), router_1 = router_0 + two random columns.
    let next = layer.routers.get(0).extended(2);
    layer.routers.routers.push(next);
    layer.experts.push(layer.experts[1].duplicate());
    layer.experts.push(layer.experts[3].duplicate());
    randomize_experts(&mut layer, 4, &device);

    assert_eq!(layer.routers.get(0).weight.val().into_data(), old_router);
    assert_eq!(
        (
            layer.routers.get(0).num_experts(),
            layer.routers.get(1).num_experts()
        ),
        (4, 6)
    );
    assert_eq!(
        layer
            .routers
            .get(1)
            .weight
            .val()
            .slice([0..32, 0..4])
            .into_data(),
        old_router
    );
    // Task 0's router never reaches the new experts: its output is bit-identical.
    let (after, routing) = layer.forward(&base, x.clone(), 0, None);
    assert_eq!(after.into_data(), before.into_data());
    assert_eq!(routing.counts().selections.len(), 4);
    // Task 1's router does use them.
    let (_, routing) = layer.forward(&base, x, 1, None);
    assert_eq!(routing.counts().selections.len(), 6);
}

/// A GELU-gated FFN that is not LLaMA's: any [`GatedFfn`] carries experts.
struct GeluFfn {
    gate: burn::nn::Linear<B>,
    up: burn::nn::Linear<B>,
    down: burn::nn::Linear<B>,
}

impl GatedFfn<B> for GeluFfn {
    fn widths(&self) -> [usize; 2] {
        self.gate.weight.dims()
    }
    fn gate(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.gate.forward(x)
    }
    fn up(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.up.forward(x)
    }
    fn down(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.down.forward(x)
    }
    fn activate(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        burn::tensor::activation::gelu(x)
    }
}

#[test]
fn any_gated_ffn_gets_experts() {
    let device = Default::default();
    let linear = |i, o| burn::nn::LinearConfig::new(i, o).init::<B>(&device);
    let ffn = GeluFfn {
        gate: linear(32, 48),
        up: linear(32, 48),
        down: linear(48, 32),
    };
    let [d_model, d_ff] = ffn.widths();
    let mut layer = MoeLoraFfnConfig::new(d_model, d_ff)
        .with_experts(4)
        .with_rank(4)
        .with_dropout(0.0)
        .init::<B>(&device);
    let x = Tensor::<B, 3>::random([2, 5, 32], Distribution::Normal(0.0, 1.0), &device);
    // Fresh experts (LoRA B = 0) leave the FFN's output as it was, bit for bit.
    let flat = x.clone().reshape([10, 32]);
    let plain = ffn
        .down(ffn.activate(ffn.gate(flat.clone())) * ffn.up(flat))
        .reshape([2, 5, 32]);
    let (fresh, _) = layer.forward(&ffn, x.clone(), 0, None);
    assert_eq!(fresh.into_data(), plain.into_data());
    // Trained experts change it, and both dispatches still equal the dense definition.
    randomize_experts(&mut layer, 0, &device);
    let dense = layer.forward_dense(&ffn, x.clone(), 0);
    for dispatch in [Dispatch::Masked, Dispatch::Grouped] {
        layer.dispatch = dispatch;
        let (out, routing) = layer.forward(&ffn, x.clone(), 0, None);
        // Outputs and the sums behind them reach ~2000 here, where f32 rounds at ~1e-4: the
        // dispatches add the experts' terms in different orders.
        out.into_data()
            .assert_approx_eq::<f32>(&dense.clone().into_data(), Tolerance::absolute(2e-3));
        assert_eq!(routing.counts().selections.iter().sum::<u64>(), 10 * 2);
    }
}
