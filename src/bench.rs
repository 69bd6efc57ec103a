//! Throughput of the LLaVA model on synthetic batches: forward, forward + backward (cross-entropy
//! on every position, all parameters trainable) and KV-cached greedy generation. The shapes are
//! HF `config.json` files under `configs/bench/`; `scripts/bench_torch.py` measures the same
//! shapes in PyTorch so that `cargo xtask bench` can report ratios.

use std::path::Path;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use cmoe_llava::{GenerationConfig, Llava, LlavaConfig, LlavaInput, Sampling, generate};
use serde::{Deserialize, Serialize};

use crate::backend::BackendTask;

/// One benchmark shape: a model config and a batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchCase {
    /// Name shown in reports.
    pub name: String,
    /// Path of the HF-style config.
    pub config: String,
    /// Batch size.
    pub batch: usize,
    /// Text tokens per row (the image tokens come on top).
    pub text_tokens: usize,
    /// New tokens per row in the generation benchmark.
    pub new_tokens: usize,
}

/// Measured throughput of one case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchResult {
    /// Case name.
    pub name: String,
    /// Backend name.
    pub backend: String,
    /// Model parameters.
    pub parameters: usize,
    /// Batch size.
    pub batch: usize,
    /// Sequence length (bos + image tokens + text tokens).
    pub seq: usize,
    /// Median seconds per forward pass.
    pub forward_s: f64,
    /// Median seconds per forward + backward pass.
    pub train_step_s: f64,
    /// Seconds for the whole generation (prefill + `new_tokens` cached steps).
    pub generate_s: f64,
    /// Tokens per second, forward.
    pub forward_tok_s: f64,
    /// Tokens per second, forward + backward.
    pub train_tok_s: f64,
    /// New tokens per second, generation (all rows).
    pub generate_tok_s: f64,
}

/// Runs one case on the chosen backend.
pub struct BenchTask {
    /// The case.
    pub case: BenchCase,
    /// Timed repetitions (after one warm-up).
    pub repeats: usize,
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn time<B: Backend>(device: &B::Device, repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    B::sync(device).expect("device sync");
    let times = (0..repeats)
        .map(|_| {
            let start = Instant::now();
            f();
            B::sync(device).expect("device sync");
            start.elapsed().as_secs_f64()
        })
        .collect();
    median(times)
}

fn synthetic_input<B: Backend>(
    config: &LlavaConfig,
    case: &BenchCase,
    device: &B::Device,
) -> LlavaInput<B> {
    let per_image = config.image_tokens_per_image();
    let image = config.image_token_index as usize;
    // Deterministic text ids in [3, min(vocab, image id)): no special or image ids.
    let text_range = config.text_config.vocab_size.min(image) - 3;
    let mut ids = Vec::new();
    for row in 0..case.batch {
        ids.push(1);
        ids.extend(std::iter::repeat_n(image as i64, per_image));
        ids.extend(
            (0..case.text_tokens).map(|t| (3 + (row * 7919 + t * 104_729) % text_range) as i64),
        );
    }
    let seq = 1 + per_image + case.text_tokens;
    let size = config.vision_config.image_size;
    LlavaInput {
        input_ids: Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [case.batch, seq]), device),
        pixel_values: Some(Tensor::random(
            [case.batch, 3, size, size],
            Distribution::Normal(0.0, 1.0),
            device,
        )),
        attention_mask: None,
    }
}

impl BackendTask for BenchTask {
    type Output = anyhow::Result<BenchResult>;

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<BenchResult> {
        let case = self.case;
        let config = LlavaConfig::from_file(Path::new(&case.config))?;
        B::seed(&device, 0);
        let seq = 1 + config.image_tokens_per_image() + case.text_tokens;
        let tokens = (case.batch * seq) as f64;

        let model: Llava<B> = config.init(&device);
        let input = synthetic_input::<B>(&config, &case, &device);
        let forward_s = time::<B>(&device, self.repeats, || {
            let logits = model.forward(input.clone()).expect("forward");
            let _ = logits.slice([0..1, 0..1, 0..1]).into_data();
        });

        let train_model: Llava<Autodiff<B>> = config.init(&device);
        let train_input = synthetic_input::<Autodiff<B>>(&config, &case, &device);
        let targets = Tensor::<Autodiff<B>, 1, Int>::from_data(
            TensorData::new(
                (0..case.batch * seq)
                    .map(|i| (i % 1000) as i64 + 3)
                    .collect::<Vec<_>>(),
                [case.batch * seq],
            ),
            &device,
        );
        let loss_fn = CrossEntropyLossConfig::new().init(&device);
        let vocab = config.text_config.vocab_size;
        let train_step_s = time::<B>(&device, self.repeats, || {
            let logits = train_model.forward(train_input.clone()).expect("forward");
            let loss = loss_fn.forward(logits.reshape([case.batch * seq, vocab]), targets.clone());
            let grads = loss.backward();
            drop(grads);
        });

        let generation = GenerationConfig {
            max_new_tokens: case.new_tokens,
            eos_token_ids: Vec::new(), // never stop early: a fixed amount of work
            pad_token_id: 0,
            sampling: Sampling::Greedy,
        };
        let generate_s = time::<B>(&device, self.repeats.min(2), || {
            generate(&model, input.clone(), &generation).expect("generate");
        });

        Ok(BenchResult {
            name: case.name,
            backend: B::name(&device),
            parameters: config.parameter_counts().total,
            batch: case.batch,
            seq,
            forward_s,
            train_step_s,
            generate_s,
            forward_tok_s: tokens / forward_s,
            train_tok_s: tokens / train_step_s,
            generate_tok_s: (case.batch * case.new_tokens) as f64 / generate_s,
        })
    }
}

/// Dispatch cost of one MoE-LoRA FFN layer at the mini shapes (hidden 256, MLP 688, LoRA r16,
/// 8 x 105 tokens): sparse dispatch against the dense definition, for several expert counts.
pub struct MoeDispatchTask {
    /// Expert counts to measure.
    pub experts: Vec<usize>,
    /// Experts per token.
    pub top_k: usize,
    /// Timed repetitions (after one warm-up).
    pub repeats: usize,
}

/// Seconds per forward of one MoE layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MoeDispatchResult {
    /// Backend name.
    pub backend: String,
    /// Number of experts.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Median seconds, sparse (grouped gather / compute / scatter-add).
    pub sparse_s: f64,
    /// Median seconds, dense (every expert on every token).
    pub dense_s: f64,
}

impl BackendTask for MoeDispatchTask {
    type Output = Vec<MoeDispatchResult>;

    fn run<B: Backend>(self, device: B::Device) -> Vec<MoeDispatchResult> {
        use cmoe_moe::moe_ffn::{FfnTargets, MoeLoraFfn};
        let (hidden, intermediate, rank) = (256, 688, 16);
        let text: cmoe_llava::config::TextConfig = serde_json::from_value(serde_json::json!({
            "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": 1,
            "num_attention_heads": 8, "vocab_size": 16
        }))
        .expect("valid text config");
        let base = text.init::<B>(false, &device).model.layers.remove(0).mlp;
        let x = Tensor::<B, 3>::random([8, 105, hidden], Distribution::Normal(0.0, 1.0), &device);
        self.experts
            .iter()
            .map(|&n| {
                let layer = MoeLoraFfn::<B>::new(
                    hidden,
                    intermediate,
                    n,
                    rank,
                    32.0,
                    0.0,
                    self.top_k,
                    FfnTargets::default(),
                    &device,
                );
                let sparse_s = time::<B>(&device, self.repeats, || {
                    let _ = layer.forward(&base, x.clone(), 0, None).0.into_data();
                });
                let dense_s = time::<B>(&device, self.repeats, || {
                    let _ = layer.forward_dense(&base, x.clone(), 0).into_data();
                });
                MoeDispatchResult {
                    backend: B::name(&device),
                    experts: n,
                    top_k: self.top_k,
                    sparse_s,
                    dense_s,
                }
            })
            .collect()
    }
}
