//! Errors of data loading: each names the file and the problem.

use std::path::Path;

/// Everything that can go wrong reading images, tokenizers or prompts.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        message: String,
    },
    /// A file was read but its content is invalid.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// An image could not be decoded.
    #[error("{path}: cannot decode image: {message}")]
    Image {
        /// The file.
        path: String,
        /// The decoder's message.
        message: String,
    },
    /// The tokenizer does not fit the model or the text.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
}

impl DataError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, err: impl std::fmt::Display) -> Self {
        Self::Io {
            path: path.display().to_string(),
            message: err.to_string(),
        }
    }

    /// Invalid content in `path`.
    pub fn parse(path: &Path, err: impl std::fmt::Display) -> Self {
        Self::Parse {
            path: path.display().to_string(),
            message: err.to_string(),
        }
    }
}
