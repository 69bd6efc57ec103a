//! Training: batches and where they come from, the stage loop on the four-term objective
//! `CE + lambda KL + eta rec + kappa aux`, which parameters train, optimiser state keyed for
//! reloading, stage checkpoints, and data-parallel steps.

mod batch;
pub mod checkpoint;
mod control;
mod data_parallel;
mod freeze;
mod loss;
pub(crate) mod noise;
mod optim_state;
mod schedule;
mod source;
mod stage;

pub use crate::error::StageError;
pub use batch::TrainBatch;
pub use checkpoint::StageCheckpoints;
pub use control::{Penalty, SaveSnapshot, StageConfig, StageControl, StageSnapshot, StageState};
pub use data_parallel::Replicas;
pub use freeze::{inference, set_trainable, trainable_experts};
pub use loss::{AnswerTargets, IGNORE_INDEX, LossTerms, LossValues, LossWeights, causal_lm_loss};
pub use optim_state::{OptimState, by_id, by_order};
pub use schedule::{adamw, learning_rate};
pub use source::{BatchSource, Cycle, TaskData, TaskSource};
pub use stage::{train_stage, train_stage_with};
