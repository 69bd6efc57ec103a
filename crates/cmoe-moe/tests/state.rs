//! The continual state saves and reloads bit for bit without the loader knowing its structure;
//! one task's adapter pack exports and re-imports on its own.

use burn::module::Param;
use burn::tensor::{Distribution, Tensor};
use cmoe_moe::fingerprint::fingerprint;
use cmoe_moe::layer::{MoeLoraFfn, MoeLoraFfnConfig};
use cmoe_moe::model::MoeConfig;
use cmoe_moe::pgke::{ExpansionPlan, LayerExpansion, PlanSource};
use cmoe_moe::ptl::{BankEntry, PrimitiveBank, PtlConfig, TaskVaeConfig};
use cmoe_moe::state::{ContinualMeta, ContinualTensors};
use cmoe_test_support::scratch;

type B = burn_flex::Flex;

const WIDTHS: [(usize, usize); 2] = [(16, 24), (16, 24)];

/// Two tasks: 3 initial experts per layer, task 1 added 2 experts to layer 1 only.
fn two_task_state() -> (ContinualTensors<B>, ContinualMeta) {
    let device = Default::default();
    let config = MoeConfig {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        top_k: 2,
        initial_experts: 3,
        ..MoeConfig::default()
    };
    let mut moe: Vec<MoeLoraFfn<B>> = WIDTHS
        .iter()
        .map(|&(h, i)| {
            MoeLoraFfnConfig::new(h, i)
                .with_experts(3)
                .with_rank(4)
                .with_alpha(8.0)
                .with_dropout(0.0)
                .with_targets(config.targets)
                .init(&device)
        })
        .collect();
    for (l, layer) in moe.iter_mut().enumerate() {
        let added = if l == 1 { 2 } else { 0 };
        for _ in 0..added {
            let copy = layer.experts[0].duplicate();
            layer.experts.push(copy);
        }
        let router = layer.routers.get(0).extended(added);
        layer.routers.routers.push(router);
        for expert in &mut layer.experts {
            if let Some(up) = &mut expert.up {
                up.lora_b = Param::from_tensor(Tensor::random(
                    up.lora_b.dims(),
                    Distribution::Normal(0.0, 1.0),
                    &device,
                ));
            }
        }
    }
    let vaes = (0..2)
        .map(|_| {
            TaskVaeConfig::new(16)
                .with_hidden(8)
                .with_latent(3)
                .init(&device)
        })
        .collect();
    let meta = ContinualMeta {
        config,
        ptl: PtlConfig::default(),
        bank: PrimitiveBank {
            entries: vec![
                BankEntry {
                    mean: -3.0,
                    std: 0.5,
                    count: 64,
                },
                BankEntry {
                    mean: -7.5,
                    std: 1.5,
                    count: 64,
                },
            ],
        },
        plans: vec![ExpansionPlan {
            task: 1,
            source: PlanSource::Probe,
            layers: vec![LayerExpansion {
                layer: 1,
                add: 2,
                init_from: 0,
            }],
            thresholds: vec![0.1, 0.2],
            probes_above: vec![0, 2],
            frequencies: vec![
                vec![0.5, 0.5, 0.5, 0.25, 0.25],
                vec![0.25, 0.25, 0.5, 0.5, 0.5],
            ],
            old_experts: vec![3, 3],
        }],
        first_expert: vec![vec![0, 0], vec![3, 3]],
    };
    (ContinualTensors { moe, vaes }, meta)
}

#[test]
fn state_round_trips_bit_for_bit() {
    let (state, meta) = two_task_state();
    let dir = scratch("state-full");
    state.save(&meta, &WIDTHS, &dir).unwrap();
    let (loaded, loaded_meta) = ContinualTensors::<B>::load(&dir, &Default::default()).unwrap();
    assert_eq!(loaded_meta, meta);
    assert_eq!(
        loaded
            .moe
            .iter()
            .map(|l| l.experts.len())
            .collect::<Vec<_>>(),
        vec![3, 5]
    );
    assert_eq!(fingerprint(&loaded), fingerprint(&state));
    // Same outputs through a layer.
    let x = Tensor::<B, 2>::random([5, 16], Distribution::Normal(0.0, 1.0), &Default::default());
    for task in 0..2 {
        let a = state.moe[1].routers.get(task).logits(x.clone()).into_data();
        let b = loaded.moe[1]
            .routers
            .get(task)
            .logits(x.clone())
            .into_data();
        assert_eq!(a, b);
    }
}

#[test]
fn an_adapter_pack_carries_one_task() {
    let (state, meta) = two_task_state();
    // Burn initialises parameters lazily, and clones of a lazy parameter initialise separately:
    // read everything once so that the clones below share the values.
    let full = fingerprint(&state);
    let dir = scratch("state-pack");
    state.export_pack(&meta, &WIDTHS, 1, &dir).unwrap();

    // The same state as it was after task 0, plus the pack, equals the two-task state.
    let mut older = ContinualTensors {
        moe: state.moe.clone(),
        vaes: state.vaes.clone(),
    };
    for (layer, &first) in older.moe.iter_mut().zip(&meta.first_expert[1]) {
        layer.experts.truncate(first);
        layer.routers.routers.truncate(1);
    }
    older.vaes.truncate(1);
    let mut older_meta = meta.clone();
    older_meta.first_expert.truncate(1);
    older_meta.bank.entries.truncate(1);
    older_meta.plans.clear();
    let task = older
        .import_pack(&mut older_meta, &dir, &Default::default())
        .unwrap();
    assert_eq!(task, 1);
    assert_eq!(older_meta, meta);
    assert_eq!(fingerprint(&older), full);

    // A pack cannot follow the wrong state (here: one that already has task 1).
    let err = older
        .import_pack(&mut older_meta, &dir, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("pack.json") && err.contains("cannot follow"),
        "{err}"
    );
}

#[test]
fn broken_state_files_are_errors() {
    let (state, meta) = two_task_state();
    let dir = scratch("state-broken");
    state.save(&meta, &WIDTHS, &dir).unwrap();
    std::fs::write(dir.join("state.json"), "{ not json").unwrap();
    let err = ContinualTensors::<B>::load(&dir, &Default::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("state.json") && err.contains("malformed"),
        "{err}"
    );
}
