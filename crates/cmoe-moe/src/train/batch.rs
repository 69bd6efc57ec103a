//! A training batch: model inputs and per-position labels.

use std::sync::Arc;

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};

use crate::host::ModelInput;
use crate::train::{AnswerTargets, IGNORE_INDEX};

/// Model inputs and per-position labels (`-100`: no loss). The labels are kept on the host too,
/// so that a training step reads nothing back to find its answer positions.
#[derive(Debug, Clone)]
pub struct TrainBatch<B: Backend> {
    /// The inputs.
    pub input: ModelInput<B>,
    /// `[batch, seq]` labels.
    pub labels: Tensor<B, 2, Int>,
    /// The same labels, row-major.
    host_labels: Arc<Vec<i64>>,
}

impl<B: Backend> TrainBatch<B> {
    /// A batch of `input` and `labels` (read back once, here).
    pub fn new(input: ModelInput<B>, labels: Tensor<B, 2, Int>) -> Self {
        let host = labels
            .to_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .expect("integer labels");
        Self {
            input,
            labels,
            host_labels: Arc::new(host),
        }
    }

    /// A batch of `input` and host `labels` of `shape` `[batch, seq]`, uploaded to `device`.
    pub fn from_host(
        input: ModelInput<B>,
        labels: Vec<i64>,
        shape: [usize; 2],
        device: &B::Device,
    ) -> Self {
        Self {
            input,
            labels: Tensor::from_data(TensorData::new(labels.clone(), shape), device),
            host_labels: Arc::new(labels),
        }
    }

    /// The positions whose logits predict an answer token (from the host labels).
    pub fn answers(&self) -> AnswerTargets {
        let [_, seq] = self.labels.dims();
        AnswerTargets::from_host(&self.host_labels, seq)
    }

    /// The batch on `device`.
    pub fn to_device(self, device: &B::Device) -> Self {
        Self {
            input: self.input.to_device(device),
            labels: self.labels.to_device(device),
            host_labels: self.host_labels,
        }
    }

    /// Per row, the position of the last prompt token (the one before the first labelled
    /// position): where PTL reads its feature.
    pub fn last_prompt_positions(&self) -> Option<Vec<usize>> {
        let [rows, seq] = self.labels.dims();
        (0..rows)
            .map(|r| {
                let row = &self.host_labels[r * seq..(r + 1) * seq];
                row.iter()
                    .position(|&l| l != IGNORE_INDEX)
                    .filter(|&first| first > 0)
                    .map(|first| first - 1)
            })
            .collect()
    }
}

impl<B: AutodiffBackend> TrainBatch<B> {
    /// The same batch without autodiff (for inference-mode passes).
    pub fn inner(self) -> TrainBatch<B::InnerBackend> {
        TrainBatch {
            input: self.input.inner(),
            labels: self.labels.inner(),
            host_labels: self.host_labels,
        }
    }
}
