//! Shared helpers of the integration tests: fixture paths and HF reference outputs.

#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};

use llava_cmoe::tensor_io::{HostTensor, read_tensor};
use serde::Deserialize;

/// `tests/fixtures/NAME`.
pub fn fixture(name: &str) -> PathBuf {
    cmoe_test_support::fixtures().join(name)
}

/// The photo every reference was computed on.
pub fn photo() -> PathBuf {
    fixture("grace_hopper.jpg")
}

/// `reference.json` written by `scripts/make_parity_fixtures.py`.
#[derive(Debug, Deserialize)]
pub struct Reference {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub num_image_tokens: usize,
    pub logits_from: usize,
    pub greedy_max_new_tokens: usize,
    pub greedy_ids: Vec<u32>,
    pub batch_input_ids: Vec<Vec<u32>>,
    pub batch_attention_mask: Vec<Vec<u32>>,
    pub batch_greedy_ids: Vec<Vec<u32>>,
}

/// The reference JSON and tensors of a fixture model directory.
pub fn reference(model: &str) -> (Reference, impl Fn(&str) -> HostTensor) {
    let dir = fixture(model);
    let json = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
    let reference: Reference = serde_json::from_str(&json).expect("reference.json parses");
    let tensors = dir.join("reference.safetensors");
    (reference, move |name: &str| {
        read_tensor(&tensors, name).expect("reference tensor")
    })
}

/// Largest absolute difference of two equally shaped tensors.
pub fn max_abs_diff(a: &HostTensor, b: &HostTensor) -> f32 {
    assert_eq!(a.shape, b.shape, "shapes differ");
    a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A copy of a fixture model directory in a fresh temp dir, for tests that break it.
pub fn scratch_copy(model: &str, tag: &str) -> PathBuf {
    let src = fixture(model);
    let dst = cmoe_test_support::scratch(&format!("copy-{tag}"));
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        // Follow symlinks (the second fixture shares the first one's tokenizer).
        std::fs::copy(&path, dst.join(path.file_name().unwrap())).unwrap();
    }
    dst
}

/// Rewrites `dir/model.safetensors` through `edit`, which gets `(name, dtype, shape, bytes)`.
pub fn rewrite_weights(
    dir: &Path,
    edit: impl FnOnce(&mut Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)>),
) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<_> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            (
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            )
        })
        .collect();
    edit(&mut tensors);
    let views: Vec<_> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();
}

/// Edits `dir/config.json` as JSON.
pub fn rewrite_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut json);
    std::fs::write(&path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
}
