//! Progress bars for a task's training stages, and the losses they saw.

use cmoe_moe::learner::{LearnEvent, Stage};

use crate::progress::{progress, tick};

/// Progress bars for the training stages of one task, and the losses they saw.
#[derive(Default)]
pub(super) struct StageBars {
    bar: Option<indicatif::ProgressBar>,
    /// `(step, cross-entropy)` of the current stage's steps run by this process.
    losses: Vec<(usize, f64)>,
    /// The current stage's length.
    steps: usize,
}

impl StageBars {
    pub(super) fn event(&mut self, event: LearnEvent<'_>) {
        match event {
            LearnEvent::StageStarted { stage, steps, done } => {
                self.finish();
                let name = match stage {
                    Stage::Initial => "initial",
                    Stage::Probe => "probe",
                    Stage::Train => "train",
                };
                self.losses.clear();
                self.steps = steps;
                let bar = progress(steps as u64, name);
                bar.set_position(done as u64);
                self.bar = Some(bar);
            }
            LearnEvent::Step { step, loss, .. } => {
                self.losses.push((step, loss.ce));
                if let Some(bar) = &self.bar {
                    let mut message =
                        format!("ce {:.3} aux {:.3} rec {:.2}", loss.ce, loss.aux, loss.rec);
                    if loss.penalty != 0.0 {
                        message += &format!(" penalty {:.4}", loss.penalty);
                    }
                    tick(bar, message);
                }
            }
            LearnEvent::Planned(plan) => {
                let layers: Vec<String> = plan
                    .layers
                    .iter()
                    .map(|l| format!("layer {} +{}", l.layer, l.add))
                    .collect();
                eprintln!(
                    "  PGKE plan: {}",
                    if layers.is_empty() {
                        "no new experts".into()
                    } else {
                        layers.join(", ")
                    }
                );
            }
        }
    }

    pub(super) fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    /// Mean cross-entropy of the last 10 % of the training stage's steps (of those this
    /// process ran, when the stage was resumed inside them).
    pub(super) fn final_loss(&self) -> f64 {
        let from = self.steps - (self.steps / 10).max(1).min(self.steps);
        let tail: Vec<f64> = self
            .losses
            .iter()
            .filter(|(step, _)| *step >= from)
            .map(|(_, ce)| *ce)
            .collect();
        tail.iter().sum::<f64>() / tail.len().max(1) as f64
    }
}
