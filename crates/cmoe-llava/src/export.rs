//! Writing a model in the HF LLaVA layout (`config.json` + `model.safetensors`), so that what
//! this project trains loads like any HF checkpoint, here and in transformers.
//!
//! Keys follow the transformers 4.x `LlavaForConditionalGeneration` layout
//! (`language_model.model.layers.0...`, `vision_tower.vision_model...`,
//! `multi_modal_projector...`), which both transformers 4.x and 5.x load; linear weights are
//! transposed to PyTorch's `[out, in]` and norms' `gamma` / `beta` are named `weight` / `bias`.

use std::path::Path;

use burn::tensor::{DType, backend::Backend};
use burn_store::BurnToPyTorchAdapter;

use crate::config::LlavaConfig;
use crate::error::LlavaError;
use crate::llava::Llava;
use cmoe_store::save_module_with;

/// Writes `model` and `config` to `dir` in the HF layout, weights cast to `dtype`.
pub fn save_hf<B: Backend>(
    model: &Llava<B>,
    config: &LlavaConfig,
    dir: &Path,
    dtype: DType,
) -> Result<(), LlavaError> {
    std::fs::create_dir_all(dir).map_err(|e| LlavaError::io(dir, e))?;
    save_module_with(
        model,
        &dir.join("model.safetensors"),
        Some(Box::new(BurnToPyTorchAdapter)),
        hf_key,
        Some(dtype),
    )?;
    let path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&hf_config(config, dtype))
        .map_err(|e| LlavaError::io(&path, e))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(|e| LlavaError::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| LlavaError::io(&path, e))
}

/// A Burn parameter path as an HF key: norms' `gamma` / `beta` become `weight` / `bias`.
fn hf_key(path: &str) -> String {
    let (parent, name) = path.rsplit_once('.').unwrap_or(("", path));
    let name = match name {
        "gamma" => "weight",
        "beta" => "bias",
        other => other,
    };
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}.{name}")
    }
}

/// `config` as HF writes it, with the model types transformers dispatches on.
fn hf_config(config: &LlavaConfig, dtype: DType) -> serde_json::Value {
    let mut value = serde_json::to_value(config).expect("configs serialise");
    let torch_dtype = match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    };
    value["model_type"] = "llava".into();
    value["architectures"] = serde_json::json!(["LlavaForConditionalGeneration"]);
    value["torch_dtype"] = torch_dtype.into();
    value["text_config"]["model_type"] = "llama".into();
    value["vision_config"]["model_type"] = "clip_vision_model".into();
    value
}
