//! Errors of reading CoIN files: each names the file (and line) and the problem.

use std::path::Path;

/// What can go wrong with CoIN data.
#[derive(Debug, thiserror::Error)]
pub enum CoinError {
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        message: String,
    },
    /// A file's content is invalid.
    #[error("{path}: {message}")]
    Invalid {
        /// The file, with `:line` for line-based files.
        path: String,
        /// What is wrong.
        message: String,
    },
}

impl CoinError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, err: impl std::fmt::Display) -> Self {
        Self::Io {
            path: path.display().to_string(),
            message: err.to_string(),
        }
    }

    /// Invalid content in `path` (optionally at a 1-based `line`).
    pub fn invalid(path: &Path, line: Option<usize>, message: impl Into<String>) -> Self {
        Self::Invalid {
            path: match line {
                Some(l) => format!("{}:{l}", path.display()),
                None => path.display().to_string(),
            },
            message: message.into(),
        }
    }
}
