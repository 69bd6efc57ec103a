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
