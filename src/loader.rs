//! The multi-worker sample loader: CoIN training records are turned into [`Encoded`] samples
//! (image decoded and preprocessed, conversation tokenised) by worker threads, batch by batch,
//! a bounded number of batches ahead of the consumer, so that only the batches in flight sit in
//! memory. Bad samples (a missing or unreadable image, a conversation that does not fit the
//! template) are skipped and counted, or stop the run, as [`BadSamples`] says; never a panic.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;

use cmoe_coin::format::{BadRecord, TestRecord, TrainRecord, read_test};
use serde::{Deserialize, Serialize};

use crate::dataset::{CoinEncoder, Encoded};

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

/// Batches of encoded samples, produced in order by worker threads (worker `w` encodes
/// batches `w`, `w + workers`, ...; each keeps at most `prefetch` finished batches).
pub struct BatchStream {
    receivers: Vec<Receiver<LoadedBatch>>,
    workers: Vec<JoinHandle<()>>,
    next: usize,
    batches: usize,
}

impl BatchStream {
    /// Starts `workers` threads encoding `records[order[..]]` in chunks of `batch_size`.
    pub fn new(
        encoder: Arc<CoinEncoder>,
        records: Arc<Vec<TrainRecord>>,
        order: Vec<usize>,
        batch_size: usize,
        workers: usize,
        prefetch: usize,
    ) -> Self {
        let batch_size = batch_size.max(1);
        let workers = workers.max(1);
        let order = Arc::new(order);
        let batches = order.len().div_ceil(batch_size);
        let mut receivers = Vec::new();
        let mut handles = Vec::new();
        for w in 0..workers.min(batches.max(1)) {
            let (tx, rx) = sync_channel(prefetch.max(1));
            let (encoder, records, order) = (encoder.clone(), records.clone(), order.clone());
            handles.push(std::thread::spawn(move || {
                for b in (w..batches).step_by(workers) {
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
            next: 0,
            batches,
        }
    }

    /// Number of batches the stream yields.
    pub fn len(&self) -> usize {
        self.batches
    }

    /// Whether the stream yields no batch.
    pub fn is_empty(&self) -> bool {
        self.batches == 0
    }
}

impl Iterator for BatchStream {
    type Item = anyhow::Result<LoadedBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.batches {
            return None;
        }
        let batch = self.next;
        let worker = batch % self.receivers.len();
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
            if handle.join().is_err() {
                eprintln!("a loader worker panicked");
            }
        }
    }
}

/// Reads a task's training file leniently and encodes every sample with `workers` threads,
/// in file order; returns the samples and what was left out (or the first problem as an
/// error under [`BadSamples::Error`]). `on_progress(done, total)` follows the records.
pub fn load_train_set(
    encoder: Arc<CoinEncoder>,
    path: &Path,
    policy: BadSamples,
    workers: usize,
    mut on_progress: impl FnMut(usize, usize),
) -> anyhow::Result<(Vec<Encoded>, LoadReport)> {
    let (records, bad) = cmoe_coin::format::read_train_lenient(path)?;
    let mut report = LoadReport::from_bad_records(bad);
    report.check(policy)?;
    let total = records.len();
    let order: Vec<usize> = (0..total).collect();
    let stream = BatchStream::new(encoder, Arc::new(records), order, 16, workers, 2);
    let mut samples = Vec::new();
    let mut done = 0;
    for loaded in stream {
        let (encoded, problems) = loaded?;
        done += encoded.len() + problems.len();
        on_progress(done, total);
        samples.extend(encoded);
        report.problems.extend(problems);
        report.check(policy)?;
    }
    report.used = samples.len();
    if samples.is_empty() {
        anyhow::bail!(
            "{}: no usable training sample ({})",
            path.display(),
            report.summary()
        );
    }
    Ok((samples, report))
}

/// A task's test questions and their prompts; questions whose image is missing or unreadable
/// are left out and returned as problems (or stop the run under [`BadSamples::Error`]).
pub fn load_test_set(
    encoder: &CoinEncoder,
    path: &Path,
    policy: BadSamples,
) -> anyhow::Result<(Vec<TestRecord>, Vec<Encoded>, Vec<SampleProblem>)> {
    let mut records = Vec::new();
    let mut prompts = Vec::new();
    let mut report = LoadReport::default();
    for record in read_test(path)? {
        let at = format!("{} question {}", path.display(), record.question_id);
        let encoded = match image_problem(encoder, &record.image, &at) {
            Some(problem) => Err(problem),
            None => encoder.encode_prompt(&record).map_err(|e| SampleProblem {
                kind: ProblemKind::UnreadableImage,
                at,
                message: format!("{e:#}"),
            }),
        };
        match encoded {
            Ok(prompt) => {
                records.push(record);
                prompts.push(prompt);
            }
            Err(problem) => {
                report.problems.push(problem);
                report.check(policy)?;
            }
        }
    }
    if records.is_empty() {
        anyhow::bail!("{}: no usable test question", path.display());
    }
    Ok((records, prompts, report.problems))
}

/// Worker threads for loading: the machine's cores, at most 8.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}
