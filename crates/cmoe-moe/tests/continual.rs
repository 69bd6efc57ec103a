//! The method's invariants across two tasks on the tiny HF fixture: after PGKE and training
//! task 1, task 0's experts, router and the frozen base are bit-identical, and task 0's outputs
//! with router 0 are unchanged.

use std::path::Path;

use burn::backend::Autodiff;
use burn::tensor::{DType, Int, Tensor, TensorData, backend::Backend};
use cmoe_llava::{LlavaInput, load_llava};
use cmoe_moe::fingerprint::fingerprint;
use cmoe_moe::model::{CmoeModel, MoeConfig};
use cmoe_moe::pgke::{ExpansionMode, PlanSource, plan_from_stats};
use cmoe_moe::stages::{
    StageConfig, TrainBatch, activation_stats, add_probes, expand, new_expert_ranges,
    set_trainable, train_stage,
};

type B = burn_flex::Flex;
type AD = Autodiff<B>;

fn batch<Be: Backend>(seed: i64, device: &Be::Device) -> TrainBatch<Be> {
    let mut ids = vec![1i64, 3148, 1001, 29901];
    ids.extend([32000; 16]);
    ids.extend((0..12).map(|i| 100 + (seed * 37 + i * 11) % 5000));
    let n = ids.len();
    let labels: Vec<i64> = ids
        .iter()
        .enumerate()
        .map(|(i, &t)| if i >= n - 6 { t } else { -100 })
        .collect();
    let shade = 0.1 + 0.1 * seed as f32;
    TrainBatch {
        input: LlavaInput {
            input_ids: Tensor::<Be, 2, Int>::from_data(TensorData::new(ids, [1, n]), device),
            pixel_values: Some(Tensor::ones([1, 3, 32, 32], device) * shade),
            attention_mask: None,
        },
        labels: Tensor::from_data(TensorData::new(labels, [1, n]), device),
    }
}

#[test]
fn training_a_new_task_leaves_every_older_thing_bit_identical() {
    let device = Default::default();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llava");
    let base = load_llava::<AD>(&dir, DType::F32, &device).unwrap().1;
    let config = MoeConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        top_k: 2,
        initial_experts: 3,
        ..MoeConfig::default()
    };
    let stage = StageConfig {
        lr: 1e-2,
        warmup_ratio: 0.03,
        steps: 4,
        weight_decay: 0.01,
        loss: Default::default(),
    };

    // Task 0: the initial experts and router_0.
    let model = CmoeModel::new(base, &config, &device);
    let all = new_expert_ranges(&model, &[0, 0]);
    let model = set_trainable(model, 0, &all);
    let task0: Vec<TrainBatch<AD>> = (0..2).map(|s| batch(s, &device)).collect();
    let mut losses = Vec::new();
    let model = train_stage(model, 0, &task0, &stage, |_, v| losses.push(v.ce)).unwrap();
    assert!(losses.iter().all(|l| l.is_finite()));

    let snapshot = |m: &CmoeModel<AD>| {
        let experts: Vec<u64> = m
            .moe
            .iter()
            .flat_map(|l| l.experts[..3].iter().map(fingerprint))
            .collect();
        let router0: Vec<u64> = m
            .moe
            .iter()
            .map(|l| fingerprint(l.routers.get(0)))
            .collect();
        (fingerprint(&m.base), experts, router0)
    };
    let before = snapshot(&model);
    let probe_input = batch::<AD>(0, &device).input;
    let output0 = model
        .forward(probe_input.clone(), 0)
        .unwrap()
        .logits
        .into_data();

    // Task 1 with PGKE: probes, statistics, plan, expansion, training.
    let task1: Vec<TrainBatch<AD>> = (5..7).map(|s| batch(s, &device)).collect();
    let (model, old_counts) = add_probes(model, 1, 2);
    assert_eq!(model.experts_per_layer(), vec![5, 5]);
    let probes = new_expert_ranges(&model, &old_counts);
    let model = set_trainable(model, 1, &probes);
    let model = train_stage(model, 1, &task1, &stage, |_, _| {}).unwrap();
    let inputs: Vec<_> = task1.iter().map(|b| b.input.clone()).collect();
    let stats = activation_stats(&model, 1, &inputs).unwrap();
    let mut plan = plan_from_stats(1, &stats, &old_counts, 0.8, ExpansionMode::ProbeCount);
    if plan.layers.is_empty() {
        // Guarantee growth for the test: a manual plan is data too.
        plan.source = PlanSource::Manual;
        plan.layers.push(cmoe_moe::pgke::LayerExpansion {
            layer: 1,
            add: 1,
            init_from: 3,
        });
    }
    let model = expand(model, 1, &old_counts, &plan);
    let grown: Vec<usize> = old_counts
        .iter()
        .enumerate()
        .map(|(l, &n)| {
            n + plan
                .layers
                .iter()
                .find(|g| g.layer == l)
                .map_or(0, |g| g.add)
        })
        .collect();
    assert_eq!(model.experts_per_layer(), grown);
    assert_eq!(model.num_tasks(), 2);
    let fresh = new_expert_ranges(&model, &old_counts);
    let model = set_trainable(model, 1, &fresh);
    let router1_before: Vec<u64> = model
        .moe
        .iter()
        .map(|l| fingerprint(l.routers.get(1)))
        .collect();
    let model = train_stage(model, 1, &task1, &stage, |_, _| {}).unwrap();
    // Training did happen: router_1 moved.
    let router1_after: Vec<u64> = model
        .moe
        .iter()
        .map(|l| fingerprint(l.routers.get(1)))
        .collect();
    assert!(
        router1_before
            .iter()
            .zip(&router1_after)
            .all(|(a, b)| a != b)
    );

    assert_eq!(
        snapshot(&model),
        before,
        "task 0's experts, router_0 or the base changed"
    );
    let again = model.forward(probe_input, 0).unwrap().logits.into_data();
    assert_eq!(again, output0, "task 0's outputs changed");
}
