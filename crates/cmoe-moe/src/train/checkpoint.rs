//! Checkpoints of a task's training stage in flight, so that a crash costs at most a few steps:
//! every `every` optimiser steps, the model's experts and routers, the task's VAE, both AdamW
//! states, the VAE's feature memory and the step are written to a folder next to the previous
//! checkpoint and swapped in (a crash at any point leaves one whole checkpoint). With the
//! stage's per-step reseeding ([`crate::train::StageConfig::seed`]), a stage resumed from a
//! checkpoint ends bit-identical to one that never stopped.
//!
//! Files: `stage.json` (what the checkpoint belongs to), `experts.safetensors` (every layer's
//! experts and routers), `vae.safetensors`, and `optimizer.mpk` (Burn's record of the two AdamW
//! states, keyed by parameter order, and the feature memory).

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Tensor};
use cmoe_store::{load_module, save_module};
use serde::{Deserialize, Serialize};

use crate::error::MoeError;
use crate::host::MoeHost;
use crate::model::CmoeModel;
use crate::ptl::{FeatureMemory, VaeFit};
use crate::train::{OptimState, StageConfig, StageError, StageSnapshot, StageState};

/// Manifest format name.
pub const STAGE_FORMAT: &str = "llava-cmoe/stage-checkpoint/1";

/// Where and how often a task's training stage checkpoints (and resumes from).
pub struct StageCheckpoints<'a> {
    /// The checkpoint folder (`<dir>.next` and `<dir>.old` are used while swapping).
    pub dir: &'a Path,
    /// Every how many optimiser steps (0: never).
    pub every: usize,
    /// Called with each new checkpoint folder and its step before the folder replaces the
    /// previous one: a caller can add its own files, which then swap in with it.
    pub extra: &'a mut dyn FnMut(&Path, usize) -> Result<(), StageError>,
}

/// What `stage.json` says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageManifest {
    /// [`STAGE_FORMAT`].
    pub format: String,
    /// The task being trained.
    pub task: usize,
    /// Per layer, the task's first new expert.
    pub first: Vec<usize>,
    /// Optimiser steps done.
    pub step: usize,
    /// Batches of the pass order those steps used up (see
    /// [`crate::train::StageState::batches_read`]).
    pub batches_read: usize,
    /// The stage's settings (a checkpoint only continues the same stage).
    pub stage: StageConfig,
    /// Experts per layer.
    pub experts: Vec<usize>,
    /// Positions of the feature memory's batches, oldest first.
    pub memory: Vec<usize>,
}

/// The Burn record in `optimizer.mpk`: the two AdamW states and the memory's features.
type OptimizerFile<B> = (OptimState<B>, OptimState<B>, Vec<Tensor<B, 2>>);

fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::new()
}

fn io(path: &Path, e: impl std::fmt::Display) -> StageError {
    StageError::Model(MoeError::io(path, e))
}

/// The checkpoint in `dir`, or in `<dir>.old` when a crash came in the middle of a swap.
fn current(dir: &Path) -> Option<PathBuf> {
    let old = dir.with_extension("old");
    [dir.to_path_buf(), old]
        .into_iter()
        .find(|d| d.join("stage.json").is_file())
}

/// The checkpoint in `dir` (the folder that holds it: `dir`, or `<dir>.old` after a crash in
/// the middle of a swap) and its manifest; `None` when there is none.
pub fn find(dir: &Path) -> Result<Option<(PathBuf, StageManifest)>, StageError> {
    let Some(dir) = current(dir) else {
        return Ok(None);
    };
    let path = dir.join("stage.json");
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    let manifest: StageManifest =
        serde_json::from_str(&text).map_err(|e| io(&path, format!("malformed: {e}")))?;
    if manifest.format != STAGE_FORMAT {
        return Err(io(
            &path,
            format!("format {:?} is not {STAGE_FORMAT}", manifest.format),
        ));
    }
    Ok(Some((dir, manifest)))
}

/// Writes `snapshot` of task `task`'s stage (`stage`, new experts from `first`) as the
/// checkpoint in `dir`.
pub(crate) fn save<B: AutodiffBackend, H: Module<B>>(
    dir: &Path,
    task: usize,
    first: &[usize],
    stage: &StageConfig,
    snapshot: StageSnapshot<'_, B, H>,
    extra: &mut dyn FnMut(&Path, usize) -> Result<(), StageError>,
) -> Result<(), StageError> {
    let StageSnapshot { model, vae, state } = snapshot;
    let next = dir.with_extension("next");
    let _ = std::fs::remove_dir_all(&next);
    std::fs::create_dir_all(&next).map_err(|e| io(&next, e))?;
    save_module(&model.moe, &next.join("experts.safetensors"))?;
    let (memory, features) = match vae {
        Some(fit) => {
            save_module(&fit.vae, &next.join("vae.safetensors"))?;
            fit.memory.entries().cloned().unzip()
        }
        None => (Vec::new(), Vec::new()),
    };
    let record: OptimizerFile<B> = (state.optim, state.vae_optim, features);
    let path = next.join("optimizer");
    recorder()
        .record(record, path.clone())
        .map_err(|e| io(&path, e))?;
    let manifest = StageManifest {
        format: STAGE_FORMAT.into(),
        task,
        first: first.to_vec(),
        step: state.step,
        batches_read: state.batches_read,
        stage: *stage,
        experts: model.experts_per_layer(),
        memory,
    };
    let path = next.join("stage.json");
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| io(&path, e))?;
    std::fs::write(&path, text).map_err(|e| io(&path, e))?;
    extra(&next, state.step)?;
    let old = dir.with_extension("old");
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).map_err(|e| io(dir, e))?;
    }
    std::fs::rename(&next, dir).map_err(|e| io(dir, e))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

/// Loads the checkpoint in `dir` into `model` and `vae` if it belongs to this stage (task
/// `task`, experts from `first`, settings `stage`) and returns where the stage stands; `None`
/// when there is no checkpoint or it belongs to another task (a finished one's leftover).
/// A checkpoint of this task that does not fit is an error naming its file.
pub(crate) fn load<B: AutodiffBackend, H: MoeHost<B>>(
    dir: &Path,
    task: usize,
    first: &[usize],
    stage: &StageConfig,
    model: &mut CmoeModel<B, H>,
    vae: &mut Option<VaeFit<B>>,
) -> Result<Option<StageState<B>>, StageError> {
    let Some((dir, manifest)) = find(dir)? else {
        return Ok(None);
    };
    if manifest.task != task {
        return Ok(None);
    }
    let mismatch = |what: String| io(&dir.join("stage.json"), what);
    if manifest.first != first || manifest.experts != model.experts_per_layer() {
        return Err(mismatch(format!(
            "new experts from {:?} of {:?} do not match the model's ({first:?} of {:?})",
            manifest.first,
            manifest.experts,
            model.experts_per_layer()
        )));
    }
    if manifest.stage != *stage {
        return Err(mismatch(format!(
            "stage settings {:?} differ from this run's {stage:?}",
            manifest.stage
        )));
    }
    load_module(&mut model.moe, &dir.join("experts.safetensors"), DType::F32)?;
    let device = model.devices().into_iter().next().unwrap_or_default();
    let path = dir.join("optimizer");
    let (optim, vae_optim, features): OptimizerFile<B> = recorder()
        .load(path.clone(), &device)
        .map_err(|e| io(&path.with_extension("mpk"), e))?;
    if let Some(fit) = vae {
        load_module(&mut fit.vae, &dir.join("vae.safetensors"), DType::F32)?;
        if features.len() != manifest.memory.len() {
            return Err(mismatch(format!(
                "{} feature batches for {} memory positions",
                features.len(),
                manifest.memory.len()
            )));
        }
        let capacity = fit.config.feature_memory.max(fit.config.bank_instances);
        let entries = manifest.memory.iter().copied().zip(features).collect();
        fit.memory = FeatureMemory::from_entries(capacity, entries);
    }
    Ok(Some(StageState {
        step: manifest.step,
        batches_read: manifest.batches_read,
        optim,
        vae_optim,
    }))
}
