//! What makes our numbers mean what the paper's mean, on the tiny HF fixture:
//! - padding takes no part in routing statistics or the aux loss, and PGKE's statistics are
//!   gathered without dropout;
//! - the initial experts train in their own phase, and then the first task goes through PGKE
//!   (its router extends the initial phase's, which stays bit-identical, and reloads);
//! - PGKE adds the configured number of experts per selected layer, the ablations the same;
//!   "w/o extension" adds none and retrains every expert;
//! - a new expert's router column is random (the paper), or with `copy-source` the probe
//!   router's column of the expert it copies; the old columns are the previous router's;
//! - EWC's penalty is zero at the consolidated parameters and grows quadratically away from
//!   them; LwF's target is the frozen previous model's output at the answer positions, and the
//!   answer-position logits and cross-entropy equal the full forward's there.

use burn::module::{AutodiffModule, Module, Param};
use burn::nn::DropoutConfig;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{ElementConversion, Tensor};
use cmoe_moe::LlavaCmoe;
use cmoe_moe::LlavaLearner;
use cmoe_moe::baselines::{Ewc, Lwf, distillation};
use cmoe_moe::fingerprint::fingerprint;
use cmoe_moe::learner::{Placement, TaskData, TaskRecipe};
use cmoe_moe::model::MoeConfig;
use cmoe_moe::pgke::{
    ExpansionMode, ExpansionPlan, NewRouterColumns, PlanSource, activation_stats, add_probes,
    expand,
};
use cmoe_moe::ptl::PtlConfig;
use cmoe_moe::train::Cycle;
use cmoe_moe::train::{AnswerTargets, causal_lm_loss};
use cmoe_moe::train::{Penalty, StageConfig, TrainBatch};
use cmoe_test_support::{on_backends, randomize_experts, scratch, seeded_batch, tiny_llava};

fn task_data<Be: Backend>(first_seed: i64, device: &Be::Device) -> TaskData<Be> {
    TaskData {
        train: (0..2)
            .map(|i| seeded_batch(first_seed + 2 * i, 0, device))
            .collect(),
        probe_train: vec![seeded_batch(first_seed + 10, 0, device)],
        probe_eval: vec![seeded_batch(first_seed + 20, 0, device)],
    }
}

fn moe(dropout: f64) -> MoeConfig {
    MoeConfig {
        rank: 4,
        alpha: 8.0,
        dropout,
        top_k: 2,
        initial_experts: 3,
        ..MoeConfig::default()
    }
}

fn stage(steps: usize) -> StageConfig {
    StageConfig {
        lr: 1e-2,
        router_lr_scale: 1.0,
        warmup_ratio: 0.03,
        steps,
        accumulation: 1,
        weight_decay: 0.0,
        loss: Default::default(),
        seed: Some(3),
    }
}

fn recipe(placement: Placement, per_layer: ExpansionMode) -> TaskRecipe {
    TaskRecipe {
        probe_experts: 2,
        // A threshold far below every frequency: every layer's probes count.
        alpha: 100.0,
        placement,
        per_layer,
        router_columns: NewRouterColumns::Random,
        probe_stage: stage(2),
        stage: stage(2),
    }
}

fn ptl() -> PtlConfig {
    PtlConfig {
        hidden: 16,
        latent: 4,
        n_rep: 4,
        bank_instances: 3,
        lr: Some(1e-2),
        seed: 7,
        ..PtlConfig::default()
    }
}

/// Gives every expert a random, non-zero LoRA B (fresh experts contribute nothing, so dropout
/// on their inputs would change nothing either).
fn with_active_experts<Be: Backend>(
    mut model: LlavaCmoe<Be>,
    device: &Be::Device,
) -> LlavaCmoe<Be> {
    for layer in &mut model.moe {
        randomize_experts(layer, 0, device);
    }
    model
}

fn scalar<Be: Backend>(t: Tensor<Be, 1>) -> f64 {
    t.into_scalar().elem::<f64>()
}

fn padding_takes_no_part_in_routing<Be: AutodiffBackend>() {
    let device = Default::default();
    let model = with_active_experts(
        LlavaCmoe::new(tiny_llava::<Be>(&device), &moe(0.0), &device),
        &device,
    );
    let plain = seeded_batch::<Be>(0, 0, &device);
    let padded = seeded_batch::<Be>(0, 5, &device);
    let a = model.forward(plain.input.clone(), 0).unwrap();
    let b = model.forward(padded.input.clone(), 0).unwrap();
    for (layer, (ra, rb)) in a.routing.iter().zip(&b.routing).enumerate() {
        let (ca, cb) = (ra.counts(), rb.counts());
        assert_eq!(ca.tokens, cb.tokens, "layer {layer}: padding was counted");
        assert_eq!(ca.selections, cb.selections, "layer {layer}");
        let (x, y) = (scalar(ra.aux_loss.clone()), scalar(rb.aux_loss.clone()));
        assert!((x - y).abs() < 1e-5, "layer {layer}: aux {x} vs {y}");
    }
    assert_eq!(a.routing[0].counts().tokens, 2 * 32);
    // PGKE's statistics over a source: the same with and without padding.
    let stats = |b: TrainBatch<Be>| {
        let batches = [b];
        activation_stats(&model, 0, &mut Cycle::new(&batches)).unwrap()
    };
    assert_eq!(stats(plain), stats(padded));
}

fn probe_statistics_are_gathered_without_dropout<Be: AutodiffBackend>() {
    let device = Default::default();
    Be::seed(&device, 1);
    let model = with_active_experts(
        LlavaCmoe::new(tiny_llava::<Be>(&device), &moe(0.5), &device),
        &device,
    );
    let batches = [
        seeded_batch::<Be>(3, 2, &device),
        seeded_batch::<Be>(5, 0, &device),
    ];
    let stats = |m: &LlavaCmoe<Be>, seed: u64| {
        Be::seed(&device, seed);
        activation_stats(m, 0, &mut Cycle::new(&batches)).unwrap()
    };
    let first = stats(&model, 11);
    assert_eq!(
        first,
        stats(&model, 12),
        "the statistics depend on the draws"
    );
    let mut no_dropout = model.clone();
    for layer in &mut no_dropout.moe {
        layer.dropout = DropoutConfig::new(0.0).init();
    }
    assert_eq!(first, stats(&no_dropout, 13));
}

fn the_first_task_goes_through_pgke_after_an_initial_phase<Be: AutodiffBackend>() {
    let device = Default::default();
    Be::seed(&device, 2);
    let learner = LlavaLearner::<Be>::new(tiny_llava(&device), moe(0.0), ptl(), &device);
    let learner = learner
        .learn_initial(&task_data(500, &device), &stage(2), |_| {})
        .unwrap();
    assert!(learner.model.has_initial_router());
    assert_eq!(learner.model.num_tasks(), 0);
    assert_eq!(learner.tasks_learned(), 0);
    let initial: Vec<u64> = learner
        .model
        .moe
        .iter()
        .map(|l| fingerprint(l.routers.initial.as_ref().unwrap()))
        .chain(learner.model.moe.iter().map(|l| fingerprint(&l.experts)))
        .collect();
    let initial_params = learner.initial_params();
    assert!(initial_params > 0);

    // Task 0: probes, statistics, one expert in each selected layer (every layer here).
    let per_layer = ExpansionMode::Fixed(1);
    let learner = learner
        .learn_task(
            &task_data(0, &device),
            &recipe(Placement::Probe, per_layer),
            |_| {},
        )
        .unwrap();
    assert_eq!(learner.meta.plans.len(), 1);
    assert_eq!(learner.meta.plans[0].task, 0);
    assert_eq!(learner.meta.plans[0].source, PlanSource::Probe);
    assert_eq!(learner.model.experts_per_layer(), vec![4, 4]);
    assert_eq!(learner.meta.first_expert, vec![vec![3, 3]]);
    // Task 0's router: the initial router's columns, then one for its new expert.
    for layer in &learner.model.moe {
        let start = layer.routers.initial.as_ref().unwrap().weight.val();
        let [d, n] = start.dims();
        let router0 = layer.routers.get(0).weight.val();
        assert_eq!(router0.dims(), [d, n + 1]);
    }
    // Only the task's expert, router and VAE count as its parameters.
    let expert = learner.model.moe[0].experts[3].clone();
    let router = learner.model.moe[0].routers.get(0).clone();
    let vae = learner.vaes[0].clone();
    assert_eq!(
        learner.trainable_params(0, false),
        2 * (expert.num_params() + router.num_params()) + vae.num_params()
    );

    // Task 1 grows again; the initial phase's experts and router never change.
    let learner = learner
        .learn_task(
            &task_data(100, &device),
            &recipe(Placement::Probe, per_layer),
            |_| {},
        )
        .unwrap();
    assert_eq!(learner.model.experts_per_layer(), vec![5, 5]);
    let after: Vec<u64> = learner
        .model
        .moe
        .iter()
        .map(|l| fingerprint(l.routers.initial.as_ref().unwrap()))
        .chain(
            learner
                .model
                .moe
                .iter()
                .map(|l| fingerprint(&l.experts[..3].to_vec())),
        )
        .collect();
    assert_eq!(
        after, initial,
        "the initial phase's experts or router changed"
    );
    assert_eq!(learner.initial_params(), initial_params);

    // The state, initial router included, reloads bit for bit.
    // One folder per backend: the backends' tests run side by side.
    let dir = scratch(&format!("initial-{}", Be::name(&device)));
    learner.save(&dir).unwrap();
    let reloaded = LlavaLearner::<Be>::load(tiny_llava(&device), &dir, &device).unwrap();
    for (a, b) in learner.model.moe.iter().zip(&reloaded.model.moe) {
        assert_eq!(fingerprint(a), fingerprint(b));
    }
    assert!(reloaded.model.has_initial_router());
    let _ = std::fs::remove_dir_all(&dir);
}

fn placements_add_the_configured_experts_per_layer<Be: AutodiffBackend>() {
    let device = Default::default();
    let grow = |placement, per_layer| {
        Be::seed(&device, 4);
        let learner = LlavaLearner::<Be>::new(tiny_llava(&device), moe(0.0), ptl(), &device)
            .learn_task(
                &task_data(0, &device),
                &recipe(placement, per_layer),
                |_| {},
            )
            .unwrap()
            .learn_task(
                &task_data(100, &device),
                &recipe(placement, per_layer),
                |_| {},
            )
            .unwrap();
        (
            learner.model.experts_per_layer(),
            learner.meta.first_expert[1].clone(),
        )
    };
    // PGKE with K = 4 and with N_s (2 probes, both above the threshold).
    assert_eq!(
        grow(Placement::Probe, ExpansionMode::Fixed(4)).0,
        vec![7, 7]
    );
    assert_eq!(
        grow(Placement::Probe, ExpansionMode::ProbeCount).0,
        vec![5, 5]
    );
    // The every-layer ablation adds the same count per layer.
    assert_eq!(
        grow(Placement::EveryLayer, ExpansionMode::Fixed(4)).0,
        vec![7, 7]
    );
    // w/o extension: no new experts, and every expert is the task's to train.
    assert_eq!(
        grow(Placement::Unfrozen, ExpansionMode::Fixed(1)),
        (vec![3, 3], vec![0, 0])
    );
}

fn ewc_penalty_is_zero_at_the_anchor_and_grows_quadratically<Be: AutodiffBackend>() {
    let device = Default::default();
    Be::seed(&device, 5);
    // Active experts: with LoRA B at zero, only B would have gradients (and a Fisher).
    let model = with_active_experts(
        LlavaCmoe::new(tiny_llava::<Be>(&device), &moe(0.0), &device),
        &device,
    );
    let model = cmoe_moe::train::set_trainable(model, 0, &[0..3, 0..3]);
    let batches = [
        seeded_batch::<Be>(0, 0, &device),
        seeded_batch::<Be>(2, 3, &device),
    ];
    let mut ewc = Ewc::<Be>::new(10.0, 1.0);
    let probe = seeded_batch::<Be>(4, 0, &device);
    let answers = AnswerTargets::from_labels(&probe.labels);
    let logits = model
        .forward_answers(probe.input.clone(), 0, &answers)
        .unwrap()
        .logits;
    assert_eq!(
        scalar(ewc.term(&model.moe, &probe, &answers, &logits).unwrap()),
        0.0,
        "no penalty before a consolidation"
    );
    ewc.consolidate(&model, &mut Cycle::new(&batches), 2)
        .unwrap();
    assert!(ewc.is_active());
    let at_anchor = scalar(ewc.term(&model.moe, &probe, &answers, &logits).unwrap());
    assert_eq!(at_anchor, 0.0, "the penalty at the consolidated parameters");
    // Move the routers (whose Fisher is not zero) by `step`.
    let moved = |step: f64| {
        let mut m = model.clone();
        for layer in &mut m.moe {
            let w = layer.routers.routers[0].weight.val();
            layer.routers.routers[0].weight =
                Param::from_tensor((w.clone().detach() + step).detach());
        }
        scalar(ewc.term(&m.moe, &probe, &answers, &logits).unwrap())
    };
    let (one, two) = (moved(0.01), moved(0.02));
    assert!(one > 0.0, "the penalty does not grow away from the anchor");
    assert!(
        (two / one - 4.0).abs() < 1e-3,
        "not quadratic: {one} then {two}"
    );
    // The penalty has gradients for the parameters (it pulls them back).
    let mut m = model.clone();
    for layer in &mut m.moe {
        let w = layer.routers.routers[0].weight.val();
        layer.routers.routers[0].weight =
            Param::from_tensor((w.detach() + 0.01).detach()).set_require_grad(true);
    }
    let grads = ewc
        .term(&m.moe, &probe, &answers, &logits)
        .unwrap()
        .backward();
    assert!(
        m.moe[0].routers.routers[0]
            .weight
            .val()
            .grad(&grads)
            .is_some()
    );
}

fn lwf_target_is_the_frozen_previous_models_output<Be: AutodiffBackend>() {
    let device = Default::default();
    Be::seed(&device, 6);
    let previous = with_active_experts(
        LlavaCmoe::new(tiny_llava::<Be>(&device), &moe(0.0), &device),
        &device,
    );
    let lwf = Lwf::new(&previous, 1.0, 2.0);
    let probe = seeded_batch::<Be>(8, 2, &device);
    let answers = AnswerTargets::from_labels(&probe.labels);
    // Every row's answer occupies labels 26..32: positions 25..31 predict it.
    let [b, s] = probe.labels.dims();
    let expected_rows: Vec<i64> = (0..b)
        .flat_map(|r| (25..31).map(move |p| (r * s + p) as i64))
        .collect();
    assert_eq!(answers.rows(), &expected_rows[..]);
    // The target is the frozen model's full output at those positions.
    let full = previous
        .valid()
        .forward(probe.clone().inner().input, 0)
        .unwrap()
        .logits;
    let target = lwf.teacher_logits(&probe, &answers).unwrap();
    let expected = answers.select(full);
    assert_eq!(target.dims(), expected.dims());
    let gap = (target - expected).abs().max().into_scalar().elem::<f32>();
    assert!(
        gap < 1e-4,
        "answer logits differ from the full logits there by {gap}"
    );
    // The model moves on; the target does not.
    let current = with_active_experts(previous.clone(), &device);
    let logits = |m: &LlavaCmoe<Be>| {
        m.forward_answers(probe.input.clone(), 0, &answers)
            .unwrap()
            .logits
    };
    assert!(
        scalar(
            lwf.term(&current.moe, &probe, &answers, &logits(&current))
                .unwrap()
        ) > 0.0
    );
    let kl = scalar(
        lwf.term(&previous.moe, &probe, &answers, &logits(&previous))
            .unwrap(),
    );
    assert!(
        kl.abs() < 1e-6,
        "the distillation of the teacher itself: {kl}"
    );
    // The cross-entropy on answer logits is the full causal loss.
    let same = logits(&previous);
    let full = previous.forward(probe.input.clone(), 0).unwrap().logits;
    let ce = scalar(answers.cross_entropy(same.clone()).unwrap());
    let reference = scalar(causal_lm_loss(full, probe.labels.clone()).unwrap());
    assert!((ce - reference).abs() < 1e-5, "{ce} against {reference}");
    assert!(scalar(distillation(same.clone() * 1.5, same, 2.0)) > 0.0);
}

/// Router columns `[first, last)` of `router`, flattened column by column.
fn columns<Be: Backend>(
    router: &cmoe_moe::layer::TaskRouter<Be>,
    first: usize,
    last: usize,
) -> Vec<f32> {
    let [d, _] = router.weight.dims();
    let w = router.weight.val().slice([0..d, first..last]);
    w.transpose().into_data().iter().collect()
}

fn new_router_columns_are_random_or_the_sources<Be: AutodiffBackend>() {
    let device = Default::default();
    Be::seed(&device, 6);
    let model = LlavaCmoe::<Be>::new(tiny_llava(&device), &moe(0.0), &device);
    let (probed, before) = add_probes(model, 1, 2).unwrap();
    let (old, probe) = (before[0], before[0] + 1); // the second probe is the source
    let previous = columns(probed.moe[0].routers.get(0), 0, old);
    let source = columns(probed.moe[0].routers.get(1), probe, probe + 1);
    let layers = probed.moe.len();
    let grow = |columns_from| {
        let plan = ExpansionPlan::every_layer(1, layers, 2, probe);
        expand(probed.clone(), 1, &before, &plan, columns_from).unwrap()
    };
    let copied = grow(NewRouterColumns::CopySource);
    let router = copied.moe[0].routers.get(1);
    assert_eq!(router.num_experts(), old + 2);
    assert_eq!(columns(router, 0, old), previous);
    assert_eq!(
        columns(router, old, old + 2),
        [source.clone(), source.clone()].concat()
    );
    // The new experts copy the source's weights in both modes.
    let expert = fingerprint(&probed.moe[0].experts[probe]);
    assert_eq!(fingerprint(&copied.moe[0].experts[old]), expert);
    let random = grow(NewRouterColumns::Random);
    let router = random.moe[0].routers.get(1);
    assert_eq!(columns(router, 0, old), previous);
    assert_ne!(columns(router, old, old + 1), source);
    assert_eq!(fingerprint(&random.moe[0].experts[old + 1]), expert);
}

on_backends! {
    flex: burn_flex::Flex,
    ndarray: burn_ndarray::NdArray;
    padding_takes_no_part_in_routing: AD,
    probe_statistics_are_gathered_without_dropout: AD,
    the_first_task_goes_through_pgke_after_an_initial_phase: AD,
    placements_add_the_configured_experts_per_layer: AD,
    new_router_columns_are_random_or_the_sources: AD,
    ewc_penalty_is_zero_at_the_anchor_and_grows_quadratically: AD,
    lwf_target_is_the_frozen_previous_models_output: AD,
}
