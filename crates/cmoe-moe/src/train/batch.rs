//! A training batch: model inputs and per-position labels.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor};

use crate::host::ModelInput;

/// Model inputs and per-position labels (`-100`: no loss).
#[derive(Debug, Clone)]
pub struct TrainBatch<B: Backend> {
    /// The inputs.
    pub input: ModelInput<B>,
    /// `[batch, seq]` labels.
    pub labels: Tensor<B, 2, Int>,
}

impl<B: AutodiffBackend> TrainBatch<B> {
    /// The same batch without autodiff (for inference-mode passes).
    pub fn inner(self) -> TrainBatch<B::InnerBackend> {
        TrainBatch {
            input: self.input.inner(),
            labels: self.labels.inner(),
        }
    }
}

impl<B: Backend> TrainBatch<B> {
    /// The batch on `device`.
    pub fn to_device(self, device: &B::Device) -> Self {
        Self {
            input: self.input.to_device(device),
            labels: self.labels.to_device(device),
        }
    }

    /// Per row, the position of the last prompt token (the one before the first labelled
    /// position): where PTL reads its feature.
    pub fn last_prompt_positions(&self) -> Option<Vec<usize>> {
        let [rows, seq] = self.labels.dims();
        let labels: Vec<i64> = self.labels.to_data().iter::<i64>().collect();
        (0..rows)
            .map(|r| {
                let row = &labels[r * seq..(r + 1) * seq];
                row.iter()
                    .position(|&l| l != crate::train::IGNORE_INDEX)
                    .filter(|&first| first > 0)
                    .map(|first| first - 1)
            })
            .collect()
    }
}
