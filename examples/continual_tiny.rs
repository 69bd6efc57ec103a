//! LLaVA-CMoE as a library: two Mini-CoIN tasks learned in sequence on the shipped small LLaVA
//! (the smoke preset: a few seconds on a laptop), the run saved, then reloaded from its folder
//! and asked one test question of each task without saying which task it belongs to: PTL
//! picks the task, that task's router answers.
//!
//! ```text
//! cargo run --release --example continual_tiny
//! ```
//!
//! From the command line the same run is `cmoe train --preset smoke --config two-tasks.toml`
//! (the file holding `[[tasks]]` tables named `ScienceQA` and `ImageNet`), then `cmoe ask`.

use std::path::PathBuf;
use std::sync::Arc;

use llava_cmoe::backend::BackendTask;
use llava_cmoe::coin::format::read_test;
use llava_cmoe::continual::{AskTask, Method, Preset, RunConfig, TaskSpec, TrainTask};
use llava_cmoe::observer::Silent;

type B = burn_flex::Flex;

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut config = RunConfig::preset(Preset::Smoke, Method::Cmoe);
    config.model = root.join("assets/llava-mini");
    config.tasks = ["ScienceQA", "ImageNet"]
        .map(|name| TaskSpec {
            name: name.into(),
            kind: None,
        })
        .into();
    let dir = std::env::temp_dir().join(format!("cmoe-continual-tiny-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    // Learn the two tasks; the run folder holds the state, the report and the generated data.
    let report = TrainTask {
        config,
        dir: dir.clone(),
        resume: false,
        backend: "flex".into(),
        stop_after: None,
        stop_after_expansion: None,
        stop_at_step: None,
        devices: Vec::new(),
        observer: Arc::new(Silent),
    }
    .run::<B>(Default::default())?;
    for (t, task) in report.tasks.iter().enumerate() {
        println!(
            "{task:<10} Immediate {:6.2}  Last {:6.2}",
            report.immediate[t], report.last[t]
        );
    }
    println!(
        "PTL located {:.1} % of the test questions",
        100.0 * report.ptl_accuracy.unwrap_or(0.0)
    );

    // Reload the run from its folder and ask each task's first test question, unlabelled.
    let data = dir.join("data");
    for task in &report.tasks {
        let question = &read_test(&data.join("Instructions").join(task).join("test.json"))?[0];
        let answer = AskTask {
            dir: dir.clone(),
            image: data.join("images").join(&question.image),
            question: question.text.clone(),
        }
        .run::<B>(Default::default())?;
        println!(
            "{task} question -> located as {}, answered {:?} (reference {:?})",
            answer.task,
            answer.text,
            question.answer.as_deref().unwrap_or("")
        );
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
