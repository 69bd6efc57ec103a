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
    /// Stored tensors that do not match the model.
    #[error(transparent)]
    Store(StoreError),
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

impl From<StoreError> for MoeError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Io { path, message } => Self::Io { path, message },
            weights => Self::Store(weights),
        }
    }
}
