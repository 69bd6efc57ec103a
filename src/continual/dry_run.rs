//! `cmoe train --dry-run`: everything a run needs, checked without loading a weight or
//! training a step (settings, the model's config, its shards' shapes, tokenizer and image
//! processor, every task's files and images, the initial phase's data), the steps of every
//! stage, and the memory plan of the largest stage ([`crate::memory_plan`]).

use std::path::Path;

use cmoe_coin::format::{read_test, read_train_lenient};
use cmoe_data::image::ImageProcessorConfig;
use cmoe_data::prompt::Conversation;
use cmoe_data::tokenizer::LlavaTokenizer;
use cmoe_llava::config::LlavaConfig;
use cmoe_moe::pgke::ExpansionMode;
use cmoe_moe::ptl::PtlFeature;
use serde::{Deserialize, Serialize};

use super::config::{InitChoice, Method, RunConfig};
use super::folder::{data_dir, image_root, train_path};
use super::train::{init_data_path, steps};
use crate::dataset::CoinEncoder;
use crate::memory_plan::{self, MemoryPlan, PlanSettings, StageShape};

/// Text tokens per row the plan assumes when the data cannot be tokenised (no tokenizer, or
/// Mini-CoIN not generated yet): CoIN's prompts and answers are mostly shorter.
pub const ASSUMED_TEXT_TOKENS: usize = 104;

/// Training records per task whose token count the plan measures (the longest counts).
const MEASURED_RECORDS: usize = 2000;

/// One thing checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    /// What was checked (a file or a setting).
    pub what: String,
    /// Whether the run can go on with it.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// A task's data and steps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSteps {
    /// The task (its folder under `Instructions/`).
    pub name: String,
    /// Usable training records.
    pub train_samples: usize,
    /// Test questions.
    pub test_questions: usize,
    /// Records whose image is missing (training and test).
    pub missing_images: usize,
    /// Optimiser steps of PGKE's probe stage.
    pub probe_steps: usize,
    /// Optimiser steps of the task's training stage.
    pub steps: usize,
}

/// What `--dry-run` found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DryRun {
    /// Whether every check passed.
    pub ok: bool,
    /// Every check, in order.
    pub checks: Vec<Check>,
    /// Samples and steps of the initial phase, when it has data.
    pub initial_phase: Option<TaskSteps>,
    /// Samples and steps per task, in training order.
    pub tasks: Vec<TaskSteps>,
    /// The largest stage's memory (whenever the model's config is readable).
    pub memory: Option<MemoryPlan>,
}

impl DryRun {
    /// The report as text.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for c in &self.checks {
            let mark = if c.ok { "ok  " } else { "FAIL" };
            out.push_str(&format!("{mark} {}: {}\n", c.what, c.detail));
        }
        let rows = self.initial_phase.iter().chain(&self.tasks);
        for t in rows {
            out.push_str(&format!(
                "     {:<24} {:>8} train {:>7} test {:>6} missing images  steps: probe {}, train {}\n",
                t.name, t.train_samples, t.test_questions, t.missing_images, t.probe_steps, t.steps
            ));
        }
        if let Some(plan) = &self.memory {
            out.push_str(&plan.describe());
        }
        out.push_str(if self.ok {
            "dry run: everything the run needs is there\n"
        } else {
            "dry run: FAILED (see above)\n"
        });
        out
    }
}

/// Where the run will run, for the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Bytes per boolean on the backend.
    pub bool_bytes: usize,
    /// Whether it is a GPU.
    pub gpu: bool,
}

/// Checks everything `config`'s run (in `run_dir`) needs, and plans its memory.
pub fn dry_run(config: &RunConfig, run_dir: &Path, target: Target) -> DryRun {
    let mut checks = Vec::new();
    let mut check = |what: &str, result: Result<String, String>| {
        let ok = result.is_ok();
        checks.push(Check {
            what: what.to_string(),
            ok,
            detail: result.unwrap_or_else(|e| e),
        });
        ok
    };
    check(
        "settings",
        config
            .check()
            .map(|_| "valid".into())
            .map_err(|e| format!("{e:#}")),
    );
    let model_config = LlavaConfig::from_file(&config.model.join("config.json"));
    check(
        &format!("{}", config.model.join("config.json").display()),
        model_config
            .as_ref()
            .map(|c| {
                format!(
                    "{} parameters, {} decoder layers of width {}",
                    c.parameter_counts().total,
                    c.text_config.num_hidden_layers,
                    c.text_config.hidden_size
                )
            })
            .map_err(|e| e.to_string()),
    );
    let model_config = model_config.ok();
    let mut tokenizer = None;
    let mut processor = None;
    if let Some(mc) = &model_config {
        check(
            "weights",
            match cmoe_llava::import::check_shapes(&config.model, mc) {
                Ok(problems) if problems.is_empty() => Ok(format!(
                    "every tensor present with its shape ({})",
                    cmoe_llava::import::weight_files(&config.model)
                        .map(|f| format!("{} files", f.len()))
                        .unwrap_or_default()
                )),
                Ok(problems) => Err(problems.join("; ")),
                Err(e) => Err(e.to_string()),
            },
        );
        let loaded = LlavaTokenizer::from_model_dir(
            &config.model,
            mc.image_token_index,
            mc.text_config.vocab_size,
        );
        check(
            "tokenizer",
            loaded
                .as_ref()
                .map(|_| "matches the model".to_string())
                .map_err(|e| e.to_string()),
        );
        tokenizer = loaded.ok();
        let loaded =
            ImageProcessorConfig::from_model_dir(&config.model, mc.vision_config.image_size as u32);
        check(
            "image processor",
            loaded
                .as_ref()
                .map(|_| "preprocessor_config.json read".to_string())
                .map_err(|e| e.to_string()),
        );
        processor = loaded.ok();
    }
    let data_dir = data_dir(config, run_dir);
    let images = image_root(config, &data_dir);
    let encoder = match (tokenizer, processor, &model_config) {
        (Some(tokenizer), Some(processor), Some(mc)) => Some(CoinEncoder {
            tokenizer,
            processor,
            conversation: Conversation::vicuna_v1(),
            tokens_per_image: mc.image_tokens_per_image(),
            image_root: images.clone(),
        }),
        _ => None,
    };
    let mut longest_text = 0;
    let mut measure = |records: &[cmoe_coin::format::TrainRecord]| {
        if let Some(encoder) = &encoder {
            for record in records.iter().take(MEASURED_RECORDS) {
                if let Ok(tokens) = encoder.text_tokens(record) {
                    longest_text = longest_text.max(tokens);
                }
            }
        }
    };
    let generated = config.data_root.is_none() && !data_dir.join("mini-coin.json").exists();
    let mut tasks = Vec::new();
    let mut initial_phase = None;
    if generated {
        check(
            "data",
            Ok(format!(
                "Mini-CoIN is generated in {} when the run starts",
                data_dir.display()
            )),
        );
    } else {
        let names = config.task_list().map_err(|e| format!("{e:#}"));
        if let Ok(names) = &names {
            for (name, _) in names {
                let train = train_path(&data_dir, name);
                let test = data_dir.join("Instructions").join(name).join("test.json");
                let read = read_train_lenient(&train).map_err(|e| e.to_string());
                let tests = read_test(&test).map_err(|e| e.to_string());
                let result = match (&read, &tests) {
                    (Ok((records, _)), _) if records.is_empty() => {
                        Err(format!("{}: no training sample", train.display()))
                    }
                    (Err(e), _) | (_, Err(e)) => Err(e.clone()),
                    (Ok((records, bad)), Ok(questions)) => {
                        measure(records);
                        let missing = records
                            .iter()
                            .map(|r| &r.image)
                            .chain(questions.iter().map(|q| &q.image))
                            .filter(|image| !images.join(image).exists())
                            .count();
                        tasks.push(task_steps(
                            config,
                            name,
                            records.len(),
                            questions.len(),
                            missing,
                        ));
                        Ok(format!(
                            "{} training records ({} malformed), {} test questions, {missing} \
                             missing images",
                            records.len(),
                            bad.len(),
                            questions.len()
                        ))
                    }
                };
                check(&format!("task {name}"), result);
            }
        }
        check("task list", names.map(|n| format!("{} tasks", n.len())));
    }
    // The initial phase's data: a file the settings name, or the set Mini-CoIN generates.
    if config.init == InitChoice::Phase && !(generated && config.init_data.is_none()) {
        let result = init_data_path(config, &data_dir)
            .map_err(|e| format!("{e:#}"))
            .and_then(|path| {
                let (records, bad) = read_train_lenient(&path).map_err(|e| e.to_string())?;
                if records.is_empty() {
                    return Err(format!("{}: no training sample", path.display()));
                }
                measure(&records);
                let missing = records
                    .iter()
                    .filter(|r| !images.join(&r.image).exists())
                    .count();
                let mut steps = task_steps(config, "initial phase", records.len(), 0, missing);
                steps.probe_steps = 0;
                steps.steps = self::steps(config, records.len().div_ceil(config.batch.max(1)));
                initial_phase = Some(steps);
                Ok(format!(
                    "{}: {} records ({} malformed), {missing} missing images",
                    path.display(),
                    records.len(),
                    bad.len()
                ))
            });
        check("initial data", result);
    }
    let memory = model_config.as_ref().map(|mc| {
        let text = if longest_text > 0 {
            longest_text
        } else {
            ASSUMED_TEXT_TOKENS
        };
        let seq = text + mc.image_tokens_per_image();
        memory_plan::plan(mc, &plan_settings(config, mc, seq, target))
    });
    DryRun {
        ok: checks.iter().all(|c| c.ok),
        checks,
        initial_phase,
        tasks,
        memory,
    }
}

/// A task's steps from its sizes.
fn task_steps(
    config: &RunConfig,
    name: &str,
    train: usize,
    test: usize,
    missing: usize,
) -> TaskSteps {
    let batches = train.div_ceil(config.batch.max(1));
    let probe = ((batches as f64) * config.probe_fraction).ceil() as usize;
    TaskSteps {
        name: name.to_string(),
        train_samples: train,
        test_questions: test,
        missing_images: missing,
        probe_steps: steps(config, probe.max(1)),
        steps: steps(config, batches),
    }
}

/// The plan's settings for `config`'s run: its stages with the most experts each can have
/// (every layer expanded by every task).
fn plan_settings(config: &RunConfig, mc: &LlavaConfig, seq: usize, target: Target) -> PlanSettings {
    let moe = config.effective_moe();
    let tasks = config.task_list().map_or(8, |t| t.len());
    let initial = moe.initial_experts;
    let added = match config.experts_per_layer {
        ExpansionMode::Fixed(n) => n,
        ExpansionMode::ProbeCount => config.probe_experts,
    };
    let mut stages = vec![(
        if config.init == InitChoice::Phase {
            "the initial phase".to_string()
        } else {
            "task 1".to_string()
        },
        StageShape {
            experts: initial,
            trainable: initial,
        },
    )];
    if config.method == Method::Cmoe {
        // With an initial phase every task goes through PGKE; without, every task but the first.
        let first = usize::from(config.init != InitChoice::Phase);
        let before_last = initial + added * (tasks - 1).saturating_sub(first);
        stages.push((
            format!("task {tasks}'s probe stage"),
            StageShape {
                experts: before_last + config.probe_experts,
                trainable: config.probe_experts,
            },
        ));
        stages.push((
            format!("task {tasks}'s training stage"),
            StageShape {
                experts: before_last + added,
                trainable: added,
            },
        ));
    }
    let feature = mc.text_config.hidden_size
        * match config.ptl.feature {
            PtlFeature::Both => 2,
            PtlFeature::Last | PtlFeature::Mean => 1,
        };
    // Encoder `d -> hidden -> 2 x latent`, decoder `latent -> hidden -> 2 x d` (weights and biases).
    let (hidden, latent) = (config.ptl.hidden, config.ptl.latent);
    let vae_params = (feature + 1) * hidden
        + 2 * (hidden + 1) * latent
        + (latent + 1) * hidden
        + 2 * (hidden + 1) * feature;
    PlanSettings {
        rows: config.batch,
        seq,
        rank: moe.rank,
        targets: moe.targets,
        dropout: moe.dropout > 0.0,
        base_bytes: config.base_dtype.bytes(),
        bool_bytes: target.bool_bytes,
        vae_params,
        stages,
        gpu: target.gpu,
    }
}
