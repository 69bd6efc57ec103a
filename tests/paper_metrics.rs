//! The paper's metric definitions and baselines end to end, on three Mini-CoIN tasks at smoke
//! size (initial phase included): Immediate is answered with each task's own router (a run
//! routed by PTL and one given the true task's router agree on it exactly), Last goes through
//! the inference router (the last task's too), BWT is the mean of Last - Immediate over all
//! tasks; EWC, LwF and multitask MoELoRA each write a report; sequential LoRA stays one LoRA
//! pair whatever the config's `[moe]` says.

use std::path::{Path, PathBuf};
use std::process::Command;

use cmoe_test_support::scratch;
use serde_json::Value;

fn cmoe(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_cmoe"))
        .args(args)
        .output()
        .expect("cmoe runs");
    assert!(
        out.status.success(),
        "cmoe {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

struct Runs {
    root: PathBuf,
    settings: PathBuf,
}

impl Runs {
    /// A scratch folder of its own for the test `test`.
    fn new(test: &str) -> Self {
        let root = scratch(&format!("paper-metrics-{test}"));
        let settings = root.join("three-tasks.toml");
        std::fs::write(
            &settings,
            "[[tasks]]\nname = \"ScienceQA\"\n[[tasks]]\nname = \"TextVQA\"\n\
             [[tasks]]\nname = \"ImageNet\"\n[moe]\ninitial_experts = 3\n",
        )
        .unwrap();
        Self { root, settings }
    }

    /// Trains `name` with `flags` over the three tasks; returns its report.
    fn train(&self, name: &str, flags: &[&str]) -> Value {
        let model: PathBuf = [env!("CARGO_MANIFEST_DIR"), "assets", "llava-mini"]
            .iter()
            .collect();
        let runs = self.root.join("runs");
        let mut args = vec![
            "train",
            "--preset",
            "smoke",
            "--config",
            self.settings.to_str().unwrap(),
            "--model",
            model.to_str().unwrap(),
            "--runs",
            runs.to_str().unwrap(),
            "--name",
            name,
        ];
        args.extend_from_slice(flags);
        cmoe(&args);
        report(&runs.join(name))
    }
}

fn report(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

#[test]
fn immediate_uses_the_tasks_own_router_and_bwt_is_the_papers() {
    let runs = Runs::new("immediate");
    let ptl = runs.train("ptl", &[]);
    let oracle = runs.train("oracle", &["--router", "oracle"]);

    // Training does not depend on the inference router: Immediate (own router) is the same.
    assert_eq!(ptl["immediate"], oracle["immediate"]);
    assert_eq!(oracle["immediate_via_router"], oracle["immediate"]);
    let accuracy = ptl["accuracy"].as_array().unwrap();
    let immediate = floats(&ptl["immediate"]);
    let last = floats(&ptl["last"]);
    for (i, &value) in immediate.iter().enumerate() {
        assert_eq!(accuracy[i][i].as_f64().unwrap(), value, "diagonal {i}");
    }
    // Last: the final row through PTL, the last task's own cell through PTL as well.
    assert_eq!(last[0], accuracy[2][0].as_f64().unwrap());
    assert_eq!(last[1], accuracy[2][1].as_f64().unwrap());
    assert_eq!(last[2], floats(&ptl["immediate_via_router"])[2]);
    let bwt = (0..3).map(|i| last[i] - immediate[i]).sum::<f64>() / 3.0;
    assert!((ptl["bwt"].as_f64().unwrap() - bwt).abs() < 1e-9);
    let located = ptl["ptl_accuracy"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&located));
    // The initial phase trained the initial experts; the first task then grew by PGKE and
    // counts only what it added.
    assert!(ptl["initial_params"].as_u64().unwrap() > 0);
    let experts = ptl["experts_per_layer"].as_array().unwrap();
    let first: u64 = experts[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .sum();
    assert!(first > 4 * 3, "task 1 added no expert: {experts:?}");
    // Every task's plan is in the report with PGKE's probe statistics: per layer, each expert's
    // share of the tokens that had it in their top 2 (so they sum to 2), and the experts it adds
    // are the growth of `experts_per_layer`.
    let plans = ptl["plans"].as_array().unwrap();
    assert_eq!(plans.len(), 3);
    let total = |t: usize| -> u64 {
        experts[t]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .sum()
    };
    for (t, plan) in plans.iter().enumerate() {
        assert_eq!(plan["task"], t);
        let added: u64 = plan["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["add"].as_u64().unwrap())
            .sum();
        let before = if t == 0 { 4 * 3 } else { total(t - 1) };
        assert_eq!(added, total(t) - before, "task {t}");
        let frequencies = plan["frequencies"].as_array().unwrap();
        assert_eq!(frequencies.len(), 4);
        for freq in frequencies {
            let sum: f64 = floats(freq).iter().sum();
            assert!((sum - 2.0).abs() < 1e-9, "task {t}: {freq}");
        }
    }
    let md = std::fs::read_to_string(runs.root.join("runs/ptl/report.md")).unwrap();
    assert!(md.contains("## Where PGKE added experts (probe statistics)"));
    assert!(ptl["config"]["init"] == "phase");
    let _ = std::fs::remove_dir_all(&runs.root);
}

#[test]
fn baselines_write_reports() {
    let runs = Runs::new("baselines");
    for method in ["ewc", "lwf"] {
        let r = runs.train(method, &["--method", method]);
        assert_eq!(r["tasks"].as_array().unwrap().len(), 3, "{method}");
        assert!(r["bwt"].as_f64().unwrap().is_finite(), "{method}");
        assert!(r["ptl_accuracy"].is_null(), "{method}: one shared router");
        assert_eq!(r["experts_per_layer"][2], serde_json::json!([3, 3, 3, 3]));
        assert_eq!(r["immediate_via_router"], r["immediate"], "{method}");
    }
    let multitask = runs.train("multitask", &["--method", "multitask"]);
    assert_eq!(multitask["accuracy"].as_array().unwrap().len(), 1);
    assert_eq!(multitask["accuracy"][0].as_array().unwrap().len(), 3);
    assert!(multitask["bwt"].is_null());
    assert_eq!(multitask["immediate"], multitask["last"]);
    // Sequential LoRA: one pair on up_proj (the paper's), whatever `[moe]` says.
    let lora = runs.train("lora", &["--method", "lora"]);
    assert_eq!(
        lora["experts_per_layer"][2],
        serde_json::json!([1, 1, 1, 1])
    );
    assert_eq!(
        lora["config"]["lora_targets"],
        serde_json::json!({"gate": false, "up": true, "down": false})
    );
    let _ = std::fs::remove_dir_all(&runs.root);
}
