//! Probe-Guided Knowledge Extension (paper Sec. 3.2), for task t:
//! 1. [`add_probes`]: `N_p` probe experts per layer (the mean of the layer's experts) and a
//!    probe router = the previous router (router_{t-1}, or the initial phase's) + random
//!    columns; only the probes and that router train, on the probe subset.
//! 2. [`activation_stats`] on a disjoint eval subset; [`plan_from_stats`]: the threshold and
//!    the plan (which layers get how many new experts, copied from which).
//! 3. [`expand`]: probes dropped, each selected layer gets its new experts (copies of its most
//!    activated expert), router_t = the previous router + random columns; only those train.

mod expand;
mod plan;

pub use expand::{NewRouterColumns, activation_stats, add_probes, expand, new_expert_ranges};
pub use plan::{
    ActivationStats, ExpansionMode, ExpansionPlan, LayerExpansion, PlanSource, plan_from_stats,
    threshold,
};
