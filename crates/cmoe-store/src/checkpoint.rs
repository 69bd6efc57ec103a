//! Checkpoints: the tensors of safetensors files (one file or shards), read lazily through
//! memory maps and applied to any Burn module by parameter path.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use burn::module::ParamId;
use burn::tensor::{DType, TensorData, backend::Backend};
use burn_store::{ModuleAdapter, ModuleSnapshot, TensorSnapshot, TensorSnapshotError};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::StoreError;

/// One tensor of a checkpoint, not yet read.
#[derive(Debug, Clone)]
pub struct StoredTensor {
    /// Key as written in the file.
    pub key: String,
    /// The file holding it.
    pub file: PathBuf,
    /// Stored element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
    map: Arc<Mmap>,
    range: (usize, usize),
}

impl StoredTensor {
    /// Reads the tensor and casts it to `dtype`.
    pub fn read(&self, dtype: DType) -> Result<TensorData, String> {
        let stored = burn_dtype(self.dtype).ok_or_else(|| {
            format!(
                "{}: stored dtype {:?} is not a float type",
                self.key, self.dtype
            )
        })?;
        let bytes = self.map[self.range.0..self.range.1].to_vec();
        Ok(TensorData::from_bytes_vec(bytes, self.shape.clone(), stored).convert_dtype(dtype))
    }
}

/// The tensors of a checkpoint (one safetensors file or several shards), with their metadata.
#[derive(Debug)]
pub struct Checkpoint {
    /// The model directory or file that names the checkpoint in errors.
    pub dir: PathBuf,
    /// The weight files read.
    pub files: Vec<PathBuf>,
    /// Every tensor, by its key in the file.
    pub tensors: BTreeMap<String, StoredTensor>,
}

impl Checkpoint {
    /// Opens the given safetensors files; `dir` names them in errors.
    pub fn from_files(dir: &Path, files: Vec<PathBuf>) -> Result<Self, StoreError> {
        let mut tensors = BTreeMap::new();
        for file in &files {
            let handle = File::open(file).map_err(|e| StoreError::io(file, e))?;
            // SAFETY: the file is opened read-only; a checkpoint changed on disk while it is being
            // read is outside what we support (as for every mmap-based loader).
            let map = Arc::new(unsafe { Mmap::map(&handle) }.map_err(|e| StoreError::io(file, e))?);
            let (header, metadata) = SafeTensors::read_metadata(&map)
                .map_err(|e| StoreError::io(file, format!("not a valid safetensors file: {e}")))?;
            let base = 8 + header;
            for (key, info) in metadata.tensors() {
                let stored = StoredTensor {
                    key: key.clone(),
                    file: file.clone(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    map: map.clone(),
                    range: (base + info.data_offsets.0, base + info.data_offsets.1),
                };
                if let Some(first) = tensors.insert(key.clone(), stored) {
                    return Err(StoreError::Weights {
                        dir: dir.display().to_string(),
                        message: format!(
                            "tensor {key} is stored twice: in {} and {}",
                            first.file.display(),
                            file.display()
                        ),
                    });
                }
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            files,
            tensors,
        })
    }

    /// Total number of stored elements.
    pub fn num_elements(&self) -> usize {
        self.tensors
            .values()
            .map(|t| t.shape.iter().product::<usize>())
            .sum()
    }

    /// The stored dtypes and how many tensors use each.
    pub fn dtypes(&self) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for t in self.tensors.values() {
            *counts.entry(format!("{:?}", t.dtype)).or_insert(0) += 1;
        }
        counts
    }
}

/// Applies a checkpoint to any module: each stored key is renamed by `rename` (`None` skips it)
/// onto the module's parameter paths, read lazily, cast to `dtype` and adapted by `adapter`.
/// Missing, unexpected, mis-shaped and non-float tensors are reported together, by key.
pub fn apply_checkpoint<B: Backend, M: ModuleSnapshot<B>>(
    module: &mut M,
    checkpoint: &Checkpoint,
    dtype: DType,
    rename: impl Fn(&str) -> Option<String>,
    adapter: Option<Box<dyn ModuleAdapter>>,
) -> Result<(), StoreError> {
    let mut problems = Vec::new();
    let mut original = BTreeMap::new();
    let mut snapshots = Vec::new();
    for (key, stored) in &checkpoint.tensors {
        let Some(name) = rename(key) else { continue };
        if burn_dtype(stored.dtype).is_none() {
            problems.push(format!(
                "  {key}: stored dtype {:?} is not a float type",
                stored.dtype
            ));
            continue;
        }
        original.insert(name.clone(), key.clone());
        let tensor = stored.clone();
        let read: Rc<dyn Fn() -> Result<TensorData, TensorSnapshotError>> =
            Rc::new(move || tensor.read(dtype).map_err(TensorSnapshotError::IoError));
        snapshots.push(TensorSnapshot::from_closure(
            read,
            dtype,
            stored.shape.clone().into(),
            name.split('.').map(str::to_string).collect(),
            Vec::new(),
            ParamId::new(),
        ));
    }
    let transposes = adapter.is_some();
    let result = module.apply(snapshots, None, adapter, false);
    let file_key = |name: &String| original.get(name).cloned().unwrap_or_else(|| name.clone());
    if !result.errors.is_empty() && transposes {
        problems.push(
            "  (shapes below are in Burn's layout: linear weights are [in, out])".to_string(),
        );
    }
    for error in &result.errors {
        problems.push(format!("  {error}"));
    }
    let missing: Vec<String> = result
        .missing
        .iter()
        .map(|(path, _)| path.clone())
        .collect();
    if !missing.is_empty() {
        problems.push(format!(
            "  missing ({}): {}",
            missing.len(),
            missing.join(", ")
        ));
    }
    let unused: Vec<String> = result.unused.iter().map(file_key).collect();
    if !unused.is_empty() {
        problems.push(format!(
            "  unexpected ({}): {}",
            unused.len(),
            unused.join(", ")
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(StoreError::Weights {
            dir: checkpoint.dir.display().to_string(),
            message: problems.join("\n"),
        })
    }
}

/// The Burn float type of a stored dtype; `None` for non-float types.
fn burn_dtype(dtype: Dtype) -> Option<DType> {
    match dtype {
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F32 => Some(DType::F32),
        Dtype::F64 => Some(DType::F64),
        _ => None,
    }
}
