//! Data-parallel stages ([`cmoe_moe::data_parallel`]) on the tiny HF fixture: a stage spread over
//! two devices equals the one-device stage on the same micro-batches.
//!
//! The CPU backends have one device, so "two devices" are two replicas on it: the whole
//! data-parallel path runs (dealing micro-batches, replicas in their own threads, Burn's
//! multi-device optimiser step, copying the updates to the replicas) except copies between
//! distinct devices. Burn 0.21 cannot copy between two wgpu devices (see
//! `cmoe_moe::data_parallel`), and CUDA cannot run here.

use burn::tensor::backend::AutodiffBackend;
use cmoe_moe::LlavaCmoe;
use cmoe_moe::LlavaLearner;
use cmoe_moe::fingerprint::fingerprint;
use cmoe_moe::learner::{Placement, TaskData, TaskRecipe};
use cmoe_moe::model::MoeConfig;
use cmoe_moe::pgke::{ExpansionMode, NewRouterColumns};
use cmoe_moe::ptl::{PtlConfig, PtlFeature, VaeFit, batch_features};
use cmoe_moe::train::{Cycle, StageConfig, StageControl, StageError, TrainBatch, train_stage_with};
use cmoe_test_support::{IGNORE, on_backends, prompt_ids, tiny_llava, train_batch};

/// No dropout: training draws nothing at random, so every run starts and goes alike.
fn moe_config() -> MoeConfig {
    MoeConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        top_k: 2,
        initial_experts: 4,
        ..MoeConfig::default()
    }
}

fn tiny_model<AD: AutodiffBackend>(device: &AD::Device) -> LlavaCmoe<AD> {
    LlavaCmoe::new(tiny_llava(device), &moe_config(), device)
}

/// The tiny model and four batches (shifts 0 to 3) to train it on.
fn start_and_batches<AD: AutodiffBackend>(
    device: &AD::Device,
) -> (LlavaCmoe<AD>, Vec<TrainBatch<AD>>) {
    let model = tiny_model::<AD>(device);
    (model, (0..4).map(|s| batch::<AD>(s, device)).collect())
}

/// A one-row batch whose image is shifted by `shift` (so every batch has its own gradient).
fn batch<AD: AutodiffBackend>(shift: usize, device: &AD::Device) -> TrainBatch<AD> {
    let ids = prompt_ids(&[13, 5618, 338, 445, 29973, 319, 1799, 29901, 15317, 2]);
    let mut labels = vec![IGNORE; ids.len() - 5];
    labels.extend([29901, 15317 + shift as i64, 2, 13, 5618]);
    train_batch(&[(ids, labels)], 0, 0.1 + 0.2 * shift as f64, device)
}

fn stage(accumulation: usize) -> StageConfig {
    StageConfig {
        lr: 1e-2,
        router_lr_scale: 1.0,
        warmup_ratio: 0.0,
        steps: 3,
        accumulation,
        weight_decay: 0.0,
        loss: Default::default(),
        seed: None,
    }
}

/// A stage from `start` over `batches` on `devices`: the trained model's logits on the first
/// batch and each step's loss.
fn train<AD: AutodiffBackend>(
    start: &LlavaCmoe<AD>,
    batches: &[TrainBatch<AD>],
    accumulation: usize,
    devices: &[AD::Device],
) -> (LlavaCmoe<AD>, Vec<f32>, Vec<f64>) {
    train_with(start, batches, &stage(accumulation), devices)
}

/// [`train`] with the stage's settings given.
fn train_with<AD: AutodiffBackend>(
    start: &LlavaCmoe<AD>,
    batches: &[TrainBatch<AD>],
    config: &StageConfig,
    devices: &[AD::Device],
) -> (LlavaCmoe<AD>, Vec<f32>, Vec<f64>) {
    let mut losses = Vec::new();
    let (model, _) = train_stage_with(
        start.clone(),
        None,
        0,
        &mut Cycle::new(batches),
        config,
        StageControl::on(devices),
        |_, v| losses.push(v.total),
    )
    .unwrap();
    let logits = model
        .forward(batches[0].input.clone(), 0)
        .unwrap()
        .logits
        .into_data()
        .iter::<f32>()
        .collect();
    (model, logits, losses)
}

fn max_diff(x: &[f32], y: &[f32]) -> f32 {
    x.iter()
        .zip(y)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0, f32::max)
}

/// A stage on `two` (the model starts on the first) equals the stage on the first alone.
fn two_devices_make_the_one_device_steps<AD: AutodiffBackend>() {
    let _alone = alone();
    let two = one_device_twice::<AD>();
    let device = two[0].clone();
    let (start, batches) = start_and_batches::<AD>(&device);
    let (one_model, one, one_losses) = train(&start, &batches, 4, &[]);
    let (two_model, parallel, parallel_losses) = train(&start, &batches, 4, &two);
    // Three steps of four micro-batches, two on each device: the same updates up to the order
    // of the float sums. Steps 2 and 3 also need the replica to have received step 1's update.
    let diff = max_diff(&one, &parallel);
    assert!(diff < 1e-5, "logits differ by {diff}");
    for (a, b) in one_losses.iter().zip(&parallel_losses) {
        assert!(
            (a - b).abs() < 1e-6,
            "{one_losses:?} vs {parallel_losses:?}"
        );
    }
    assert_eq!(fingerprint(&two_model.base), fingerprint(&one_model.base));
    // Both devices' micro-batches count: the first device's alone give another model.
    let firsts = [batches[0].clone(), batches[2].clone()];
    let (_, half, _) = train(&start, &firsts, 2, &[]);
    assert!(
        max_diff(&half, &parallel) > 1e-4,
        "the second device's micro-batches did not count"
    );
}

/// With the routers at their own learning rate (two optimiser steps per step, on disjoint
/// parameters), two devices still make the one-device steps, and the scale reaches them.
fn the_routers_own_learning_rate_holds_on_two_devices<AD: AutodiffBackend>() {
    let _alone = alone();
    let two = one_device_twice::<AD>();
    let device = two[0].clone();
    let (start, batches) = start_and_batches::<AD>(&device);
    let scaled = StageConfig {
        router_lr_scale: 4.0,
        ..stage(4)
    };
    let (_, one, _) = train_with(&start, &batches, &scaled, &[]);
    let (_, parallel, _) = train_with(&start, &batches, &scaled, &two);
    let diff = max_diff(&one, &parallel);
    assert!(diff < 1e-5, "logits differ by {diff}");
    let (_, unscaled, _) = train_with(&start, &batches, &stage(4), &two);
    assert!(
        max_diff(&unscaled, &parallel) > 1e-4,
        "the routers' scale did not reach the two-device step"
    );
}

/// With LoRA dropout and a VAE, two replicas sharing one CPU device draw from per-micro-batch
/// streams: a seeded stage repeats, whichever replica's thread draws first. (Up to float sums:
/// ndarray's rayon reductions split work by what the other thread leaves free, which moved the
/// VAE's reconstruction term by up to 1e-5 of itself after four steps in CI. Draws taken in
/// thread order, or another seed, move the losses by percents.)
fn replicas_on_one_device_repeat_their_draws<AD: AutodiffBackend>() {
    let _alone = alone();
    let two = one_device_twice::<AD>();
    let device = two[0].clone();
    let moe = MoeConfig {
        dropout: 0.3,
        ..moe_config()
    };
    let start = LlavaCmoe::new(tiny_llava::<AD>(&device), &moe, &device);
    let batches: Vec<_> = (0..4).map(|s| batch::<AD>(s, &device)).collect();
    let width = batch_features(&start, &batches[0], 0, PtlFeature::Last)
        .unwrap()
        .dims()[1];
    // Each step's CE and the VAE's reconstruction term.
    let run = |seed: u64| {
        AD::seed(&device, 1); // the VAE's initial weights
        let vae = VaeFit::new(PtlConfig::default(), width, &device);
        let mut losses = Vec::new();
        train_stage_with(
            start.clone(),
            Some(vae),
            0,
            &mut Cycle::new(&batches),
            &StageConfig {
                seed: Some(seed),
                steps: 4,
                ..stage(2)
            },
            StageControl::on(&two),
            |_, v| losses.extend([v.ce, v.rec]),
        )
        .unwrap();
        losses
    };
    let largest_change = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| ((x - y) / x).abs())
            .fold(0.0, f64::max)
    };
    let first = run(5);
    for _ in 0..3 {
        let again = run(5);
        let change = largest_change(&first, &again);
        assert!(change < 1e-4, "{first:?} vs {again:?}");
    }
    let other = largest_change(&first, &run(6));
    assert!(other > 1e-2, "the seed does not reach the draws ({other})");
}

/// A stage fitting a VAE on `two` keeps the feature memory the one-device stage keeps.
fn the_feature_memory_is_the_one_device_one<AD: AutodiffBackend>() {
    let _alone = alone();
    let two = one_device_twice::<AD>();
    let device = two[0].clone();
    let (start, batches) = start_and_batches::<AD>(&device);
    let width = batch_features(&start, &batches[0], 0, PtlFeature::Last)
        .unwrap()
        .dims()[1];
    let run = |devices: &[AD::Device]| {
        let fit = VaeFit::new(PtlConfig::default(), width, &device);
        let (_, fit) = train_stage_with(
            start.clone(),
            Some(fit),
            0,
            &mut Cycle::new(&batches),
            &stage(2),
            StageControl::on(devices),
            |_, v| assert!(v.total.is_finite()),
        )
        .unwrap();
        fit.unwrap().memory
    };
    let one = run(&[]);
    let two = run(&two);
    // Six micro-batches over a pass of four: every batch's features, the most recent last,
    // whichever device computed them.
    let positions =
        |m: &cmoe_moe::ptl::FeatureMemory<AD>| m.entries().map(|(p, _)| *p).collect::<Vec<_>>();
    assert_eq!(positions(&one), vec![2, 3, 0, 1]);
    assert_eq!(positions(&two), positions(&one));
    for ((_, a), (_, b)) in one.entries().zip(two.entries()) {
        let a: Vec<f32> = a.to_data().iter().collect();
        let b: Vec<f32> = b.to_data().iter().collect();
        assert!(max_diff(&a, &b) < 1e-6);
    }
}

/// A continual learner spread over `two` learns two tasks (probes, plan, expansion, experts,
/// routers, VAEs) with the one-device learner's plans and experts, and leaves task 0's experts
/// bit-identical while it learns task 1.
fn a_learner_on_two_devices_learns_as_on_one<AD: AutodiffBackend>() {
    let _alone = alone();
    let two = one_device_twice::<AD>();
    let device = two[0].clone();
    let base = tiny_llava::<AD>(&device);
    let ptl = PtlConfig {
        hidden: 16,
        latent: 4,
        n_rep: 4,
        bank_instances: 3,
        lr: Some(1e-2),
        fit_epochs: 1,
        seed: 7,
        ..PtlConfig::default()
    };
    let stage = StageConfig {
        seed: Some(5),
        ..stage(2)
    };
    let recipe = TaskRecipe {
        probe_experts: 2,
        // Far below every frequency: every layer grows.
        alpha: 100.0,
        placement: Placement::Probe,
        per_layer: ExpansionMode::ProbeCount,
        router_columns: NewRouterColumns::Random,
        probe_stage: StageConfig { lr: 3e-2, ..stage },
        stage,
    };
    let data = |first: usize| TaskData {
        train: (first..first + 4).map(|s| batch(s, &device)).collect(),
        probe_train: vec![batch(first + 4, &device), batch(first + 5, &device)],
        probe_eval: vec![batch(first + 6, &device)],
    };
    // Per layer, the experts' digests.
    let experts = |learner: &LlavaLearner<AD>| -> Vec<Vec<u64>> {
        let layers = learner.model.moe.iter();
        layers
            .map(|l| l.experts.iter().map(fingerprint).collect())
            .collect()
    };
    let learn = |devices: &[AD::Device]| {
        AD::seed(&device, 3);
        let learner = LlavaLearner::new(base.clone(), moe_config(), ptl, &device)
            .on_devices(devices.to_vec());
        let learner = learner.learn_task(&data(0), &recipe, |_| {}).unwrap();
        let task0 = experts(&learner);
        let learner = learner.learn_task(&data(8), &recipe, |_| {}).unwrap();
        for (layer, (old, now)) in task0.iter().zip(experts(&learner)).enumerate() {
            assert!(now.len() > old.len(), "layer {layer} did not grow");
            assert_eq!(
                &now[..old.len()],
                old,
                "task 0's experts of layer {layer} changed"
            );
        }
        learner
    };
    let one = learn(&[]);
    let parallel = learn(&two);
    // The same layers grow from the same experts. (The thresholds themselves, mean - 100 std
    // of selection counts, move with any float difference that flips a top-k choice.)
    let grown = |l: &LlavaLearner<AD>| {
        l.meta
            .plans
            .iter()
            .map(|p| p.layers.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(grown(&parallel), grown(&one));
    let logits = |learner: &LlavaLearner<AD>| -> Vec<f32> {
        let input = batch::<AD>(0, &device).input;
        let out = learner.model.forward(input, 1).unwrap().logits;
        out.into_data().iter().collect()
    };
    let diff = max_diff(&logits(&one), &logits(&parallel));
    assert!(diff < 1e-6, "task 1's logits differ by {diff}");
}

/// Three devices for two micro-batches per step is refused.
fn more_devices_than_micro_batches_is_an_error<AD: AutodiffBackend>() {
    let _alone = alone();
    let device = AD::Device::default();
    let start = tiny_model::<AD>(&device);
    let batches = [batch::<AD>(0, &device)];
    let three = [device.clone(), device.clone(), device.clone()];
    let error = train_stage_with(
        start,
        None,
        0,
        &mut Cycle::new(&batches),
        &stage(2),
        StageControl::on(&three),
        |_, _| {},
    )
    .map(|_| ())
    .unwrap_err();
    assert!(matches!(error, StageError::Config(_)), "{error}");
    assert!(error.to_string().contains("3 devices"), "{error}");
}
/// The CPU backends draw from one generator per process: tests running beside each other would
/// change each other's draws (fresh experts, new router columns), so these run one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The default device, named twice: two replicas on the one CPU device.
fn one_device_twice<AD: AutodiffBackend>() -> [AD::Device; 2] {
    let device = AD::Device::default();
    [device.clone(), device]
}

on_backends! {
    flex: burn_flex::Flex,
    ndarray: burn_ndarray::NdArray;
    two_devices_make_the_one_device_steps: AD,
    the_routers_own_learning_rate_holds_on_two_devices: AD,
    replicas_on_one_device_repeat_their_draws: AD,
    the_feature_memory_is_the_one_device_one: AD,
    a_learner_on_two_devices_learns_as_on_one: AD,
    more_devices_than_micro_batches_is_an_error: AD,
}
