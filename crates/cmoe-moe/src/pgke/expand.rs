//! PGKE's model steps: probe experts added, their activation statistics gathered, the probes
//! replaced by the planned experts.

use std::ops::Range;

use burn::module::{AutodiffModule, Module};
use burn::tensor::backend::{AutodiffBackend, Backend};
use serde::{Deserialize, Serialize};

use super::{ActivationStats, ExpansionPlan};
use crate::host::AutodiffHost;
use crate::layer::{FfnExpert, RoutingCounts};
use crate::model::CmoeModel;
use crate::train::{BatchSource, StageError};

/// PGKE step 1: `n_probe` probe experts per layer (each the mean of the layer's experts) and
/// the probe router for `task` = the previous router (task `task - 1`'s, or the initial
/// phase's for the first task) + `n_probe` random columns. Returns the model and the expert
/// counts before probing.
pub fn add_probes<B: Backend, H: Module<B>>(
    mut model: CmoeModel<B, H>,
    task: usize,
    n_probe: usize,
) -> Result<(CmoeModel<B, H>, Vec<usize>), StageError> {
    let before = model.experts_per_layer();
    for layer in &mut model.moe {
        if layer.routers.num_tasks() != task {
            return Err(StageError::Config(format!(
                "probing task {task} needs routers 0..{task}, the model has {}",
                layer.routers.num_tasks()
            )));
        }
        let previous = layer.routers.previous(task).ok_or_else(|| {
            StageError::Config(format!("task {task} has no previous router to probe from"))
        })?;
        let probe_router = previous.extended(n_probe);
        let mean = FfnExpert::mean(&layer.experts.iter().collect::<Vec<_>>());
        for _ in 0..n_probe {
            layer.experts.push(mean.duplicate());
        }
        layer.routers.routers.push(probe_router);
    }
    Ok((model, before))
}

/// PGKE step 2: per layer, how often each expert is among a token's top-k under `task`'s router,
/// over one pass of `source` (labels unused). Runs in inference mode (no dropout, no autodiff
/// graph); padding tokens are not counted.
pub fn activation_stats<B: AutodiffBackend, H: AutodiffHost<B>>(
    model: &CmoeModel<B, H>,
    task: usize,
    source: &mut dyn BatchSource<B>,
) -> Result<ActivationStats, StageError> {
    let model = model.valid();
    let mut stats = ActivationStats::default();
    for _ in 0..source.len() {
        let (_, batch) = source.next_batch()?;
        let out = model.forward(batch.inner().input, task)?;
        for (layer, counts) in RoutingCounts::read(&out.routing).into_iter().enumerate() {
            stats.record(layer, &counts.selections, counts.tokens);
        }
    }
    Ok(stats)
}

/// How a new expert's router column starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NewRouterColumns {
    /// Random, as every new router row in the paper (`router_i = router_{i-1} + random rows`).
    #[default]
    Random,
    /// The probe router's column of the expert the new expert copies (`init_from`): the new
    /// expert starts with its source's weights and its source's routing on this task. Not
    /// the paper's; an option for the share of routing a task's new experts get.
    CopySource,
}

/// PGKE step 3: drops the probes and the probe router (layers had `before[layer]` experts),
/// adds each planned layer's experts as copies of `init_from`, and creates router_task = the
/// previous router + one column per new expert, random or copied as `columns` says.
pub fn expand<B: Backend, H: Module<B>>(
    mut model: CmoeModel<B, H>,
    task: usize,
    before: &[usize],
    plan: &ExpansionPlan,
    columns: NewRouterColumns,
) -> Result<CmoeModel<B, H>, StageError> {
    for (index, layer) in model.moe.iter_mut().enumerate() {
        let grow = plan.layers.iter().find(|l| l.layer == index);
        let new: Vec<FfnExpert<B>> = grow
            .map(|g| {
                (0..g.add)
                    .map(|_| layer.experts[g.init_from].duplicate())
                    .collect()
            })
            .unwrap_or_default();
        let previous = layer.routers.previous(task).ok_or_else(|| {
            StageError::Config(format!("task {task} has no previous router to extend"))
        })?;
        // The probe router, when the task was probed: the routing `init_from` was chosen under.
        let probe_router = layer.routers.routers.get(task).unwrap_or(previous);
        let router = match (columns, grow) {
            (NewRouterColumns::CopySource, Some(g)) => {
                previous.extended_with_copies(probe_router, &vec![g.init_from; g.add])
            }
            _ => previous.extended(new.len()),
        };
        layer.experts.truncate(before[index]);
        layer.routers.routers.truncate(task); // the probe router, if any
        layer.experts.extend(new);
        layer.routers.routers.push(router);
    }
    Ok(model)
}

/// The experts a task trains: from `first[layer]` (the count before the task) to the end.
pub fn new_expert_ranges<B: Backend, H: Module<B>>(
    model: &CmoeModel<B, H>,
    first: &[usize],
) -> Vec<Range<usize>> {
    model
        .experts_per_layer()
        .iter()
        .zip(first)
        .map(|(&n, &f)| f..n)
        .collect()
}
