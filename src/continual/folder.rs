//! A run's folder: its progress (the resume point and every measurement), the lock that keeps
//! one process per folder, the data and state paths, and checkpoints swapped in atomically.

use std::path::{Path, PathBuf};

use anyhow::Context;
use cmoe_coin::format::write_json;
use cmoe_moe::LlavaLearner;
use cmoe_moe::baselines::Ewc;
use cmoe_moe::pgke::ExpansionPlan;
use serde::{Deserialize, Serialize};

use super::config::RunConfig;
use crate::loader::{LoadReport, SampleProblem};

/// What has been done so far (`progress.json`): the resume point and every measurement.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Whether the initial phase is done (and saved in `state/`).
    #[serde(default)]
    pub initialised: bool,
    /// Parameters the initial phase trained.
    #[serde(default)]
    pub initial_params: usize,
    /// Seconds the initial phase took.
    #[serde(default)]
    pub initial_seconds: f64,
    /// Per task, the base model's accuracy before any task (empty until measured).
    #[serde(default)]
    pub zero_shot: Vec<f64>,
    /// Tasks trained and evaluated.
    pub completed: usize,
    /// `accuracy[t][i]`: task `i` after training task `t` (positions in training order), the
    /// paper's Table 9: off the diagonal answered through the inference router (PTL), on the
    /// diagonal with the task's own router (Immediate).
    pub accuracy: Vec<Vec<Option<f64>>>,
    /// `a[t][t]` answered through the inference router instead (task location mixed in).
    #[serde(default)]
    pub diagonal_via_router: Vec<f64>,
    /// Per task, the parameters it trained.
    pub trainable_params_per_task: Vec<usize>,
    /// Per task, the experts in each layer after it.
    pub experts_per_layer: Vec<Vec<usize>>,
    /// After the last evaluation: `confusion[true][chosen]` counts of the routing decision.
    pub ptl_confusion: Vec<Vec<usize>>,
    /// Per task, the seconds spent training and evaluating it.
    pub seconds_per_task: Vec<f64>,
    /// Per task, the mean loss of the last 10 % of training steps.
    pub final_loss: Vec<f64>,
    /// Per task, over the same steps: the share of the routed top-k slots (all MoE layers)
    /// that went to the experts the task trained, against the frozen old ones (1 for a
    /// baseline that trains every expert; at most `min(new, k) / k` of a layer's slots can go
    /// to its `new` experts). `None` for tasks run before the share was recorded.
    #[serde(default)]
    pub final_trained_share: Vec<Option<f64>>,
    /// Per task, the training samples used and those left out.
    #[serde(default)]
    pub train_data: Vec<LoadReport>,
    /// Per task, the test questions left out (missing or unreadable images).
    #[serde(default)]
    pub test_problems: Vec<Vec<SampleProblem>>,
    /// The backend the run trains on.
    #[serde(default)]
    pub backend: String,
    /// The expansion plans so far (one per task that grew), with PGKE's probe statistics.
    #[serde(default)]
    pub plans: Vec<ExpansionPlan>,
    /// The task whose PGKE expansion is done and saved in `state/` but whose training is not:
    /// a resumed run continues with its training stage.
    #[serde(default)]
    pub expanded: Option<ExpandedTask>,
}

/// A task checkpointed between PGKE's expansion and its training stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExpandedTask {
    /// Its position in the run.
    pub task: usize,
    /// Per layer, the index of its first new expert.
    pub first: Vec<usize>,
}

/// The file of online EWC's consolidated Fisher in a state folder.
pub(super) const EWC_FILE: &str = "ewc-fisher.safetensors";

/// A task's training file: `train.json`, else `train.jsonl`.
pub(super) fn train_path(data_dir: &Path, name: &str) -> PathBuf {
    let task_dir = data_dir.join("Instructions").join(name);
    match task_dir.join("train.json") {
        json if !json.exists() && task_dir.join("train.jsonl").exists() => {
            task_dir.join("train.jsonl")
        }
        json => json,
    }
}

/// What a run leaves in its folder: any of them means the folder holds a run.
pub(super) const RUN_TRACES: [&str; 6] = [
    "run.json",
    "progress.json",
    "state",
    "state.old",
    "stage",
    "report.json",
];

/// An exclusive OS lock on a run folder's `.lock` file, released when dropped or when the
/// process dies.
pub(super) struct RunLock {
    /// The locked file (closing it releases the lock).
    _file: std::fs::File,
}

impl RunLock {
    pub(super) fn acquire(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
                "{} is in use by another cmoe process (it holds {}); wait for it to finish or \
                 choose another --name",
                dir.display(),
                path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
    }
}

/// The settings in which `saved` and `given` differ, as `key: saved -> given`.
pub(super) fn settings_diff(saved: &RunConfig, given: &RunConfig) -> anyhow::Result<String> {
    pub(super) fn walk(
        path: &str,
        a: &serde_json::Value,
        b: &serde_json::Value,
        out: &mut Vec<String>,
    ) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (key, value) in a {
                    let inner = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    walk(
                        &inner,
                        value,
                        b.get(key).unwrap_or(&serde_json::Value::Null),
                        out,
                    );
                }
            }
            _ if a != b => out.push(format!("{path}: {a} -> {b}")),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(
        "",
        &serde_json::to_value(saved)?,
        &serde_json::to_value(given)?,
        &mut out,
    );
    Ok(out.join(", "))
}

/// Reads a JSON file a run wrote, naming the file in every error.
pub(super) fn read_run_file<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {} (is this a run folder?)", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: malformed", path.display()))
}

/// The data folder of a run: the user's CoIN folder or the generated Mini-CoIN.
pub(super) fn data_dir(config: &RunConfig, run_dir: &Path) -> PathBuf {
    config
        .data_root
        .clone()
        .unwrap_or_else(|| run_dir.join("data"))
}

/// The folder the records' image paths are relative to (default: `<data>/images`).
pub(super) fn image_root(config: &RunConfig, data_dir: &Path) -> PathBuf {
    config
        .image_root
        .clone()
        .unwrap_or_else(|| data_dir.join("images"))
}

/// Saves the learner (and online EWC's Fisher) and the progress it belongs to next to the
/// previous checkpoint and swaps them in together, so that a crash leaves one complete,
/// consistent checkpoint.
pub(super) fn save_checkpoint<B: burn::tensor::backend::AutodiffBackend>(
    learner: &LlavaLearner<B>,
    ewc: Option<&Ewc<B>>,
    progress: &Progress,
    state_dir: &Path,
) -> anyhow::Result<()> {
    let next = state_dir.with_extension("next");
    let old = state_dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&next);
    learner.save(&next)?;
    if let Some(ewc) = ewc {
        ewc.save(&next.join(EWC_FILE))?;
    }
    write_json(&next.join("progress.json"), progress)?;
    if state_dir.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(state_dir, &old)?;
    }
    std::fs::rename(&next, state_dir)?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// The progress of the run in `dir`: a new run's (its folder must hold no run; `run.json` is
/// written), or, with `resume`, the last checkpoint's of a run started with the same settings.
pub(super) fn start_or_resume(
    config: &RunConfig,
    dir: &Path,
    resume: bool,
) -> anyhow::Result<Progress> {
    let run_json = dir.join("run.json");
    if !resume {
        let traces: Vec<&str> = RUN_TRACES
            .iter()
            .copied()
            .filter(|name| dir.join(name).exists())
            .collect();
        if !traces.is_empty() {
            anyhow::bail!(
                "{} already holds a run (it has {}); continue it with --resume or choose \
                 another --name",
                dir.display(),
                traces.join(", ")
            );
        }
        write_json(&run_json, config)?;
        return Ok(Progress::default());
    }
    if !run_json.exists() {
        anyhow::bail!(
            "{}: there is no run to resume (no run.json); start it without --resume",
            dir.display()
        );
    }
    let saved: RunConfig = read_run_file(&run_json)?;
    if &saved != config {
        anyhow::bail!(
            "{}: the run was started with other settings ({}); resume it with the same \
             arguments or start a new --name",
            run_json.display(),
            settings_diff(&saved, config)?
        );
    }
    // The checkpoint's own copy (saved with the state, in one swap) is the resume point.
    let state_dir = dir.join("state");
    let previous = state_dir.with_extension("old");
    if !state_dir.exists() && previous.exists() {
        // Killed in the middle of a swap: the previous checkpoint is whole.
        std::fs::rename(&previous, &state_dir)
            .with_context(|| format!("cannot restore {}", previous.display()))?;
    }
    let checkpoint = state_dir.join("progress.json");
    let progress_json = dir.join("progress.json");
    if checkpoint.exists() {
        read_run_file(&checkpoint)
    } else if progress_json.exists() {
        read_run_file(&progress_json)
    } else {
        // Killed before the first checkpoint between stages: a stage checkpoint, if any, is
        // this run's own (run.json matched).
        Ok(Progress::default())
    }
}
