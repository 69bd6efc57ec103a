//! `cmoe`: inference and tools for LLaVA / LLaVA-CMoE models in HF layout.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use burn::tensor::backend::Backend;
use clap::{Parser, Subcommand};
use llava_cmoe::backend::{BackendKind, BackendTask, run_on};
use llava_cmoe::bench::{
    BenchCase, BenchTask, ContinualBenchTask, ContinualSettings, MoeDispatchTask,
};
use llava_cmoe::coin::format::write_jsonl;
use llava_cmoe::coin::mini::{self, MiniCoinConfig};
use llava_cmoe::coin::score::{Compat, TaskType, score_files};
use llava_cmoe::continual::{
    AskTask, EvalTask, ExpansionMode, InitChoice, Method, PlanChoice, Preset, RouterChoice,
    RunConfig, TaskOrder, TrainTask, rebuild_report, report_markdown,
};
use llava_cmoe::instruction_accuracy::EvalBaseTask;
use llava_cmoe::llava::Sampling;
use llava_cmoe::loader::BadSamples;
use llava_cmoe::memory_proxy::MemoryProxyTask;
use llava_cmoe::moe::layer::FfnTargets;
use llava_cmoe::moe::ptl::PtlFeature;
use llava_cmoe::parity::ParityTask;
use llava_cmoe::pipeline::{self, ImportTask, LlavaPipeline, Precision};
use llava_cmoe::pretrain::{PretrainConfig, PretrainTask};
use llava_cmoe::tensor_io::{self, HostTensor};

mod terminal;
use terminal::Terminal;

/// Counts the heap, for `cmoe memory-proxy` (two relaxed atomic operations per allocation).
#[global_allocator]
static ALLOCATOR: llava_cmoe::alloc_meter::AllocMeter = llava_cmoe::alloc_meter::AllocMeter;

#[derive(Parser)]
#[command(
    name = "cmoe",
    version,
    about = "LLaVA-CMoE on Burn: inference and tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Backend to run on (commands that run a model).
    #[arg(long, global = true, default_value = "flex")]
    backend: BackendKind,
    /// Print JSON instead of text (commands that report a result).
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Answer a prompt about an image.
    Generate(GenerateArgs),
    /// Preprocess an image into `pixel_values` [1, 3, H, W] f32 (safetensors).
    Preprocess {
        /// HF model directory (its preprocessor_config.json is used).
        #[arg(long)]
        model: PathBuf,
        /// Input image.
        #[arg(long)]
        image: PathBuf,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the model on token ids and save `logits` [1, seq, vocab] f32 (safetensors).
    Forward {
        /// HF model directory.
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated ids, image tokens already expanded.
        #[arg(long)]
        input_ids: String,
        /// safetensors file holding `pixel_values`.
        #[arg(long)]
        pixel_values: Option<PathBuf>,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
    /// Measure forward, forward + backward and generation throughput on random weights.
    Bench {
        /// HF-style config of the model to build (e.g. configs/bench/llava-mini.json).
        #[arg(long)]
        config: PathBuf,
        /// Name shown in the report (defaults to the config's file stem).
        #[arg(long)]
        name: Option<String>,
        /// Batch size.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Text tokens per row (bos and image tokens come on top).
        #[arg(long, default_value_t = 40)]
        text_tokens: usize,
        /// New tokens per row for the generation benchmark.
        #[arg(long, default_value_t = 16)]
        new_tokens: usize,
        /// Timed repetitions after one warm-up.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Also measure the continual work at the runner's settings: LLaVA-CMoE's training
        /// step (two-epoch stage with the VAE), plain LoRA's, and one task's evaluation
        /// through PTL (`--new-tokens` per question).
        #[arg(long)]
        continual: bool,
        /// Test questions of the evaluation case.
        #[arg(long, default_value_t = 60)]
        eval_questions: usize,
        /// Questions per generation batch in the evaluation case.
        #[arg(long, default_value_t = 16)]
        eval_batch: usize,
        /// Expert and VAE sizes of the continual cases: the Mini-CoIN preset's or the paper's.
        #[arg(long, value_enum, default_value = "mini")]
        settings: ContinualSettings,
        /// The frozen base's dtype in the continual cases (bf16 for a 7B base on a GPU).
        #[arg(long, value_enum, default_value = "f32")]
        base_dtype: Precision,
    },
    /// Time one MoE-LoRA FFN layer (mini shapes) at several expert counts, in both dispatches
    /// (grouped: the CPU default; masked: the GPU default), forward and forward + backward.
    BenchMoe {
        /// Expert counts.
        #[arg(long, value_delimiter = ',', default_value = "8,16,32")]
        experts: Vec<usize>,
        /// Experts per token.
        #[arg(long, default_value_t = 2)]
        top_k: usize,
        /// Timed repetitions after one warm-up.
        #[arg(long, default_value_t = 5)]
        repeats: usize,
    },
    /// Check a fixture model's logits (and greedy tokens in f32) against the transformers
    /// references beside it (tests/fixtures/tiny-llava, tiny-llava-b); prints JSON with
    /// --json; exits non-zero when it does not pass.
    Parity {
        /// The fixture model directory.
        #[arg(long)]
        model: PathBuf,
        /// The weights' dtype: f32 (reference.safetensors) or bf16
        /// (reference-bf16.safetensors).
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Precision,
    },
    /// Measure on the CPU what the memory plan predicts: the bytes one MoE-LoRA FFN and one
    /// decoder layer keep for the backward pass per token, at a model's true widths (few
    /// layers), beside the plan's figures (docs/scale.md).
    MemoryProxy {
        /// The model's config.json (its decoder widths are used).
        #[arg(long, default_value = "tests/fixtures/llava-1.5-7b-hf/config.json")]
        config: PathBuf,
        /// Tokens per row (LLaVA-1.5: 576 image tokens and the text).
        #[arg(long, default_value_t = 680)]
        seq: usize,
        /// Experts per layer, all trainable.
        #[arg(long, default_value_t = 8)]
        experts: usize,
        /// LoRA rank.
        #[arg(long, default_value_t = 64)]
        rank: usize,
        /// Experts per token.
        #[arg(long, default_value_t = 2)]
        top_k: usize,
        /// LoRA dropout.
        #[arg(long, default_value_t = 0.05)]
        dropout: f64,
        /// The frozen base's dtype.
        #[arg(long, value_enum, default_value = "bf16")]
        base_dtype: Precision,
        /// Decoder layers of the decoder passes (the per-layer figure needs 2 and 3).
        #[arg(long, value_delimiter = ',', default_value = "2,3")]
        layers: Vec<usize>,
        /// Rows of the passes (the per-token figures need 1 and 2).
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        rows: Vec<usize>,
        /// Which passes: `ffn` (one MoE-LoRA FFN) and / or `decoder`.
        #[arg(long, value_delimiter = ',', default_value = "ffn,decoder")]
        cases: Vec<String>,
    },
    /// Score results in CoIN's formats: prints the accuracy in percent.
    Score {
        /// Task type: scienceqa, textvqa, imagenet, gqa, vizwiz, grounding, vqav2 or ocrvqa.
        #[arg(long)]
        task_type: TaskType,
        /// CoIN test file (`[{"question_id", "image", "text", "answer"}]`).
        #[arg(long)]
        annotations: PathBuf,
        /// Results, one `{"question_id", "text"}` object per line.
        #[arg(long)]
        predictions: PathBuf,
        /// Reproduce CoIN's eval scripts exactly, quirks included (see `cmoe_coin::score`).
        #[arg(long)]
        coin_compat: bool,
    },
    /// Redraw figures from a JSON file, as PNG beside it: a pretraining's `pretrain.json` (its
    /// loss curve) or a comparison's JSON from `cargo xtask compare` (mean Immediate / Last and
    /// parameters per method). A run's figures come with `cargo xtask report`.
    Plot {
        /// The JSON file.
        file: PathBuf,
    },
    /// Generate Mini-CoIN (eight synthetic tasks in CoIN's formats) from a seed.
    MiniCoin {
        /// Output folder (Instructions/, images/, mini-coin.json).
        #[arg(long)]
        out: PathBuf,
        /// Seed of every random stream.
        #[arg(long, default_value_t = MiniCoinConfig::default().seed)]
        seed: u64,
        /// Image side in pixels.
        #[arg(long, default_value_t = MiniCoinConfig::default().image_size)]
        image_size: u32,
        /// Training samples per task.
        #[arg(long, default_value_t = MiniCoinConfig::default().train_per_task)]
        train_per_task: usize,
        /// Test questions per task.
        #[arg(long, default_value_t = MiniCoinConfig::default().test_per_task)]
        test_per_task: usize,
        /// Samples of the initialisation set (descriptions, none of the tasks; 0: none).
        #[arg(long, default_value_t = 0)]
        init_samples: usize,
    },
    /// Run LLaVA-CMoE (or a baseline) through Mini-CoIN and write the report.
    Train {
        /// Size preset.
        #[arg(long, value_enum, default_value = "default")]
        preset: Preset,
        /// Who learns the stream.
        #[arg(long, value_enum, default_value = "cmoe")]
        method: Method,
        /// Inference routing (cmoe) [default: ptl].
        #[arg(long, value_enum)]
        router: Option<RouterChoice>,
        /// Expansion placement (cmoe) [default: pgke].
        #[arg(long, value_enum)]
        plan: Option<PlanChoice>,
        /// Experts PGKE adds to each selected layer: a number (the paper: 1; Table 4: 1, 4,
        /// 8) or `probe-count` (N_s, the probes above the threshold) [default: 1].
        #[arg(long)]
        experts_per_layer: Option<ExpansionMode>,
        /// How the initial experts start: their own `phase` on initialisation data (the
        /// paper), or trained by the `first-task` [default: phase].
        #[arg(long, value_enum)]
        init: Option<InitChoice>,
        /// The initial phase's training file (LLaVA conversations, images under the image
        /// root); Mini-CoIN generates one.
        #[arg(long)]
        init_data: Option<PathBuf>,
        /// The projections sequential LoRA adapts (`--method lora`): `up` (the paper's
        /// baseline, Table 8) or a list such as `gate,up,down` [default: up].
        #[arg(long, value_delimiter = ',', value_parser = ["gate", "up", "down"])]
        lora_targets: Vec<String>,
        /// PTL's feature: the `last` prompt token's state (the paper), the `mean` over the
        /// question, or `both` [default: last].
        #[arg(long)]
        ptl_feature: Option<PtlFeature>,
        /// Task order [default: normal].
        #[arg(long, value_enum)]
        task_order: Option<TaskOrder>,
        /// Seed [default: 0].
        #[arg(long)]
        seed: Option<u64>,
        /// The LLaVA to learn on, in HF layout [default: assets/llava-mini].
        #[arg(long)]
        model: Option<PathBuf>,
        /// Run name (folder under --runs); default: built from the settings.
        #[arg(long)]
        name: Option<String>,
        /// Where runs go.
        #[arg(long, default_value = "runs")]
        runs: PathBuf,
        /// Continue a killed run from its last checkpoint.
        #[arg(long)]
        resume: bool,
        /// Stop after this many tasks, as if killed there (exercises --resume).
        #[arg(long, hide = true)]
        stop_after_tasks: Option<usize>,
        /// Stop once task N (1-based) is expanded and checkpointed (exercises --resume).
        #[arg(long, hide = true)]
        stop_after_expansion: Option<usize>,
        /// Stop while writing the stage checkpoint of TASK:STEP (1-based task), before it
        /// replaces the previous one (exercises --resume).
        #[arg(long, hide = true, value_parser = task_step)]
        stop_at_step: Option<(usize, usize)>,
        /// Checkpoint a task's training stage every N optimiser steps (0: only between stages).
        #[arg(long)]
        checkpoint_every: Option<usize>,
        /// The frozen base model's dtype (experts, routers and VAEs train in f32).
        #[arg(long, value_enum)]
        base_dtype: Option<Precision>,
        /// Train data-parallel on these devices of the backend (e.g. `0,1,2,3`; the first holds
        /// the model); each step's micro-batches (`accumulation` of them) are dealt over them.
        #[arg(long, value_delimiter = ',')]
        devices: Vec<usize>,
        /// Learn a CoIN-format folder (`Instructions/<Task>/{train,test}.json`) instead of
        /// generating Mini-CoIN.
        #[arg(long)]
        data_root: Option<PathBuf>,
        /// Folder the records' image paths are relative to (default: `<data>/images`).
        #[arg(long)]
        image_root: Option<PathBuf>,
        /// Samples with a malformed record or a missing / unreadable image: skip and count
        /// them, or stop with an error [default: skip].
        #[arg(long, value_enum)]
        bad_samples: Option<BadSamples>,
        /// A TOML file of settings over the preset's (e.g. configs/llava-1.5-7b-coin.toml);
        /// flags given on the command line win over it.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Check everything the run needs (settings, the model's config, shards and tokenizer,
        /// every task's files and images, the initial data) without training, print the steps
        /// of every stage and the memory plan of the largest; exits non-zero when something is
        /// missing. Needs no weights for the plan (a model folder with only config.json).
        #[arg(long)]
        dry_run: bool,
    },
    /// Answer a question about an image with a trained run; PTL picks the task's router.
    Ask {
        /// The run folder (runs/<name>).
        #[arg(long)]
        run: PathBuf,
        /// The image.
        #[arg(long)]
        image: PathBuf,
        /// The question, in the task's instruction style.
        #[arg(long)]
        question: String,
    },
    /// Pretrain a small LLaVA (tokenizer + weights): optionally the vision tower alone, then captions, then instructions (resumable).
    Pretrain {
        /// The model's config.json.
        #[arg(long, default_value = "configs/llava-mini.json")]
        config: PathBuf,
        /// Output directory (HF layout).
        #[arg(long, default_value = "assets/llava-mini")]
        out: PathBuf,
        /// Seed of the initialisation, the tokenizer corpus and the batches.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Optimiser steps of stage 0, the vision tower alone on descriptions' words (0:
        /// skipped; the shipped model: see its pretrain.json).
        #[arg(long, default_value_t = 6000)]
        vision_steps: usize,
        /// Optimiser steps of stage 1, captions (the shipped model: see its pretrain.json).
        #[arg(long, default_value_t = 600)]
        caption_steps: usize,
        /// Optimiser steps of stage 2, instructions.
        #[arg(long, default_value_t = 2400)]
        instruction_steps: usize,
        /// Samples per step.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        /// Peak learning rate of stages 0 and 1.
        #[arg(long, default_value_t = 1e-3)]
        lr: f64,
        /// Peak learning rate of stage 2.
        #[arg(long, default_value_t = 5e-4)]
        instruction_lr: f64,
        /// Share of stage 2's samples that are captions.
        #[arg(long, default_value_t = 0.2)]
        caption_share: f64,
        /// Checkpoint every this many steps (0: never).
        #[arg(long, default_value_t = 50)]
        checkpoint_every: usize,
        /// Continue the pretraining checkpointed in OUT/pretrain-checkpoint.
        #[arg(long)]
        resume: bool,
        /// Stop after this many steps, as if killed (tests of --resume).
        #[arg(long, hide = true)]
        stop_after_steps: Option<usize>,
        /// Descriptions in the tokenizer's training corpus.
        #[arg(long, default_value_t = 20000)]
        tokenizer_corpus: usize,
        /// Held-out questions per kind of stage 2 the result answers, its accuracy in
        /// pretrain.json (0: none; see `cmoe eval-base`).
        #[arg(long, default_value_t = 100)]
        held_out_per_kind: usize,
    },
    /// Measure how well a base follows instructions: its accuracy on held-out questions of each
    /// kind in the pretraining's stage 2 (colour, count, reading, corners, ...), greedy.
    EvalBase {
        /// HF model directory (with tokenizer and image processor).
        #[arg(long, default_value = "assets/llava-mini")]
        model: PathBuf,
        /// Seed of the questions (a pretraining's seed gives the questions it reports).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Questions per kind.
        #[arg(long, default_value_t = 100)]
        per_kind: usize,
        /// Also write every question, reference and answer here (JSON lines).
        #[arg(long)]
        answers: Option<PathBuf>,
    },
    /// Print the resolved config and parameter counts of a model directory.
    Inspect {
        /// HF model directory (only config.json is required).
        #[arg(long)]
        model: PathBuf,
    },
    /// Validate a HF LLaVA directory (config, shards, every tensor's key and shape, dtypes,
    /// tokenizer, image processor) by loading it on the backend.
    Import {
        /// HF model directory.
        #[arg(long)]
        model: PathBuf,
        /// The dtype to load the weights in (bf16 halves a 7B model's memory).
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Precision,
    },
    /// Evaluate a run's latest state on every task it has learned (PTL routing); writes
    /// `eval.json` and the answers under `eval/`.
    Eval {
        /// The run folder (runs/<name>).
        #[arg(long)]
        run: PathBuf,
    },
    /// Rebuild a run's report (report.json, report.md, plots) from its progress.
    Report {
        /// The run folder (runs/<name>).
        #[arg(long)]
        run: PathBuf,
    },
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// HF model directory.
    #[arg(long)]
    model: PathBuf,
    /// Input image (preprocessed with the model's processor).
    #[arg(
        long,
        conflicts_with = "pixel_values",
        required_unless_present = "pixel_values"
    )]
    image: Option<PathBuf>,
    /// Preprocessed `pixel_values` safetensors file instead of an image.
    #[arg(long)]
    pixel_values: Option<PathBuf>,
    /// Full prompt text, `<image>` included; bos is added as the tokenizer does.
    #[arg(long)]
    prompt: String,
    /// Most new tokens.
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Greedy decoding (otherwise temperature + top-p sampling).
    #[arg(long)]
    greedy: bool,
    /// Sampling temperature (> 0).
    #[arg(long, default_value_t = 0.2, allow_negative_numbers = true)]
    temperature: f32,
    /// Nucleus mass (0 < top_p <= 1).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() {
    if let Err(err) = run(Cli::parse()) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

/// Runs one subcommand. (Long on purpose: one short arm per subcommand.)
fn run(cli: Cli) -> anyhow::Result<()> {
    let Cli {
        command,
        backend,
        json,
    } = cli;
    match command {
        Command::Generate(args) => run_on(backend, GenerateTask { args, json })?,
        Command::Preprocess { model, image, out } => preprocess(&model, &image, &out),
        Command::Forward {
            model,
            input_ids,
            pixel_values,
            out,
        } => run_on(
            backend,
            ForwardTask {
                model,
                input_ids,
                pixel_values,
                out,
            },
        )?,
        Command::Inspect { model } => inspect(&model, json),
        Command::Import { model, dtype } => {
            let task = ImportTask {
                dir: model.clone(),
                precision: dtype,
            };
            let check = run_on(backend, task)??;
            if json {
                println!("{}", serde_json::to_string_pretty(&check)?);
            } else {
                inspect(&model, false)?;
                println!(
                    "import: ok on {backend}: {} parameters loaded, tokenizer of {} tokens",
                    check.loaded_parameters, check.tokenizer_vocab
                );
            }
            Ok(())
        }
        Command::Eval { run } => {
            let report = run_on(
                backend,
                EvalTask {
                    dir: run.clone(),
                    observer: Arc::new(Terminal::default()),
                },
            )??;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                for (task, accuracy) in report.tasks.iter().zip(&report.accuracy) {
                    println!("{task:<10} {accuracy:6.2}");
                }
                println!("mean       {:6.2}", report.mean);
                println!("PTL        {:6.3}", report.ptl_accuracy);
                println!("eval: {}", run.join("eval.json").display());
            }
            Ok(())
        }
        Command::EvalBase {
            model,
            seed,
            per_kind,
            answers,
        } => {
            let (accuracy, held_out) = run_on(
                backend,
                EvalBaseTask {
                    model,
                    seed,
                    per_kind,
                    observer: Arc::new(Terminal::default()),
                },
            )??;
            if let Some(path) = &answers {
                write_jsonl(path, &held_out)?;
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&accuracy)?);
            } else {
                for kind in &accuracy.kinds {
                    println!("{:<14} {:6.2}", kind.kind, kind.accuracy);
                }
                println!("{:<14} {:6.2}", "mean", accuracy.mean);
            }
            Ok(())
        }
        Command::Report { run } => {
            let report = rebuild_report(&run)?;
            println!("{}", report_markdown(&report));
            println!("report: {}", run.join("report.json").display());
            Ok(())
        }
        Command::Train {
            preset,
            method,
            router,
            plan,
            experts_per_layer,
            init,
            init_data,
            lora_targets,
            ptl_feature,
            task_order,
            seed,
            model,
            name,
            runs,
            resume,
            stop_after_tasks,
            stop_after_expansion,
            stop_at_step,
            checkpoint_every,
            base_dtype,
            devices,
            data_root,
            image_root,
            bad_samples,
            config: file,
            dry_run,
        } => {
            let mut config = RunConfig::preset(preset, method);
            if let Some(file) = file {
                config = config.with_file(&file)?;
            }
            // Flags given on the command line win over the preset and the file.
            config.data_root = data_root.or(config.data_root);
            config.image_root = image_root.or(config.image_root);
            config.bad_samples = bad_samples.unwrap_or(config.bad_samples);
            config.router = router.unwrap_or(config.router);
            config.plan = plan.unwrap_or(config.plan);
            config.experts_per_layer = experts_per_layer.unwrap_or(config.experts_per_layer);
            config.init = init.unwrap_or(config.init);
            config.init_data = init_data.or(config.init_data);
            if !lora_targets.is_empty() {
                let has = |p: &str| lora_targets.iter().any(|t| t == p);
                config.lora_targets = FfnTargets {
                    gate: has("gate"),
                    up: has("up"),
                    down: has("down"),
                };
            }
            if let Some(feature) = ptl_feature {
                config.ptl.feature = feature;
            }
            config.order = task_order.unwrap_or(config.order);
            config.seed = seed.unwrap_or(config.seed);
            config.model = model.unwrap_or(config.model);
            config.checkpoint_every = checkpoint_every.unwrap_or(config.checkpoint_every);
            config.base_dtype = base_dtype.unwrap_or(config.base_dtype);
            let name = name.unwrap_or_else(|| config.default_name(preset));
            check_run_name(&name)?;
            // run.json keeps paths that work from any working directory.
            config.model = absolute(&config.model)?;
            config.init_data = config.init_data.as_deref().map(absolute).transpose()?;
            config.data_root = config.data_root.as_deref().map(absolute).transpose()?;
            config.image_root = config.image_root.as_deref().map(absolute).transpose()?;
            let dir = runs.join(name);
            if dry_run {
                let found = llava_cmoe::continual::dry_run(&config, &dir, backend.target());
                if json {
                    println!("{}", serde_json::to_string_pretty(&found)?);
                } else {
                    print!("{}", found.describe());
                }
                if !found.ok {
                    anyhow::bail!("the dry run found problems (listed above)");
                }
                return Ok(());
            }
            let report = run_on(
                backend,
                TrainTask {
                    config,
                    dir: dir.clone(),
                    resume,
                    backend: backend.name().to_string(),
                    stop_after: stop_after_tasks,
                    stop_after_expansion,
                    stop_at_step,
                    devices,
                    observer: Arc::new(Terminal::default()),
                },
            )??;
            println!("{}", report_markdown(&report));
            println!("report: {}", dir.join("report.json").display());
            Ok(())
        }
        Command::Ask {
            run,
            image,
            question,
        } => {
            let answer = run_on(
                backend,
                AskTask {
                    dir: run,
                    image,
                    question,
                },
            )??;
            if json {
                println!("{}", serde_json::to_string(&answer)?);
            } else {
                println!("[{}] {}", answer.task, answer.text);
            }
            Ok(())
        }
        Command::Pretrain {
            config,
            out,
            seed,
            vision_steps,
            caption_steps,
            instruction_steps,
            batch,
            lr,
            instruction_lr,
            caption_share,
            checkpoint_every,
            resume,
            stop_after_steps,
            tokenizer_corpus,
            held_out_per_kind,
        } => {
            let report = run_on(
                backend,
                PretrainTask {
                    config: PretrainConfig {
                        model_config: config,
                        out,
                        seed,
                        vision_steps,
                        caption_steps,
                        instruction_steps,
                        batch,
                        lr,
                        instruction_lr,
                        caption_share,
                        tokenizer_corpus,
                        checkpoint_every,
                    },
                    resume,
                    stop_after_steps,
                    held_out_per_kind,
                    observer: Arc::new(Terminal::default()),
                },
            )??;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(())
        }
        Command::Plot { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: malformed", file.display()))?;
            let paths = if json.get("stages").is_some() {
                let report: llava_cmoe::pretrain::PretrainReport = serde_json::from_value(json)
                    .with_context(|| format!("{}: not a pretrain.json", file.display()))?;
                let out = file.with_file_name("pretrain_loss.png");
                llava_cmoe::pretrain::loss_figure(&report, &out)?;
                vec![out]
            } else if json.get("rows").is_some() || json.get("runs").is_some() {
                llava_cmoe::plots::comparison_figures(&file)?
            } else {
                anyhow::bail!(
                    "{}: neither a pretrain.json nor a Table 1 comparison's JSON",
                    file.display()
                );
            };
            for path in paths {
                println!("{}", path.display());
            }
            Ok(())
        }
        Command::MiniCoin {
            out,
            seed,
            image_size,
            train_per_task,
            test_per_task,
            init_samples,
        } => {
            llava_cmoe::continual::check_image_size(image_size)?;
            let config = MiniCoinConfig {
                seed,
                image_size,
                train_per_task,
                test_per_task,
                init_samples,
            };
            mini::generate(&config, &out, |task| eprintln!("{task}: written"))?;
            println!("Mini-CoIN written to {}", out.display());
            Ok(())
        }
        Command::Score {
            task_type,
            annotations,
            predictions,
            coin_compat,
        } => {
            let compat = if coin_compat {
                Compat::Coin
            } else {
                Compat::Correct
            };
            let s = score_files(task_type, &annotations, &predictions, compat)?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!(
                    "{}: accuracy {:.2}% ({} of {} questions{})",
                    task_type.name(),
                    s.accuracy,
                    s.correct,
                    s.total,
                    if coin_compat { ", CoIN-compatible" } else { "" }
                );
                if s.missing > 0 {
                    let counted = if coin_compat && task_type != TaskType::ScienceQa {
                        "left out of the accuracy, as CoIN's script does"
                    } else {
                        "each scored 0"
                    };
                    eprintln!(
                        "note: {} of the test file's questions have no result in {} ({counted})",
                        s.missing,
                        predictions.display()
                    );
                }
            }
            Ok(())
        }
        Command::Parity { model, dtype } => {
            let result = run_on(
                backend,
                ParityTask {
                    model,
                    precision: dtype,
                },
            )??;
            if json {
                println!("{}", serde_json::to_string(&result)?);
            } else {
                println!(
                    "{} ({:?}) on {}: max |logit diff| {:.2e}{}{}",
                    result.model.display(),
                    result.dtype,
                    result.backend,
                    result.max_logit_diff,
                    result
                        .greedy_equal
                        .map_or(String::new(), |e| format!(", greedy tokens equal: {e}")),
                    result.ours_to_f32.zip(result.transformers_to_f32).map_or(
                        String::new(),
                        |(o, t)| format!(
                            "; to the f32 run: ours {o:.4}, transformers' bf16 {t:.4}"
                        )
                    )
                );
            }
            if !result.passed {
                anyhow::bail!("parity not reached");
            }
            Ok(())
        }
        Command::MemoryProxy {
            config,
            seq,
            experts,
            rank,
            top_k,
            dropout,
            base_dtype,
            layers,
            rows,
            cases,
        } => {
            let report = run_on(
                backend,
                MemoryProxyTask {
                    config,
                    seq,
                    experts,
                    rank,
                    top_k,
                    dropout,
                    base_dtype,
                    layers,
                    rows,
                    cases,
                },
            )??;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.describe());
            }
            Ok(())
        }
        Command::BenchMoe {
            experts,
            top_k,
            repeats,
        } => {
            let results = run_on(
                backend,
                MoeDispatchTask {
                    experts,
                    top_k,
                    repeats: repeats.max(1),
                },
            )?;
            if json {
                println!("{}", serde_json::to_string(&results)?);
            } else {
                for r in results {
                    println!(
                        "{} experts, top-{} on {}: forward grouped {:.2} ms, masked {:.2} ms; \
                         forward + backward grouped {:.2} ms, masked {:.2} ms",
                        r.experts,
                        r.top_k,
                        r.backend,
                        r.grouped_s * 1e3,
                        r.masked_s * 1e3,
                        r.grouped_train_s * 1e3,
                        r.masked_train_s * 1e3
                    );
                }
            }
            Ok(())
        }
        Command::Bench {
            config,
            name,
            batch,
            text_tokens,
            new_tokens,
            repeats,
            continual,
            eval_questions,
            eval_batch,
            settings,
            base_dtype,
        } => {
            let name = name.unwrap_or_else(|| {
                config
                    .file_stem()
                    .map_or("bench".into(), |s| s.to_string_lossy().into_owned())
            });
            let case = BenchCase {
                name,
                config: config.display().to_string(),
                batch,
                text_tokens,
                new_tokens,
            };
            let mut r = run_on(
                backend,
                BenchTask {
                    case: case.clone(),
                    repeats: repeats.max(1),
                },
            )??;
            if continual {
                let c = run_on(
                    backend,
                    ContinualBenchTask {
                        case,
                        repeats: repeats.max(1),
                        eval_questions,
                        eval_batch: eval_batch.max(1),
                        settings,
                        // As the Mini-CoIN runner trains: its step's micro-batches over the
                        // replicas it uses on this backend.
                        replicas: llava_cmoe::continual::default_replicas(
                            backend.name(),
                            RunConfig::preset(Preset::Default, Method::Cmoe).accumulation,
                        ),
                        base_dtype,
                    },
                )??;
                r = r.with_continual(c);
            }
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} on {}: {} params, batch {} x seq {}: forward {:.0} tok/s, forward+backward {:.0} tok/s, generation {:.1} new tok/s",
                    r.name,
                    r.backend,
                    r.parameters,
                    r.batch,
                    r.seq,
                    r.forward_tok_s,
                    r.train_tok_s,
                    r.generate_tok_s
                );
                if let Some(c) = &r.continual {
                    println!(
                        "continual: CMoE step {:.0} ms, LoRA step {:.0} ms, evaluation of {} questions {:.1} s",
                        c.cmoe_step_s * 1e3,
                        c.lora_step_s * 1e3,
                        c.eval_questions,
                        c.eval_s
                    );
                }
            }
            Ok(())
        }
    }
}

fn read_pixels(path: &Path) -> anyhow::Result<HostTensor> {
    tensor_io::read_tensor(path, "pixel_values")
}

/// `cmoe generate` on a backend; `json`: print one JSON object.
struct GenerateTask {
    args: GenerateArgs,
    json: bool,
}

impl BackendTask for GenerateTask {
    type Output = anyhow::Result<()>;

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let args = self.args;
        let pipe = LlavaPipeline::<B>::load(&args.model, &device)?;
        let pixels = match (&args.image, &args.pixel_values) {
            (Some(image), _) => pipe.preprocess(image)?,
            (None, Some(file)) => {
                let pixels = read_pixels(file)?;
                pipe.check_pixels(&pixels, &file.display().to_string())?;
                pixels
            }
            (None, None) => anyhow::bail!("give --image or --pixel-values"),
        };
        let sampling = if args.greedy {
            Sampling::Greedy
        } else {
            Sampling::TopP {
                temperature: args.temperature,
                top_p: args.top_p,
                seed: args.seed,
            }
        };
        let out = pipe.generate(&args.prompt, Some(&pixels), args.max_new_tokens, sampling)?;
        if self.json {
            println!("{}", serde_json::to_string(&out)?);
        } else {
            println!("{}", out.text);
        }
        Ok(())
    }
}

struct ForwardTask {
    model: PathBuf,
    input_ids: String,
    pixel_values: Option<PathBuf>,
    out: PathBuf,
}

impl BackendTask for ForwardTask {
    type Output = anyhow::Result<()>;

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let ids = self
            .input_ids
            .split(',')
            .map(|s| {
                s.trim()
                    .parse::<u32>()
                    .with_context(|| format!("--input-ids: {s:?} is not a token id"))
            })
            .collect::<anyhow::Result<Vec<u32>>>()?;
        let pipe = LlavaPipeline::<B>::load(&self.model, &device)?;
        let pixels = self.pixel_values.as_deref().map(read_pixels).transpose()?;
        if let (Some(p), Some(file)) = (&pixels, &self.pixel_values) {
            pipe.check_pixels(p, &file.display().to_string())?;
        }
        let logits = pipe.logits(&ids, pixels.as_ref())?;
        tensor_io::write_tensors(&self.out, &[("logits", &logits)])
    }
}

fn preprocess(model: &Path, image: &Path, out: &Path) -> anyhow::Result<()> {
    let config = llava_cmoe::llava::LlavaConfig::from_file(&model.join("config.json"))?;
    let processor = llava_cmoe::data::ImageProcessorConfig::from_model_dir(
        model,
        config.vision_config.image_size as u32,
    )?;
    let pv = processor.preprocess_file(image)?;
    let pixels = HostTensor {
        data: pv.data,
        shape: vec![1, 3, pv.height, pv.width],
    };
    tensor_io::write_tensors(out, &[("pixel_values", &pixels)])
}

fn inspect(model: &Path, json: bool) -> anyhow::Result<()> {
    let report = pipeline::inspect(model)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let c = &report.config;
    let t = &c.text_config;
    let v = &c.vision_config;
    let p = &report.parameters;
    println!("model: {}", model.display());
    println!(
        "language model: hidden {} / {} layers / {} heads ({} kv, head_dim {}) / MLP {} / vocab {} / rope theta {} / rms eps {:e}",
        t.hidden_size,
        t.num_hidden_layers,
        t.num_attention_heads,
        t.num_kv_heads(),
        t.head_dim(),
        t.intermediate_size,
        t.vocab_size,
        t.rope_theta(),
        t.rms_norm_eps
    );
    println!(
        "vision tower: hidden {} / {} layers / {} heads / MLP {} / image {} / patch {} / {:?}",
        v.hidden_size,
        v.num_hidden_layers,
        v.num_attention_heads,
        v.intermediate_size,
        v.image_size,
        v.patch_size,
        v.hidden_act
    );
    println!(
        "llava: feature layer {:?} ({:?} strategy) -> {} image tokens per <image> (id {}); projector {:?}; tied embeddings {}",
        c.vision_feature_layer,
        c.vision_feature_select_strategy,
        report.image_tokens_per_image,
        c.image_token_index,
        c.projector_hidden_act,
        c.tied_embeddings()
    );
    let fmt = |n: usize| format!("{n} ({:.2}M)", n as f64 / 1e6);
    println!("parameters: vision tower {}", fmt(p.vision_tower));
    println!("            projector    {}", fmt(p.projector));
    println!("            decoder      {}", fmt(p.decoder));
    println!("            lm_head      {}", fmt(p.lm_head));
    println!(
        "            total        {} ({:.3}B)",
        p.total,
        p.total as f64 / 1e9
    );
    match &report.checkpoint {
        Some(ck) => println!(
            "checkpoint: {} file(s), {} tensors, {} elements, dtypes {:?}",
            ck.files.len(),
            ck.tensors,
            ck.elements,
            ck.dtypes
        ),
        None => println!("checkpoint: none (config only)"),
    }
    Ok(())
}

/// Parses `TASK:STEP`.
fn task_step(text: &str) -> Result<(usize, usize), String> {
    let (task, step) = text
        .split_once(':')
        .ok_or_else(|| format!("{text:?} is not TASK:STEP"))?;
    let number = |s: &str| s.parse::<usize>().map_err(|e| format!("{s:?}: {e}"));
    Ok((number(task)?, number(step)?))
}

/// A run name is one folder inside the runs root: not empty, no `/`, not `.` or `..`.
fn check_run_name(name: &str) -> anyhow::Result<()> {
    let one_folder = Path::new(name).components().count() == 1
        && matches!(
            Path::new(name).components().next(),
            Some(std::path::Component::Normal(_))
        );
    if name.is_empty() || !one_folder || name.contains(['/', '\\']) {
        anyhow::bail!("--name {name:?}: a run name is one folder name (no '/', not '.' or '..')");
    }
    Ok(())
}

/// `path` made absolute against the working directory (not resolving links).
fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot resolve {}", path.display()))
}
