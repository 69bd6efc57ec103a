//! HF `config.json` for LLaVA, mirrored field for field.
//!
//! HF's LLaVA configs omit most fields and rely on `LlamaConfig` / `CLIPVisionConfig` defaults;
//! every default below is the one transformers applies, so the published `llava-1.5-7b-hf`
//! config comes out as the 7B model. transformers v5 names (`rope_parameters`, `head_dim`,
//! `image_token_id`) are accepted beside the v4 ones.

use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::LlavaError;

/// Activation functions that appear in LLaVA / CLIP / LLaMA configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)` (CLIP).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact GELU with erf (LLaVA projector).
    #[serde(rename = "gelu")]
    Gelu,
    /// GELU with the tanh approximation.
    #[serde(rename = "gelu_pytorch_tanh", alias = "gelu_new", alias = "gelu_fast")]
    GeluTanh,
    /// SiLU / swish (LLaMA MLP).
    #[serde(rename = "silu", alias = "swish")]
    Silu,
}

/// Which vision tokens reach the projector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureSelectStrategy {
    /// Drop the CLS token (LLaVA-1.5).
    Default,
    /// Keep every token, CLS included.
    Full,
}

/// The LLaMA decoder's configuration (`LlamaConfig`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextConfig {
    /// Vocabulary size (rows of `embed_tokens` and `lm_head`).
    #[serde(default = "text::vocab_size")]
    pub vocab_size: usize,
    /// Model width.
    #[serde(default = "text::hidden_size")]
    pub hidden_size: usize,
    /// SwiGLU inner width.
    #[serde(default = "text::intermediate_size")]
    pub intermediate_size: usize,
    /// Number of decoder layers.
    #[serde(default = "text::num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Number of query heads.
    #[serde(default = "text::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Number of key/value heads (GQA); defaults to `num_attention_heads`.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// MLP activation.
    #[serde(default = "text::hidden_act")]
    pub hidden_act: Activation,
    /// Longest sequence the RoPE tables are meant for (informational; RoPE is computed on the fly).
    #[serde(default = "text::max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    #[serde(default = "text::rms_norm_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (v4 name; v5 puts it in `rope_parameters`).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// transformers v5 RoPE block: `{"rope_theta": .., "rope_type": "default"}`.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// v4 RoPE scaling block; only `null` / `"default"` is supported.
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    /// Bias on q/k/v/o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Bias on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Whether `lm_head` shares `embed_tokens`' weight.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Beginning-of-sequence id.
    #[serde(default = "text::bos_token_id")]
    pub bos_token_id: u32,
    /// End-of-sequence id(s).
    #[serde(default = "text::eos_token_id", deserialize_with = "one_or_many")]
    pub eos_token_id: Vec<u32>,
}

/// RoPE parameters (v5 `rope_parameters`, v4 `rope_scaling`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RopeParameters {
    /// RoPE base frequency.
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Scaling type; only `"default"` (no scaling) is implemented.
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
}

/// The CLIP vision tower's configuration (`CLIPVisionConfig`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VisionConfig {
    /// Model width.
    #[serde(default = "vision::hidden_size")]
    pub hidden_size: usize,
    /// MLP inner width.
    #[serde(default = "vision::intermediate_size")]
    pub intermediate_size: usize,
    /// Number of encoder layers.
    #[serde(default = "vision::num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    #[serde(default = "vision::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Input channels.
    #[serde(default = "vision::num_channels")]
    pub num_channels: usize,
    /// Input resolution (square).
    #[serde(default = "vision::image_size")]
    pub image_size: usize,
    /// Patch size.
    #[serde(default = "vision::patch_size")]
    pub patch_size: usize,
    /// MLP activation.
    #[serde(default = "vision::hidden_act")]
    pub hidden_act: Activation,
    /// LayerNorm epsilon.
    #[serde(default = "vision::layer_norm_eps")]
    pub layer_norm_eps: f64,
}

/// The whole `LlavaConfig`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LlavaConfig {
    /// The language model.
    #[serde(default = "llava::text_config")]
    pub text_config: TextConfig,
    /// The vision tower.
    #[serde(default = "llava::vision_config")]
    pub vision_config: VisionConfig,
    /// Id of the `<image>` placeholder token.
    #[serde(default = "llava::image_token_index", alias = "image_token_id")]
    pub image_token_index: u32,
    /// Padding id.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Projector activation.
    #[serde(default = "llava::projector_hidden_act")]
    pub projector_hidden_act: Activation,
    /// Bias on the projector's linears.
    #[serde(default = "llava::yes")]
    pub multimodal_projector_bias: bool,
    /// Which CLIP tokens are kept.
    #[serde(default = "llava::select_strategy")]
    pub vision_feature_select_strategy: FeatureSelectStrategy,
    /// Index (or indices, concatenated) of the CLIP hidden state(s) fed to the projector;
    /// index 0 is the embedding output, negative indices count from the end.
    #[serde(default = "llava::feature_layer", deserialize_with = "one_or_many_i64")]
    pub vision_feature_layer: Vec<i64>,
    /// Top-level tie flag (LLaVA's; the text config's flag also counts).
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

mod text {
    use super::Activation;
    pub fn vocab_size() -> usize {
        32000
    }
    pub fn hidden_size() -> usize {
        4096
    }
    pub fn intermediate_size() -> usize {
        11008
    }
    pub fn num_hidden_layers() -> usize {
        32
    }
    pub fn num_attention_heads() -> usize {
        32
    }
    pub fn hidden_act() -> Activation {
        Activation::Silu
    }
    pub fn max_position_embeddings() -> usize {
        2048
    }
    pub fn rms_norm_eps() -> f64 {
        1e-6
    }
    pub fn bos_token_id() -> u32 {
        1
    }
    pub fn eos_token_id() -> Vec<u32> {
        vec![2]
    }
}

mod vision {
    use super::Activation;
    pub fn hidden_size() -> usize {
        768
    }
    pub fn intermediate_size() -> usize {
        3072
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        12
    }
    pub fn num_channels() -> usize {
        3
    }
    pub fn image_size() -> usize {
        224
    }
    pub fn patch_size() -> usize {
        32
    }
    pub fn hidden_act() -> Activation {
        Activation::QuickGelu
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
}

mod llava {
    use super::*;
    pub fn text_config() -> TextConfig {
        serde_json::from_str("{}").expect("empty text config")
    }
    /// `LlavaConfig` builds this CLIP-L/14-336 config when `vision_config` is absent.
    pub fn vision_config() -> VisionConfig {
        VisionConfig {
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            num_channels: 3,
            image_size: 336,
            patch_size: 14,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
    pub fn image_token_index() -> u32 {
        32000
    }
    pub fn projector_hidden_act() -> Activation {
        Activation::Gelu
    }
    pub fn yes() -> bool {
        true
    }
    pub fn select_strategy() -> FeatureSelectStrategy {
        FeatureSelectStrategy::Default
    }
    pub fn feature_layer() -> Vec<i64> {
        vec![-2]
    }
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(u32),
        Many(Vec<u32>),
        None(()),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(x) => vec![x],
        OneOrMany::Many(v) => v,
        OneOrMany::None(()) => Vec::new(),
    })
}

fn one_or_many_i64<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(i64),
        Many(Vec<i64>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(x) => vec![x],
        OneOrMany::Many(v) => v,
    })
}

impl TextConfig {
    /// Key/value heads (GQA groups).
    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// RoPE base, from whichever field the file used.
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.rope_theta)
            .or(self.rope_theta)
            .unwrap_or(10000.0)
    }
}

impl VisionConfig {
    /// Patches per side.
    pub fn patches_per_side(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Patch tokens per image (CLS excluded).
    pub fn num_patches(&self) -> usize {
        self.patches_per_side() * self.patches_per_side()
    }
}

impl LlavaConfig {
    /// Parses a `config.json` text; `source` names the file in errors.
    pub fn from_json_str(text: &str, source: &str) -> Result<Self, LlavaError> {
        let config: Self = serde_json::from_str(text).map_err(|e| LlavaError::Config {
            path: source.to_string(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|message| LlavaError::Config {
            path: source.to_string(),
            message,
        })?;
        Ok(config)
    }

    /// Reads and parses a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self, LlavaError> {
        let text = std::fs::read_to_string(path).map_err(|e| LlavaError::io(path, e))?;
        Self::from_json_str(&text, &path.display().to_string())
    }

    /// Whether `lm_head` is tied to the input embeddings.
    pub fn tied_embeddings(&self) -> bool {
        self.tie_word_embeddings || self.text_config.tie_word_embeddings
    }

    /// Image tokens each `<image>` placeholder expands to.
    pub fn image_tokens_per_image(&self) -> usize {
        let patches = self.vision_config.num_patches();
        match self.vision_feature_select_strategy {
            FeatureSelectStrategy::Default => patches,
            FeatureSelectStrategy::Full => patches + 1,
        }
    }

    /// The CLIP hidden-state indices to read, made non-negative (0 = embeddings output).
    pub fn vision_feature_layers(&self) -> Vec<usize> {
        let n = self.vision_config.num_hidden_layers as i64 + 1;
        self.vision_feature_layer
            .iter()
            .map(|&l| if l < 0 { (n + l) as usize } else { l as usize })
            .collect()
    }

    fn validate(&self) -> Result<(), String> {
        let t = &self.text_config;
        let v = &self.vision_config;
        if t.num_attention_heads == 0
            || t.hidden_size == 0
            || t.vocab_size == 0
            || t.num_hidden_layers == 0
        {
            return Err(
                "text_config: hidden_size, num_hidden_layers, num_attention_heads and vocab_size must be > 0"
                    .into(),
            );
        }
        if t.head_dim.is_none() && !t.hidden_size.is_multiple_of(t.num_attention_heads) {
            return Err(format!(
                "text_config: hidden_size {} is not divisible by num_attention_heads {}",
                t.hidden_size, t.num_attention_heads
            ));
        }
        if !t.num_attention_heads.is_multiple_of(t.num_kv_heads()) {
            return Err(format!(
                "text_config: num_attention_heads {} is not a multiple of num_key_value_heads {}",
                t.num_attention_heads,
                t.num_kv_heads()
            ));
        }
        if !t.head_dim().is_multiple_of(2) {
            return Err(format!(
                "text_config: head_dim {} must be even for RoPE",
                t.head_dim()
            ));
        }
        for rope in [&t.rope_parameters, &t.rope_scaling].into_iter().flatten() {
            if let Some(kind) = &rope.rope_type
                && kind != "default"
            {
                return Err(format!(
                    "text_config: RoPE type \"{kind}\" is not supported (only \"default\")"
                ));
            }
        }
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(format!(
                "vision_config: hidden_size {} is not divisible by num_attention_heads {}",
                v.hidden_size, v.num_attention_heads
            ));
        }
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return Err(format!(
                "vision_config: image_size {} is not a multiple of patch_size {}",
                v.image_size, v.patch_size
            ));
        }
        if self.vision_feature_layer.is_empty() {
            return Err("vision_feature_layer is empty".into());
        }
        let n = v.num_hidden_layers as i64;
        for &l in &self.vision_feature_layer {
            if l > n || l < -(n + 1) {
                return Err(format!(
                    "vision_feature_layer {l} is outside the {} hidden states of a {n}-layer vision tower",
                    n + 1
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published `llava-hf/llava-1.5-7b-hf` config.json, which omits most fields.
    const LLAVA_7B: &str = r#"{
      "architectures": ["LlavaForConditionalGeneration"],
      "ignore_index": -100, "image_token_index": 32000, "model_type": "llava",
      "pad_token_id": 32001, "projector_hidden_act": "gelu",
      "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
        "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
        "torch_dtype": "float16", "vocab_size": 32064},
      "tie_word_embeddings": false, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
      "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
        "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
        "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
      "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064
    }"#;

    #[test]
    fn llava_7b_defaults_fill_in() {
        let c = LlavaConfig::from_json_str(LLAVA_7B, "7b").unwrap();
        let t = &c.text_config;
        assert_eq!(
            (
                t.hidden_size,
                t.num_hidden_layers,
                t.num_attention_heads,
                t.intermediate_size
            ),
            (4096, 32, 32, 11008)
        );
        assert_eq!(
            (t.num_kv_heads(), t.head_dim(), t.vocab_size),
            (32, 128, 32064)
        );
        assert_eq!(t.rope_theta(), 10000.0);
        assert_eq!(t.rms_norm_eps, 1e-5);
        assert_eq!(t.hidden_act, Activation::Silu);
        let v = &c.vision_config;
        assert_eq!(
            (
                v.hidden_size,
                v.num_hidden_layers,
                v.num_attention_heads,
                v.intermediate_size
            ),
            (1024, 24, 16, 4096)
        );
        assert_eq!(
            (v.image_size, v.patch_size, v.hidden_act),
            (336, 14, Activation::QuickGelu)
        );
        assert_eq!(c.image_tokens_per_image(), 576);
        assert_eq!(c.vision_feature_layers(), vec![23]);
        assert!(!c.tied_embeddings());
    }

    #[test]
    fn v5_field_names() {
        let c = LlavaConfig::from_json_str(
            r#"{"image_token_id": 7, "vision_feature_layer": [-2, -5],
               "text_config": {"hidden_size": 64, "num_attention_heads": 4, "head_dim": 32,
               "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}, "eos_token_id": [2, 9]}}"#,
            "v5",
        )
        .unwrap();
        assert_eq!(c.image_token_index, 7);
        assert_eq!(c.text_config.head_dim(), 32);
        assert_eq!(c.text_config.rope_theta(), 500000.0);
        assert_eq!(c.text_config.eos_token_id, vec![2, 9]);
        assert_eq!(c.vision_feature_layers(), vec![23, 20]);
        // The absent vision config is LLaVA's CLIP-L/14-336 default.
        assert_eq!(c.vision_config.image_size, 336);
    }

    #[test]
    fn bad_configs_are_errors() {
        let err = LlavaConfig::from_json_str(r#"{"text_config": {"hidden_size": 65}}"#, "x.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.json") && err.contains("divisible"), "{err}");
        let err = LlavaConfig::from_json_str(
            r#"{"text_config": {"rope_scaling": {"type": "linear", "factor": 2.0}}}"#,
            "y.json",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("linear"), "{err}");
        assert!(LlavaConfig::from_json_str("{not json", "z.json").is_err());
    }
}

/// Parameter counts per component, computed from the config alone (no weights needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParameterCounts {
    /// CLIP vision tower (all layers, `post_layernorm` included).
    pub vision_tower: usize,
    /// Multimodal projector.
    pub projector: usize,
    /// LLaMA decoder: embeddings, blocks, final norm.
    pub decoder: usize,
    /// Output head (0 when tied to the embeddings).
    pub lm_head: usize,
    /// Sum of the above.
    pub total: usize,
}

impl LlavaConfig {
    /// Parameters of the model this config describes.
    pub fn parameter_counts(&self) -> ParameterCounts {
        let v = &self.vision_config;
        let (d, i) = (v.hidden_size, v.intermediate_size);
        let embeddings =
            d + v.num_channels * v.patch_size * v.patch_size * d + (v.num_patches() + 1) * d;
        let vision_layer = 4 * (d * d + d) + 4 * d + (d * i + i) + (i * d + d);
        let vision_tower = embeddings + 2 * d + v.num_hidden_layers * vision_layer + 2 * d;

        let h = self.text_config.hidden_size;
        let input = d * self.vision_feature_layer.len();
        let bias = usize::from(self.multimodal_projector_bias);
        let projector = input * h + bias * h + h * h + bias * h;

        let t = &self.text_config;
        let (q, kv, m) = (
            t.num_attention_heads * t.head_dim(),
            t.num_kv_heads() * t.head_dim(),
            t.intermediate_size,
        );
        let attention =
            h * q + 2 * h * kv + q * h + usize::from(t.attention_bias) * (q + 2 * kv + h);
        let mlp = 3 * h * m + usize::from(t.mlp_bias) * (2 * m + h);
        let decoder = t.vocab_size * h + t.num_hidden_layers * (attention + mlp + 2 * h) + h;
        let lm_head = if self.tied_embeddings() {
            0
        } else {
            t.vocab_size * h
        };
        ParameterCounts {
            vision_tower,
            projector,
            decoder,
            lm_head,
            total: vision_tower + projector + decoder + lm_head,
        }
    }
}
