//! Errors of model loading and inference: each names the file or input at fault.

use std::path::Path;

/// Everything that can go wrong loading or running a LLaVA model.
#[derive(Debug, thiserror::Error)]
pub enum LlavaError {
    /// A file could not be read.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        message: String,
    },
    /// `config.json` is malformed or describes an unsupported model.
    #[error("{path}: invalid LLaVA config: {message}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// The weights do not match the model the config describes.
    #[error("{dir}: weights do not match the model:\n{message}")]
    Weights {
        /// The model directory or weight file.
        dir: String,
        /// The keys and shapes at fault.
        message: String,
    },
    /// Inputs inconsistent with the model (shapes, image-token counts, ids out of range).
    #[error("invalid input: {0}")]
    Input(String),
    /// The model computed NaN or infinite values where a result is read.
    #[error("non-finite output: {0}")]
    NonFinite(String),
}

impl LlavaError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, err: impl std::fmt::Display) -> Self {
        Self::Io {
            path: path.display().to_string(),
            message: err.to_string(),
        }
    }
}

impl From<cmoe_store::StoreError> for LlavaError {
    fn from(err: cmoe_store::StoreError) -> Self {
        match err {
            cmoe_store::StoreError::Io { path, message } => Self::Io { path, message },
            cmoe_store::StoreError::Weights { dir, message } => Self::Weights { dir, message },
        }
    }
}
