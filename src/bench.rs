//! Throughput of the LLaVA model on synthetic batches: forward, forward + backward (cross-entropy
//! on every position, all parameters trainable) and KV-cached greedy generation. The shapes are
//! HF `config.json` files under `configs/bench/`; `scripts/bench_torch.py` measures the same
//! shapes in PyTorch so that `cargo xtask bench` can report ratios.

use std::path::Path;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::Module;
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
    /// Tokens per second of LLaVA-CMoE's training step for a task after the first
    /// ([`ContinualResult::cmoe_step_s`]), when the continual cases ran.
    #[serde(default)]
    pub cmoe_step_tok_s: Option<f64>,
    /// Tokens per second of plain LoRA's training step.
    #[serde(default)]
    pub lora_step_tok_s: Option<f64>,
    /// New tokens per second of one task's evaluation through PTL.
    #[serde(default)]
    pub eval_tok_s: Option<f64>,
    /// The continual cases' raw figures.
    #[serde(default)]
    pub continual: Option<ContinualResult>,
    /// The process's peak resident memory after all cases, MB (Linux; `None` elsewhere).
    #[serde(default)]
    pub peak_rss_mb: Option<f64>,
}

/// The process's peak resident set size so far, MB (`VmHWM` in `/proc/self/status`).
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

impl BenchResult {
    /// These results with the continual cases' added.
    pub fn with_continual(self, c: ContinualResult) -> Self {
        Self {
            cmoe_step_tok_s: Some(c.step_tokens as f64 / c.cmoe_step_s),
            lora_step_tok_s: Some(c.step_tokens as f64 / c.lora_step_s),
            eval_tok_s: Some((c.eval_questions * c.eval_new_tokens) as f64 / c.eval_s),
            continual: Some(c),
            peak_rss_mb: peak_rss_mb(),
            ..self
        }
    }
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
            cmoe_step_tok_s: None,
            lora_step_tok_s: None,
            eval_tok_s: None,
            continual: None,
            peak_rss_mb: peak_rss_mb(),
        })
    }
}

/// Dispatch cost of one MoE-LoRA FFN layer at the mini shapes (hidden 256, MLP 688, LoRA r16,
/// dropout 0.05, 8 x 105 tokens): the grouped and the masked dispatch, for several expert
/// counts, forward alone and forward + backward.
pub struct MoeDispatchTask {
    /// Expert counts to measure.
    pub experts: Vec<usize>,
    /// Experts per token.
    pub top_k: usize,
    /// Timed repetitions (after one warm-up).
    pub repeats: usize,
}

/// Seconds per forward, and per forward + backward, of one MoE layer in each dispatch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MoeDispatchResult {
    /// Backend name.
    pub backend: String,
    /// Number of experts.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// Median seconds of a forward, grouped dispatch (gather / compute / scatter-add).
    pub grouped_s: f64,
    /// Median seconds of a forward, masked dispatch (every expert on every token, two
    /// products per projection, nothing read back).
    pub masked_s: f64,
    /// Median seconds of a forward and backward (every expert trainable), grouped.
    pub grouped_train_s: f64,
    /// Median seconds of a forward and backward (every expert trainable), masked.
    pub masked_train_s: f64,
}

impl BackendTask for MoeDispatchTask {
    type Output = Vec<MoeDispatchResult>;

    fn run<B: Backend>(self, device: B::Device) -> Vec<MoeDispatchResult> {
        use cmoe_moe::{Dispatch, MoeLoraFfnConfig};
        let (hidden, intermediate, rank) = (256, 688, 16);
        let text: cmoe_llava::config::TextConfig = serde_json::from_value(serde_json::json!({
            "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": 1,
            "num_attention_heads": 8, "vocab_size": 16
        }))
        .expect("valid text config");
        let base = text.init::<B>(false, &device).model.layers.remove(0).mlp;
        let trained = text
            .init::<Autodiff<B>>(false, &device)
            .model
            .layers
            .remove(0)
            .mlp
            .no_grad();
        let x = Tensor::<B, 3>::random([8, 105, hidden], Distribution::Normal(0.0, 1.0), &device);
        let x_trained = Tensor::<Autodiff<B>, 3>::from_inner(x.clone());
        self.experts
            .iter()
            .map(|&n| {
                let config = MoeLoraFfnConfig::new(hidden, intermediate)
                    .with_experts(n)
                    .with_rank(rank)
                    .with_alpha(32.0)
                    .with_dropout(0.05)
                    .with_top_k(self.top_k);
                let mut layer = config.init::<B>(&device);
                let mut layer_trained = config.init::<Autodiff<B>>(&device);
                let mut forward = |dispatch| {
                    layer.dispatch = dispatch;
                    time::<B>(&device, self.repeats, || {
                        let _ = layer.forward(&base, x.clone(), 0, None).0.into_data();
                    })
                };
                let (grouped_s, masked_s) = (forward(Dispatch::Grouped), forward(Dispatch::Masked));
                let mut train = |dispatch| {
                    layer_trained.dispatch = dispatch;
                    time::<B>(&device, self.repeats, || {
                        let (out, routing) =
                            layer_trained.forward(&trained, x_trained.clone(), 0, None);
                        let grads = (out.sum() + routing.aux_loss).backward();
                        let a = &layer_trained.experts[0]
                            .gate
                            .as_ref()
                            .expect("gate expert")
                            .lora_a;
                        let _ = a.grad(&grads).map(|g| g.into_data());
                    })
                };
                let (grouped_train_s, masked_train_s) =
                    (train(Dispatch::Grouped), train(Dispatch::Masked));
                MoeDispatchResult {
                    backend: B::name(&device),
                    experts: n,
                    top_k: self.top_k,
                    grouped_s,
                    masked_s,
                    grouped_train_s,
                    masked_train_s,
                }
            })
            .collect()
    }
}

/// The continual-learning work a `cargo xtask train` run waits for, at the runner's default
/// settings (4 initial experts, top-2, LoRA r16 / alpha 32 on gate, up and down, dropout 0.05;
/// VAE 128 / 16 with 8 draws; AdamW): seconds per training step of LLaVA-CMoE for a task after
/// the first, of plain LoRA, and of one task's evaluation through PTL.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContinualResult {
    /// Mean seconds per step of a two-epoch CMoE stage (the first epoch runs the frozen
    /// base's PTL feature pass, the second reads the features from memory), median over
    /// repeats.
    pub cmoe_step_s: f64,
    /// Mean seconds per step of plain LoRA (one expert, top-1, no VAE), median over repeats.
    pub lora_step_s: f64,
    /// Seconds to answer one task's test set: PTL over 8 tasks' VAEs, then one greedy
    /// generation per chosen router, in batches.
    pub eval_s: f64,
    /// Test questions of the evaluation.
    pub eval_questions: usize,
    /// New tokens per question.
    pub eval_new_tokens: usize,
    /// Tokens per training batch (batch x sequence).
    pub step_tokens: usize,
}

/// Whose expert and VAE sizes the continual cases use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ContinualSettings {
    /// The Mini-CoIN preset: LoRA r16 / alpha 32, 4 initial experts, VAE 128 / 16.
    Mini,
    /// The paper's (configs/llava-1.5-7b-coin.toml): r64 / alpha 128, 8 initial experts,
    /// VAE 512 / 64.
    Paper,
}

impl ContinualSettings {
    /// The expert settings, with `initial_experts` / `top_k` overridden for plain LoRA.
    fn moe(self, lora: bool) -> cmoe_moe::model::MoeConfig {
        let (rank, alpha, experts) = match self {
            Self::Mini => (16, 32.0, 4),
            Self::Paper => (64, 128.0, 8),
        };
        cmoe_moe::model::MoeConfig {
            rank,
            alpha,
            dropout: 0.05,
            top_k: if lora { 1 } else { 2 },
            initial_experts: if lora { 1 } else { experts },
            ..Default::default()
        }
    }

    /// The locator's settings.
    fn ptl(self) -> cmoe_moe::ptl::PtlConfig {
        let (hidden, latent) = match self {
            Self::Mini => (128, 16),
            Self::Paper => (512, 64),
        };
        cmoe_moe::ptl::PtlConfig {
            hidden,
            latent,
            n_rep: 8,
            bank_instances: 200,
            lr: Some(1e-3),
            fit_epochs: 0,
            ..Default::default()
        }
    }
}

/// Synthetic training batches of `case`'s shape: bos, the image tokens, text, and the last
/// `answer` text tokens labelled.
fn train_batches<B: Backend>(
    config: &LlavaConfig,
    case: &BenchCase,
    count: usize,
    device: &B::Device,
) -> Vec<cmoe_moe::train::TrainBatch<B>> {
    const ANSWER: usize = 6;
    (0..count)
        .map(|b| {
            let mut input = synthetic_input::<B>(config, case, device);
            let [rows, seq] = input.input_ids.dims();
            let ids: Vec<i64> = input.input_ids.to_data().iter::<i64>().collect();
            // Each batch its own text: shift the text ids.
            let text_range = config
                .text_config
                .vocab_size
                .min(config.image_token_index as usize);
            let image = config.image_token_index as i64;
            let ids: Vec<i64> = ids
                .iter()
                .map(|&id| match id {
                    1 => 1,
                    id if id == image => id,
                    id => 3 + (id + 31 * b as i64) % (text_range as i64 - 3),
                })
                .collect();
            let labels: Vec<i64> = ids
                .iter()
                .enumerate()
                .map(|(i, &id)| if i % seq >= seq - ANSWER { id } else { -100 })
                .collect();
            input.input_ids = Tensor::from_data(TensorData::new(ids, [rows, seq]), device);
            input.attention_mask = Some(Tensor::ones([rows, seq], device));
            cmoe_moe::train::TrainBatch::from_host(input.into(), labels, [rows, seq], device)
        })
        .collect()
}

/// Mean seconds per step of a stage of `steps` steps from `model` over `batches`, each step
/// one micro-batch per device of `devices` (replicas in threads of their own).
fn stage_step_seconds<AD: burn::tensor::backend::AutodiffBackend>(
    model: cmoe_moe::LlavaCmoe<AD>,
    vae: Option<cmoe_moe::ptl::VaeFit<AD>>,
    task: usize,
    batches: &[cmoe_moe::train::TrainBatch<AD>],
    steps: usize,
    devices: &[AD::Device],
) -> anyhow::Result<f64> {
    use cmoe_moe::train::{StageConfig, StageControl, train_stage_with};
    let config = StageConfig {
        lr: 1e-3,
        router_lr_scale: 1.0,
        warmup_ratio: 0.03,
        steps,
        accumulation: devices.len(),
        weight_decay: 0.0,
        loss: Default::default(),
        seed: Some(0),
    };
    let mut source = cmoe_moe::train::Cycle::new(batches);
    let start = Instant::now();
    let (model, _) = train_stage_with(
        model,
        vae,
        task,
        &mut source,
        &config,
        StageControl::on(devices),
        |_, _| {},
    )?;
    // The last step's update has been computed once its parameters are read.
    let _ = model.moe[0].routers.get(task).weight.val().into_data();
    Ok(start.elapsed().as_secs_f64() / steps as f64)
}

/// Runs the continual cases on the chosen backend.
pub struct ContinualBenchTask {
    /// The shape.
    pub case: BenchCase,
    /// Timed repetitions (after one warm-up).
    pub repeats: usize,
    /// Test questions of the evaluation case.
    pub eval_questions: usize,
    /// Questions per generation batch.
    pub eval_batch: usize,
    /// Expert and VAE sizes.
    pub settings: ContinualSettings,
    /// Replicas of the model training side by side (each step's samples dealt over them), as
    /// the runner uses on this backend.
    pub replicas: usize,
    /// The frozen base's dtype (experts, routers and VAE in f32).
    pub base_dtype: crate::pipeline::Precision,
}

impl BackendTask for ContinualBenchTask {
    type Output = anyhow::Result<ContinualResult>;

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<ContinualResult> {
        use cmoe_moe::LlavaCmoe;
        use cmoe_moe::pgke::{ExpansionPlan, NewRouterColumns, expand};
        use cmoe_moe::ptl::VaeFit;
        use cmoe_moe::train::set_trainable;
        type AD<B> = Autodiff<B>;
        let case = &self.case;
        let config = LlavaConfig::from_file(Path::new(&case.config))?;
        B::seed(&device, 0);
        let layers = config.text_config.num_hidden_layers;
        let hidden = config.text_config.hidden_size;
        let seq = 1 + config.image_tokens_per_image() + case.text_tokens;
        // Two epochs over 4 steps, each step's samples dealt over the replicas as the runner
        // deals them: `replicas` micro-batches of `batch / replicas` samples.
        let replicas = self.replicas.clamp(1, case.batch);
        let micro_case = BenchCase {
            batch: case.batch / replicas,
            ..case.clone()
        };
        let batches = train_batches::<AD<B>>(&config, &micro_case, 4 * replicas, &device);
        let steps = 2 * 4;
        let devices = vec![device.clone(); replicas];

        // (a) LLaVA-CMoE, a task after the first: task 1's new expert in every layer and its
        // router train with the VAE; the initial experts and router 0 are frozen.
        let moe = self.settings.moe(false);
        let initial = moe.initial_experts;
        let dtype = self.base_dtype.dtype();
        let base = || crate::pipeline::cast_floats(config.init::<AD<B>>(&device), dtype);
        let cmoe_model = || -> anyhow::Result<LlavaCmoe<AD<B>>> {
            let mut model = LlavaCmoe::new(base(), &moe, &device);
            model.set_dispatch(crate::backend::dispatch_for::<B>());
            let plan = ExpansionPlan::every_layer(1, layers, 1, 0);
            let model = expand(
                model,
                1,
                &vec![initial; layers],
                &plan,
                NewRouterColumns::Random,
            )?;
            Ok(set_trainable(model, 1, &vec![initial..initial + 1; layers]))
        };
        let vae = || Some(VaeFit::new(self.settings.ptl(), hidden, &device));
        let warm_up = &batches[..replicas];
        stage_step_seconds(cmoe_model()?, vae(), 1, warm_up, 1, &devices)?;
        let cmoe_step_s = median(
            (0..self.repeats)
                .map(|_| stage_step_seconds(cmoe_model()?, vae(), 1, &batches, steps, &devices))
                .collect::<anyhow::Result<_>>()?,
        );

        // (b) Plain LoRA: one expert, top-1, CE (+ the constant aux).
        let lora_model = || {
            let lora = self.settings.moe(true);
            let mut model = LlavaCmoe::new(base(), &lora, &device);
            model.set_dispatch(crate::backend::dispatch_for::<B>());
            set_trainable(model, 0, &vec![0..1; layers])
        };
        stage_step_seconds(lora_model(), None, 0, warm_up, 1, &devices)?;
        let lora_step_s = median(
            (0..self.repeats)
                .map(|_| stage_step_seconds(lora_model(), None, 0, &batches, steps, &devices))
                .collect::<anyhow::Result<_>>()?,
        );

        // (c) One task's evaluation after 8 tasks: every batch located by PTL over 8 VAEs,
        // then one generation per router chosen (as the runner does it).
        let eval_s = self.evaluation::<B>(&config, &device)?;

        Ok(ContinualResult {
            cmoe_step_s,
            lora_step_s,
            eval_s,
            eval_questions: self.eval_questions,
            eval_new_tokens: case.new_tokens,
            step_tokens: micro_case.batch * replicas * seq,
        })
    }
}

impl ContinualBenchTask {
    /// Seconds to evaluate `eval_questions` prompts with 8 tasks learned (median of repeats,
    /// after a warm-up batch).
    fn evaluation<B: Backend>(
        &self,
        config: &LlavaConfig,
        device: &B::Device,
    ) -> anyhow::Result<f64> {
        use cmoe_moe::LlavaCmoe;
        use cmoe_moe::pgke::{ExpansionPlan, NewRouterColumns, expand};
        use cmoe_moe::ptl::{BankEntry, PrimitiveBank};
        use cmoe_moe::state::ContinualMeta;
        const TASKS: usize = 8;
        let case = &self.case;
        let layers = config.text_config.num_hidden_layers;
        let hidden = config.text_config.hidden_size;
        let moe = self.settings.moe(false);
        let base = crate::pipeline::cast_floats(config.init::<B>(device), self.base_dtype.dtype());
        let mut model = LlavaCmoe::new(base, &moe, device);
        model.set_dispatch(crate::backend::dispatch_for::<B>());
        for task in 1..TASKS {
            let before = model.experts_per_layer();
            model = expand(
                model,
                task,
                &before,
                &ExpansionPlan::every_layer(task, layers, 1, 0),
                NewRouterColumns::Random,
            )?;
        }
        let ptl = self.settings.ptl();
        let vaes: Vec<_> = (0..TASKS)
            .map(|_| ptl.init_vae::<B>(hidden, device))
            .collect();
        let meta = ContinualMeta {
            config: moe,
            ptl,
            bank: PrimitiveBank {
                entries: vec![
                    BankEntry {
                        mean: 0.0,
                        std: 1.0,
                        count: 1,
                    };
                    TASKS
                ],
            },
            plans: Vec::new(),
            first_expert: Vec::new(),
        };
        let locator = meta.ptl.locator().init(&vaes, meta.bank.clone(), device);
        let per_image = config.image_tokens_per_image();
        let image = config.image_token_index;
        let text_range = config.text_config.vocab_size.min(image as usize) as u32 - 3;
        let size = config.vision_config.image_size;
        let prompts: Vec<crate::dataset::Encoded> = (0..self.eval_questions)
            .map(|q| {
                let mut ids = vec![1u32];
                ids.extend(std::iter::repeat_n(image, per_image));
                // Questions of varying length (left padding, as in a real test set).
                let len = case.text_tokens - (q % 5);
                ids.extend((0..len).map(|t| 3 + ((q * 7919 + t * 104_729) as u32 % text_range)));
                crate::dataset::Encoded {
                    input_ids: ids,
                    labels: Vec::new(),
                    pixels: cmoe_data::image::PixelValues {
                        data: (0..3 * size * size)
                            .map(|i| ((i * 31 + q * 17) % 255) as f32 / 127.0 - 1.0)
                            .collect(),
                        height: size,
                        width: size,
                    },
                }
            })
            .collect();
        let generation = GenerationConfig {
            max_new_tokens: case.new_tokens,
            eos_token_ids: Vec::new(),
            pad_token_id: 0,
            sampling: Sampling::Greedy,
        };
        let pad = 0;
        // Random VAEs locate arbitrarily; the routers used are fixed instead (the last task's
        // for 4 questions of 5, another for the fifth), so that both frameworks generate the
        // same groups. The locator's work is done all the same.
        let routers = |first: usize, n: usize| -> Vec<usize> {
            (first..first + n)
                .map(|q| {
                    if q % 5 == 0 {
                        q % (TASKS - 1)
                    } else {
                        TASKS - 1
                    }
                })
                .collect()
        };
        // Batches on worker threads, as the runner answers them.
        let answer = |prompts: &[crate::dataset::Encoded]| -> anyhow::Result<()> {
            let chunks: Vec<_> = prompts.chunks(self.eval_batch).collect();
            crate::continual::in_parallel(chunks.len(), |c| {
                let chunk = chunks[c];
                let input = crate::dataset::collate_prompts::<B>(chunk, pad, device);
                let located = model.locate(&locator, input.into())?;
                assert_eq!(located.tasks.len(), chunk.len());
                let chosen = routers(c * self.eval_batch, chunk.len());
                crate::continual::generate_grouped(&model, chunk, &chosen, pad, &generation, device)
            })?;
            Ok(())
        };
        answer(&prompts[..self.eval_batch.min(prompts.len())])?; // warm-up
        let times = (0..self.repeats.clamp(1, 2))
            .map(|_| {
                let start = Instant::now();
                answer(&prompts)?;
                Ok(start.elapsed().as_secs_f64())
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(median(times))
    }
}
