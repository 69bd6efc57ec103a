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

use std::collections::{BTreeMap, BTreeSet};
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

/// Every parameter a checkpoint of `config`'s model holds, by its key in this crate's tree
/// ([`normalize_key`]'s output), with its shape as HF stores it (linear weights `[out, in]`):
/// what a model directory is checked against without loading it.
pub fn expected_shapes(config: &LlavaConfig) -> BTreeMap<String, Vec<usize>> {
    let mut shapes = BTreeMap::new();
    let mut put = |key: String, shape: Vec<usize>| {
        shapes.insert(key, shape);
    };
    let v = &config.vision_config;
    let (d, i) = (v.hidden_size, v.intermediate_size);
    let vision = "vision_tower.vision_model";
    put(format!("{vision}.embeddings.class_embedding"), vec![d]);
    put(
        format!("{vision}.embeddings.patch_embedding.weight"),
        vec![d, v.num_channels, v.patch_size, v.patch_size],
    );
    put(
        format!("{vision}.embeddings.position_embedding.weight"),
        vec![v.num_patches() + 1, d],
    );
    for norm in ["pre_layrnorm", "post_layernorm"] {
        put(format!("{vision}.{norm}.gamma"), vec![d]);
        put(format!("{vision}.{norm}.beta"), vec![d]);
    }
    for layer in 0..v.num_hidden_layers {
        let at = format!("{vision}.encoder.layers.{layer}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            put(format!("{at}.self_attn.{proj}.weight"), vec![d, d]);
            put(format!("{at}.self_attn.{proj}.bias"), vec![d]);
        }
        for norm in ["layer_norm1", "layer_norm2"] {
            put(format!("{at}.{norm}.gamma"), vec![d]);
            put(format!("{at}.{norm}.beta"), vec![d]);
        }
        put(format!("{at}.mlp.fc1.weight"), vec![i, d]);
        put(format!("{at}.mlp.fc1.bias"), vec![i]);
        put(format!("{at}.mlp.fc2.weight"), vec![d, i]);
        put(format!("{at}.mlp.fc2.bias"), vec![d]);
    }
    let t = &config.text_config;
    let h = t.hidden_size;
    let projector_input = d * config.vision_feature_layer.len();
    for (name, input) in [("linear_1", projector_input), ("linear_2", h)] {
        put(
            format!("multi_modal_projector.{name}.weight"),
            vec![h, input],
        );
        if config.multimodal_projector_bias {
            put(format!("multi_modal_projector.{name}.bias"), vec![h]);
        }
    }
    let text = "language_model.model";
    let (q, kv, m) = (
        t.num_attention_heads * t.head_dim(),
        t.num_kv_heads() * t.head_dim(),
        t.intermediate_size,
    );
    put(format!("{text}.embed_tokens.weight"), vec![t.vocab_size, h]);
    for layer in 0..t.num_hidden_layers {
        let at = format!("{text}.layers.{layer}");
        for (proj, out, input) in [
            ("q_proj", q, h),
            ("k_proj", kv, h),
            ("v_proj", kv, h),
            ("o_proj", h, q),
        ] {
            put(format!("{at}.self_attn.{proj}.weight"), vec![out, input]);
            if t.attention_bias {
                put(format!("{at}.self_attn.{proj}.bias"), vec![out]);
            }
        }
        for (proj, out, input) in [("gate_proj", m, h), ("up_proj", m, h), ("down_proj", h, m)] {
            put(format!("{at}.mlp.{proj}.weight"), vec![out, input]);
            if t.mlp_bias {
                put(format!("{at}.mlp.{proj}.bias"), vec![out]);
            }
        }
        put(format!("{at}.input_layernorm.gamma"), vec![h]);
        put(format!("{at}.post_attention_layernorm.gamma"), vec![h]);
    }
    put(format!("{text}.norm.gamma"), vec![h]);
    if !config.tied_embeddings() {
        put(
            "language_model.lm_head.weight".to_string(),
            vec![t.vocab_size, h],
        );
    }
    shapes
}

/// Checks a model directory's weights against `config` from the files' headers alone (no
/// tensor is read): every expected tensor present with its shape, nothing unexpected. Returns
/// the problems, each naming the key (at most 10 of each kind, then a count).
pub fn check_shapes(dir: &Path, config: &LlavaConfig) -> Result<Vec<String>, LlavaError> {
    let checkpoint = open_checkpoint(dir)?;
    let mut expected = expected_shapes(config);
    let mut problems = Vec::new();
    let mut unexpected = Vec::new();
    for (key, stored) in &checkpoint.tensors {
        let Some(name) = normalize_key(key) else {
            continue;
        };
        if config.tied_embeddings() && name == "language_model.lm_head.weight" {
            continue;
        }
        match expected.remove(&name) {
            Some(shape) if shape == stored.shape => {}
            Some(shape) => problems.push(format!(
                "{key} has shape {:?}, the config gives {shape:?} ({})",
                stored.shape,
                stored.file.display()
            )),
            None => unexpected.push(key.clone()),
        }
    }
    let missing: Vec<String> = expected.into_keys().collect();
    let mut listed = |what: &str, keys: Vec<String>| {
        if !keys.is_empty() {
            let shown: Vec<&str> = keys.iter().take(10).map(String::as_str).collect();
            let more = keys.len().saturating_sub(10);
            let tail = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            problems.push(format!("{what}: {}{tail}", shown.join(", ")));
        }
    };
    listed("missing tensors", missing);
    listed("unexpected tensors", unexpected);
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::normalize_key;
    use std::path::Path;

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

    #[test]
    fn the_tiny_fixture_has_exactly_the_expected_shapes() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llava");
        let config = crate::config::LlavaConfig::from_file(&dir.join("config.json")).unwrap();
        assert_eq!(
            super::check_shapes(&dir, &config).unwrap(),
            Vec::<String>::new()
        );
        let mut other = config.clone();
        other.text_config.intermediate_size += 1;
        let problems = super::check_shapes(&dir, &other).unwrap();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("mlp.gate_proj.weight has shape")),
            "{problems:?}"
        );
    }
}
