//! Errors of the continual core: each names the file or the input at fault.

use std::path::Path;

use cmoe_store::StoreError;

/// Everything that can go wrong running or saving a continual model.
#[derive(Debug, thiserror::Error)]
pub enum MoeError {
    /// A file could not be read or written, or is malformed.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// Stored tensors that could not be read or written, or do not match the model.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Inputs inconsistent with the model (shapes, a task without a router).
    #[error("invalid input: {0}")]
    Input(String),
    /// The host model failed (its own error, e.g. a LLaVA input error).
    #[error(transparent)]
    Host(Box<dyn std::error::Error + Send + Sync>),
}

impl MoeError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, err: impl std::fmt::Display) -> Self {
        Self::Io {
            path: path.display().to_string(),
            message: err.to_string(),
        }
    }
}

/// Why a stage stopped.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// Bad inputs.
    #[error(transparent)]
    Model(#[from] MoeError),
    /// A batch without any answer token.
    #[error("batch {0} has no labelled position")]
    NoLabels(usize),
    /// The loss diverged.
    #[error("loss is {value} at step {step} (lr {lr}): training diverged")]
    NonFinite {
        /// Step.
        step: usize,
        /// The loss.
        value: f64,
        /// Learning rate at that step.
        lr: f64,
    },
    /// Nothing to train on.
    #[error("a stage needs at least one batch")]
    NoData,
    /// The batch source failed (a sample could not be read, or the loader stopped).
    #[error("{0}")]
    Data(String),
    /// Settings that cannot work together (e.g. more devices than micro-batches per step).
    #[error("{0}")]
    Config(String),
}

impl From<StoreError> for StageError {
    fn from(err: StoreError) -> Self {
        Self::Model(err.into())
    }
}
