//! The primitive bank (per-task score statistics) and the feature memory a stage keeps for it.

use std::collections::VecDeque;

use burn::tensor::{Tensor, backend::Backend};
use serde::{Deserialize, Serialize};

/// A bank entry: the statistics of a task's scores on its last training instances.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BankEntry {
    /// Mean `log p_rec` of the task's own instances.
    pub mean: f64,
    /// Their std (floored, so that a z-score is always defined).
    pub std: f64,
    /// How many instances they came from.
    pub count: usize,
}

impl BankEntry {
    /// Statistics of `scores` (population std, floored at 1e-6).
    pub fn from_scores(scores: &[f64]) -> Self {
        let n = scores.len().max(1) as f64;
        let mean = scores.iter().sum::<f64>() / n;
        let var = scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n;
        Self {
            mean,
            std: var.sqrt().max(1e-6),
            count: scores.len(),
        }
    }
}

/// The frozen base's features of the batches a training stage went through, the most recent
/// last, keeping at least `capacity` rows and no older batch than needed. A batch seen again
/// (the same position of the next pass) is moved to the end, not stored twice.
#[derive(Debug, Clone)]
pub struct FeatureMemory<B: Backend> {
    capacity: usize,
    rows: usize,
    batches: VecDeque<(usize, Tensor<B, 2>)>,
}

impl<B: Backend> FeatureMemory<B> {
    /// An empty memory keeping `capacity` rows.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            rows: 0,
            batches: VecDeque::new(),
        }
    }

    /// The features of the batch at `position` of its pass: the stored ones if it is still
    /// held, else `compute()`'s; either way stored as the most recent.
    pub fn features<E>(
        &mut self,
        position: usize,
        compute: impl FnOnce() -> Result<Tensor<B, 2>, E>,
    ) -> Result<Tensor<B, 2>, E> {
        let features = match self.get(position) {
            Some(features) => features,
            None => compute()?,
        };
        self.insert(position, features.clone());
        Ok(features)
    }

    /// The stored features of the batch at `position`, if still held.
    pub fn get(&self, position: usize) -> Option<Tensor<B, 2>> {
        self.batches
            .iter()
            .find(|(p, _)| *p == position)
            .map(|(_, features)| features.clone())
    }

    /// Stores `features` as the batch at `position`'s, the most recent (replacing what was
    /// held for it), and drops the oldest batches the capacity no longer needs.
    pub fn insert(&mut self, position: usize, features: Tensor<B, 2>) {
        let held = self.batches.iter().position(|(p, _)| *p == position);
        if let Some((_, replaced)) = held.and_then(|index| self.batches.remove(index)) {
            self.rows -= replaced.dims()[0];
        }
        self.rows += features.dims()[0];
        self.batches.push_back((position, features));
        while let Some((_, oldest)) = self.batches.front() {
            let rows = oldest.dims()[0];
            if self.rows - rows < self.capacity {
                break;
            }
            self.rows -= rows;
            self.batches.pop_front();
        }
    }

    /// The batches held, oldest first.
    pub fn batches(&self) -> impl Iterator<Item = &Tensor<B, 2>> {
        self.batches.iter().map(|(_, features)| features)
    }

    /// The batches held with their positions, oldest first (for a checkpoint).
    pub fn entries(&self) -> impl Iterator<Item = &(usize, Tensor<B, 2>)> {
        self.batches.iter()
    }

    /// A memory holding `entries` (as [`Self::entries`] gave them).
    pub fn from_entries(capacity: usize, entries: Vec<(usize, Tensor<B, 2>)>) -> Self {
        let mut memory = Self::new(capacity);
        for (position, features) in entries {
            memory.insert(position, features);
        }
        memory
    }

    /// The last `rows` rows (fewer if fewer are held), `None` when empty.
    pub fn recent(&self, rows: usize) -> Option<Tensor<B, 2>> {
        let mut taken = 0;
        let mut recent = Vec::new();
        for (_, features) in self.batches.iter().rev() {
            if taken >= rows.max(1) {
                break;
            }
            taken += features.dims()[0];
            recent.push(features.clone());
        }
        recent.reverse();
        (!recent.is_empty()).then(|| {
            let all = Tensor::cat(recent, 0);
            let n = all.dims()[0];
            all.slice(n.saturating_sub(rows.max(1))..n)
        })
    }
}

/// The primitive bank: one entry per task, in task order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrimitiveBank {
    /// `entries[t]` belongs to task `t`.
    pub entries: Vec<BankEntry>,
}
