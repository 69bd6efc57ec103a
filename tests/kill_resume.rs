//! `kill -9` at random moments of a smoke run: whenever the process dies (generating data,
//! in the zero-shot evaluation, the initial phase, a PGKE expansion, a training step, while a
//! checkpoint is written or swapped in, evaluating), running it again (with `--resume` once the
//! folder holds a run) finishes the run with a final state byte-identical to an unbroken run's
//! and the same report. The moments are drawn from a seed printed by the test (set
//! `CMOE_KILL_SEED` to replay one).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cmoe_test_support::scratch;
use rand::{Rng, SeedableRng};

fn spawn(runs: &Path, settings: &Path, name: &str, resume: bool) -> Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cmoe"));
    command
        .args(["train", "--preset", "smoke", "--name", name, "--config"])
        .arg(settings)
        .arg("--runs")
        .arg(runs)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if resume {
        command.arg("--resume");
    }
    command.spawn().expect("cmoe starts")
}

/// Waits up to `limit` for `child`; `Some(success)` if it exited, `None` if still running.
fn wait_for(child: &mut Child, limit: Duration) -> Option<bool> {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status.success());
        }
        if start.elapsed() >= limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(child: Child) -> String {
    String::from_utf8_lossy(&child.wait_with_output().unwrap().stderr).into_owned()
}

fn report(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap()
}

#[test]
fn killed_at_random_moments_a_run_resumes_to_the_same_bytes() {
    let seed = std::env::var("CMOE_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as u64
        });
    eprintln!("kill moments drawn with CMOE_KILL_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let root = scratch("kill");
    let runs = root.join("runs");
    let settings = root.join("smoke.toml");
    std::fs::write(&settings, "epochs = 2\ncheckpoint_every = 1\n").unwrap();

    let started = Instant::now();
    let whole = spawn(&runs, &settings, "whole", false);
    let out = whole.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let unbroken = started.elapsed();

    // Four kills at moments spread over the run, then a run to the end.
    let mut kills = 0;
    let mut finished = false;
    for attempt in 0..12 {
        let resume = runs.join("broken/run.json").exists();
        let mut child = spawn(&runs, &settings, "broken", resume);
        if kills == 4 {
            finished = true;
            let message = stderr_of(child);
            assert!(
                report(&runs.join("broken")).is_object(),
                "attempt {attempt}: {message}"
            );
            break;
        }
        let moment = unbroken.mul_f64(rng.random_range(0.02..0.3));
        match wait_for(&mut child, moment) {
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
            }
            Some(true) => {
                finished = true;
                break;
            }
            Some(false) => panic!("attempt {attempt} failed: {}", stderr_of(child)),
        }
    }
    assert!(finished, "the broken run never finished");

    let a = report(&runs.join("whole"));
    let b = report(&runs.join("broken"));
    for key in [
        "zero_shot",
        "accuracy",
        "ptl_confusion",
        "trainable_params_per_task",
        "experts_per_layer",
        "plans",
    ] {
        assert_eq!(a[key], b[key], "{key} differs (CMOE_KILL_SEED={seed})");
    }
    let state = |run: &str| std::fs::read(runs.join(run).join("state/state.safetensors")).unwrap();
    assert!(
        state("whole") == state("broken"),
        "the final states differ (CMOE_KILL_SEED={seed})"
    );
    let _ = std::fs::remove_dir_all(root);
}
