//! How a learner learns each task: the placement of new experts, the stages' settings, the
//! events it reports, and the expansion plan a recipe asks for.

use serde::{Deserialize, Serialize};

use crate::pgke::{
    ActivationStats, ExpansionMode, ExpansionPlan, NewRouterColumns, plan_from_stats,
};
use crate::train::{LossValues, StageConfig};

/// Where a new task's experts go.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// PGKE: the layers whose probes are used.
    Probe,
    /// Ablation: every layer.
    EveryLayer,
    /// Ablation: as many layers as PGKE would pick, chosen at random.
    RandomLayers {
        /// Seed of the choice (mixed with the task index).
        seed: u64,
    },
    /// Ablation "w/o extension" (paper Table 2, left): no new experts; every existing expert
    /// trains again on the task, under the task's own router (a copy of the previous one).
    Unfrozen,
}

/// How every task is learned.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TaskRecipe {
    /// `N_p`: probe experts per layer.
    pub probe_experts: usize,
    /// PGKE's threshold factor (`mean - alpha * std`; paper 0.8).
    pub alpha: f64,
    /// Where the new experts go.
    pub placement: Placement,
    /// How many experts each selected layer receives (paper main results: one; Table 4: 1 / 4
    /// / 8). The ablation placements add the same count per layer; with
    /// [`ExpansionMode::ProbeCount`] they add the mean `N_s` of PGKE's layers (at least one).
    pub per_layer: ExpansionMode,
    /// How the new experts' router columns start (paper: random).
    #[serde(default)]
    pub router_columns: NewRouterColumns,
    /// The probe stage's optimiser settings (paper: lr 3e-4).
    pub probe_stage: StageConfig,
    /// The task's main stage (paper: lr 2e-4).
    pub stage: StageConfig,
}

impl TaskRecipe {
    /// The paper's settings (AdamW, warmup 0.03 + cosine, lr 3e-4 for probes and 2e-4 after,
    /// alpha 0.8, one expert per selected layer) with N_p = 4 probes (our choice; the paper
    /// does not give it) and the given step counts (one epoch each in the paper).
    pub fn paper(probe_steps: usize, steps: usize) -> Self {
        let stage = StageConfig {
            lr: 2e-4,
            router_lr_scale: 1.0,
            warmup_ratio: 0.03,
            steps,
            accumulation: 1,
            weight_decay: 0.0,
            loss: Default::default(),
            seed: None,
        };
        Self {
            probe_experts: 4,
            alpha: 0.8,
            placement: Placement::Probe,
            per_layer: ExpansionMode::Fixed(1),
            router_columns: NewRouterColumns::Random,
            probe_stage: StageConfig {
                lr: 3e-4,
                steps: probe_steps,
                ..stage
            },
            stage,
        }
    }
}

/// The two training stages of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// The initial experts and their router, before the first task.
    Initial,
    /// PGKE's probe training.
    Probe,
    /// The task's experts, router and VAE.
    Train,
}

/// What [`ContinualLearner::learn_task`](super::ContinualLearner::learn_task) reports while it
/// runs.
#[derive(Debug, Clone, Copy)]
pub enum LearnEvent<'a> {
    /// A stage of `steps` optimiser steps begins.
    StageStarted {
        /// Which.
        stage: Stage,
        /// Its length.
        steps: usize,
        /// Steps already done (a stage resumed from a checkpoint).
        done: usize,
    },
    /// One optimiser step's loss terms.
    Step {
        /// Stage.
        stage: Stage,
        /// Step index.
        step: usize,
        /// The terms.
        loss: &'a LossValues,
    },
    /// PGKE decided where the task's experts go.
    Planned(&'a ExpansionPlan),
}

/// The expansion plan the recipe asks for, from the probe statistics.
pub(super) fn place(
    recipe: &TaskRecipe,
    task: usize,
    stats: &ActivationStats,
    before: &[usize],
) -> ExpansionPlan {
    let pgke = plan_from_stats(task, stats, before, recipe.alpha, recipe.per_layer);
    // The ablations add as many experts per layer as PGKE does.
    let add = match recipe.per_layer {
        ExpansionMode::Fixed(k) => k,
        ExpansionMode::ProbeCount => {
            let layers = pgke.layers.len().max(1);
            (pgke.total_added() as f64 / layers as f64).round().max(1.0) as usize
        }
    };
    let mut plan = match recipe.placement {
        Placement::Probe | Placement::Unfrozen => return pgke,
        Placement::EveryLayer => ExpansionPlan::every_layer(task, before.len(), add, 0),
        Placement::RandomLayers { seed } => {
            let seed = seed ^ (task as u64).wrapping_mul(0x9E37_79B9);
            ExpansionPlan::random_layers(task, before.len(), pgke.layers.len(), add, 0, seed)
        }
    };
    // The probe statistics stay with the ablation's plan: what PGKE would have chosen.
    plan.thresholds = pgke.thresholds;
    plan.probes_above = pgke.probes_above;
    plan.frequencies = pgke.frequencies;
    plan.old_experts = pgke.old_experts;
    // New experts start from the layer's most activated expert, as in PGKE.
    for layer in &mut plan.layers {
        let freq = stats.frequencies(layer.layer);
        layer.init_from = (0..freq.len()).fold(0, |b, i| if freq[i] > freq[b] { i } else { b });
    }
    plan
}
