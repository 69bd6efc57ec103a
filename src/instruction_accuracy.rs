//! How well a base model follows instructions: its accuracy on held-out questions of each kind
//! in the pretraining's instruction mixture ([`cmoe_coin::mini::instructions::Kind`]), answered
//! greedily. A stage-2 loss is one number over every kind; this shows which skills (reading,
//! boxes, counting, ...) the base has before a continual run depends on them.
//!
//! The questions come from a generator stream of their own (seeded by the pretraining seed,
//! not one of its step streams). The smallest kinds' answer spaces are small, so a question
//! may repeat one seen in training by chance: the figures measure the skill, not recall of
//! unseen images.

use std::path::PathBuf;
use std::sync::Arc;

use burn::tensor::backend::Backend;
use cmoe_coin::mini::instructions::{Kind, sample_of};
use cmoe_coin::mini::tasks::Sample;
use cmoe_data::prompt::Conversation;
use cmoe_llava::{GenerationConfig, Llava, LlavaConfig, Sampling};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::backend::BackendTask;
use crate::continual::in_parallel;
use crate::dataset::{CoinEncoder, Encoded, collate_prompts};
use crate::observer::{RunEvent, RunObserver};
use crate::pipeline::LlavaPipeline;

/// Questions answered per generation batch.
const BATCH: usize = 16;

/// Longest answer generated, in tokens (the longest reference, a corners answer, takes 15
/// with the shipped tokenizer).
const MAX_NEW_TOKENS: usize = 24;

/// A base's accuracy on held-out instruction questions (in `pretrain.json`, and printed by
/// `cmoe eval-base`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstructionAccuracy {
    /// Seed of the questions' stream.
    pub seed: u64,
    /// Questions per kind.
    pub per_kind: usize,
    /// Accuracy (percent) per kind, in [`Kind::ALL`]'s order.
    pub kinds: Vec<KindAccuracy>,
    /// Mean over the kinds.
    pub mean: f64,
}

/// Accuracy on one kind of question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindAccuracy {
    /// The kind's name ([`Kind::name`]).
    pub kind: String,
    /// Percent of its questions answered right ([`Kind::is_correct`]).
    pub accuracy: f64,
}

/// One held-out question and the base's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldOutAnswer {
    /// The kind's name.
    pub kind: String,
    /// The question.
    pub question: String,
    /// The reference answer.
    pub reference: String,
    /// The base's answer.
    pub answer: String,
    /// Whether it counts as right.
    pub correct: bool,
}

/// `per_kind` questions of every kind, in [`Kind::ALL`]'s order, from the stream of `seed`.
pub fn held_out_questions(seed: u64, per_kind: usize, image_size: u32) -> Vec<(Kind, Sample)> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x4E1D_0000);
    Kind::ALL
        .into_iter()
        .flat_map(|kind| std::iter::repeat_n(kind, per_kind))
        .map(|kind| (kind, sample_of(kind, &mut rng, image_size)))
        .collect()
}

/// Answers `per_kind` held-out questions of every kind with `model` (its `config`; greedy,
/// batches spread over the cores) and scores them; returns the accuracies and every answer.
pub fn instruction_accuracy<B: Backend>(
    model: &Llava<B>,
    encoder: &CoinEncoder,
    config: &LlavaConfig,
    (seed, per_kind): (u64, usize),
    device: &B::Device,
    observer: &dyn RunObserver,
) -> anyhow::Result<(InstructionAccuracy, Vec<HeldOutAnswer>)> {
    anyhow::ensure!(per_kind > 0, "at least one question per kind is needed");
    let pad = config.pad_token_id.unwrap_or(0);
    let image_size = config.vision_config.image_size as u32;
    let questions = held_out_questions(seed, per_kind, image_size);
    let prompts = questions
        .iter()
        .map(|(_, s)| encoder.encode_question(&s.question, encoder.processor.preprocess(&s.image)))
        .collect::<anyhow::Result<Vec<Encoded>>>()?;
    let generation = GenerationConfig {
        max_new_tokens: MAX_NEW_TOKENS,
        eos_token_ids: config.text_config.eos_token_id.clone(),
        pad_token_id: pad,
        sampling: Sampling::Greedy,
    };
    observer.event(RunEvent::Started {
        name: "held-out instructions",
        len: prompts.len() as u64,
        done: 0,
    });
    let batches = in_parallel(prompts.len().div_ceil(BATCH), |b| {
        let batch = &prompts[b * BATCH..((b + 1) * BATCH).min(prompts.len())];
        let input = collate_prompts::<B>(batch, pad, device);
        let ids = cmoe_llava::generation::generate(model, input.into(), &generation)?;
        observer.event(RunEvent::Advanced {
            steps: ids.len() as u64,
            status: None,
        });
        Ok(ids)
    })?;
    observer.event(RunEvent::Finished);
    let mut answers = Vec::with_capacity(questions.len());
    for ((kind, sample), ids) in questions.iter().zip(batches.iter().flatten()) {
        let answer = encoder.tokenizer.decode(ids)?.trim().to_string();
        answers.push(HeldOutAnswer {
            kind: kind.name().into(),
            question: sample.question.clone(),
            reference: sample.answer.clone(),
            correct: kind.is_correct(&answer, &sample.answer),
            answer,
        });
    }
    let kinds: Vec<KindAccuracy> = Kind::ALL
        .iter()
        .zip(answers.chunks(per_kind))
        .map(|(kind, chunk)| KindAccuracy {
            kind: kind.name().into(),
            accuracy: 100.0 * chunk.iter().filter(|a| a.correct).count() as f64 / per_kind as f64,
        })
        .collect();
    let mean = kinds.iter().map(|k| k.accuracy).sum::<f64>() / kinds.len() as f64;
    Ok((
        InstructionAccuracy {
            seed,
            per_kind,
            kinds,
            mean,
        },
        answers,
    ))
}

/// `cmoe eval-base`: loads a model directory and measures [`instruction_accuracy`].
pub struct EvalBaseTask {
    /// The model directory (HF layout with tokenizer and processor).
    pub model: PathBuf,
    /// Seed of the questions (a pretraining's seed gives the questions it reports).
    pub seed: u64,
    /// Questions per kind.
    pub per_kind: usize,
    /// Receives the progress ([`crate::observer::Silent`] ignores it).
    pub observer: Arc<dyn RunObserver>,
}

impl BackendTask for EvalBaseTask {
    type Output = anyhow::Result<(InstructionAccuracy, Vec<HeldOutAnswer>)>;

    fn run<B: Backend>(self, device: B::Device) -> Self::Output {
        let pipe = LlavaPipeline::<B>::load(&self.model, &device)?;
        let encoder = CoinEncoder {
            tokenizer: pipe.tokenizer,
            processor: pipe.processor,
            conversation: Conversation::vicuna_v1(),
            tokens_per_image: pipe.config.image_tokens_per_image(),
            image_root: PathBuf::new(),
        };
        instruction_accuracy(
            &pipe.model,
            &encoder,
            &pipe.config,
            (self.seed, self.per_kind),
            &device,
            &*self.observer,
        )
    }
}
