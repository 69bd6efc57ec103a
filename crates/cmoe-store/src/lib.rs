//! Any Burn module to and from safetensors, keyed by its parameter paths
//! (`moe.3.experts.1.gate.lora_a`), generic over `B: Backend`.
//!
//! - [`checkpoint`]: the tensors of one or more safetensors files, read lazily through memory
//!   maps, applied to a module with every missing, unexpected or mis-shaped tensor reported.
//! - [`module_file`]: a whole module written to one file atomically, and read back.

pub mod checkpoint;
pub mod module_file;

use std::path::Path;

pub use checkpoint::{Checkpoint, StoredTensor, apply_checkpoint};
pub use module_file::{load_module, save_module, save_module_with};

/// What can go wrong reading or writing stored tensors: each names the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What the OS or the format said.
        message: String,
    },
    /// The stored tensors do not match the module.
    #[error("{dir}: weights do not match the model:\n{message}")]
    Weights {
        /// The model directory or weight file.
        dir: String,
        /// The keys and shapes at fault.
        message: String,
    },
}

impl StoreError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, err: impl std::fmt::Display) -> Self {
        Self::Io {
            path: path.display().to_string(),
            message: err.to_string(),
        }
    }
}
