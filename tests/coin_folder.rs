//! A CoIN-format folder through the whole path with the shipped small model: `cmoe import`
//! validates the model, `cmoe train --data-root` learns the eight tasks from the folder,
//! `cmoe eval` re-evaluates the saved state, `cmoe report` rebuilds the report. The folder is a
//! tiny Mini-CoIN written in CoIN's formats, then damaged the way real downloads are: one
//! training image is missing, one task's training file is JSONL with a malformed line, and one
//! test image is missing. Skipped samples are counted per task; `--bad-samples error` stops
//! with a message naming the file and the problem.

use std::path::{Path, PathBuf};
use std::process::Command;

use cmoe_test_support::scratch;
use serde_json::Value;

fn cmoe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cmoe"))
        .args(args)
        .output()
        .expect("cmoe runs")
}

fn ok(args: &[&str]) -> String {
    let out = cmoe(args);
    assert!(
        out.status.success(),
        "cmoe {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Writes the damaged folder; returns (root, the removed training image's sample id).
fn damaged_coin_folder(root: &Path) -> String {
    let data = root.to_str().unwrap();
    ok(&[
        "mini-coin",
        "--out",
        data,
        "--train-per-task",
        "6",
        "--test-per-task",
        "4",
        "--init-samples",
        "8",
    ]);
    let instructions = root.join("Instructions");
    // A missing training image (ScienceQA's first sample).
    let science = json(&instructions.join("ScienceQA/train.json"));
    let first = &science[0];
    std::fs::remove_file(root.join("images").join(first["image"].as_str().unwrap())).unwrap();
    // GQA's training set as JSONL with a malformed line.
    let gqa = instructions.join("GQA");
    let records = json(&gqa.join("train.json"));
    let mut lines: Vec<String> = records
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.to_string())
        .collect();
    lines.insert(2, "{\"id\": \"broken\", \"image\": ".to_string());
    std::fs::write(gqa.join("train.jsonl"), lines.join("\n")).unwrap();
    std::fs::remove_file(gqa.join("train.json")).unwrap();
    // A missing test image (VizWiz's last question).
    let vizwiz = json(&instructions.join("VizWiz/test.json"));
    let last = vizwiz.as_array().unwrap().last().unwrap();
    std::fs::remove_file(root.join("images").join(last["image"].as_str().unwrap())).unwrap();
    first["id"].as_str().unwrap().to_string()
}

#[test]
fn coin_folder_runs_through_import_train_eval_and_report() {
    let root = scratch("coin-folder");
    let data = root.join("coin");
    let missing_id = damaged_coin_folder(&data);
    let model: PathBuf = [env!("CARGO_MANIFEST_DIR"), "assets", "llava-mini"]
        .iter()
        .collect();
    let (m, d) = (model.to_str().unwrap(), data.to_str().unwrap());
    // The initial phase's data, a file of the user's (images under the folder's images/).
    let init = data.join("Initialisation/train.json");
    let init = init.to_str().unwrap();
    let runs = root.join("runs");
    let r = runs.to_str().unwrap();

    let import = ok(&["import", "--model", m, "--json"]);
    let import: Value = serde_json::from_str(&import).unwrap();
    assert_eq!(import["loaded_parameters"], 5_138_432);
    assert_eq!(import["inspection"]["parameters"]["total"], 5_138_432);

    // A CoIN folder has no initialisation data of its own: the initial phase asks for it.
    let no_init = cmoe(&[
        "train",
        "--preset",
        "smoke",
        "--model",
        m,
        "--data-root",
        d,
        "--runs",
        r,
        "--name",
        "no-init",
    ]);
    assert!(!no_init.status.success());
    let message = String::from_utf8_lossy(&no_init.stderr);
    assert!(
        message.contains("init_data") && message.contains("--init first-task"),
        "{message}"
    );

    // A bad sample stops a run that asks for errors, naming the sample and the problem.
    let strict = cmoe(&[
        "train",
        "--preset",
        "smoke",
        "--model",
        m,
        "--data-root",
        d,
        "--runs",
        r,
        "--name",
        "strict",
        "--init-data",
        init,
        "--bad-samples",
        "error",
    ]);
    assert!(!strict.status.success());
    let message = String::from_utf8_lossy(&strict.stderr);
    assert!(
        message.contains("does not exist") && message.contains("--bad-samples skip"),
        "{message}"
    );

    ok(&[
        "train",
        "--preset",
        "smoke",
        "--model",
        m,
        "--data-root",
        d,
        "--runs",
        r,
        "--name",
        "coin",
        "--init-data",
        init,
    ]);
    let run = runs.join("coin");
    let report = json(&run.join("report.json"));
    let tasks: Vec<&str> = report["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(
        tasks,
        [
            "ScienceQA",
            "TextVQA",
            "ImageNet",
            "GQA",
            "VizWiz",
            "Grounding",
            "VQAv2",
            "OCRVQA"
        ]
    );
    // The damage is counted where it is, and nowhere else.
    let train_data = report["train_data"].as_array().unwrap();
    for (t, entry) in train_data.iter().enumerate() {
        let problems = entry["problems"].as_array().unwrap();
        let kinds: Vec<&str> = problems
            .iter()
            .map(|p| p["kind"].as_str().unwrap())
            .collect();
        match tasks[t] {
            "ScienceQA" => {
                assert_eq!(kinds, ["missing-image"]);
                assert_eq!(problems[0]["at"], missing_id.as_str());
                assert_eq!(entry["used"], 5);
            }
            "GQA" => {
                assert_eq!(kinds, ["bad-record"]);
                assert!(
                    problems[0]["at"]
                        .as_str()
                        .unwrap()
                        .ends_with("train.jsonl:3")
                );
                assert_eq!(entry["used"], 6);
            }
            _ => {
                assert!(kinds.is_empty(), "{}: {kinds:?}", tasks[t]);
                assert_eq!(entry["used"], 6);
            }
        }
    }
    let test_problems = report["test_problems"].as_array().unwrap();
    for (t, problems) in test_problems.iter().enumerate() {
        let expected = usize::from(tasks[t] == "VizWiz");
        assert_eq!(problems.as_array().unwrap().len(), expected, "{}", tasks[t]);
    }
    // Every remaining question was routed once after the last task.
    let routed: Vec<u64> = report["ptl_confusion"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .sum()
        })
        .collect();
    assert_eq!(routed, [4, 4, 4, 4, 3, 4, 4, 4]);

    // Re-evaluating the saved state reproduces the last row of the accuracy matrix.
    ok(&["eval", "--run", run.to_str().unwrap()]);
    let eval = json(&run.join("eval.json"));
    assert_eq!(eval["accuracy"], report["last"]);
    assert_eq!(eval["ptl_confusion"], report["ptl_confusion"]);
    assert!(run.join("eval/OCRVQA.jsonl").is_file());

    // The report is rebuilt from the run's progress alone.
    std::fs::remove_file(run.join("report.json")).unwrap();
    std::fs::remove_file(run.join("report.md")).unwrap();
    ok(&["report", "--run", run.to_str().unwrap()]);
    assert_eq!(json(&run.join("report.json")), report);
    assert!(run.join("report.md").is_file());

    let _ = std::fs::remove_dir_all(&root);
}
