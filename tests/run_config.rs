//! Run settings from TOML files: the shipped LLaVA-1.5-7B / CoIN file carries the paper's
//! settings, and a key that is not a setting is an error naming it.

use std::path::Path;

use cmoe_test_support::scratch;
use llava_cmoe::continual::{
    ExpansionMode, InitChoice, Method, NewRouterColumns, Preset, RunConfig,
};

fn preset() -> RunConfig {
    RunConfig::preset(Preset::Default, Method::Cmoe)
}

#[test]
fn the_7b_coin_file_carries_the_paper_settings() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/llava-1.5-7b-coin.toml");
    let c = preset().with_file(&path).unwrap();
    assert_eq!(
        (c.moe.rank, c.moe.alpha, c.moe.initial_experts, c.moe.top_k),
        (64, 128.0, 8, 2)
    );
    assert_eq!(c.batch * c.accumulation, 128, "global batch");
    assert_eq!((c.lr, c.probe_lr, c.router_lr_scale), (2e-4, 3e-4, 1.0));
    assert_eq!((c.alpha, c.probe_fraction, c.epochs), (0.8, 0.1, 1));
    assert_eq!(c.model, Path::new("models/llava-1.5-7b-hf"));
    assert_eq!(c.base_dtype, llava_cmoe::pipeline::Precision::Bf16);
    assert_eq!(c.checkpoint_every, 50);
    assert_eq!(c.data_root.as_deref(), Some(Path::new("data/CoIN")));
    assert_eq!(c.experts_per_layer, ExpansionMode::Fixed(1));
    assert_eq!(c.new_router_columns, NewRouterColumns::Random);
    assert_eq!(c.init, InitChoice::Phase);
    // What the file does not name keeps the preset's value.
    assert_eq!(c.moe.targets, preset().moe.targets);
    assert_eq!(c.order, preset().order);
}

#[test]
fn unknown_or_mistyped_settings_are_errors_naming_them() {
    let dir = scratch("run-config");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let typo = write("typo.toml", "[moe]\nrnak = 8\n");
    let err = format!("{:#}", preset().with_file(&typo).unwrap_err());
    assert!(
        err.contains("typo.toml") && err.contains("`moe.rnak`"),
        "{err}"
    );
    let mistyped = write("mistyped.toml", "batch = \"eight\"\n");
    let err = format!("{:#}", preset().with_file(&mistyped).unwrap_err());
    assert!(
        err.contains("mistyped.toml") && err.contains("bad setting"),
        "{err}"
    );
    let broken = write("broken.toml", "batch = \n");
    let err = format!("{:#}", preset().with_file(&broken).unwrap_err());
    assert!(
        err.contains("broken.toml") && err.contains("malformed TOML"),
        "{err}"
    );
    let ok = write(
        "ok.toml",
        "batch = 2\nexperts_per_layer = 4\n[ptl]\nlatent = 4\n",
    );
    let c = preset().with_file(&ok).unwrap();
    assert_eq!(
        (c.batch, c.ptl.latent, c.ptl.hidden),
        (2, 4, preset().ptl.hidden)
    );
    assert_eq!(c.experts_per_layer, ExpansionMode::Fixed(4));
    let counted = write("counted.toml", "experts_per_layer = \"probe-count\"\n");
    let c = preset().with_file(&counted).unwrap();
    assert_eq!(c.experts_per_layer, ExpansionMode::ProbeCount);
    let copied = write("copied.toml", "new_router_columns = \"copy-source\"\n");
    let c = preset().with_file(&copied).unwrap();
    assert_eq!(c.new_router_columns, NewRouterColumns::CopySource);
    assert_eq!(
        c.default_name(Preset::Default),
        "default-cmoe-columns-copy-source"
    );
    assert_eq!(preset().new_router_columns, NewRouterColumns::Random);
    let zero = write("zero.toml", "experts_per_layer = 0\n");
    let err = format!("{:#}", preset().with_file(&zero).unwrap_err());
    assert!(
        err.contains("zero.toml") && err.contains("positive"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_config_names_the_task_list() {
    let dir = std::env::temp_dir().join(format!("cmoe-task-list-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    // CoIN's eight by default, in its order.
    let coin = preset().task_list().unwrap();
    assert_eq!(coin.len(), 8);
    assert_eq!(
        (coin[0].0.as_str(), coin[7].0.as_str()),
        ("ScienceQA", "OCRVQA")
    );

    let listed = write(
        "tasks.toml",
        "order = \"reverse\"\n[[tasks]]\nname = \"GQA\"\n\
         [[tasks]]\nname = \"Charts\"\ntype = \"vqav2\"\n",
    );
    let c = preset().with_file(&listed).unwrap();
    let tasks: Vec<(String, String)> = c
        .task_list()
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.name().to_string()))
        .collect();
    assert_eq!(
        tasks,
        [
            ("Charts".to_string(), "vqav2".to_string()),
            ("GQA".to_string(), "gqa".to_string())
        ]
    );

    let untyped = write("untyped.toml", "[[tasks]]\nname = \"Charts\"\n");
    let err = format!(
        "{:#}",
        preset()
            .with_file(&untyped)
            .unwrap()
            .task_list()
            .unwrap_err()
    );
    assert!(err.contains("`Charts`") && err.contains("type"), "{err}");
    let twice = write(
        "twice.toml",
        "[[tasks]]\nname = \"GQA\"\n[[tasks]]\nname = \"GQA\"\n",
    );
    let err = format!(
        "{:#}",
        preset().with_file(&twice).unwrap().task_list().unwrap_err()
    );
    assert!(err.contains("`GQA` is listed twice"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
