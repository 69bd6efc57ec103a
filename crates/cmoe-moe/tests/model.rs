//! The continual model on the tiny HF fixture: fresh experts leave the base untouched,
//! gradients reach exactly the trainable parameters, and the routers' learning rate scales
//! their step alone.

use burn::optim::GradientsParams;
use burn::tensor::ElementConversion;
use burn::tensor::backend::{AutodiffBackend, Backend};
use cmoe_moe::fingerprint::fingerprint;
use cmoe_moe::model::MoeConfig;
use cmoe_moe::ptl::PtlFeature;
use cmoe_moe::train::Cycle;
use cmoe_moe::train::causal_lm_loss;
use cmoe_moe::train::{StageConfig, TrainBatch, train_stage};
use cmoe_moe::{LlavaCmoe, ModelInput};
use cmoe_test_support::{on_backends, prompt_ids, prompt_input, randomize_experts, tiny_llava};

/// The tiny fixture's prompt with a question and its answer, on a grey image.
fn input<Be: Backend>(device: &Be::Device) -> ModelInput<Be> {
    let ids = prompt_ids(&[13, 5618, 338, 445, 29973, 319, 1799, 29901, 15317, 2]);
    prompt_input(&ids, 0.3, device)
}

fn config() -> MoeConfig {
    MoeConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        top_k: 2,
        initial_experts: 4,
        ..MoeConfig::default()
    }
}

fn fresh_experts_leave_the_base_model_unchanged<B: Backend>() {
    let device = Default::default();
    let base = tiny_llava::<B>(&device);
    let expected = base.forward(input(&device).into()).unwrap();
    let model = LlavaCmoe::new(base, &config(), &device);
    let out = model.forward(input(&device), 0).unwrap();
    assert_eq!(out.logits.into_data(), expected.into_data());
    assert_eq!(out.routing.len(), 2);
    assert_eq!(model.experts_per_layer(), vec![4, 4]);
    assert!(
        model.forward(input(&device), 1).is_err(),
        "task 1 has no router yet"
    );
}

fn gradients_reach_only_the_experts_and_router<AD: AutodiffBackend>() {
    let device = Default::default();
    // top-k = every expert, so that each one certainly receives tokens (and gradients).
    let config = MoeConfig {
        top_k: 4,
        ..config()
    };
    let model = LlavaCmoe::new(tiny_llava::<AD>(&device), &config, &device);
    let base_before = fingerprint(&model.base);
    let x = input::<AD>(&device);
    let labels = x.input_ids.clone();
    let out = model.forward(x, 0).unwrap();
    let aux = out
        .routing
        .iter()
        .map(|r| r.aux_loss.clone())
        .reduce(|a, b| a + b)
        .unwrap();
    let loss = causal_lm_loss(out.logits, labels).unwrap() + aux * 1e-3;
    let mut grads = loss.backward();
    // Every parameter of the experts and routers (2 layers x (4 experts x 3 LoRA pairs x 2 + router)).
    let trainable = GradientsParams::from_module(&mut grads, &model.moe);
    assert_eq!(trainable.len(), 2 * (4 * 3 * 2 + 1));
    // Nothing of the frozen base.
    assert!(GradientsParams::from_module(&mut grads, &model.base).is_empty());
    assert_eq!(fingerprint(&model.base), base_before);
}

fn a_feature_read_inside_a_sequence_equals_the_prompt_alone<B: Backend>() {
    let device = Default::default();
    let model = LlavaCmoe::new(tiny_llava::<B>(&device), &config(), &device);
    let full = input::<B>(&device);
    let n = full.input_ids.dims()[1];
    let cut = n - 4;
    let prompt = ModelInput {
        input_ids: full.input_ids.clone().slice([0..1, 0..cut]),
        ..full.clone()
    };
    // Every PTL feature: the last prompt token's state, the question's mean, both.
    for feature in [PtlFeature::Last, PtlFeature::Mean, PtlFeature::Both] {
        let alone = model.task_features(prompt.clone(), feature).unwrap();
        let inside = model
            .task_features_at(full.clone(), &[cut - 1], feature)
            .unwrap();
        assert_eq!(alone.dims()[1], feature.width(64), "{feature:?}");
        let diff: f32 = (alone - inside).abs().max().into_scalar().elem();
        assert!(diff < 1e-5, "{feature:?}: max difference {diff}");
    }
    assert!(
        model
            .task_features_at(full, &[n], PtlFeature::Last)
            .is_err(),
        "a position past the end"
    );
}

/// Two stage steps from `start` over `batches`, `accumulation` micro-batches per step; returns
/// the logits of the trained model on `input` and the loss each step reported.
fn train_from<AD: AutodiffBackend>(
    start: &LlavaCmoe<AD>,
    batches: &[TrainBatch<AD>],
    accumulation: usize,
) -> (Vec<f32>, Vec<f64>) {
    let stage = StageConfig {
        lr: 1e-2,
        router_lr_scale: 1.0,
        warmup_ratio: 0.0,
        steps: 2,
        accumulation,
        weight_decay: 0.0,
        loss: Default::default(),
        seed: None,
    };
    let mut losses = Vec::new();
    let mut source = Cycle::new(batches);
    let model = train_stage(start.clone(), 0, &mut source, &stage, |_, v| {
        losses.push(v.ce)
    })
    .unwrap();
    let logits = model.forward(input(&Default::default()), 0).unwrap().logits;
    (logits.into_data().iter::<f32>().collect(), losses)
}

fn accumulated_micro_batches_make_one_step<AD: AutodiffBackend>() {
    let device = Default::default();
    let batch = |shift: i64| {
        let x = input::<AD>(&device);
        let x = ModelInput {
            pixel_values: x.pixel_values.map(|p| p + shift as f64 * 0.2),
            ..x
        };
        TrainBatch::new(x.clone(), x.input_ids)
    };
    let (a, b) = (batch(0), batch(1));
    // One start for every run (no dropout: training draws nothing at random), so that tests
    // running beside this one and drawing from the backend's generator change nothing.
    let start = LlavaCmoe::new(tiny_llava::<AD>(&device), &config(), &device);
    let (alone_a, losses_a) = train_from(&start, std::slice::from_ref(&a), 1);
    let (_, losses_b) = train_from(&start, std::slice::from_ref(&b), 1);
    let (ab, losses_ab) = train_from(&start, &[a.clone(), b.clone()], 2);
    let (ba, _) = train_from(&start, &[b, a], 2);
    // Two optimiser steps either way, each reporting the mean over its micro-batches.
    assert_eq!(losses_ab.len(), 2);
    let mean = (losses_a[0] + losses_b[0]) / 2.0;
    assert!(
        (losses_ab[0] - mean).abs() < 1e-6,
        "{losses_ab:?} vs {mean}"
    );
    // The micro-batches' gradients are combined symmetrically, and both count.
    let max_diff = |x: &[f32], y: &[f32]| {
        x.iter()
            .zip(y)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0f32, f32::max)
    };
    assert!(max_diff(&ab, &ba) < 1e-6, "order changed the step");
    assert!(
        max_diff(&ab, &alone_a) > 1e-4,
        "the second micro-batch did not count"
    );
}

/// One AdamW step from one start with the routers at 1x and at 4x the experts' learning rate:
/// the experts end bit-identical, the routers move 4 times as far (AdamW's first step is
/// `lr * g / (|g| + eps)`, so the largest move is the learning rate itself).
fn the_router_learning_rate_scales_only_the_routers_step<AD: AutodiffBackend>() {
    let device = Default::default();
    let mut start = LlavaCmoe::new(tiny_llava::<AD>(&device), &config(), &device);
    // Experts that contribute, so that the routing weights have a gradient.
    for layer in &mut start.moe {
        randomize_experts(layer, 0, &device);
    }
    let batch = TrainBatch::new(input(&device), input::<AD>(&device).input_ids);
    let step = |router_lr_scale: f64| {
        let stage = StageConfig {
            lr: 1e-3,
            router_lr_scale,
            warmup_ratio: 0.0,
            steps: 1,
            accumulation: 1,
            weight_decay: 0.0,
            loss: Default::default(),
            seed: None,
        };
        let mut source = Cycle::new(std::slice::from_ref(&batch));
        train_stage(start.clone(), 0, &mut source, &stage, |_, _| {}).unwrap()
    };
    let (plain, scaled) = (step(1.0), step(4.0));
    let largest_move = |model: &LlavaCmoe<AD>, layer: usize| -> f64 {
        let moved = model.moe[layer].routers.routers[0].weight.val()
            - start.moe[layer].routers.routers[0].weight.val();
        moved.abs().max().into_scalar().elem()
    };
    for layer in 0..start.moe.len() {
        for (a, b) in plain.moe[layer]
            .experts
            .iter()
            .zip(&scaled.moe[layer].experts)
        {
            assert_eq!(
                fingerprint(a),
                fingerprint(b),
                "layer {layer}: an expert moved"
            );
        }
        let (one, four) = (largest_move(&plain, layer), largest_move(&scaled, layer));
        assert!(
            (one - 1e-3).abs() < 1e-5,
            "layer {layer}: router moved {one}"
        );
        assert!(
            (four - 4e-3).abs() < 4e-5,
            "layer {layer}: router moved {four}"
        );
    }
}

on_backends! {
    flex: burn_flex::Flex,
    ndarray: burn_ndarray::NdArray;
    fresh_experts_leave_the_base_model_unchanged: B,
    gradients_reach_only_the_experts_and_router: AD,
    accumulated_micro_batches_make_one_step: AD,
    the_router_learning_rate_scales_only_the_routers_step: AD,
    a_feature_read_inside_a_sequence_equals_the_prompt_alone: B,
}
