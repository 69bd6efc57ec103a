//! Where a stage's batches come from: batches in memory ([`Cycle`], [`TaskData`]) or any
//! [`BatchSource`] a caller implements, such as a loader that reads and encodes samples from
//! disk while the stage trains, so that a task's data never has to sit in memory.

use crate::train::{StageError, TrainBatch};
use burn::tensor::backend::Backend;

/// Training batches read in order, pass after pass: a stage asks for as many as its optimiser
/// steps x accumulation need.
pub trait BatchSource<B: Backend> {
    /// Batches in one pass over the data (their positions are `0..len`).
    fn len(&self) -> usize;

    /// Whether a pass holds no batch.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The next batch and its position in the pass; after the last one, the first of the next
    /// pass.
    fn next_batch(&mut self) -> Result<(usize, TrainBatch<B>), StageError>;

    /// Passes over the next `batches` batches (a resumed stage skips those its steps already
    /// trained on). Reads and drops them unless a source knows better.
    fn skip(&mut self, batches: usize) -> Result<(), StageError> {
        for _ in 0..batches {
            self.next_batch()?;
        }
        Ok(())
    }
}

/// A [`BatchSource`] over batches in memory.
#[derive(Debug)]
pub struct Cycle<'a, B: Backend> {
    batches: &'a [TrainBatch<B>],
    next: usize,
}

impl<'a, B: Backend> Cycle<'a, B> {
    /// Cycles over `batches` from the first.
    pub fn new(batches: &'a [TrainBatch<B>]) -> Self {
        Self { batches, next: 0 }
    }
}

impl<B: Backend> BatchSource<B> for Cycle<'_, B> {
    fn len(&self) -> usize {
        self.batches.len()
    }

    fn next_batch(&mut self) -> Result<(usize, TrainBatch<B>), StageError> {
        if self.batches.is_empty() {
            return Err(StageError::NoData);
        }
        let position = self.next % self.batches.len();
        self.next = position + 1;
        Ok((position, self.batches[position].clone()))
    }

    fn skip(&mut self, batches: usize) -> Result<(), StageError> {
        self.next += batches;
        Ok(())
    }
}

/// A task's data as the learner reads it: three sources, each started afresh when a stage
/// needs it.
pub trait TaskSource<B: Backend> {
    /// The full training set.
    fn train(&self) -> Box<dyn BatchSource<B> + '_>;
    /// PGKE's probe-training subset (unused for the first task).
    fn probe_train(&self) -> Box<dyn BatchSource<B> + '_>;
    /// PGKE's statistics subset, disjoint from the probe-training one (read once; labels are
    /// not used).
    fn probe_eval(&self) -> Box<dyn BatchSource<B> + '_>;
}

/// One task's data, already tokenised and batched in memory.
#[derive(Debug, Clone)]
pub struct TaskData<B: Backend> {
    /// The full training set.
    pub train: Vec<TrainBatch<B>>,
    /// PGKE's probe-training subset (unused for the first task).
    pub probe_train: Vec<TrainBatch<B>>,
    /// PGKE's statistics subset, disjoint from `probe_train`.
    pub probe_eval: Vec<TrainBatch<B>>,
}

impl<B: Backend> TaskSource<B> for TaskData<B> {
    fn train(&self) -> Box<dyn BatchSource<B> + '_> {
        Box::new(Cycle::new(&self.train))
    }

    fn probe_train(&self) -> Box<dyn BatchSource<B> + '_> {
        Box::new(Cycle::new(&self.probe_train))
    }

    fn probe_eval(&self) -> Box<dyn BatchSource<B> + '_> {
        Box::new(Cycle::new(&self.probe_eval))
    }
}
