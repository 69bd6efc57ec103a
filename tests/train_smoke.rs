//! The main job end to end at smoke size: `cmoe pretrain` makes a small LLaVA (a few steps of
//! both stages; stopped and resumed, it ends bit-identical; `cmoe eval-base` measures the
//! held-out instruction accuracy its pretrain.json reports),
//! `cmoe train --preset smoke` runs all eight Mini-CoIN tasks on it and writes the report, and
//! a run killed after three tasks, resumed, killed again between task 5's PGKE expansion and its
//! training (and in the middle of a checkpoint swap), resumed, killed inside task 6's training
//! stage (while writing its step-3 checkpoint), and resumed again ends bit-identical to an
//! unbroken run; a finished run resumed trains nothing and keeps its report.

use std::path::Path;
use std::process::Command;

fn cmoe(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_cmoe"))
        .args(args)
        .output()
        .expect("cmoe runs")
}

fn ok(args: &[&str]) -> std::process::Output {
    let out = cmoe(args);
    assert!(
        out.status.success(),
        "cmoe {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The stderr of a command that must have succeeded (shown if it did not).
fn stderr_of_success(out: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    stderr
}

/// What a successful `cmoe ... --json` printed.
fn ok_json(args: &[&str]) -> serde_json::Value {
    serde_json::from_slice(&ok(args).stdout).unwrap()
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn report(dir: &Path) -> serde_json::Value {
    read_json(&dir.join("report.json"))
}

#[test]
fn smoke_run_reports_and_resumes_bit_identically() {
    let root = std::env::temp_dir().join(format!("cmoe-smoke-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let model = root.join("model");
    let runs = root.join("runs");
    let (m, r) = (model.to_str().unwrap(), runs.to_str().unwrap());
    // All three pretraining stages (3 + 3 + 2 steps, a checkpoint every 2); a pretraining
    // stopped after step 3 (inside stage 0, after its checkpoint), resumed, stopped again after
    // step 5 (inside stage 1, after its checkpoint) and resumed again ends with the same
    // weights, tokenizer and loss curves as the unbroken one.
    let pretrain = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "pretrain",
            "--out",
            out,
            "--vision-steps",
            "3",
            "--caption-steps",
            "3",
            "--instruction-steps",
            "2",
            "--checkpoint-every",
            "2",
            "--batch",
            "4",
            "--tokenizer-corpus",
            "300",
            "--held-out-per-kind",
            "1",
        ];
        args.extend_from_slice(extra);
        cmoe(&args)
    };
    let out = pretrain(m, &[]);
    stderr_of_success(&out);
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "preprocessor_config.json",
        "pretrain.json",
        "pretrain_loss.png",
    ] {
        assert!(model.join(file).is_file(), "{file}");
    }
    assert!(!model.join("pretrain-checkpoint").exists());
    let broken = root.join("model-broken");
    let b = broken.to_str().unwrap();
    let stopped = pretrain(b, &["--stop-after-steps", "3"]);
    assert!(!stopped.status.success());
    assert!(String::from_utf8_lossy(&stopped.stderr).contains("--resume"));
    let again = pretrain(b, &[]);
    assert!(
        !again.status.success(),
        "a new pretraining over a checkpoint is refused"
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("pass --resume"));
    let stopped = pretrain(b, &["--resume", "--stop-after-steps", "5"]);
    assert!(!stopped.status.success());
    assert!(String::from_utf8_lossy(&stopped.stderr).contains("stopped after step 5"));
    let resumed = pretrain(b, &["--resume"]);
    stderr_of_success(&resumed);
    for file in ["model.safetensors", "tokenizer.json"] {
        assert!(
            std::fs::read(model.join(file)).unwrap() == std::fs::read(broken.join(file)).unwrap(),
            "{file} differs after a resumed pretraining"
        );
    }
    let curves = |dir: &Path| {
        read_json(&dir.join("pretrain.json"))["stages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["loss_curve"].clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(curves(&model), curves(&broken));
    let names: Vec<_> = read_json(&model.join("pretrain.json"))["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["vision", "captions", "instructions"]);

    // The held-out instruction accuracy in pretrain.json is what `cmoe eval-base` measures on
    // the shipped weights (same seed, same questions), and its answers are written.
    let held_out = |dir: &Path| read_json(&dir.join("pretrain.json"))["held_out"].clone();
    assert_eq!(held_out(&model)["kinds"].as_array().unwrap().len(), 11);
    let answers = root.join("held-out.jsonl");
    let measured = ok_json(&[
        "eval-base",
        "--model",
        m,
        "--per-kind",
        "1",
        "--answers",
        answers.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(measured, held_out(&model));
    assert_eq!(
        std::fs::read_to_string(&answers).unwrap().lines().count(),
        11
    );

    // Two passes over each task's two batches: four steps, checkpointed after each.
    let settings = root.join("smoke.toml");
    std::fs::write(&settings, "epochs = 2\ncheckpoint_every = 1\n").unwrap();
    let settings = settings.to_str().unwrap();
    let train = |name: &str, extra: &[&str]| {
        let mut args = vec![
            "train", "--preset", "smoke", "--config", settings, "--model", m, "--runs", r,
            "--name", name,
        ];
        args.extend_from_slice(extra);
        cmoe(&args)
    };
    let whole = train("whole", &[]);
    stderr_of_success(&whole);
    let stopped = train("broken", &["--stop-after-tasks", "3"]);
    assert!(!stopped.status.success());
    assert!(String::from_utf8_lossy(&stopped.stderr).contains("--resume"));
    let fresh = train("broken", &[]);
    assert!(
        !fresh.status.success(),
        "a fresh run must not overwrite a started one"
    );
    assert!(String::from_utf8_lossy(&fresh.stderr).contains("already holds a run"));
    // Resumed after task 3, killed again between task 5's expansion and its training.
    let stopped = train("broken", &["--resume", "--stop-after-expansion", "5"]);
    assert!(!stopped.status.success());
    let message = String::from_utf8_lossy(&stopped.stderr);
    assert!(message.contains("resuming after task 3"), "{message}");
    assert!(
        message.contains("after the expansion of task 5"),
        "{message}"
    );
    // ... and as if killed in the middle of swapping a checkpoint in (only the previous one
    // is left, under its temporary name).
    let state = runs.join("broken/state");
    std::fs::rename(&state, state.with_extension("old")).unwrap();
    let stopped = train("broken", &["--resume", "--stop-at-step", "6:3"]);
    assert!(!stopped.status.success());
    let message = String::from_utf8_lossy(&stopped.stderr);
    assert!(
        message.contains("resuming after the expansion of task 5"),
        "{message}"
    );
    assert!(
        message.contains("stopped while checkpointing step 3 of task 6"),
        "{message}"
    );
    // Task 6's training continues from its step-2 checkpoint.
    let message = stderr_of_success(&train("broken", &["--resume"]));
    assert!(
        message.contains("resuming the training stage at step 2"),
        "{message}"
    );

    let a = report(&runs.join("whole"));
    let b = report(&runs.join("broken"));
    for key in [
        "accuracy",
        "ptl_confusion",
        "trainable_params_per_task",
        "experts_per_layer",
    ] {
        assert_eq!(a[key], b[key], "{key} differs after resuming");
    }
    let state = |run: &str| std::fs::read(runs.join(run).join("state/state.safetensors")).unwrap();
    assert!(
        state("whole") == state("broken"),
        "the final states differ after resuming"
    );
    // A finished run resumed with its own settings trains nothing and writes the same report
    // (how `cargo xtask compare` reuses runs); with other settings it is refused, named.
    let message = stderr_of_success(&train("whole", &["--resume"]));
    assert!(message.contains("every task is done"), "{message}");
    assert!(
        !message.contains("zero-shot") && !message.contains("task 1/8"),
        "{message}"
    );
    assert_eq!(report(&runs.join("whole")), a);
    let other = train("whole", &["--resume", "--seed", "3"]);
    assert!(!other.status.success());
    let message = String::from_utf8_lossy(&other.stderr);
    assert!(message.contains("seed: 0 -> 3"), "{message}");
    assert_eq!(report(&runs.join("whole")), a);
    // The report's shape.
    let tasks = a["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 8);
    assert_eq!(tasks[0], "ScienceQA");
    let acc = a["accuracy"].as_array().unwrap();
    for (t, row) in acc.iter().enumerate() {
        for (i, cell) in row.as_array().unwrap().iter().enumerate() {
            assert_eq!(cell.is_null(), i > t, "accuracy[{t}][{i}]");
        }
    }
    let last: Vec<f64> = a["last"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let immediate: Vec<f64> = a["immediate"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    // The paper's BWT: the mean over all eight tasks of Last - Immediate.
    let bwt: f64 = (0..8).map(|i| last[i] - immediate[i]).sum::<f64>() / 8.0;
    assert!((a["bwt"].as_f64().unwrap() - bwt).abs() < 1e-9);
    let routed: u64 = a["ptl_confusion"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|v| v.as_u64().unwrap()))
        .sum();
    assert_eq!(
        routed,
        8 * 8,
        "every test question of the smoke preset is routed once"
    );
    // PGKE only grows: experts per layer never shrink from task to task.
    let experts = a["experts_per_layer"].as_array().unwrap();
    for pair in experts.windows(2) {
        let (x, y) = (pair[0].as_array().unwrap(), pair[1].as_array().unwrap());
        assert!(x.iter().zip(y).all(|(p, q)| p.as_u64() <= q.as_u64()));
    }
    assert!(runs.join("whole/report.md").is_file());
    // The saved answers score to the report's numbers with `cmoe score`.
    let answers = runs.join("whole/predictions/after-8-OCRVQA/GQA.jsonl");
    let test = runs.join("whole/data/Instructions/GQA/test.json");
    let scored = ok_json(&[
        "score",
        "--task-type",
        "gqa",
        "--annotations",
        test.to_str().unwrap(),
        "--predictions",
        answers.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(scored["accuracy"], a["accuracy"][7][3]);
    // A trained run answers new questions, PTL choosing the router.
    let image = runs.join("whole/data/images/GQA/test/000000.png");
    let answer = ok_json(&[
        "ask",
        "--run",
        runs.join("whole").to_str().unwrap(),
        "--image",
        image.to_str().unwrap(),
        "--question",
        "What colour is the shape on the left side?",
        "--json",
    ]);
    assert_eq!(answer["z_scores"].as_array().unwrap().len(), 8);
    assert!(tasks.contains(&answer["task"]));
    assert!(runs.join("whole/state/state.safetensors").is_file());

    // The baselines share the runner: a sequential-LoRA smoke run has one expert per layer.
    ok(&[
        "train", "--preset", "smoke", "--model", m, "--runs", r, "--name", "lora", "--method",
        "lora",
    ]);
    let lora = report(&runs.join("lora"));
    assert_eq!(
        lora["experts_per_layer"][7],
        serde_json::json!([1, 1, 1, 1])
    );
    let _ = std::fs::remove_dir_all(&root);
}
