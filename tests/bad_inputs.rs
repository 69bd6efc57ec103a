#![cfg(feature = "flex")]
//! The catalogue of bad inputs and misuse a run meets (issue 15): each gives a non-zero exit and
//! a message naming the file or setting and the problem, before anything is lost.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use cmoe_test_support::scratch;
use common::{fixture, photo};

/// Asserts that `out` failed and that its message holds every one of `parts`.
fn fails_with(out: &Output, parts: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded:\n{err}");
    assert!(!err.contains("panicked"), "panicked:\n{err}");
    for part in parts {
        assert!(err.contains(part), "the message lacks {part:?}:\n{err}");
    }
}

#[test]
fn a_truncated_jpeg_is_an_error_not_grey_pixels() {
    let dir = scratch("jpeg");
    let whole = std::fs::read(photo()).unwrap();
    let cut = dir.join("cut.jpg");
    std::fs::write(&cut, &whole[..whole.len() / 2]).unwrap();
    let model = fixture("tiny-llava");
    let out_file = dir.join("pixels.safetensors");
    let preprocess = |image: &Path| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_cmoe"));
        command.arg("preprocess").arg("--model").arg(&model);
        command
            .arg("--image")
            .arg(image)
            .arg("--out")
            .arg(&out_file);
        command.output().unwrap()
    };
    fails_with(&preprocess(&cut), &["cut.jpg", "truncated JPEG"]);
    // The whole file still decodes.
    let whole_out = preprocess(&photo());
    assert!(
        whole_out.status.success(),
        "{}",
        String::from_utf8_lossy(&whole_out.stderr)
    );
}

/// `cmoe train --preset smoke` into `runs/<name>`, with `more` flags.
fn smoke(runs: &Path, name: &str, more: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cmoe"));
    command.args(["train", "--preset", "smoke", "--name", name]);
    command.args(more).arg("--runs").arg(runs);
    command
}

#[test]
fn a_run_folder_has_one_owner() {
    let runs = scratch("owner");
    // --resume of a run that does not exist.
    let out = smoke(&runs, "none", &["--resume"]).output().unwrap();
    fails_with(&out, &["no run to resume", "none"]);
    // A folder holding any trace of a run (here a stage checkpoint left by a run killed in its
    // first task) is refused without --resume.
    let stale = runs.join("stale");
    std::fs::create_dir_all(stale.join("stage")).unwrap();
    let out = smoke(&runs, "stale", &[]).output().unwrap();
    fails_with(&out, &["already holds a run", "stage", "--resume"]);
    // Two runs into one folder: the second is refused while the first holds the lock, and the
    // first finishes with its results intact.
    let mut first = smoke(&runs, "x", &["--stop-after-tasks", "1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = runs.join("x").join("run.json");
    while !lock.exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let second = smoke(&runs, "x", &["--seed", "1", "--resume"])
        .output()
        .unwrap();
    fails_with(&second, &["in use by another cmoe process"]);
    // (--stop-after-tasks ends the run as if killed there: a non-zero exit.)
    first.wait().unwrap();
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&lock).unwrap()).unwrap();
    assert_eq!(run["seed"], 0);
    let progress: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(runs.join("x").join("progress.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(progress["completed"], 1);
}

#[test]
fn run_names_stay_inside_the_runs_folder() {
    let runs = scratch("names");
    for name in ["", "../x", "a/b", ".", ".."] {
        let out = smoke(&runs, name, &[]).output().unwrap();
        fails_with(&out, &["--name", "one folder name"]);
    }
    assert_eq!(std::fs::read_dir(&runs).unwrap().count(), 0);
    assert!(!runs.parent().unwrap().join("x").exists());
}

#[test]
fn resuming_with_other_settings_names_them() {
    let runs = scratch("settings");
    let first = smoke(&runs, "r", &["--stop-after-tasks", "1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(err.contains("stopped after task 1"), "{err}");
    let out = smoke(&runs, "r", &["--resume", "--seed", "3"])
        .output()
        .unwrap();
    fails_with(&out, &["run.json", "other settings", "seed: 0 -> 3"]);
}

#[test]
fn run_json_keeps_paths_that_work_from_anywhere() {
    let runs = scratch("paths");
    let out = Command::new(env!("CARGO_BIN_EXE_cmoe"))
        .args([
            "train",
            "--preset",
            "smoke",
            "--name",
            "p",
            "--stop-after-tasks",
            "1",
        ])
        .arg("--runs")
        .arg(&runs)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("stopped after task 1"), "{err}");
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs.join("p").join("run.json")).unwrap())
            .unwrap();
    let model = PathBuf::from(run["model"].as_str().unwrap());
    assert!(model.is_absolute(), "{}", model.display());
    assert!(model.join("config.json").exists());
}

/// `cmoe generate` of two tokens with `model` on the fixture photo, with `more` flags.
fn generate(model: &Path, prompt: &str, more: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cmoe"))
        .arg("generate")
        .arg("--model")
        .arg(model)
        .arg("--image")
        .arg(photo())
        .args(["--prompt", prompt, "--max-new-tokens", "2"])
        .args(more)
        .output()
        .unwrap()
}

#[test]
fn sampling_settings_are_range_checked() {
    let model = fixture("tiny-llava");
    for temperature in ["nan", "-1", "0", "inf"] {
        let out = generate(
            &model,
            "<image>\nWhat is it?",
            &["--temperature", temperature],
        );
        let shown = if temperature == "nan" {
            "NaN"
        } else {
            temperature
        };
        fails_with(&out, &["temperature > 0", shown]);
    }
}

#[test]
fn non_finite_logits_stop_generation_with_an_error() {
    let model = common::scratch_copy("tiny-llava", "nan-std");
    let path = model.join("preprocessor_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["image_std"] = serde_json::json!([0.0, 0.0, 0.0]);
    std::fs::write(&path, config.to_string()).unwrap();
    let out = generate(&model, "<image>\nWhat is it?", &["--greedy"]);
    fails_with(&out, &["non-finite", "image_std"]);
}

#[test]
fn a_broken_shard_index_is_named_not_taken_for_no_weights() {
    let model = common::scratch_copy("tiny-llava", "shards");
    std::fs::remove_file(model.join("model-00002-of-00003.safetensors")).unwrap();
    for command in ["import", "inspect"] {
        let out = Command::new(env!("CARGO_BIN_EXE_cmoe"))
            .arg(command)
            .arg("--model")
            .arg(&model)
            .output()
            .unwrap();
        fails_with(
            &out,
            &["model.safetensors.index.json", "model-00002-of-00003"],
        );
    }
    std::fs::write(model.join("model.safetensors.index.json"), "{ not json").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cmoe"))
        .args(["inspect", "--model"])
        .arg(&model)
        .output()
        .unwrap();
    fails_with(&out, &["model.safetensors.index.json", "malformed JSON"]);
}

#[test]
fn settings_no_run_can_use_are_refused_before_any_work() {
    let runs = scratch("settings-range");
    let config = runs.join("bad.toml");
    for (toml, message) in [
        ("lr = -0.001", "setting lr = -0.001"),
        ("batch = 0", "setting batch = 0"),
        ("epochs = 0", "setting epochs = 0"),
        ("[moe]\nrank = 0", "setting moe.rank = 0"),
        (
            "[moe]\ntop_k = 9",
            "moe.top_k = 9 is more than moe.initial_experts = 4",
        ),
        ("[moe]\ndropout = 1.5", "setting moe.dropout = 1.5"),
        ("[data]\nimage_size = 100000", "image size 100000"),
    ] {
        std::fs::write(&config, toml).unwrap();
        let out = smoke(&runs, "s", &[])
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        fails_with(&out, &[message]);
        assert!(!runs.join("s").exists(), "{toml}: the run folder was made");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_cmoe"))
        .args(["mini-coin", "--image-size", "100000", "--out"])
        .arg(runs.join("mc"))
        .output()
        .unwrap();
    fails_with(&out, &["image size 100000"]);
}

#[test]
fn a_malformed_training_file_of_a_later_task_stops_the_run_before_the_first_step() {
    let runs = scratch("late");
    let data = runs.join("mc");
    let out = Command::new(env!("CARGO_BIN_EXE_cmoe"))
        .args([
            "mini-coin",
            "--train-per-task",
            "8",
            "--test-per-task",
            "4",
            "--out",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = data.join("Instructions/Grounding/train.json");
    assert!(
        last.exists(),
        "{} is not Mini-CoIN's last task",
        last.display()
    );
    std::fs::write(&last, "[ {\"id\": ").unwrap();
    let out = smoke(&runs, "late", &["--init", "first-task"])
        .arg("--data-root")
        .arg(&data)
        .output()
        .unwrap();
    fails_with(&out, &["Grounding/train.json"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("task 1/"), "a task trained first:\n{err}");
}

#[test]
fn an_output_path_that_is_a_folder_is_refused_and_leaves_nothing() {
    let dir = scratch("out-folder");
    let out = Command::new(env!("CARGO_BIN_EXE_cmoe"))
        .arg("preprocess")
        .arg("--model")
        .arg(fixture("tiny-llava"))
        .arg("--image")
        .arg(photo())
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    fails_with(&out, &["is a folder", ".safetensors"]);
    let tmp = dir.with_extension("safetensors.tmp");
    assert!(!tmp.exists(), "{} was left behind", tmp.display());
}

#[test]
fn a_prompt_without_its_image_mark_says_to_write_one() {
    let out = generate(&fixture("tiny-llava"), "What is it?", &["--greedy"]);
    fails_with(
        &out,
        &["0 <image> mark(s) for 1 image(s)", "generate expands it"],
    );
}

#[test]
fn a_tokenizer_that_does_not_match_the_model_stops_a_run_before_any_work() {
    let runs = scratch("tokenizer");
    let model = runs.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for file in [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ] {
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("assets/llava-mini")
                .join(file),
            model.join(file),
        )
        .unwrap();
    }
    // A 32,000-token LLaMA tokenizer for a 2,048-token model.
    std::fs::copy(
        fixture("tiny-llava-b").join("tokenizer.json"),
        model.join("tokenizer.json"),
    )
    .unwrap();
    let out = smoke(&runs, "t", &[])
        .arg("--model")
        .arg(&model)
        .output()
        .unwrap();
    fails_with(&out, &["tokenizer.json", "do not match"]);
    assert!(
        !runs.join("t/progress.json").exists(),
        "the run started before the tokenizer was checked"
    );
}
