//! `cmoe ask`: a new question answered by a saved run, PTL choosing the task's router.

use std::path::PathBuf;

use burn::tensor::backend::Backend;
use cmoe_coin::format::TestRecord;
use cmoe_moe::{InferenceModel, LlavaLearner};
use serde::Serialize;

use super::config::RunConfig;
use super::folder::read_run_file;
use super::runtime::Runtime;
use crate::backend::{BackendTask, dispatch_for};
use crate::dataset::collate_prompts;

/// What [`AskTask`] answers.
#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    /// The task whose router answered.
    pub task: String,
    /// Every learned task's z-score, in training order (empty for shared-router baselines).
    pub z_scores: Vec<(String, f64)>,
    /// The generated answer.
    pub text: String,
}

/// Answers a question about an image with a finished (or partial) run: PTL picks the task,
/// its router answers.
pub struct AskTask {
    /// The run folder (`run.json`, `state/`).
    pub dir: PathBuf,
    /// The image.
    pub image: PathBuf,
    /// The question, in the task's instruction style.
    pub question: String,
}

impl BackendTask for AskTask {
    type Output = anyhow::Result<Answer>;

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<Answer> {
        let config: RunConfig = read_run_file(&self.dir.join("run.json"))?;
        let Runtime {
            base,
            pad,
            generation,
            encoder,
        } = Runtime::<B>::load(&config, PathBuf::new(), &device)?;
        let mut learner = LlavaLearner::load(base, &self.dir.join("state"), &device)?;
        learner.model.set_dispatch(dispatch_for::<B>());
        let learned = learner.tasks_learned();
        if learned == 0 {
            anyhow::bail!("{}: no task has been learned yet", self.dir.display());
        }
        let names: Vec<String> = config
            .task_list()?
            .into_iter()
            .take(learned)
            .map(|(name, _)| name)
            .collect();
        let InferenceModel { model, locator } = learner.valid();
        let record = TestRecord {
            question_id: cmoe_coin::format::QuestionId("ask".into()),
            image: self.image.display().to_string(),
            text: self.question,
            answer: None,
            answers: None,
            answer_bbox: None,
            size: None,
        };
        let prompt = [encoder.encode_prompt(&record)?];
        let (task, z_scores) = if !config.method.shared_router() {
            let location = model.locate(&locator, collate_prompts::<B>(&prompt, pad, &device))?;
            let z = names
                .iter()
                .cloned()
                .zip(location.z_scores[0].clone())
                .collect();
            (location.tasks[0], z)
        } else {
            (0, Vec::new())
        };
        let ids = model.generate(
            collate_prompts::<B>(&prompt, pad, &device),
            task,
            &generation,
        )?;
        Ok(Answer {
            task: names[task].clone(),
            z_scores,
            text: encoder.tokenizer.decode(&ids[0])?.trim().to_string(),
        })
    }
}
