//! The MoE-LoRA layer on every compiled backend (wgpu through lavapipe in CI): sparse dispatch
//! equals the dense definition, and one expert with top-k = 1 equals plain LoRA.

use burn::module::Param;
use burn::tensor::{Distribution, Tensor, Tolerance, backend::Backend};
use llava_cmoe::llava::config::TextConfig;
use llava_cmoe::llava::llama::LlamaMlp;
use llava_cmoe::moe::moe_ffn::{FfnTargets, MoeLoraFfn};

fn base_mlp<B: Backend>(device: &B::Device) -> LlamaMlp<B> {
    let config: TextConfig = serde_json::from_str(
        r#"{"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10}"#,
    )
    .unwrap();
    config.init::<B>(false, device).model.layers.remove(0).mlp
}

fn layer<B: Backend>(n_experts: usize, top_k: usize, device: &B::Device) -> MoeLoraFfn<B> {
    let mut layer = MoeLoraFfn::new(
        32,
        48,
        n_experts,
        8,
        16.0,
        0.0,
        top_k,
        FfnTargets::default(),
        device,
    );
    for expert in &mut layer.experts {
        for lora in [&mut expert.gate, &mut expert.up, &mut expert.down]
            .into_iter()
            .flatten()
        {
            let shape = lora.lora_b.dims();
            lora.lora_b = Param::from_tensor(Tensor::random(
                shape,
                Distribution::Normal(0.0, 0.5),
                device,
            ));
        }
    }
    layer
}

fn sparse_equals_dense<B: Backend>(device: &B::Device) {
    let base = base_mlp::<B>(device);
    for (n_experts, k) in [(8, 2), (4, 4), (1, 1)] {
        let layer = layer::<B>(n_experts, k, device);
        let x = Tensor::<B, 3>::random([2, 9, 32], Distribution::Normal(0.0, 1.0), device);
        let (sparse, routing) = layer.forward(&base, x.clone(), 0, None);
        let dense = layer.forward_dense(&base, x, 0);
        sparse
            .into_data()
            .assert_approx_eq::<f32>(&dense.into_data(), Tolerance::absolute(1e-4));
        assert_eq!(routing.selections.iter().sum::<u64>(), 18 * k as u64);
    }
}

macro_rules! on_backend {
    ($feature:literal, $module:ident, $backend:ty) => {
        #[cfg(feature = $feature)]
        mod $module {
            #[test]
            fn moe_layer_sparse_dispatch_equals_dense() {
                super::sparse_equals_dense::<$backend>(&Default::default());
            }
        }
    };
}

on_backend!("flex", flex, burn_flex::Flex);
on_backend!("ndarray", ndarray, burn_ndarray::NdArray);
on_backend!("wgpu", wgpu, burn_wgpu::Wgpu);
on_backend!("cuda", cuda, burn_cuda::Cuda);
