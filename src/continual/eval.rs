//! Evaluation: test questions answered in parallel batches with a chosen router per question,
//! scored with CoIN's scorers; the zero-shot row; `cmoe eval` on a saved run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::backend::Backend;
use cmoe_coin::format::{Prediction, TestRecord, write_json, write_jsonl};
use cmoe_coin::score::{Compat, TaskType, score};
use cmoe_llava::GenerationConfig;
use cmoe_moe::LlavaCmoe;
use cmoe_moe::TaskLocator;
use cmoe_moe::{InferenceModel, LlavaLearner};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::config::{Method, RouterChoice, RunConfig};
use super::folder::{data_dir, image_root, read_run_file};
use super::report::location_accuracy;
use super::runtime::Runtime;
use crate::backend::{BackendTask, dispatch_for};
use crate::dataset::{CoinEncoder, Encoded, collate_prompts};
use crate::loader::{SampleProblem, load_test_set};
use crate::observer::{RunEvent, RunObserver};

/// Accuracy of a run's latest state on every task it has learned (`eval.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    /// Learned tasks, in training order.
    pub tasks: Vec<String>,
    /// Accuracy per task (percent).
    pub accuracy: Vec<f64>,
    /// Mean of `accuracy`.
    pub mean: f64,
    /// `ptl_confusion[true][chosen]`.
    pub ptl_confusion: Vec<Vec<usize>>,
    /// Share of questions routed to their own task.
    pub ptl_accuracy: f64,
    /// Questions left out per task (missing or unreadable images).
    pub test_problems: Vec<Vec<SampleProblem>>,
}

/// Evaluates a run's saved state on the test sets of every task it has learned, writing the
/// answers (`eval/<task>.jsonl`) and `eval.json`.
pub struct EvalTask {
    /// The run folder.
    pub dir: PathBuf,
    /// Receives the evaluation's progress ([`crate::observer::Silent`] ignores it).
    pub observer: Arc<dyn RunObserver>,
}

impl BackendTask for EvalTask {
    type Output = anyhow::Result<EvalReport>;

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<EvalReport> {
        let (dir, observer) = (self.dir, &*self.observer);
        let config: RunConfig = read_run_file(&dir.join("run.json"))?;
        let data = data_dir(&config, &dir);
        let Runtime {
            base,
            pad,
            generation,
            encoder,
        } = Runtime::<B>::load(&config, image_root(&config, &data), &device)?;
        let mut learner = LlavaLearner::load(base, &dir.join("state"), &device)?;
        learner.model.set_dispatch(dispatch_for::<B>());
        let all = config.task_list()?;
        // Multitask training learns every task in one stage.
        let learned = match learner.tasks_learned() {
            0 => anyhow::bail!("{}: no task has been learned yet", dir.display()),
            _ if config.method == Method::Multitask => all.len(),
            n => n,
        };
        let tasks: Vec<(String, TaskType)> = all.into_iter().take(learned).collect();
        let InferenceModel { model, locator } = learner.valid();
        let evaluator = Evaluator {
            model: &model,
            locator: &locator,
            config: &config,
            encoder: &encoder,
            pad,
            generation: &generation,
            device: &device,
            observer,
        };
        let mut rng = StdRng::seed_from_u64(config.seed);
        let mut report = EvalReport {
            tasks: Vec::new(),
            accuracy: Vec::new(),
            mean: 0.0,
            ptl_confusion: vec![vec![0; learned]; learned],
            ptl_accuracy: 0.0,
            test_problems: Vec::new(),
        };
        for (i, (name, task_type)) in tasks.into_iter().enumerate() {
            let path = data.join("Instructions").join(&name).join("test.json");
            let (records, problems) = load_test_set(&encoder, &path, config.bad_samples)?;
            let (accuracy, chosen, predictions) =
                evaluator.evaluate(learned - 1, i, &records, task_type, config.router, &mut rng)?;
            for c in chosen {
                report.ptl_confusion[i][c] += 1;
            }
            write_jsonl(
                &dir.join("eval").join(format!("{name}.jsonl")),
                &predictions,
            )?;
            observer.note(&format!("  {name:<10} {accuracy:6.2}"));
            report.tasks.push(name);
            report.accuracy.push(accuracy);
            report.test_problems.push(problems);
        }
        report.mean = report.accuracy.iter().sum::<f64>() / learned as f64;
        report.ptl_accuracy = location_accuracy(&report.ptl_confusion);
        write_json(&dir.join("eval.json"), &report)?;
        Ok(report)
    }
}

/// What answering test questions with a learned state needs.
pub(super) struct Evaluator<'a, B: Backend> {
    pub(super) model: &'a LlavaCmoe<B>,
    pub(super) locator: &'a TaskLocator<B>,
    pub(super) config: &'a RunConfig,
    pub(super) encoder: &'a CoinEncoder,
    pub(super) pad: u32,
    pub(super) generation: &'a GenerationConfig,
    pub(super) device: &'a B::Device,
    pub(super) observer: &'a dyn RunObserver,
}

/// One evaluation: the accuracy, the router chosen for each question, and the answers.
pub(super) type Evaluation = (f64, Vec<usize>, Vec<Prediction>);

impl<B: Backend> Evaluator<'_, B> {
    /// Accuracy on task `i` after training task `t` with routers chosen by `router`, the
    /// router chosen for each question, and the answers.
    pub(super) fn evaluate(
        &self,
        t: usize,
        i: usize,
        records: &[TestRecord],
        task_type: TaskType,
        router: RouterChoice,
        rng: &mut StdRng,
    ) -> anyhow::Result<Evaluation> {
        let Self {
            model,
            locator,
            config,
            encoder,
            pad,
            generation,
            device,
            observer,
        } = *self;
        let shared = config.method.shared_router();
        // Random routers are drawn here, in order, so that the run stays reproducible.
        let drawn: Vec<usize> = match router {
            RouterChoice::Random if !shared => (0..records.len())
                .map(|_| rng.random_range(0..=t))
                .collect(),
            _ => Vec::new(),
        };
        let answer = |first: usize, prompts: &[Encoded]| {
            let n = prompts.len();
            let chosen: Vec<usize> = match router {
                _ if shared => vec![0; n],
                RouterChoice::Ptl => {
                    model
                        .locate(locator, collate_prompts::<B>(prompts, pad, device))?
                        .tasks
                }
                RouterChoice::Last => vec![t; n],
                RouterChoice::Random => drawn[first..first + n].to_vec(),
                RouterChoice::Oracle => vec![i; n],
            };
            let outputs = generate_grouped(model, prompts, &chosen, pad, generation, device)?;
            Ok((chosen, outputs))
        };
        answer_and_score(
            encoder,
            records,
            task_type,
            config.eval_batch,
            answer,
            observer,
        )
    }
}

/// Answers the questions of `records` in batches of `batch` with `answer` (given the batch's
/// first position and its prompts, it returns the router chosen for each row and the generated
/// ids), and scores the answers as `task_type`; `observer` sees the progress. A batch's images
/// are decoded when it is answered and dropped after: memory does not grow with the test set.
pub(super) fn answer_and_score(
    encoder: &CoinEncoder,
    records: &[TestRecord],
    task_type: TaskType,
    batch: usize,
    answer: impl Fn(usize, &[Encoded]) -> anyhow::Result<(Vec<usize>, Vec<Vec<u32>>)> + Sync,
    observer: &dyn RunObserver,
) -> anyhow::Result<Evaluation> {
    observer.event(RunEvent::Started {
        name: "evaluate",
        len: records.len() as u64,
        done: 0,
    });
    let batch = batch.max(1);
    // Batches are answered by worker threads (each batch's work is the same whichever
    // thread does it, so the answers are those of a sequential pass).
    let chunks = records.len().div_ceil(batch);
    let answered = in_parallel(chunks, |chunk| {
        let first = chunk * batch;
        let prompts = records[first..(first + batch).min(records.len())]
            .iter()
            .map(|record| {
                encoder.encode_prompt(record).map_err(|e| {
                    e.context(format!(
                        "test question {}: its image passed the check when the test set was \
                         opened but cannot be decoded now",
                        record.question_id
                    ))
                })
            })
            .collect::<anyhow::Result<Vec<Encoded>>>()?;
        let answers = answer(first, &prompts)?;
        observer.event(RunEvent::Advanced {
            steps: answers.1.len() as u64,
            status: None,
        });
        Ok(answers)
    })?;
    let mut predictions = Vec::with_capacity(records.len());
    let mut chosen_all = Vec::with_capacity(records.len());
    for (record, ids) in records.iter().zip(answered.iter().flat_map(|(_, o)| o)) {
        predictions.push(Prediction {
            question_id: record.question_id.clone(),
            text: encoder.tokenizer.decode(ids)?.trim().to_string(),
        });
    }
    for (chosen, _) in answered {
        chosen_all.extend(chosen);
    }
    observer.event(RunEvent::Finished);
    let s = score(task_type, records, &predictions, Compat::Correct)?;
    Ok((s.accuracy, chosen_all, predictions))
}

/// Zero-shot accuracy: every task's test questions, in its own instruction text, answered by
/// the base model before any task (no experts), with its answers written to
/// `answers_dir/<task>.jsonl`.
pub(super) fn zero_shot<B: Backend>(
    base: &cmoe_llava::Llava<B>,
    tests: &[Vec<TestRecord>],
    names: &[String],
    types: &[TaskType],
    runtime: (&CoinEncoder, u32, &GenerationConfig, &RunConfig),
    answers_dir: &Path,
    device: &B::Device,
    observer: &dyn RunObserver,
) -> anyhow::Result<Vec<f64>> {
    let (encoder, pad, generation, config) = runtime;
    let mut accuracy = Vec::with_capacity(tests.len());
    for ((records, name), &task_type) in tests.iter().zip(names).zip(types) {
        let answer = |_: usize, prompts: &[Encoded]| {
            let input = collate_prompts::<B>(prompts, pad, device);
            let outputs = cmoe_llava::generation::generate(base, input.into(), generation)?;
            Ok((Vec::new(), outputs))
        };
        let (a, _, predictions) = answer_and_score(
            encoder,
            records,
            task_type,
            config.eval_batch,
            answer,
            observer,
        )?;
        write_jsonl(&answers_dir.join(format!("{name}.jsonl")), &predictions)?;
        observer.note(&format!("  {name:<10} {a:6.2} (zero-shot)"));
        accuracy.push(a);
    }
    Ok(accuracy)
}

/// `work(0..n)` on up to one worker thread per core, the results in order; the first error
/// stops the rest.
pub fn in_parallel<T: Send>(
    n: usize,
    work: impl Fn(usize) -> anyhow::Result<T> + Sync,
) -> anyhow::Result<Vec<T>> {
    let workers = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(n.max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failed = std::sync::atomic::AtomicBool::new(false);
    let mut results: Vec<(usize, anyhow::Result<T>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if index >= n || failed.load(std::sync::atomic::Ordering::Relaxed) {
                            return done;
                        }
                        let result = work(index);
                        if result.is_err() {
                            failed.store(true, std::sync::atomic::Ordering::Relaxed);
                        }
                        done.push((index, result));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("an evaluation worker panicked"))
            .collect()
    });
    results.sort_by_key(|(index, _)| *index);
    results.into_iter().map(|(_, r)| r).collect()
}

/// Answers `prompts` (one batch), each with the router `chosen[row]`: one generation per
/// router chosen. Returns the generated ids in the prompts' order.
pub fn generate_grouped<B: Backend>(
    model: &LlavaCmoe<B>,
    prompts: &[Encoded],
    chosen: &[usize],
    pad: u32,
    generation: &GenerationConfig,
    device: &B::Device,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let mut groups: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (row, &c) in chosen.iter().enumerate() {
        groups.entry(c).or_default().push(row);
    }
    let mut outputs = vec![Vec::new(); prompts.len()];
    for (router, rows) in groups {
        let group: Vec<Encoded> = rows.iter().map(|&r| prompts[r].clone()).collect();
        let generated = model.generate(
            collate_prompts::<B>(&group, pad, device),
            router,
            generation,
        )?;
        for (&row, ids) in rows.iter().zip(generated) {
            outputs[row] = ids;
        }
    }
    Ok(outputs)
}
