//! A task's training stages as the run's observer sees them, and the losses they saw.

use cmoe_moe::learner::{LearnEvent, Stage};

use crate::observer::{RunEvent, RunObserver};

/// Passes the learner's events on to `observer` and keeps the current stage's losses.
pub(super) struct StageLog<'a> {
    observer: &'a dyn RunObserver,
    /// `(step, cross-entropy, trained experts' routing share)` of the current stage's steps
    /// run by this process.
    losses: Vec<(usize, f64, f64)>,
    /// The current stage's length.
    steps: usize,
}

impl<'a> StageLog<'a> {
    pub(super) fn new(observer: &'a dyn RunObserver) -> Self {
        Self {
            observer,
            losses: Vec::new(),
            steps: 0,
        }
    }

    pub(super) fn event(&mut self, event: LearnEvent<'_>) {
        match event {
            LearnEvent::StageStarted { stage, steps, done } => {
                let name = match stage {
                    Stage::Initial => "initial",
                    Stage::Probe => "probe",
                    Stage::Train => "train",
                };
                self.losses.clear();
                self.steps = steps;
                self.observer.event(RunEvent::Started {
                    name,
                    len: steps as u64,
                    done: done as u64,
                });
            }
            LearnEvent::Step { step, loss, .. } => {
                self.losses.push((step, loss.ce, loss.trained_share));
                let mut status =
                    format!("ce {:.3} aux {:.3} rec {:.2}", loss.ce, loss.aux, loss.rec);
                if loss.penalty != 0.0 {
                    status += &format!(" penalty {:.4}", loss.penalty);
                }
                // Only where frozen experts take part in the routing (LLaVA-CMoE's stages);
                // the share is a mean over micro-batches, so 1 may come out a hair below.
                if loss.trained_share < 1.0 - 1e-9 {
                    status += &format!(" trained-share {:.2}", loss.trained_share);
                }
                self.observer.event(RunEvent::Advanced {
                    steps: 1,
                    status: Some(&status),
                });
            }
            LearnEvent::Planned(plan) => {
                let layers: Vec<String> = plan
                    .layers
                    .iter()
                    .map(|l| format!("layer {} +{}", l.layer, l.add))
                    .collect();
                self.observer.note(&format!(
                    "  PGKE plan: {}",
                    if layers.is_empty() {
                        "no new experts".into()
                    } else {
                        layers.join(", ")
                    }
                ));
                if !plan.frequencies.is_empty() {
                    let stats: Vec<String> = (0..plan.thresholds.len())
                        .filter_map(|layer| {
                            Some(format!("layer {layer} {}", plan.probe_summary(layer)?))
                        })
                        .collect();
                    self.observer.note(&format!(
                        "  probes' activation / threshold: {}",
                        stats.join("; ")
                    ));
                }
            }
        }
    }

    /// The stages of the task are over.
    pub(super) fn finish(&self) {
        self.observer.event(RunEvent::Finished);
    }

    /// Mean cross-entropy of the last 10 % of the training stage's steps (of those this
    /// process ran, when the stage was resumed inside them).
    pub(super) fn final_loss(&self) -> f64 {
        self.tail_mean(|&(_, ce, _)| ce)
    }

    /// Mean share of the routed top-k slots that went to the experts the stage trains, over
    /// the same last 10 % of the training stage's steps as [`Self::final_loss`].
    pub(super) fn final_trained_share(&self) -> f64 {
        self.tail_mean(|&(_, _, share)| share)
    }

    fn tail_mean(&self, value: impl Fn(&(usize, f64, f64)) -> f64) -> f64 {
        let from = self.steps - (self.steps / 10).max(1).min(self.steps);
        let tail: Vec<f64> = self
            .losses
            .iter()
            .filter(|(step, _, _)| *step >= from)
            .map(value)
            .collect();
        tail.iter().sum::<f64>() / tail.len().max(1) as f64
    }
}
