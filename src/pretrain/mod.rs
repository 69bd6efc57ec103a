//! Pretraining the small LLaVA shipped in `assets/`, LLaVA-1.5's recipe in small: a byte-level
//! BPE tokenizer trained on the synthetic corpus, then every weight trained from a seeded
//! initialisation in up to three stages:
//!
//! 0. **vision** (optional, what CLIP's own pretraining is to LLaVA): the vision tower and
//!    projector alone learn to predict the words of pictures' descriptions ([`vision`]);
//! 1. **captions** (LLaVA's feature alignment): descriptions of Mini-CoIN's kinds of images
//!    (`cmoe_coin::mini::captions`: shapes, colours, positions, counts, words, covers,
//!    degraded pictures);
//! 2. **instructions** (LLaVA's visual instruction tuning): questions about the same kinds of
//!    images in words of their own (`cmoe_coin::mini::instructions`: objects, colours, counts,
//!    positions, reading, boxes, yes/no, multiple choice), with a share of captions mixed in.
//!
//! None of the eight tasks' templates or answer formats is in any stage, and their samples
//! come from generator streams of their own (seeded from the pretraining seed, disjoint from
//! Mini-CoIN's). The result is written in the HF LLaVA layout with `pretrain.json` (settings,
//! time and loss curve of each stage).
//!
//! Pretraining checkpoints every `checkpoint_every` steps into `<out>/pretrain-checkpoint`
//! (weights, AdamW state, losses; swapped in atomically) and, with `resume`, continues from
//! there; each step draws its samples from a generator seeded by the stage and the step, so a
//! resumed pretraining ends bit-identical to an unbroken one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::record::{FullPrecisionSettings, NamedMpkFileRecorder, Recorder};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, ElementConversion, Tensor};
use cmoe_coin::format::{TrainRecord, Turn, write_json};
use cmoe_coin::mini::tasks::Sample;
use cmoe_coin::mini::{TASKS, captions, instructions, tasks};
use cmoe_data::bpe::train_bpe;
use cmoe_data::image::{CLIP_MEAN, CLIP_STD, ImageProcessorConfig};
use cmoe_data::prompt::{Conversation, VICUNA_SYSTEM};
use cmoe_data::tokenizer::{IMAGE_TOKEN, LlavaTokenizer};
use cmoe_llava::LlavaConfig;
use cmoe_llava::export::save_hf;
use cmoe_moe::train::causal_lm_loss;
use cmoe_moe::train::{OptimState, by_id, by_order, learning_rate};
use cmoe_store::{load_module, save_module};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::backend::BackendTask;
use crate::dataset::{CoinEncoder, collate_train, stack_pixels};
use crate::instruction_accuracy::{InstructionAccuracy, instruction_accuracy};
use crate::observer::{RunEvent, RunObserver};
use crate::plots::{Lines, lines};

pub mod vision;

use vision::{CaptionWords, word_targets};

/// What to pretrain and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PretrainConfig {
    /// The model's `config.json` (shapes, special ids).
    pub model_config: PathBuf,
    /// Output directory (HF layout).
    pub out: PathBuf,
    /// Seed of the initialisation, the corpus and the batches.
    pub seed: u64,
    /// Optimiser steps of stage 0, the vision tower alone ([`vision`]; 0: skipped, as in
    /// pretrainings before it existed).
    #[serde(default)]
    pub vision_steps: usize,
    /// Optimiser steps of stage 1 (captions).
    pub caption_steps: usize,
    /// Optimiser steps of stage 2 (instructions).
    pub instruction_steps: usize,
    /// Samples per step.
    pub batch: usize,
    /// Peak learning rate of stages 0 and 1 (AdamW, warmup 5 % then cosine).
    pub lr: f64,
    /// Peak learning rate of stage 2 (same schedule, a fresh AdamW state).
    pub instruction_lr: f64,
    /// Share of stage 2's samples that are stage 1's captions.
    pub caption_share: f64,
    /// Descriptions drawn to train the tokenizer on (with as many instructions and Mini-CoIN's
    /// questions).
    pub tokenizer_corpus: usize,
    /// Checkpoint every this many steps (0: never).
    pub checkpoint_every: usize,
}

/// One stage's record in `pretrain.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageReport {
    /// `vision`, `captions` or `instructions`.
    pub name: String,
    /// Optimiser steps.
    pub steps: usize,
    /// Mean loss over the first and the last 10 % of steps.
    pub first_loss: f64,
    /// See `first_loss`.
    pub last_loss: f64,
    /// Wall time of its training loop (a resumed stage: the sum of its runs).
    pub seconds: f64,
    /// Mean loss of each window of [`CURVE_WINDOW`] steps.
    pub loss_curve: Vec<f64>,
}

/// Steps per point of a stage's loss curve.
pub const CURVE_WINDOW: usize = 25;

/// What a pretraining run reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PretrainReport {
    /// The settings.
    pub config: PretrainConfig,
    /// Each stage, in order.
    pub stages: Vec<StageReport>,
    /// Wall time of the stages' training loops.
    pub train_seconds: f64,
    /// Parameters.
    pub parameters: usize,
    /// The pretrained base's accuracy on held-out questions of each kind of stage 2 (absent
    /// when not measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_out: Option<InstructionAccuracy>,
}

/// Pretrains on the backend it is run on (with autodiff); `resume` continues the checkpoint
/// in `<out>/pretrain-checkpoint`.
pub struct PretrainTask {
    /// The settings.
    pub config: PretrainConfig,
    /// Continue from the checkpoint (an error when there is none).
    pub resume: bool,
    /// Stop with an error after this many steps of all stages, as if killed there (to
    /// exercise `resume`).
    pub stop_after_steps: Option<usize>,
    /// Held-out questions per kind of stage 2 answered by the result (0: none; see
    /// [`crate::instruction_accuracy`]).
    pub held_out_per_kind: usize,
    /// Receives the pretraining's progress ([`crate::observer::Silent`] ignores it).
    pub observer: Arc<dyn RunObserver>,
}

impl BackendTask for PretrainTask {
    type Output = anyhow::Result<PretrainReport>;

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<PretrainReport> {
        let observer = &*self.observer;
        pretrain::<B>(
            self.config,
            (self.resume, self.stop_after_steps),
            self.held_out_per_kind,
            observer,
            &device,
        )
    }
}

/// What a stage trains on.
#[derive(Debug, Clone, Copy)]
enum Objective {
    /// The tower and projector predict descriptions' words ([`vision`]).
    CaptionWords,
    /// Next-token loss on conversations, `caption_share` of them descriptions and the rest
    /// instructions.
    Language { caption_share: f64 },
}

/// One stage of pretraining.
#[derive(Debug, Clone, Copy)]
struct Stage {
    name: &'static str,
    steps: usize,
    peak_lr: f64,
    objective: Objective,
    /// Which generator stream its steps draw from ([`step_rng`]).
    stream: usize,
}

/// Stages per pretraining.
const STAGES: usize = 3;

/// The stages in order: the vision tower alone (skipped at 0 steps), captions, instructions.
fn stages(config: &PretrainConfig) -> [Stage; STAGES] {
    [
        Stage {
            name: "vision",
            steps: config.vision_steps,
            peak_lr: config.lr,
            objective: Objective::CaptionWords,
            stream: 2,
        },
        Stage {
            name: "captions",
            steps: config.caption_steps,
            peak_lr: config.lr,
            objective: Objective::Language { caption_share: 1.0 },
            stream: 0,
        },
        Stage {
            name: "instructions",
            steps: config.instruction_steps,
            peak_lr: config.instruction_lr,
            objective: Objective::Language {
                caption_share: config.caption_share,
            },
            stream: 1,
        },
    ]
}

/// What every stage's training loop shares: where it checkpoints, its seed, and where it
/// reports.
struct StageRun<'a, B: Backend> {
    checkpoint_dir: &'a Path,
    seed: u64,
    checkpoint_every: usize,
    stop_after_steps: Option<usize>,
    observer: &'a dyn RunObserver,
    device: &'a B::Device,
}

impl<B: Backend> StageRun<'_, B> {
    /// Trains `module` through the steps of `stage` that `state` has not done (from the
    /// checkpoint's weights and AdamW state when it stopped inside this stage), each step on the
    /// loss `loss` computes from that step's generator; checkpoints on the way.
    fn train<M: AutodiffModule<Autodiff<B>>>(
        &self,
        mut module: M,
        stage: &Stage,
        stage_start: usize,
        state: &mut CheckpointState,
        loss: impl Fn(&M, &mut StdRng, usize) -> anyhow::Result<Tensor<Autodiff<B>, 1>>,
    ) -> anyhow::Result<M> {
        let index = state.stage;
        let mut optim = AdamWConfig::new()
            .with_weight_decay(0.0)
            .with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(1.0)))
            .init();
        if state.step > 0 {
            load_module(
                &mut module,
                &self.checkpoint_dir.join("model.safetensors"),
                DType::F32,
            )?;
            let path = self.checkpoint_dir.join("optimizer");
            let record: OptimState<Autodiff<B>> = recorder()
                .load(path.clone(), self.device)
                .with_context(|| format!("cannot read {}.mpk", path.display()))?;
            optim = optim.load_record(by_id(record, &module));
        }
        self.observer.event(RunEvent::Started {
            name: &format!("pretrain {}", stage.name),
            len: stage.steps as u64,
            done: state.step as u64,
        });
        let mut start = std::time::Instant::now();
        while state.step < stage.steps {
            let step = state.step;
            let mut rng = step_rng(self.seed, stage.stream, step);
            let loss = loss(&module, &mut rng, step)?;
            let value: f64 = loss.clone().into_scalar().elem();
            if !value.is_finite() {
                anyhow::bail!(
                    "pretraining diverged: loss {value} at step {step} of {}",
                    stage.name
                );
            }
            state.losses[index].push(value);
            let lr = learning_rate(step, stage.steps, stage.peak_lr, 0.05);
            let grads = GradientsParams::from_grads(loss.backward(), &module);
            module = optim.step(lr, module, grads);
            state.step += 1;
            self.observer.event(RunEvent::Advanced {
                steps: 1,
                status: Some(&format!("loss {value:.3}")),
            });
            let every = self.checkpoint_every;
            if every > 0 && state.step % every == 0 && state.step < stage.steps {
                state.seconds[index] += start.elapsed().as_secs_f64();
                start = std::time::Instant::now();
                save_checkpoint(
                    self.checkpoint_dir,
                    state,
                    &module,
                    by_order(optim.to_record(), &module),
                )?;
            }
            if self.stop_after_steps == Some(stage_start + state.step) {
                anyhow::bail!(
                    "stopped after step {} as asked; continue with --resume",
                    stage_start + state.step
                );
            }
        }
        self.observer.event(RunEvent::Finished);
        state.seconds[index] += start.elapsed().as_secs_f64();
        Ok(module)
    }
}

/// Where a pretraining checkpoint stands (`state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    format: String,
    config: PretrainConfig,
    /// The stage in flight (an index into [`stages`]) and the steps it has done; at a stage
    /// boundary (step 0) `model.safetensors` holds the LLaVA, inside a stage the module it
    /// trains.
    stage: usize,
    step: usize,
    /// Every step's loss, per stage so far.
    losses: Vec<Vec<f64>>,
    /// Wall time per stage so far.
    seconds: Vec<f64>,
}

const CHECKPOINT_FORMAT: &str = "llava-cmoe/pretrain-checkpoint/2";

fn recorder() -> NamedMpkFileRecorder<FullPrecisionSettings> {
    NamedMpkFileRecorder::new()
}

/// Pretrains (or resumes) the small LLaVA: checks, the tokenizer and model, then the stages
/// step by step with checkpoints, then the weights, the held-out accuracy and the report.
/// (One function on purpose: the resume logic reads top to bottom beside the loop it resumes.)
fn pretrain<B: Backend>(
    config: PretrainConfig,
    (resume, stop_after_steps): (bool, Option<usize>),
    held_out_per_kind: usize,
    observer: &dyn RunObserver,
    device: &B::Device,
) -> anyhow::Result<PretrainReport> {
    anyhow::ensure!(config.batch > 0, "--batch must be at least 1");
    anyhow::ensure!(
        config.lr > 0.0 && config.instruction_lr > 0.0,
        "learning rates must be positive (got {} and {})",
        config.lr,
        config.instruction_lr
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&config.caption_share),
        "--caption-share must lie in [0, 1] (got {})",
        config.caption_share
    );
    let model_config = LlavaConfig::from_file(&config.model_config)?;
    let image_size = model_config.vision_config.image_size as u32;
    std::fs::create_dir_all(&config.out)
        .with_context(|| format!("cannot create {}", config.out.display()))?;
    let checkpoint_dir = config.out.join("pretrain-checkpoint");
    let checkpoint = find_checkpoint(&checkpoint_dir)?;
    let mut state = match (checkpoint, resume) {
        (Some((_, state)), true) => {
            anyhow::ensure!(
                state.config == config,
                "{} was written with other settings ({:?}) than this run's ({:?})",
                checkpoint_dir.join("state.json").display(),
                state.config,
                config
            );
            state
        }
        (Some(_), false) => anyhow::bail!(
            "{} holds a pretraining in progress: pass --resume to continue it, or delete the \
             folder to start over",
            checkpoint_dir.display()
        ),
        (None, true) => anyhow::bail!(
            "--resume: {} holds no pretraining checkpoint",
            checkpoint_dir.display()
        ),
        (None, false) => CheckpointState {
            format: CHECKPOINT_FORMAT.into(),
            config: config.clone(),
            stage: 0,
            step: 0,
            losses: vec![Vec::new(); STAGES],
            seconds: vec![0.0; STAGES],
        },
    };

    // 1. The tokenizer: the chat template, descriptions, instructions and Mini-CoIN's tasks
    //    (deterministic, so a resumed run writes the same file).
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

    // 2. Every weight trains, stage by stage, on fresh samples.
    type AD<B> = Autodiff<B>;
    AD::<B>::seed(device, config.seed);
    let mut model = model_config.init::<AD<B>>(device);
    let parameters = model.num_params();
    if state.step == 0 && state.stage > 0 {
        // A checkpoint at a stage boundary holds the LLaVA itself.
        load_module(
            &mut model,
            &checkpoint_dir.join("model.safetensors"),
            DType::F32,
        )?;
    }
    let run = StageRun {
        checkpoint_dir: &checkpoint_dir,
        seed: config.seed,
        checkpoint_every: config.checkpoint_every,
        stop_after_steps,
        observer,
        device,
    };
    let vocab = model_config.text_config.vocab_size;
    let mut steps_before = 0;
    for (index, stage) in stages(&config).into_iter().enumerate() {
        let stage_start = steps_before;
        steps_before += stage.steps;
        if index < state.stage || stage.steps == 0 {
            continue;
        }
        state.stage = index;
        model = match stage.objective {
            Objective::CaptionWords => {
                let hidden = model_config.text_config.hidden_size;
                let words = CaptionWords::new(model, hidden, vocab, device);
                let trained = run.train(words, &stage, stage_start, &mut state, |m, rng, _| {
                    let samples: Vec<Sample> = (0..config.batch)
                        .map(|_| captions::sample(rng, image_size))
                        .collect();
                    let pixels: Vec<_> = samples
                        .iter()
                        .map(|s| encoder.processor.preprocess(&s.image))
                        .collect();
                    let descriptions: Vec<&str> =
                        samples.iter().map(|s| s.answer.as_str()).collect();
                    let targets = word_targets(&encoder.tokenizer, &descriptions, vocab, device)?;
                    Ok(m.loss(stack_pixels(pixels.iter(), device), targets))
                })?;
                trained.llava
            }
            Objective::Language { caption_share } => {
                run.train(model, &stage, stage_start, &mut state, |m, rng, step| {
                    let samples = (0..config.batch)
                        .map(|i| {
                            let s = if rng.random_bool(caption_share) {
                                captions::sample(rng, image_size)
                            } else {
                                instructions::sample(rng, image_size)
                            };
                            let id = format!("{}-{step}-{i}", stage.name);
                            let record = conversation(id, &s.question, &s.answer);
                            encoder.encode_conversation(
                                &record,
                                encoder.processor.preprocess(&s.image),
                            )
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    let batch = collate_train::<AD<B>>(&samples, pad, device);
                    let logits = m.forward(batch.input.into())?;
                    causal_lm_loss(logits, batch.labels).context("a batch without labels")
                })?
            }
        };
        if index + 1 < STAGES {
            // The stage boundary: the next stage starts from these weights with a fresh AdamW.
            state.stage = index + 1;
            state.step = 0;
            if config.checkpoint_every > 0 {
                save_checkpoint(&checkpoint_dir, &state, &model, Default::default())?;
            }
        }
    }

    // 3. HF layout, half precision (what the repository ships), and what the result can do.
    save_hf(&model.valid(), &model_config, &config.out, DType::F16)?;
    let held_out = match held_out_per_kind {
        0 => None,
        n => {
            // The weights as shipped (rounded to f16), as a continual run loads them.
            let (_, shipped) = cmoe_llava::load_llava::<B>(&config.out, DType::F32, device)?;
            let (accuracy, _) = instruction_accuracy(
                &shipped,
                &encoder,
                &model_config,
                (config.seed, n),
                device,
                observer,
            )?;
            Some(accuracy)
        }
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let reports: Vec<StageReport> = stages(&config)
        .into_iter()
        .zip(&state.losses)
        .zip(&state.seconds)
        .filter(|((stage, _), _)| stage.steps > 0 || stage.name != "vision")
        .map(|((stage, losses), &seconds)| {
            let tenth = (losses.len() / 10).max(1).min(losses.len());
            StageReport {
                name: stage.name.into(),
                steps: stage.steps,
                first_loss: mean(&losses[..tenth]),
                last_loss: mean(&losses[losses.len() - tenth..]),
                seconds,
                loss_curve: losses.chunks(CURVE_WINDOW).map(mean).collect(),
            }
        })
        .collect();
    let report = PretrainReport {
        train_seconds: reports.iter().map(|s| s.seconds).sum(),
        stages: reports,
        parameters,
        config,
        held_out,
    };
    write_json(&report.config.out.join("pretrain.json"), &report)?;
    loss_figure(&report, &report.config.out.join("pretrain_loss.png"))?;
    for dir in [
        checkpoint_dir.clone(),
        checkpoint_dir.with_extension("old"),
        checkpoint_dir.with_extension("next"),
    ] {
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("cannot remove {}", dir.display()))?;
        }
    }
    Ok(report)
}

/// The loss figure of a pretraining (`pretrain_loss.png` beside its `pretrain.json`): each
/// stage's loss curve over the steps of all.
pub fn loss_figure(report: &PretrainReport, path: &Path) -> anyhow::Result<()> {
    let mut offset = 0.0;
    let series: Vec<(String, Vec<(f64, f64)>)> = report
        .stages
        .iter()
        .map(|stage| {
            let points = stage
                .loss_curve
                .iter()
                .enumerate()
                .map(|(i, &loss)| (offset + ((i as f64 + 0.5) * CURVE_WINDOW as f64), loss))
                .collect();
            offset += stage.steps as f64;
            (format!("stage: {}", stage.name), points)
        })
        .collect();
    lines(
        path,
        &Lines {
            title: &format!(
                "Pretraining the small LLaVA ({:.0} min, batch {})",
                report.train_seconds / 60.0,
                report.config.batch
            ),
            x_label: "optimiser step",
            y_label: &format!("training loss (mean of {CURVE_WINDOW} steps)"),
            series: &series,
        },
    )
}

/// The generator of one step's samples: seeded by the run's seed, the stage's stream and the
/// step, so a resumed stage draws what an unbroken one would.
fn step_rng(seed: u64, stream: usize, step: usize) -> StdRng {
    let salt = ((stream as u64 + 1) << 40) ^ (step as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    StdRng::seed_from_u64(seed ^ 0xCAB ^ salt)
}

/// The checkpoint in `dir` (or in `<dir>.old` after a crash in the middle of a swap).
fn find_checkpoint(dir: &Path) -> anyhow::Result<Option<(PathBuf, CheckpointState)>> {
    let Some(dir) = [dir.to_path_buf(), dir.with_extension("old")]
        .into_iter()
        .find(|d| d.join("state.json").is_file())
    else {
        return Ok(None);
    };
    let path = dir.join("state.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let state: CheckpointState =
        serde_json::from_str(&text).with_context(|| format!("{} is malformed", path.display()))?;
    anyhow::ensure!(
        state.format == CHECKPOINT_FORMAT,
        "{}: format {:?} is not {CHECKPOINT_FORMAT}",
        path.display(),
        state.format
    );
    Ok(Some((dir, state)))
}

/// Writes the checkpoint into `<dir>.next`, then swaps it in for `dir` (a crash at any point
/// leaves one whole checkpoint, in `dir` or `<dir>.old`).
fn save_checkpoint<B: burn::tensor::backend::AutodiffBackend, M: Module<B>>(
    dir: &Path,
    state: &CheckpointState,
    module: &M,
    optim: OptimState<B>,
) -> anyhow::Result<()> {
    let next = dir.with_extension("next");
    let old = dir.with_extension("old");
    let _ = std::fs::remove_dir_all(&next);
    std::fs::create_dir_all(&next).with_context(|| format!("cannot create {}", next.display()))?;
    save_module(module, &next.join("model.safetensors"))?;
    let path = next.join("optimizer");
    recorder()
        .record(optim, path.clone())
        .with_context(|| format!("cannot write {}.mpk", path.display()))?;
    write_json(&next.join("state.json"), state)?;
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&old);
        std::fs::rename(dir, &old).with_context(|| format!("cannot move {}", dir.display()))?;
    }
    std::fs::rename(&next, dir).with_context(|| format!("cannot move {}", next.display()))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
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

/// The tokenizer's training text: whole conversations of descriptions, instructions and
/// Mini-CoIN's tasks (the tokenizer may know the tasks' words; the model is not trained on
/// their questions here).
fn tokenizer_corpus(
    seed: u64,
    descriptions: usize,
    size: u32,
) -> impl Iterator<Item = String> + Send {
    let template = Conversation::vicuna_v1();
    let mut rng = StdRng::seed_from_u64(seed ^ 0x70C);
    let render = |s: Sample| {
        template
            .render(&[(format!("{IMAGE_TOKEN}\n{}", s.question), s.answer)])
            .0
    };
    let mut texts = Vec::with_capacity(2 * descriptions + 8 * 200);
    for _ in 0..descriptions {
        texts.push(render(captions::sample(&mut rng, size)));
        texts.push(render(instructions::sample(&mut rng, size)));
    }
    for (_, task) in TASKS {
        for _ in 0..200 {
            texts.push(render(tasks::sample(task, &mut rng, size)));
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
