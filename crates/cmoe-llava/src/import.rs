//! Weight import from a Hugging Face model directory.
//!
//! Reads `model.safetensors` or the shards listed in `model.safetensors.index.json` through
//! memory maps, lazily: a tensor is read, cast to the model's dtype (fp16 / bf16 / f32 stored
//! tensors alike) and moved to the device only when its parameter is reached. The module tree
//! carries HF's names, so the only adaptations are the layout ones: PyTorch `[out, in]` linear
//! weights are transposed (burn-store's `PyTorchToBurnAdapter`), norm `weight`/`bias` become
//! Burn's `gamma`/`beta`, and the key layouts of transformers v4 (`vision_tower.vision_model.*`),
//! v5 (`vision_tower.*`) and v5's in-memory tree (`model.language_model.*`, `lm_head.*`) are
//! folded onto one. Missing, unexpected and mis-shaped tensors are reported together, by key.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, backend::Backend};
use burn_store::PyTorchToBurnAdapter;
pub use cmoe_store::{Checkpoint, StoredTensor, apply_checkpoint};

use crate::config::LlavaConfig;
use crate::error::LlavaError;
use crate::llava::Llava;

/// Name of the single-file checkpoint.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Name of the shard index of a sharded checkpoint.
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// The weight files of a model directory: the shards named by the index, or the single file.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, LlavaError> {
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| LlavaError::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| LlavaError::io(&index, format!("malformed JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| LlavaError::io(&index, "no \"weight_map\" object"))?;
        let mut shards = BTreeSet::new();
        for (key, file) in map {
            let file = file.as_str().ok_or_else(|| {
                LlavaError::io(&index, format!("weight_map[{key}] is not a file name"))
            })?;
            shards.insert(file.to_string());
        }
        let files: Vec<PathBuf> = shards.into_iter().map(|f| dir.join(f)).collect();
        if let Some(missing) = files.iter().find(|f| !f.exists()) {
            return Err(LlavaError::io(
                &index,
                format!("lists shard {} which does not exist", missing.display()),
            ));
        }
        return Ok(files);
    }
    let single = dir.join(WEIGHTS_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(LlavaError::io(
        dir,
        format!("no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} in this directory"),
    ))
}

/// Maps a checkpoint key onto this crate's module tree, or `None` for known non-parameters.
pub fn normalize_key(key: &str) -> Option<String> {
    if key.ends_with(".position_ids") || key.ends_with("rotary_emb.inv_freq") {
        return None; // buffers older transformers saved; recomputed here
    }
    // transformers v5 in-memory tree: model.{language_model,vision_tower,multi_modal_projector}.*
    let key = match key.strip_prefix("model.") {
        Some(rest)
            if rest.starts_with("language_model.")
                || rest.starts_with("vision_tower.")
                || rest.starts_with("multi_modal_projector.") =>
        {
            rest
        }
        _ => key,
    };
    let mut key = if let Some(rest) = key.strip_prefix("lm_head.") {
        format!("language_model.lm_head.{rest}")
    } else if let Some(rest) = key.strip_prefix("language_model.") {
        if rest.starts_with("model.") || rest.starts_with("lm_head.") {
            key.to_string()
        } else {
            format!("language_model.model.{rest}")
        }
    } else if let Some(rest) = key.strip_prefix("vision_tower.") {
        if rest.starts_with("vision_model.") {
            key.to_string()
        } else {
            format!("vision_tower.vision_model.{rest}")
        }
    } else {
        key.to_string()
    };
    // Norms (CLIP's LayerNorms, LLaMA's RMSNorms) store `weight`/`bias`; Burn calls them
    // `gamma`/`beta`. Every norm module of LLaVA has "norm" in its name.
    let mut parts: Vec<&str> = key.split('.').collect();
    if parts.len() >= 2 && parts[parts.len() - 2].contains("norm") {
        match parts.last() {
            Some(&"weight") => *parts.last_mut().expect("non-empty") = "gamma",
            Some(&"bias") => *parts.last_mut().expect("non-empty") = "beta",
            _ => {}
        }
        key = parts.join(".");
    }
    Some(key)
}

/// Opens the weights of a HF model directory (the single file or the shards its index lists).
pub fn open_checkpoint(dir: &Path) -> Result<Checkpoint, LlavaError> {
    Ok(Checkpoint::from_files(dir, weight_files(dir)?)?)
}

/// Loads `config.json` and the weights of a HF LLaVA directory onto `device`, in `dtype`.
pub fn load_llava<B: Backend>(
    dir: &Path,
    dtype: DType,
    device: &B::Device,
) -> Result<(LlavaConfig, Llava<B>), LlavaError> {
    let config = LlavaConfig::from_file(&dir.join("config.json"))?;
    let mut model = config.init::<B>(device);
    let checkpoint = open_checkpoint(dir)?;
    load_weights(&mut model, &checkpoint, dtype, config.tied_embeddings())?;
    Ok((config, model))
}

/// Applies a checkpoint's tensors to `model`; every parameter must be found with its shape,
/// and every stored tensor must be used (buffers and a tied `lm_head` excepted).
pub fn load_weights<B: Backend>(
    model: &mut Llava<B>,
    checkpoint: &Checkpoint,
    dtype: DType,
    tied_embeddings: bool,
) -> Result<(), LlavaError> {
    let rename = |key: &str| {
        normalize_key(key)
            .filter(|name| !(tied_embeddings && name == "language_model.lm_head.weight"))
    };
    Ok(apply_checkpoint(
        model,
        checkpoint,
        dtype,
        rename,
        Some(Box::new(PyTorchToBurnAdapter)),
    )?)
}

#[cfg(test)]
mod tests {
    use super::normalize_key;

    #[test]
    fn key_layouts_fold_onto_one_tree() {
        let cases = [
            (
                "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
                "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
            ),
            (
                "vision_tower.encoder.layers.0.mlp.fc1.weight",
                "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",
            ),
            (
                "model.vision_tower.pre_layrnorm.bias",
                "vision_tower.vision_model.pre_layrnorm.beta",
            ),
            (
                "language_model.model.layers.1.input_layernorm.weight",
                "language_model.model.layers.1.input_layernorm.gamma",
            ),
            (
                "vision_tower.encoder.layers.2.layer_norm1.bias",
                "vision_tower.vision_model.encoder.layers.2.layer_norm1.beta",
            ),
            (
                "model.language_model.norm.weight",
                "language_model.model.norm.gamma",
            ),
            (
                "model.language_model.embed_tokens.weight",
                "language_model.model.embed_tokens.weight",
            ),
            ("lm_head.weight", "language_model.lm_head.weight"),
            (
                "language_model.lm_head.weight",
                "language_model.lm_head.weight",
            ),
            (
                "model.multi_modal_projector.linear_1.bias",
                "multi_modal_projector.linear_1.bias",
            ),
        ];
        for (key, expected) in cases {
            assert_eq!(normalize_key(key).as_deref(), Some(expected), "{key}");
        }
        assert_eq!(
            normalize_key("vision_tower.vision_model.embeddings.position_ids"),
            None
        );
    }
}
