//! `cargo xtask`: project tasks. xtask itself holds no model code: it builds the `cmoe` binary
//! with the backend feature a task asks for and drives it (plus the PyTorch reference scripts).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

mod compare;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "LLaVA-CMoE project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// The main job: LLaVA-CMoE through Mini-CoIN on the shipped small LLaVA, with the report
    /// in runs/<name>/ (every `cmoe train` flag is accepted: --preset smoke, --method lora,
    /// --router last, --plan every-layer, --task-order reverse, --resume, ...).
    Train {
        /// Burn backend: flex, ndarray, wgpu or cuda (the binary is built with that feature).
        #[arg(long, default_value = "flex")]
        backend: String,
        /// Flags passed to `cmoe train`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Regenerates the small LLaVA in assets/llava-mini (tokenizer + pretraining); every
    /// `cmoe pretrain` flag is accepted.
    Pretrain {
        /// Burn backend.
        #[arg(long, default_value = "flex")]
        backend: String,
        /// Flags passed to `cmoe pretrain`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Validates a Hugging Face LLaVA directory by loading it (`cmoe import --model DIR`):
    /// config, shards, every tensor's key and shape, dtypes, tokenizer, image processor.
    Import {
        /// Burn backend to load on.
        #[arg(long, default_value = "flex")]
        backend: String,
        /// Flags passed to `cmoe import`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Evaluates a run's latest state on every task it learned (`cmoe eval --run DIR`).
    Eval {
        /// Burn backend.
        #[arg(long, default_value = "flex")]
        backend: String,
        /// Flags passed to `cmoe eval`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Rebuilds a run's report from its progress (`cmoe report --run DIR`).
    Report {
        /// Flags passed to `cmoe report`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Runs several methods / ablations with one preset and writes one comparison table
    /// (Markdown + JSON under --out). A finished run there is reused and a killed one resumed,
    /// both only if made with the same settings (`cmoe train --resume` checks).
    Compare {
        /// Burn backend.
        #[arg(long, default_value = "flex")]
        backend: String,
        /// Size preset of every run.
        #[arg(long, default_value = "default")]
        preset: String,
        /// Runs, each `method[:flag=value...]`, e.g. `cmoe`, `lora`, `cmoe:router=last`,
        /// `cmoe:plan=every-layer`, `cmoe:experts-per-layer=4`.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "cmoe,lora,moelora,cmoe:plan=every-layer,cmoe:router=last"
        )]
        runs: Vec<String>,
        /// The paper's Table 1 instead: multitask MoELoRA, LoRA, MoELoRA, EWC, LwF and
        /// LLaVA-CMoE, Immediate and Last rows, Mean, BWT, trainable parameters per task.
        #[arg(long, conflicts_with = "ablations")]
        paper: bool,
        /// The paper's ablation tables instead (Tables 2 to 5: w/o extension, placement,
        /// task order, experts per layer, router choice, PTL feature).
        #[arg(long)]
        ablations: bool,
        /// Where the runs and the table go.
        #[arg(long, default_value = "runs")]
        out: PathBuf,
        /// Seeds of the free comparison (`--seeds 0,1,2`): every run once per seed, the table
        /// with the mean and standard deviation over them.
        #[arg(long, value_delimiter = ',', default_value = "0")]
        seeds: Vec<u64>,
    },
    /// Prepares what a GPU machine needs beyond the tracked tree for scripts/gpu-check.sh:
    /// `cmoe` built with CUDA alone (`--no-default-features --features cuda`), stripped and
    /// xz-compressed, in target/gpu-pack/; prints its size beside the tracked tree's.
    GpuPack,
    /// Forward, forward+backward and generation throughput of Burn vs PyTorch on the same shapes.
    Bench {
        /// Burn backend: flex, ndarray, wgpu or cuda (the binary is built with that feature).
        #[arg(long, default_value = "flex")]
        backend: String,
        /// Which shapes: mini (the project's reference shapes) and/or mid.
        #[arg(long, value_delimiter = ',', default_value = "mini,mid")]
        cases: Vec<String>,
        /// Timed repetitions per measurement.
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// Python with torch + transformers for the reference; skipped when it lacks them.
        #[arg(long, env = "CMOE_PYTHON", default_value = "python3")]
        python: String,
        /// Where the JSON and Markdown results go.
        #[arg(long, default_value = "runs/bench")]
        out: PathBuf,
        /// Benchmark this `cmoe` binary (built with the backend's feature) instead of
        /// building one, e.g. the test build's `target/release/cmoe`.
        #[arg(long, env = "CMOE_BIN")]
        cmoe: Option<PathBuf>,
    },
}

/// A benchmark shape: config, batch, text tokens, new tokens.
struct Case {
    name: &'static str,
    config: &'static str,
    batch: usize,
    text_tokens: usize,
    new_tokens: usize,
}

const CASES: [Case; 2] = [
    // The project's "mini" LLaVA with the runner's default batch: 8 x (1 + 64 image + 57
    // text) = 122 tokens, answers of 24 new tokens (the preset's max_new_tokens). The
    // continual cases (CMoE step, LoRA step, evaluation) run on this shape.
    Case {
        name: "mini",
        config: "configs/bench/llava-mini.json",
        batch: 8,
        text_tokens: 57,
        new_tokens: 24,
    },
    // Mid-size: batch 4 x (1 + 64 image + 63 text) = 128 tokens.
    Case {
        name: "mid",
        config: "configs/bench/llava-mid.json",
        batch: 4,
        text_tokens: 63,
        new_tokens: 16,
    },
];

fn main() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    std::env::set_current_dir(&root)?;
    match Cli::parse().command {
        Task::Bench {
            backend,
            cases,
            repeats,
            python,
            out,
            cmoe,
        } => {
            let cmoe = match cmoe {
                Some(path) => path,
                None => build_cmoe(&backend)?,
            };
            bench(&cmoe, &backend, &cases, repeats, &python, &out)
        }
        Task::GpuPack => gpu_pack(),
        Task::Train { backend, args } => run_cmoe(&backend, "train", &args),
        Task::Pretrain { backend, args } => run_cmoe(&backend, "pretrain", &args),
        Task::Import { backend, args } => run_cmoe(&backend, "import", &args),
        Task::Eval { backend, args } => run_cmoe(&backend, "eval", &args),
        Task::Report { args } => {
            let cmoe = build_cmoe("flex")?;
            let status = Command::new(&cmoe).arg("report").args(&args).status()?;
            if !status.success() {
                bail!("cmoe report failed");
            }
            Ok(())
        }
        Task::Compare {
            backend,
            preset,
            runs,
            paper,
            ablations,
            out,
            seeds,
        } => {
            let cmoe = build_cmoe(&backend)?;
            let train = |flags: &[String]| {
                let status = Command::new(&cmoe)
                    .arg("train")
                    .args(["--backend", &backend])
                    .args(flags)
                    .status()
                    .with_context(|| format!("cannot run {}", cmoe.display()))?;
                if !status.success() {
                    bail!("cmoe train {} failed", flags.join(" "));
                }
                Ok(())
            };
            let plot = |table: &Path| {
                let status = Command::new(&cmoe)
                    .arg("plot")
                    .arg(table)
                    .status()
                    .with_context(|| format!("cannot run {}", cmoe.display()))?;
                if !status.success() {
                    bail!("cmoe plot {} failed", table.display());
                }
                Ok(())
            };
            let runner = compare::Runner {
                train: &train,
                plot: &plot,
                preset: &preset,
                backend: &backend,
                out: &out,
                seeds: &seeds,
            };
            if paper {
                runner.paper()
            } else if ablations {
                runner.ablations()
            } else {
                let specs: Vec<_> = runs.into_iter().map(compare::RunSpec).collect();
                runner.runs(&specs)
            }
        }
    }
}

/// Builds `cmoe` with `backend` and runs `cmoe <command> --backend <backend> <args>`, with
/// the terminal (progress bars) passed through.
fn run_cmoe(backend: &str, command: &str, args: &[String]) -> anyhow::Result<()> {
    let cmoe = build_cmoe(backend)?;
    let status = Command::new(&cmoe)
        .arg(command)
        .args(["--backend", backend])
        .args(args)
        .status()
        .with_context(|| format!("cannot run {}", cmoe.display()))?;
    if !status.success() {
        bail!("cmoe {command} failed");
    }
    Ok(())
}

/// Builds the CUDA-only `cmoe` (its own target folder, so that the CPU build is left alone),
/// strips and compresses it into target/gpu-pack/cmoe.xz, and prints the sizes.
fn gpu_pack() -> anyhow::Result<()> {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| "target".into(), PathBuf::from);
    let build = target.join("gpu-build");
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--package",
            "llava-cmoe",
            "--bin",
            "cmoe",
        ])
        .args([
            "--no-default-features",
            "--features",
            "cuda",
            "--target-dir",
        ])
        .arg(&build)
        .status()?;
    if !status.success() {
        bail!("building cmoe with --no-default-features --features cuda failed");
    }
    let pack = target.join("gpu-pack");
    std::fs::create_dir_all(&pack)?;
    let binary = pack.join("cmoe");
    std::fs::copy(build.join("release").join("cmoe"), &binary)?;
    let run = |command: &mut Command| -> anyhow::Result<()> {
        let printed = format!("{command:?}");
        let status = command
            .status()
            .with_context(|| format!("cannot run {printed}"))?;
        if !status.success() {
            bail!("{printed} failed");
        }
        Ok(())
    };
    run(Command::new("strip").arg(&binary))?;
    run(Command::new("xz").args(["-9", "-f", "-T0"]).arg(&binary))?;
    let packed = std::fs::metadata(pack.join("cmoe.xz"))?.len();
    let listed = Command::new("git").args(["ls-files", "-z"]).output()?;
    let tree: u64 = listed
        .stdout
        .split(|&b| b == 0)
        .filter(|p| !p.is_empty())
        .filter_map(|p| std::fs::metadata(String::from_utf8_lossy(p).as_ref()).ok())
        .map(|m| m.len())
        .sum();
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    println!(
        "{}: {:.1} MiB; the tracked tree {:.1} MiB; together {:.1} MiB (the device tool carries 64)",
        pack.join("cmoe.xz").display(),
        mib(packed),
        mib(tree),
        mib(packed + tree)
    );
    Ok(())
}

/// Builds `cmoe` in release with `backend`'s feature and returns its path.
fn build_cmoe(backend: &str) -> anyhow::Result<PathBuf> {
    if !["flex", "ndarray", "wgpu", "cuda"].contains(&backend) {
        bail!("unknown backend {backend:?} (flex, ndarray, wgpu or cuda)");
    }
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--package",
            "llava-cmoe",
            "--bin",
            "cmoe",
            "--features",
            backend,
        ])
        .status()?;
    if !status.success() {
        bail!("building cmoe with --features {backend} failed");
    }
    // Cargo puts it under CARGO_TARGET_DIR when that is set (relative paths: to this root).
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| "target".into(), PathBuf::from);
    Ok(target.join("release").join("cmoe"))
}

fn run_json(mut command: Command) -> anyhow::Result<serde_json::Value> {
    let printed = format!("{command:?}");
    let out = command
        .output()
        .with_context(|| format!("cannot run {printed}"))?;
    if !out.status.success() {
        bail!(
            "{printed} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8(out.stdout)?;
    let line = text.lines().last().context("no output")?;
    serde_json::from_str(line).with_context(|| format!("{printed} printed {line:?}"))
}

fn has_torch(python: &str) -> bool {
    Command::new(python)
        .args(["-c", "import torch, transformers"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `cargo xtask bench`: Burn's cases, then the PyTorch twin's, and the ratios written out.
/// (Slightly over 120 lines: the two sides' command lines are kept together.)
fn bench(
    cmoe: &Path,
    backend: &str,
    names: &[String],
    repeats: usize,
    python: &str,
    out: &Path,
) -> anyhow::Result<()> {
    let torch = has_torch(python);
    if !torch {
        eprintln!(
            "note: {python} lacks torch/transformers; the PyTorch reference is skipped (set --python or CMOE_PYTHON)"
        );
    }
    std::fs::create_dir_all(out)?;
    let mut rows = Vec::new();
    let mut results = Vec::new();
    for name in names {
        let case = CASES
            .iter()
            .find(|c| c.name == name)
            .with_context(|| format!("unknown case {name:?} (mini, mid)"))?;
        let shape = [
            "--config".to_string(),
            case.config.into(),
            "--name".into(),
            case.name.into(),
            "--batch".into(),
            case.batch.to_string(),
            "--text-tokens".into(),
            case.text_tokens.to_string(),
            "--new-tokens".into(),
            case.new_tokens.to_string(),
            "--repeats".into(),
            repeats.to_string(),
            "--json".into(),
        ];
        eprintln!("bench {name} on {backend} ...");
        // The continual work users wait for, on the mini shape.
        let continual = case.name == "mini";
        let mut command = Command::new(&cmoe);
        command
            .arg("bench")
            .args(&shape)
            .args(["--backend", backend]);
        if continual {
            command.arg("--continual");
        }
        let burn = run_json(command)?;
        let torch = if torch {
            eprintln!("bench {name} on pytorch ...");
            let mut command = Command::new(python);
            command.arg("scripts/bench_torch.py").args(&shape);
            let mut result = run_json(command)?;
            if continual {
                eprintln!("bench {name} (continual) on pytorch ...");
                let mut command = Command::new(python);
                command.arg("scripts/bench_torch_continual.py").args(&shape);
                let extra = run_json(command)?;
                for key in ["cmoe_step_tok_s", "lora_step_tok_s", "eval_tok_s"] {
                    result[key] = extra[key].clone();
                }
                result["continual"] = extra;
            }
            Some(result)
        } else {
            None
        };
        for (metric, label) in [
            ("forward_tok_s", "forward"),
            ("train_tok_s", "forward+backward (all weights)"),
            ("generate_tok_s", "generation (new tokens)"),
            (
                "cmoe_step_tok_s",
                "LLaVA-CMoE training step (task 2+, with PTL)",
            ),
            ("lora_step_tok_s", "LoRA training step"),
            (
                "eval_tok_s",
                "evaluation of a task through PTL (new tokens)",
            ),
        ] {
            let Some(ours) = burn[metric].as_f64() else {
                continue;
            };
            let theirs = torch.as_ref().and_then(|t| t[metric].as_f64());
            rows.push(format!(
                "| {name} | {} | {} x {} | {label} | {ours:.0} | {} | {} |",
                burn["parameters"],
                burn["batch"],
                burn["seq"],
                theirs.map_or("-".into(), |t| format!("{t:.0}")),
                theirs.map_or("-".into(), |t| format!("{:.2}", ours / t)),
            ));
        }
        let mb = |v: &serde_json::Value| v["peak_rss_mb"].as_f64();
        if let Some(ours) = mb(&burn) {
            let theirs = torch.as_ref().and_then(mb);
            rows.push(format!(
                "| {name} | {} | {} x {} | peak memory of the process (MB; lower is better) | {ours:.0} | {} | {} |",
                burn["parameters"],
                burn["batch"],
                burn["seq"],
                theirs.map_or("-".into(), |t| format!("{t:.0}")),
                theirs.map_or("-".into(), |t| format!("{:.2}", ours / t)),
            ));
        }
        results.push(serde_json::json!({ "case": name, "burn": burn, "pytorch": torch }));
    }
    let table = format!(
        "| case | params | batch x seq | measure | Burn {backend} tok/s | PyTorch tok/s | Burn / PyTorch |\n|---|---|---|---|---|---|---|\n{}\n",
        rows.join("\n")
    );
    println!("{table}");
    std::fs::write(
        out.join(format!("bench-{backend}.json")),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(out.join(format!("bench-{backend}.md")), &table)?;
    eprintln!("wrote {}/bench-{backend}.{{json,md}}", out.display());
    Ok(())
}
