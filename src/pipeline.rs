//! A model directory put to use: config, weights, tokenizer and image processor loaded together
//! and checked against each other; prompt -> ids -> logits / generated text.

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{DType, Int, Tensor, TensorData, backend::Backend};
use cmoe_data::{ImageProcessorConfig, LlavaTokenizer, PixelValues};
use cmoe_llava::config::ParameterCounts;
use cmoe_llava::open_checkpoint;
use cmoe_llava::{GenerationConfig, Llava, LlavaConfig, LlavaInput, Sampling};
use serde::Serialize;

use crate::tensor_io::HostTensor;

/// Everything loaded from a HF LLaVA directory.
pub struct LlavaPipeline<B: Backend> {
    /// The model directory.
    pub dir: PathBuf,
    /// Its resolved config.
    pub config: LlavaConfig,
    /// The model with imported weights.
    pub model: Llava<B>,
    /// Its tokenizer, checked against the config.
    pub tokenizer: LlavaTokenizer,
    /// Its image processor (`preprocessor_config.json`, or CLIP's defaults).
    pub processor: ImageProcessorConfig,
    device: B::Device,
}

/// What `generate` returns.
#[derive(Debug, Clone, Serialize)]
pub struct Generation {
    /// The ids fed to the model, image tokens expanded.
    pub prompt_ids: Vec<u32>,
    /// The new ids (up to and including end-of-sequence).
    pub generated_ids: Vec<u32>,
    /// The new ids decoded, special tokens skipped.
    pub text: String,
}

/// The dtype a frozen base model is held in. Trainable experts, routers and VAEs are f32
/// whatever this is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats (4 bytes a parameter).
    #[default]
    F32,
    /// bfloat16 (2 bytes; LLaVA-1.5's own dtype, for a 7B base on one GPU).
    Bf16,
    /// IEEE half (2 bytes).
    F16,
}

/// `module` with every float parameter cast to `dtype` (a randomly initialised base in bf16,
/// as benchmarks and the memory proxy build it).
pub fn cast_floats<B: Backend, M: Module<B>>(module: M, dtype: DType) -> M {
    struct Cast(DType);
    impl<B: Backend> ModuleMapper<B> for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            let (id, tensor, mapper) = param.consume();
            Param::from_mapped_value(id, tensor.cast(self.0), mapper)
        }
    }
    module.map(&mut Cast(dtype))
}

impl Precision {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::Bf16 | Self::F16 => 2,
        }
    }

    /// Burn's dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

impl<B: Backend> LlavaPipeline<B> {
    /// Loads config, weights (as f32), tokenizer and image processor from `dir`.
    pub fn load(dir: &Path, device: &B::Device) -> anyhow::Result<Self> {
        Self::load_in(dir, Precision::F32, device)
    }

    /// [`Self::load`] with the weights in `precision`.
    pub fn load_in(dir: &Path, precision: Precision, device: &B::Device) -> anyhow::Result<Self> {
        let (config, model) = cmoe_llava::load_llava::<B>(dir, precision.dtype(), device)?;
        let tokenizer = LlavaTokenizer::from_model_dir(
            dir,
            config.image_token_index,
            config.text_config.vocab_size,
        )?;
        let processor =
            ImageProcessorConfig::from_model_dir(dir, config.vision_config.image_size as u32)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            model,
            tokenizer,
            processor,
            device: device.clone(),
        })
    }

    /// Preprocesses an image file with the model's processor and checks its size.
    pub fn preprocess(&self, image: &Path) -> anyhow::Result<HostTensor> {
        let PixelValues {
            data,
            height,
            width,
        } = self.processor.preprocess_file(image)?;
        let pixels = HostTensor {
            data,
            shape: vec![1, 3, height, width],
        };
        self.check_pixels(&pixels, &image.display().to_string())?;
        Ok(pixels)
    }

    /// Checks that pixel values fit the vision tower.
    pub fn check_pixels(&self, pixels: &HostTensor, source: &str) -> anyhow::Result<()> {
        let s = self.config.vision_config.image_size;
        anyhow::ensure!(
            pixels.shape.len() == 4
                && pixels.shape[1] == 3
                && pixels.shape[2] == s
                && pixels.shape[3] == s,
            "{source}: pixel values have shape {:?}, the model takes [n, 3, {s}, {s}]",
            pixels.shape
        );
        Ok(())
    }

    /// The prompt's ids with `<image>` expanded.
    pub fn prompt_ids(&self, prompt: &str) -> anyhow::Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode_prompt(prompt, self.config.image_tokens_per_image())?)
    }

    fn input(&self, ids: &[u32], pixels: Option<&HostTensor>) -> LlavaInput<B> {
        let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        let len = ids.len();
        LlavaInput {
            input_ids: Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [1, len]), &self.device),
            pixel_values: pixels.map(|p| {
                Tensor::from_data(
                    TensorData::new(p.data.clone(), p.shape.clone()),
                    &self.device,
                )
            }),
            attention_mask: None,
        }
    }

    /// Logits `[1, seq, vocab]` for ids whose image tokens are already expanded.
    pub fn logits(&self, ids: &[u32], pixels: Option<&HostTensor>) -> anyhow::Result<HostTensor> {
        anyhow::ensure!(!ids.is_empty(), "no input ids");
        let logits = self.model.forward(self.input(ids, pixels))?;
        let shape = logits.dims().to_vec();
        Ok(HostTensor {
            data: logits.into_data().iter::<f32>().collect(),
            shape,
        })
    }

    /// Generates an answer to `prompt` (which contains `<image>` where the image goes).
    pub fn generate(
        &self,
        prompt: &str,
        pixels: Option<&HostTensor>,
        max_new_tokens: usize,
        sampling: Sampling,
    ) -> anyhow::Result<Generation> {
        let images = pixels.map_or(0, |p| p.shape[0]);
        let marks = prompt.matches("<image>").count();
        if marks != images {
            anyhow::bail!(
                "the prompt has {marks} <image> mark(s) for {images} image(s): write one \
                 <image> where each picture goes (e.g. \"<image>\\nWhat is it?\"); generate \
                 expands it to the model's image tokens itself"
            );
        }
        let prompt_ids = self.prompt_ids(prompt)?;
        let config = GenerationConfig {
            max_new_tokens,
            eos_token_ids: self.config.text_config.eos_token_id.clone(),
            pad_token_id: self.config.pad_token_id.unwrap_or(0),
            sampling,
        };
        let generated_ids =
            cmoe_llava::generate(&self.model, self.input(&prompt_ids, pixels), &config)?
                .pop()
                .context("no output row")?;
        let text = self.tokenizer.decode(&generated_ids)?;
        Ok(Generation {
            prompt_ids,
            generated_ids,
            text,
        })
    }
}

/// What `cmoe inspect` reports.
#[derive(Debug, Serialize)]
pub struct Inspection {
    /// The resolved config, every default filled in.
    pub config: LlavaConfig,
    /// Parameter counts from the config.
    pub parameters: ParameterCounts,
    /// Image tokens per `<image>`.
    pub image_tokens_per_image: usize,
    /// The checkpoint found beside the config, if any.
    pub checkpoint: Option<CheckpointSummary>,
}

/// A checkpoint's files and dtypes.
#[derive(Debug, Serialize)]
pub struct CheckpointSummary {
    /// Weight files.
    pub files: Vec<String>,
    /// Number of tensors.
    pub tensors: usize,
    /// Stored elements.
    pub elements: usize,
    /// Tensors per stored dtype.
    pub dtypes: std::collections::BTreeMap<String, usize>,
}

/// Reads `dir/config.json` (and the checkpoint's metadata when weights are present).
pub fn inspect(dir: &Path) -> anyhow::Result<Inspection> {
    let config = LlavaConfig::from_file(&dir.join("config.json"))?;
    // Config only when there is no weights file at all; a broken index or a missing shard is
    // an error naming it (from `open_checkpoint`).
    use cmoe_llava::import::{WEIGHTS_FILE, WEIGHTS_INDEX_FILE};
    let has_weights = dir.join(WEIGHTS_INDEX_FILE).exists() || dir.join(WEIGHTS_FILE).exists();
    let checkpoint = if has_weights {
        let c = open_checkpoint(dir)?;
        Some(CheckpointSummary {
            files: c.files.iter().map(|f| f.display().to_string()).collect(),
            tensors: c.tensors.len(),
            elements: c.num_elements(),
            dtypes: c.dtypes(),
        })
    } else {
        None
    };
    Ok(Inspection {
        parameters: config.parameter_counts(),
        image_tokens_per_image: config.image_tokens_per_image(),
        config,
        checkpoint,
    })
}

/// What `cmoe import` found in a model directory.
#[derive(Debug, Serialize)]
pub struct ImportCheck {
    /// Config, parameter counts and checkpoint summary.
    pub inspection: Inspection,
    /// Tokens in the tokenizer (added tokens included).
    pub tokenizer_vocab: usize,
    /// Parameters of the model built from the config and filled from the checkpoint.
    pub loaded_parameters: usize,
}

/// Validates a Hugging Face LLaVA directory for use: the config parses, the checkpoint's
/// shards hold every tensor the config implies with the right shape (missing, unexpected and
/// mis-shaped keys are reported together), the tokenizer loads and fits the vocabulary and
/// `<image>` id, the image processor config is readable. Loads the weights on the backend.
pub struct ImportTask {
    /// The model directory.
    pub dir: PathBuf,
    /// The dtype to load the weights in.
    pub precision: Precision,
}

impl crate::backend::BackendTask for ImportTask {
    type Output = anyhow::Result<ImportCheck>;

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<ImportCheck> {
        let inspection = inspect(&self.dir)?;
        if inspection.checkpoint.is_none() {
            anyhow::bail!(
                "{}: no weights (model.safetensors or model.safetensors.index.json)",
                self.dir.display()
            );
        }
        let pipe = LlavaPipeline::<B>::load_in(&self.dir, self.precision, &device)?;
        Ok(ImportCheck {
            tokenizer_vocab: pipe.tokenizer.inner().get_vocab_size(true),
            loaded_parameters: burn::module::Module::num_params(&pipe.model),
            inspection,
        })
    }
}
