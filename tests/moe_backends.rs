//! The MoE-LoRA layer on every compiled backend (wgpu through lavapipe in CI): both dispatches
//! equal the dense definition, and one expert with top-k = 1 equals plain LoRA; and a
//! continual learner trained through two tasks there, in the dispatch the runner uses on that
//! backend, keeps the base and everything of task 0 bit-identical.

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

/// Two tiny tasks on the tiny fixture (PGKE grows every layer for the second): task 0's
/// experts, router and VAE and the base are bit-identical after task 1, and task 0's logits
/// with its router unchanged.
fn continual_learner_keeps_task_zero<B: Backend>() {
    use burn::backend::Autodiff;
    use cmoe_moe::fingerprint::fingerprint;
    use cmoe_moe::learner::{Placement, TaskData, TaskRecipe};
    use cmoe_moe::model::MoeConfig;
    use cmoe_moe::pgke::{ExpansionMode, NewRouterColumns};
    use cmoe_moe::ptl::PtlConfig;
    use cmoe_moe::train::StageConfig;
    use cmoe_test_support::{seeded_batch, seeded_prompt, tiny_llava};
    type AD<B> = Autodiff<B>;
    let device = &Default::default();
    let data = |seed: i64| TaskData::<AD<B>> {
        train: vec![
            seeded_batch(seed, 0, device),
            seeded_batch(seed + 1, 2, device),
        ],
        probe_train: vec![seeded_batch(seed + 10, 0, device)],
        probe_eval: vec![seeded_batch(seed + 20, 0, device)],
    };
    let stage = StageConfig {
        lr: 1e-2,
        router_lr_scale: 1.0,
        warmup_ratio: 0.0,
        steps: 2,
        accumulation: 1,
        weight_decay: 0.0,
        loss: Default::default(),
        seed: Some(3),
    };
    let recipe = TaskRecipe {
        probe_experts: 2,
        alpha: 100.0,
        placement: Placement::Probe,
        per_layer: ExpansionMode::ProbeCount,
        router_columns: NewRouterColumns::Random,
        probe_stage: stage.clone(),
        stage,
    };
    let moe = MoeConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.05,
        initial_experts: 3,
        ..MoeConfig::default()
    };
    let ptl = PtlConfig {
        hidden: 16,
        latent: 4,
        n_rep: 4,
        bank_instances: 2,
        ..PtlConfig::default()
    };
    let mut learner = cmoe_moe::LlavaLearner::<AD<B>>::new(tiny_llava(device), moe, ptl, device);
    learner
        .model
        .set_dispatch(llava_cmoe::backend::dispatch_for::<B>());
    let learner = learner.learn_task(&data(0), &recipe, |_| {}).unwrap();
    let snapshot = |l: &cmoe_moe::LlavaLearner<AD<B>>| {
        let mut digests = vec![fingerprint(&l.model.base), fingerprint(&l.vaes[0])];
        for layer in &l.model.moe {
            digests.extend(layer.experts[..3].iter().map(fingerprint));
            digests.push(fingerprint(layer.routers.get(0)));
        }
        digests
    };
    let logits = |l: &cmoe_moe::LlavaLearner<AD<B>>| {
        let out = l
            .valid()
            .model
            .forward(seeded_prompt(0, device), 0)
            .unwrap();
        out.logits.into_data()
    };
    let (before, logits_before) = (snapshot(&learner), logits(&learner));
    let learner = learner.learn_task(&data(100), &recipe, |_| {}).unwrap();
    assert!(
        learner.model.experts_per_layer().iter().all(|&n| n > 3),
        "every layer grew"
    );
    assert_eq!(snapshot(&learner), before, "task 0 or the base changed");
    assert_eq!(logits(&learner), logits_before, "task 0's logits changed");
}

on_backends! {
    #[cfg(feature = "flex")] flex: burn_flex::Flex,
    #[cfg(feature = "ndarray")] ndarray: burn_ndarray::NdArray,
    #[cfg(feature = "wgpu")] wgpu: burn_wgpu::Wgpu,
    #[cfg(feature = "cuda")] cuda: burn_cuda::Cuda;
    moe_layer_sparse_dispatch_equals_dense: B,
    continual_learner_keeps_task_zero: B,
}
