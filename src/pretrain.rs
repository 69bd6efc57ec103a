//! Pretraining the small LLaVA shipped in `assets/`: a byte-level BPE tokenizer trained on the
//! synthetic corpus, then every weight trained from a seeded initialisation on the perception
//! mixture of `cmoe_coin::mini::captions` (descriptions of shapes, colours, positions, counts,
//! words, covers and degraded images; none of Mini-CoIN's question formats), and the result
//! written in the HF LLaVA layout.

use std::path::{Path, PathBuf};

use anyhow::Context;
use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion};
use cmoe_coin::format::{TrainRecord, Turn, write_json};
use cmoe_coin::mini::{TASKS, captions, tasks};
use cmoe_data::bpe::train_bpe;
use cmoe_data::image::{CLIP_MEAN, CLIP_STD, ImageProcessorConfig};
use cmoe_data::prompt::{Conversation, VICUNA_SYSTEM};
use cmoe_data::tokenizer::{IMAGE_TOKEN, LlavaTokenizer};
use cmoe_llava::LlavaConfig;
use cmoe_llava::export::save_hf;
use cmoe_moe::loss::causal_lm_loss;
use cmoe_moe::stages::learning_rate;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Serialize;

use crate::backend::BackendTask;
use crate::dataset::{CoinEncoder, collate_train};
use crate::progress::{progress, tick};

/// What to pretrain and how.
#[derive(Debug, Clone, Serialize)]
pub struct PretrainConfig {
    /// The model's `config.json` (shapes, special ids).
    pub model_config: PathBuf,
    /// Output directory (HF layout).
    pub out: PathBuf,
    /// Seed of the initialisation, the corpus and the batches.
    pub seed: u64,
    /// Optimiser steps.
    pub steps: usize,
    /// Samples per step.
    pub batch: usize,
    /// Peak learning rate (AdamW, warmup 5 % then cosine).
    pub lr: f64,
    /// Descriptions drawn to train the tokenizer on (with Mini-CoIN's questions).
    pub tokenizer_corpus: usize,
}

/// What a pretraining run reports.
#[derive(Debug, Clone, Serialize)]
pub struct PretrainReport {
    /// The settings.
    pub config: PretrainConfig,
    /// Mean loss over the first and the last 10 % of steps.
    pub first_loss: f64,
    /// See `first_loss`.
    pub last_loss: f64,
    /// Wall time of the training loop.
    pub train_seconds: f64,
    /// Parameters.
    pub parameters: usize,
}

/// Pretrains on the backend it is run on (with autodiff).
pub struct PretrainTask(pub PretrainConfig);

impl BackendTask for PretrainTask {
    type Output = anyhow::Result<PretrainReport>;

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<PretrainReport> {
        pretrain::<B>(self.0, &device)
    }
}

fn pretrain<B: Backend>(
    config: PretrainConfig,
    device: &B::Device,
) -> anyhow::Result<PretrainReport> {
    let model_config = LlavaConfig::from_file(&config.model_config)?;
    let image_size = model_config.vision_config.image_size as u32;
    std::fs::create_dir_all(&config.out)
        .with_context(|| format!("cannot create {}", config.out.display()))?;

    // 1. The tokenizer: the chat template, descriptions and Mini-CoIN's questions and answers.
    let tokenizer_path = config.out.join("tokenizer.json");
    train_bpe(
        tokenizer_corpus(config.seed, config.tokenizer_corpus, image_size),
        model_config.text_config.vocab_size,
        &tokenizer_path,
    )?;
    write_processor_config(&config.out, image_size)?;
    let tokenizer = LlavaTokenizer::from_model_dir(
        &config.out,
        model_config.image_token_index,
        model_config.text_config.vocab_size,
    )?;
    let encoder = CoinEncoder {
        tokenizer,
        processor: ImageProcessorConfig::from_model_dir(&config.out, image_size)?,
        conversation: Conversation::vicuna_v1(),
        tokens_per_image: model_config.image_tokens_per_image(),
        image_root: PathBuf::new(),
    };
    let pad = model_config.pad_token_id.unwrap_or(0);

    // 2. Every weight trains on fresh descriptions.
    type AD<B> = Autodiff<B>;
    AD::<B>::seed(device, config.seed);
    let mut model = model_config.init::<AD<B>>(device);
    let parameters = model.num_params();
    let mut optim = AdamWConfig::new()
        .with_weight_decay(0.0)
        .with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(1.0)))
        .init();
    let mut rng = StdRng::seed_from_u64(config.seed ^ 0xCAB);
    let bar = progress(config.steps as u64, "pretrain");
    let mut losses = Vec::with_capacity(config.steps);
    let start = std::time::Instant::now();
    for step in 0..config.steps {
        let samples = (0..config.batch)
            .map(|i| {
                let s = captions::sample(&mut rng, image_size);
                let record = conversation(format!("caption-{step}-{i}"), &s.question, &s.answer);
                encoder.encode_conversation(&record, encoder.processor.preprocess(&s.image))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let batch = collate_train::<AD<B>>(&samples, pad, device);
        let logits = model.forward(batch.input)?;
        let loss = causal_lm_loss(logits, batch.labels).context("a batch without labels")?;
        let value: f64 = loss.clone().into_scalar().elem();
        if !value.is_finite() {
            anyhow::bail!("pretraining diverged: loss {value} at step {step}");
        }
        losses.push(value);
        let lr = learning_rate(step, config.steps, config.lr, 0.05);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr, model, grads);
        tick(&bar, format!("loss {value:.3}"));
    }
    bar.finish();
    let train_seconds = start.elapsed().as_secs_f64();

    // 3. HF layout, half precision (what the repository ships).
    save_hf(&model.valid(), &model_config, &config.out, DType::F16)?;
    let tenth = (losses.len() / 10).max(1);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let report = PretrainReport {
        first_loss: mean(&losses[..tenth.min(losses.len())]),
        last_loss: mean(&losses[losses.len().saturating_sub(tenth)..]),
        train_seconds,
        parameters,
        config,
    };
    write_json(&report.config.out.join("pretrain.json"), &report)?;
    Ok(report)
}

/// A one-turn conversation record.
fn conversation(id: String, question: &str, answer: &str) -> TrainRecord {
    TrainRecord {
        id,
        image: String::new(),
        conversations: vec![
            Turn {
                from: "human".into(),
                value: format!("{IMAGE_TOKEN}\n{question}"),
            },
            Turn {
                from: "gpt".into(),
                value: answer.into(),
            },
        ],
    }
}

/// The tokenizer's training text: whole conversations of descriptions and of Mini-CoIN's
/// tasks (the tokenizer may know the tasks' words; the model is not trained on them here).
fn tokenizer_corpus(
    seed: u64,
    descriptions: usize,
    size: u32,
) -> impl Iterator<Item = String> + Send {
    let template = Conversation::vicuna_v1();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x70C);
    let mut texts = Vec::with_capacity(descriptions + 8 * 200);
    for _ in 0..descriptions {
        let s = captions::sample(&mut rng, size);
        texts.push(
            template
                .render(&[(format!("{IMAGE_TOKEN}\n{}", s.question), s.answer)])
                .0,
        );
    }
    for (_, task) in TASKS {
        for _ in 0..200 {
            let s = tasks::sample(task, &mut rng, size);
            texts.push(
                template
                    .render(&[(format!("{IMAGE_TOKEN}\n{}", s.question), s.answer)])
                    .0,
            );
        }
    }
    texts.push(VICUNA_SYSTEM.to_string());
    texts.into_iter()
}

/// `preprocessor_config.json`: CLIP's processor at the model's resolution.
fn write_processor_config(dir: &Path, size: u32) -> anyhow::Result<()> {
    let json = serde_json::json!({
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": true,
        "size": {"shortest_edge": size},
        "resample": 3,
        "do_center_crop": true,
        "crop_size": {"height": size, "width": size},
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_convert_rgb": true
    });
    Ok(write_json(&dir.join("preprocessor_config.json"), &json)?)
}
