//! Reading and writing named f32 tensors in safetensors files (`--pixel-values`, `--out`).

use std::path::Path;

use anyhow::{Context, bail};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

/// A host tensor: values in row-major order and a shape.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Row-major values.
    pub data: Vec<f32>,
    /// Shape.
    pub shape: Vec<usize>,
}

/// Reads tensor `name` from a safetensors file as f32 (f16, bf16 and f64 are converted).
pub fn read_tensor(path: &Path, name: &str) -> anyhow::Result<HostTensor> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let file = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a valid safetensors file", path.display()))?;
    let names: Vec<String> = file.names().into_iter().map(str::to_string).collect();
    let view = file.tensor(name).with_context(|| {
        format!(
            "{}: no tensor named {name:?} (it holds {names:?})",
            path.display()
        )
    })?;
    let raw = view.data();
    let data: Vec<f32> = match view.dtype() {
        Dtype::F32 => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F64 => raw
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        Dtype::F16 => raw
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => raw
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => bail!(
            "{}: tensor {name:?} has dtype {other:?}, expected a float type",
            path.display()
        ),
    };
    Ok(HostTensor {
        data,
        shape: view.shape().to_vec(),
    })
}

/// Writes f32 tensors to a safetensors file (atomically: a temp file, then a rename).
pub fn write_tensors(path: &Path, tensors: &[(&str, &HostTensor)]) -> anyhow::Result<()> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, t)| t.data.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, t), b)| {
            Ok((
                name.to_string(),
                TensorView::new(Dtype::F32, t.shape.clone(), b)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    if path.is_dir() {
        anyhow::bail!(
            "{}: is a folder; give the path of a .safetensors file to write",
            path.display()
        );
    }
    let tmp = path.with_extension("safetensors.tmp");
    let written = safetensors::serialize_to_file(views, None, &tmp)
        .with_context(|| format!("{}: cannot write", tmp.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot write", path.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}
