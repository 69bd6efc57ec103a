//! Any Burn module to and from a safetensors file, keyed by its parameter paths
//! (`moe.3.experts.1.gate.lora_a`): how the continual state and adapter packs are saved.

use std::path::Path;

use burn::tensor::{DType, backend::Backend};
use burn_store::ModuleSnapshot;
use safetensors::{Dtype, tensor::TensorView};

use crate::StoreError;
use crate::checkpoint::{Checkpoint, apply_checkpoint};

/// Writes every float parameter of `module` to `path`, atomically (a temp file, then a rename).
pub fn save_module<B: Backend, M: ModuleSnapshot<B>>(
    module: &M,
    path: &Path,
) -> Result<(), StoreError> {
    save_module_with(module, path, None, |key| key.to_string(), None)
}

/// [`save_module`] with the tensors passed through `adapter` (e.g. to PyTorch's layout), keys
/// renamed by `rename`, and values cast to `dtype` (`None`: as stored, f32 for other types).
pub fn save_module_with<B: Backend, M: ModuleSnapshot<B>>(
    module: &M,
    path: &Path,
    adapter: Option<Box<dyn burn_store::ModuleAdapter>>,
    rename: impl Fn(&str) -> String,
    dtype: Option<DType>,
) -> Result<(), StoreError> {
    let mut named = Vec::new();
    for snapshot in module.collect(None, adapter, false) {
        let data = snapshot.to_data().map_err(|e| {
            StoreError::io(path, format!("cannot read {}: {e}", snapshot.full_path()))
        })?;
        let data = match dtype {
            Some(d) => data.convert_dtype(d),
            None => data,
        };
        let (data, dtype) = match data.dtype {
            DType::F16 => (data, Dtype::F16),
            DType::BF16 => (data, Dtype::BF16),
            DType::F64 => (data, Dtype::F64),
            _ => (data.convert_dtype(DType::F32), Dtype::F32),
        };
        named.push((
            rename(&snapshot.full_path()),
            dtype,
            data.shape.to_vec(),
            data.as_bytes().to_vec(),
        ));
    }
    let views = named
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes).map(|v| (name.clone(), v))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| StoreError::io(path, e))?;
    if path.is_dir() {
        return Err(StoreError::io(
            path,
            "is a folder; give the path of a .safetensors file to write",
        ));
    }
    let tmp = path.with_extension("safetensors.tmp");
    let written = safetensors::serialize_to_file(views, None, &tmp)
        .map_err(|e| StoreError::io(&tmp, e))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| StoreError::io(path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Loads `path` into `module` (whose structure must match the file exactly), cast to `dtype`.
pub fn load_module<B: Backend, M: ModuleSnapshot<B>>(
    module: &mut M,
    path: &Path,
    dtype: DType,
) -> Result<(), StoreError> {
    if !path.exists() {
        return Err(StoreError::io(path, "no such file"));
    }
    let checkpoint = Checkpoint::from_files(path, vec![path.to_path_buf()])?;
    apply_checkpoint(
        module,
        &checkpoint,
        dtype,
        |key| Some(key.to_string()),
        None,
    )
}
