//! The `cmoe` commands, run as a user would, against the HF references.

mod common;

use std::process::Command;

use cmoe_test_support::scratch;
use common::{fixture, max_abs_diff, photo, reference};
use llava_cmoe::tensor_io::read_tensor;

fn cmoe(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_cmoe"))
        .args(args)
        .output()
        .expect("cmoe runs");
    assert!(
        out.status.success(),
        "cmoe {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn generate_json_matches_transformers() {
    for model in ["tiny-llava", "tiny-llava-b"] {
        let (r, _) = reference(model);
        let dir = fixture(model);
        let out = cmoe(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--image",
            photo().to_str().unwrap(),
            "--prompt",
            &r.prompt,
            "--max-new-tokens",
            &r.greedy_max_new_tokens.to_string(),
            "--greedy",
            "--json",
        ]);
        let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        let ids = |key: &str| -> Vec<u32> { serde_json::from_value(json[key].clone()).unwrap() };
        assert_eq!(ids("prompt_ids"), r.prompt_ids, "{model}");
        assert_eq!(ids("generated_ids"), r.greedy_ids, "{model}");
        assert!(json["text"].is_string());
    }
}

#[test]
fn preprocess_then_forward_matches_transformers() {
    let model = "tiny-llava";
    let (r, tensor) = reference(model);
    let dir = fixture(model);
    let pixels = scratch("cli-pixels").join("pixels.safetensors");
    cmoe(&[
        "preprocess",
        "--model",
        dir.to_str().unwrap(),
        "--image",
        photo().to_str().unwrap(),
        "--out",
        pixels.to_str().unwrap(),
    ]);
    let ours = read_tensor(&pixels, "pixel_values").unwrap();
    assert_eq!(ours.shape, vec![1, 3, 32, 32]);
    assert!(max_abs_diff(&ours, &tensor("pixel_values")) <= 1e-5);

    let logits_file = scratch("cli-logits").join("logits.safetensors");
    let ids: Vec<String> = r.prompt_ids.iter().map(u32::to_string).collect();
    cmoe(&[
        "forward",
        "--model",
        dir.to_str().unwrap(),
        "--input-ids",
        &ids.join(","),
        "--pixel-values",
        pixels.to_str().unwrap(),
        "--out",
        logits_file.to_str().unwrap(),
    ]);
    let logits = read_tensor(&logits_file, "logits").unwrap();
    assert_eq!(logits.shape, vec![1, r.prompt_ids.len(), 32064]);
    assert!(max_abs_diff(&logits, &tensor("logits")) <= 1e-3);

    // generate also takes the preprocessed file.
    let out = cmoe(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--pixel-values",
        pixels.to_str().unwrap(),
        "--prompt",
        &r.prompt,
        "--max-new-tokens",
        "4",
        "--greedy",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let generated: Vec<u32> = serde_json::from_value(json["generated_ids"].clone()).unwrap();
    assert_eq!(generated, r.greedy_ids[..4]);
}

#[test]
fn inspect_shows_the_7b_model_from_its_sparse_config() {
    let out = cmoe(&[
        "inspect",
        "--model",
        fixture("llava-1.5-7b-hf").to_str().unwrap(),
    ]);
    assert!(
        out.contains(
            "hidden 4096 / 32 layers / 32 heads (32 kv, head_dim 128) / MLP 11008 / vocab 32064"
        ),
        "{out}"
    );
    assert!(
        out.contains("hidden 1024 / 24 layers / 16 heads / MLP 4096 / image 336 / patch 14"),
        "{out}"
    );
    assert!(out.contains("576 image tokens"), "{out}");
    // LLaVA-1.5-7B has 7,063,427,072 parameters (transformers' count).
    assert!(out.contains("total        7063427072"), "{out}");
    let json: serde_json::Value = serde_json::from_str(&cmoe(&[
        "inspect",
        "--model",
        fixture("tiny-llava").to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(json["parameters"]["total"], 4242432);
    assert_eq!(json["checkpoint"]["elements"], 4242432);
}

#[test]
fn user_errors_exit_non_zero_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_cmoe"))
        .args([
            "generate",
            "--model",
            "/nonexistent-model",
            "--image",
            "x.jpg",
            "--prompt",
            "<image>",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent-model/config.json"), "{err}");
}

#[test]
fn devices_the_backend_lacks_are_refused_before_anything_is_written() {
    let runs = scratch("cli-devices").join("runs");
    for (devices, expected) in [
        ("0,1", "there is no device 1; backend flex has 1 device(s)"),
        // The CPU runs several replicas on its one device, but no more than a step's
        // micro-batches (the smoke preset has 2).
        ("0,0,0", "3 devices need at least as many micro-batches"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_cmoe"))
            .args([
                "train",
                "--preset",
                "smoke",
                "--backend",
                "flex",
                "--devices",
                devices,
            ])
            .arg("--runs")
            .arg(&runs)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expected), "{err}");
    }
    assert!(!runs.exists(), "a refused run wrote {}", runs.display());
}

#[test]
fn score_prints_the_accuracy_and_json_and_names_bad_files() {
    let dir = scratch("cli-score");
    std::fs::create_dir_all(&dir).unwrap();
    let test = dir.join("test.json");
    std::fs::write(
        &test,
        r#"[{"question_id": 1, "image": "a.png", "text": "q", "answer": "Unanswerable"},
            {"question_id": 2, "image": "b.png", "text": "q", "answer": "The Hobbit"},
            {"question_id": 3, "image": "c.png", "text": "q", "answer": "Dune"}]"#,
    )
    .unwrap();
    let results = dir.join("results.jsonl");
    std::fs::write(
        &results,
        "{\"question_id\": 1, \"text\": \"Unanswerable\"}\n{\"question_id\": 2, \"text\": \"the hobbit\"}\n",
    )
    .unwrap();
    let args = |extra: &[&str]| {
        let mut a = vec![
            "score",
            "--task-type",
            "ocrvqa",
            "--annotations",
            test.to_str().unwrap(),
            "--predictions",
            results.to_str().unwrap(),
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |extra: &[&str]| {
        let a = args(extra);
        cmoe(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // Correct: 2 of 3 questions. CoIN: the "Unanswerable" result is skipped, the missing
    // question 3 is not counted: 1 of 2.
    assert!(run(&[]).contains("accuracy 66.67%"), "{}", run(&[]));
    let json: serde_json::Value = serde_json::from_str(run(&["--json"]).trim()).unwrap();
    assert_eq!(json["total"], 3);
    assert_eq!(json["correct"], 2.0);
    let coin: serde_json::Value =
        serde_json::from_str(run(&["--coin-compat", "--json"]).trim()).unwrap();
    assert_eq!(coin["accuracy"], 50.0);

    std::fs::write(
        &results,
        "{\"question_id\": 1, \"text\": \"x\"}\nnot json\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cmoe"))
        .args(args(&[]))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("results.jsonl:2") && err.contains("malformed"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `cmoe [--json] train --dry-run ...`: its exit status and what it printed.
fn dry_run(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cmoe"))
        .args(["--json", "train", "--dry-run"])
        .args(args)
        .output()
        .expect("cmoe runs");
    (out.status.success(), String::from_utf8(out.stdout).unwrap())
}

#[test]
fn the_7b_dry_run_plans_under_70_gib_and_names_what_is_missing() {
    let runs = scratch("dry-run-7b");
    let no_data = runs.join("no-such-data");
    let (ok, printed) = dry_run(&[
        "--backend",
        "cuda",
        "--config",
        "configs/llava-1.5-7b-coin.toml",
        "--model",
        fixture("llava-1.5-7b-hf").to_str().unwrap(),
        "--data-root",
        no_data.to_str().unwrap(),
        "--runs",
        runs.to_str().unwrap(),
    ]);
    assert!(!ok, "a dry run without weights or data must fail");
    let found: serde_json::Value = serde_json::from_str(&printed).unwrap();
    let failed: Vec<String> = found["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| format!("{}: {}", c["what"], c["detail"]))
        .collect();
    let names = |needle: &str| failed.iter().any(|f| f.contains(needle));
    assert!(names("weights") && names("model.safetensors"), "{failed:?}");
    assert!(names("tokenizer.json"), "{failed:?}");
    assert!(names("no-such-data"), "{failed:?}");
    let memory = &found["memory"];
    let peak = memory["peak_bytes"].as_u64().unwrap() as f64 / (1u64 << 30) as f64;
    assert!(peak < 70.0, "7B plan peak {peak:.1} GiB");
    assert_eq!(memory["rows"], 4);
    // LLaVA-1.5's 576 image tokens and the assumed text.
    assert_eq!(memory["seq"], 576 + 104);
    let per_token = memory["activation_bytes_per_token_per_layer"]
        .as_u64()
        .unwrap();
    assert!((300_000..500_000).contains(&per_token), "{per_token}");
    let names: Vec<&str> = memory["components"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for part in ["frozen base", "trainable experts", "activations", "runtime"] {
        assert!(
            names.iter().any(|n| n.contains(part)),
            "{part} in {names:?}"
        );
    }
}

#[test]
fn the_default_dry_run_passes_and_a_missing_model_or_initial_data_fails_it() {
    let runs = scratch("dry-run-mini");
    let runs = runs.to_str().unwrap();
    let (ok, printed) = dry_run(&["--runs", runs]);
    assert!(ok, "{printed}");
    let found: serde_json::Value = serde_json::from_str(&printed).unwrap();
    assert!(found["memory"]["peak_bytes"].as_u64().unwrap() > 0);

    let (ok, printed) = dry_run(&["--runs", runs, "--model", "no/such/model"]);
    assert!(!ok);
    assert!(printed.contains("no/such/model/config.json"), "{printed}");

    let (ok, printed) = dry_run(&["--runs", runs, "--init-data", "no/such/init.json"]);
    assert!(!ok);
    assert!(printed.contains("no/such/init.json"), "{printed}");
}

#[test]
fn the_gpu_check_rehearses_every_step_on_the_cpu() {
    let out = scratch("gpu-check-rehearsal");
    let status = Command::new("scripts/gpu-check.sh")
        .arg(&out)
        .env("GPU_CHECK_REHEARSAL", "1")
        .env("CMOE", env!("CARGO_BIN_EXE_cmoe"))
        .status()
        .expect("the script runs");
    let summary = std::fs::read_to_string(out.join("summary.json")).expect("summary.json");
    assert!(status.success(), "{summary}");
    let mut files: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["gpu-check.tar.gz", "summary.json"]);
    let summary: serde_json::Value = serde_json::from_str(&summary).unwrap();
    let steps: Vec<(&str, &str)> = summary["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    let names: Vec<&str> = steps.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "preflight",
            "parity-f32",
            "parity-bf16",
            "smoke",
            "plan",
            "memory",
            "bench"
        ]
    );
    assert!(steps.iter().all(|(_, s)| *s == "ok"), "{steps:?}");
    assert!(summary["memory"]["bytes_per_layer"].as_f64().is_some());
    assert!(
        summary["bench"]["steps"]["cmoe_step"]["burn_tok_s"]
            .as_f64()
            .unwrap()
            > 0.0
    );
}
