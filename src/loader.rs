//! The multi-worker sample loader: CoIN training records are turned into [`Encoded`] samples
//! (image decoded and preprocessed, conversation tokenised) by worker threads, batch by batch,
//! a bounded number of batches ahead of the consumer, so that only the batches in flight sit in
//! memory. [`StreamedTask`] feeds them to the learner's stages as they train. Bad samples (a missing or unreadable image, a conversation that does not fit the
//! template) are skipped and counted, or stop the run, as [`BadSamples`] says; never a panic.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;

use burn::tensor::backend::Backend;
use cmoe_coin::format::{BadRecord, TestRecord, TrainRecord, read_test};
use cmoe_moe::train::{BatchSource, TaskSource};
use cmoe_moe::train::{StageError, TrainBatch};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::dataset::{CoinEncoder, Encoded, collate_train};
use cmoe_data::image::ImageProcessorConfig;

/// What to do with a sample that cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BadSamples {
    /// Skip it, count it and list it in the load report.
    #[default]
    Skip,
    /// Stop with an error naming the sample and the problem.
    Error,
}

/// Why a sample was left out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// The record is not a training record (malformed JSON line or shape).
    BadRecord,
    /// Its image file does not exist.
    MissingImage,
    /// Its image exists but cannot be decoded.
    UnreadableImage,
    /// Its conversation cannot be tokenised with the template.
    BadConversation,
}

/// One sample left out, with where and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SampleProblem {
    /// What kind of problem.
    pub kind: ProblemKind,
    /// The record (`id`, or `file:line` / `file[index]` for unreadable records).
    pub at: String,
    /// The message.
    pub message: String,
}

impl std::fmt::Display for SampleProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// What loading a task's training set met: how many samples were used and every one left out.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Samples encoded.
    pub used: usize,
    /// Samples left out.
    pub problems: Vec<SampleProblem>,
}

impl LoadReport {
    /// Starts a report with the records a lenient reader could not parse.
    pub fn from_bad_records(bad: Vec<BadRecord>) -> Self {
        Self {
            used: 0,
            problems: bad
                .into_iter()
                .map(|b| SampleProblem {
                    kind: ProblemKind::BadRecord,
                    at: b.at,
                    message: b.problem,
                })
                .collect(),
        }
    }

    /// How many problems of `kind`.
    pub fn count(&self, kind: ProblemKind) -> usize {
        self.problems.iter().filter(|p| p.kind == kind).count()
    }

    /// One line: used samples and the count of each kind of problem.
    pub fn summary(&self) -> String {
        let kinds = [
            (ProblemKind::BadRecord, "malformed records"),
            (ProblemKind::MissingImage, "missing images"),
            (ProblemKind::UnreadableImage, "unreadable images"),
            (ProblemKind::BadConversation, "bad conversations"),
        ];
        let mut line = format!("{} samples", self.used);
        for (kind, words) in kinds {
            let n = self.count(kind);
            if n > 0 {
                line += &format!(", {n} {words} skipped");
            }
        }
        line
    }

    /// Applies `policy` to the problems so far: with [`BadSamples::Error`], the first one.
    pub fn check(&self, policy: BadSamples) -> anyhow::Result<()> {
        match (policy, self.problems.first()) {
            (BadSamples::Error, Some(p)) => {
                anyhow::bail!("{p} (pass --bad-samples skip to skip such samples and count them)")
            }
            _ => Ok(()),
        }
    }
}

/// Checks that `image` (relative to the encoder's image root) exists, and names it if not.
fn image_problem(encoder: &CoinEncoder, image: &str, at: &str) -> Option<SampleProblem> {
    let path = encoder.image_root.join(image);
    (!path.is_file()).then(|| SampleProblem {
        kind: ProblemKind::MissingImage,
        at: at.to_string(),
        message: format!("image {} does not exist", path.display()),
    })
}

/// Encodes `record`, classifying a failure.
fn encode_one(encoder: &CoinEncoder, record: &TrainRecord) -> Result<Encoded, SampleProblem> {
    if let Some(problem) = image_problem(encoder, &record.image, &record.id) {
        return Err(problem);
    }
    let problem = |kind, message: String| SampleProblem {
        kind,
        at: record.id.clone(),
        message,
    };
    let pixels = encoder
        .processor
        .preprocess_file(&encoder.image_root.join(&record.image))
        .map_err(|e| problem(ProblemKind::UnreadableImage, e.to_string()))?;
    encoder
        .encode_conversation(record, pixels)
        .map_err(|e| problem(ProblemKind::BadConversation, e.to_string()))
}

/// A batch of encoded samples and the samples of that batch that were left out.
pub type LoadedBatch = (Vec<Encoded>, Vec<SampleProblem>);

/// Batches of encoded samples, produced in order by worker threads (starting at batch `first`,
/// worker `w` encodes batches `first + w`, `first + w + workers`, ...; each keeps at most
/// `prefetch` finished batches).
pub struct BatchStream {
    receivers: Vec<Receiver<LoadedBatch>>,
    workers: Vec<JoinHandle<()>>,
    next: usize,
    batches: usize,
    first: usize,
}

impl BatchStream {
    /// Starts `workers` threads encoding `records[order[..]]` in chunks of `batch_size`, from
    /// chunk `first` on.
    pub fn new(
        encoder: Arc<CoinEncoder>,
        records: Arc<Vec<TrainRecord>>,
        order: Arc<Vec<usize>>,
        first: usize,
        batch_size: usize,
        workers: usize,
        prefetch: usize,
    ) -> Self {
        let batch_size = batch_size.max(1);
        let workers = workers.max(1);
        let batches = order.len().div_ceil(batch_size);
        let mut receivers = Vec::new();
        let mut handles = Vec::new();
        let first = first.min(batches);
        for w in 0..workers.min((batches - first).max(1)) {
            let (tx, rx) = sync_channel(prefetch.max(1));
            let (encoder, records, order) = (encoder.clone(), records.clone(), order.clone());
            handles.push(std::thread::spawn(move || {
                for b in (first + w..batches).step_by(workers) {
                    let end = ((b + 1) * batch_size).min(order.len());
                    let mut loaded: LoadedBatch = (Vec::new(), Vec::new());
                    for &i in &order[b * batch_size..end] {
                        match encode_one(&encoder, &records[i]) {
                            Ok(sample) => loaded.0.push(sample),
                            Err(problem) => loaded.1.push(problem),
                        }
                    }
                    if tx.send(loaded).is_err() {
                        return; // the consumer stopped
                    }
                }
            }));
            receivers.push(rx);
        }
        Self {
            receivers,
            workers: handles,
            next: first,
            batches,
            first,
        }
    }

    /// Number of batches the stream yields.
    pub fn len(&self) -> usize {
        self.batches - self.first
    }

    /// Whether the stream yields no batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Iterator for BatchStream {
    type Item = anyhow::Result<LoadedBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.batches {
            return None;
        }
        let batch = self.next;
        let worker = (batch - self.first) % self.receivers.len();
        self.next += 1;
        // A worker only stops early if the consumer is gone, or if it panicked.
        Some(self.receivers[worker].recv().map_err(|_| {
            anyhow::anyhow!("the loader worker for batch {batch} stopped unexpectedly")
        }))
    }
}

impl Drop for BatchStream {
    fn drop(&mut self) {
        self.receivers.clear(); // unblocks workers waiting to send
        for handle in self.workers.drain(..) {
            // A worker's panic was reported by the panic hook, and its batch as an error.
            let _ = handle.join();
        }
    }
}

/// A task's training set read from disk as the learner's stages need it (a [`TaskSource`]):
/// only the records sit in memory; samples are encoded by worker threads a few batches ahead
/// of training and dropped once trained on. Records that cannot be parsed and samples whose
/// image does not exist are found when the task is opened; unreadable images and conversations
/// that do not fit the template when their batch is loaded. Each is recorded once in the
/// task's [`LoadReport`] (or stops the run, by [`BadSamples`]).
pub struct StreamedTask<B: Backend> {
    encoder: Arc<CoinEncoder>,
    records: Arc<Vec<TrainRecord>>,
    /// Record indices in training order, and PGKE's two disjoint subsets.
    train: Arc<Vec<usize>>,
    probe_train: Arc<Vec<usize>>,
    probe_eval: Arc<Vec<usize>>,
    settings: StreamSettings,
    device: B::Device,
    report: RefCell<LoadReport>,
}

/// How a [`StreamedTask`] batches and loads.
#[derive(Debug, Clone, Copy)]
pub struct StreamSettings {
    /// Samples per batch.
    pub batch: usize,
    /// Fraction of the samples in each PGKE subset (probe training, statistics).
    pub probe_fraction: f64,
    /// Worker threads.
    pub workers: usize,
    /// Padding token id.
    pub pad: u32,
    /// What to do with bad samples.
    pub policy: BadSamples,
    /// Seed of the training order.
    pub seed: u64,
}

impl<B: Backend> StreamedTask<B> {
    /// Reads the training file at `path` (JSON array or JSONL, leniently), checks that every
    /// record's image exists, and shuffles the usable records with `settings.seed`. PGKE's
    /// subsets are the first `probe_fraction` of that order and the next as many (the
    /// statistics reuse the probe subset when there are too few samples for two).
    pub fn open(
        encoder: Arc<CoinEncoder>,
        path: &Path,
        settings: StreamSettings,
        device: &B::Device,
    ) -> anyhow::Result<Self> {
        Self::open_all(encoder, &[path.to_path_buf()], settings, device)
    }

    /// [`Self::open`] over the records of several training files together (multitask
    /// training reads every task's file as one set).
    pub fn open_all(
        encoder: Arc<CoinEncoder>,
        paths: &[PathBuf],
        settings: StreamSettings,
        device: &B::Device,
    ) -> anyhow::Result<Self> {
        let mut records = Vec::new();
        let mut bad = Vec::new();
        for path in paths {
            let (more, more_bad) = cmoe_coin::format::read_train_lenient(path)?;
            records.extend(more);
            bad.extend(more_bad);
        }
        let path = paths
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let mut report = LoadReport::from_bad_records(bad);
        report.check(settings.policy)?;
        let mut usable = Vec::with_capacity(records.len());
        for (i, record) in records.iter().enumerate() {
            match image_problem(&encoder, &record.image, &record.id) {
                Some(problem) => {
                    report.problems.push(problem);
                    report.check(settings.policy)?;
                }
                None => usable.push(i),
            }
        }
        if usable.is_empty() {
            anyhow::bail!("{path}: no usable training sample ({})", report.summary());
        }
        report.used = usable.len();
        usable.shuffle(&mut StdRng::seed_from_u64(settings.seed));
        let n = usable.len();
        let subset = ((n as f64 * settings.probe_fraction).ceil() as usize).clamp(1, n);
        let probe_train = usable[..subset].to_vec();
        let probe_eval = if 2 * subset <= n {
            usable[subset..2 * subset].to_vec()
        } else {
            probe_train.clone()
        };
        Ok(Self {
            encoder,
            records: Arc::new(records),
            train: Arc::new(usable),
            probe_train: Arc::new(probe_train),
            probe_eval: Arc::new(probe_eval),
            settings,
            device: device.clone(),
            report: RefCell::new(report),
        })
    }

    /// What loading met so far: usable samples (those with an image, less those found bad
    /// while loading) and every problem.
    pub fn report(&self) -> LoadReport {
        self.report.borrow().clone()
    }

    /// Records `problems` met while loading (each once) and applies the policy.
    fn note(&self, problems: Vec<SampleProblem>) -> anyhow::Result<()> {
        let mut report = self.report.borrow_mut();
        for problem in problems {
            if !report.problems.contains(&problem) {
                report.used = report.used.saturating_sub(1);
                report.problems.push(problem);
            }
        }
        report.check(self.settings.policy)
    }

    /// Adds problems recorded before a restart (a resumed stage does not read the batches it
    /// skips again).
    pub fn restore(&self, saved: LoadReport) -> anyhow::Result<()> {
        self.note(saved.problems)
    }

    /// Loading of `order`'s batches from batch `first` on.
    fn stream(&self, order: Arc<Vec<usize>>, first: usize) -> BatchStream {
        BatchStream::new(
            self.encoder.clone(),
            self.records.clone(),
            order,
            first,
            self.settings.batch,
            self.settings.workers,
            2,
        )
    }

    fn source(&self, order: &Arc<Vec<usize>>) -> Box<dyn BatchSource<B> + '_> {
        Box::new(Stream {
            task: self,
            order: order.clone(),
            stream: None,
            position: 0,
        })
    }
}

impl<B: Backend> TaskSource<B> for StreamedTask<B> {
    fn train(&self) -> Box<dyn BatchSource<B> + '_> {
        self.source(&self.train)
    }

    fn probe_train(&self) -> Box<dyn BatchSource<B> + '_> {
        self.source(&self.probe_train)
    }

    fn probe_eval(&self) -> Box<dyn BatchSource<B> + '_> {
        self.source(&self.probe_eval)
    }
}

/// Passes over some of a [`StreamedTask`]'s records, a [`BatchStream`] each.
struct Stream<'a, B: Backend> {
    task: &'a StreamedTask<B>,
    order: Arc<Vec<usize>>,
    stream: Option<BatchStream>,
    position: usize,
}

impl<B: Backend> BatchSource<B> for Stream<'_, B> {
    fn len(&self) -> usize {
        self.order.len().div_ceil(self.task.settings.batch.max(1))
    }

    fn next_batch(&mut self) -> Result<(usize, TrainBatch<B>), StageError> {
        let data_error = |e: anyhow::Error| StageError::Data(format!("{e:#}"));
        let task = self.task;
        let mut empty = 0;
        loop {
            let (order, position) = (&self.order, self.position);
            let stream = self
                .stream
                .get_or_insert_with(|| task.stream(order.clone(), position));
            let Some(loaded) = stream.next() else {
                // The pass is over: the next starts from the first batch.
                self.stream = None;
                self.position = 0;
                continue;
            };
            let position = self.position;
            self.position += 1;
            let (samples, problems) = loaded.map_err(data_error)?;
            task.note(problems).map_err(data_error)?;
            if samples.is_empty() {
                empty += 1;
                if empty > self.len() {
                    return Err(StageError::Data(
                        "no sample of a whole pass could be loaded".into(),
                    ));
                }
                continue;
            }
            let batch = collate_train::<B>(&samples, task.settings.pad, &task.device);
            return Ok((position, batch));
        }
    }

    fn skip(&mut self, batches: usize) -> Result<(), StageError> {
        // Loading restarts at the batch the skip lands on; nothing before it is read.
        self.position = (self.position + batches) % self.len().max(1);
        self.stream = None;
        Ok(())
    }
}

/// A task's test questions whose image exists and reads as an image (its header: the pixels
/// are decoded batch by batch when the questions are answered, so that a test set of any size
/// holds only its records in memory); the others are left out and returned as problems (or
/// stop the run under [`BadSamples::Error`]).
pub fn load_test_set(
    encoder: &CoinEncoder,
    path: &Path,
    policy: BadSamples,
) -> anyhow::Result<(Vec<TestRecord>, Vec<SampleProblem>)> {
    let mut records = Vec::new();
    let mut report = LoadReport::default();
    for record in read_test(path)? {
        let at = format!("{} question {}", path.display(), record.question_id);
        let problem = image_problem(encoder, &record.image, &at).or_else(|| {
            let image = encoder.image_root.join(&record.image);
            ImageProcessorConfig::probe_file(&image)
                .err()
                .map(|e| SampleProblem {
                    kind: ProblemKind::UnreadableImage,
                    at: at.clone(),
                    message: e.to_string(),
                })
        });
        match problem {
            None => records.push(record),
            Some(problem) => {
                report.problems.push(problem);
                report.check(policy)?;
            }
        }
    }
    if records.is_empty() {
        anyhow::bail!("{}: no usable test question", path.display());
    }
    Ok((records, report.problems))
}

/// Worker threads for loading: the machine's cores, at most 8.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}
