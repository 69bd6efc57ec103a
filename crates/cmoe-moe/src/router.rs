//! Routers: one per task and per MoE layer (the router bank). A task's router only knows the
//! experts that existed when that task was trained; growing a layer adds columns to the *new*
//! task's router and never touches an older one.

use burn::module::{Module, Param};
use burn::tensor::{Distribution, Tensor, backend::Backend};

/// Router `G: d -> N_e` without bias (paper Eq. 1: `g = G x`), stored `[d, N_e]`.
#[derive(Module, Debug)]
pub struct TaskRouter<B: Backend> {
    /// Routing weights `[d, N_e]`.
    pub weight: Param<Tensor<B, 2>>,
}

impl<B: Backend> TaskRouter<B> {
    /// A random router over `n_experts` experts.
    pub fn new(d_model: usize, n_experts: usize, device: &B::Device) -> Self {
        Self {
            weight: Param::from_tensor(Self::random_columns(d_model, n_experts, device)),
        }
    }

    fn random_columns(d_model: usize, n: usize, device: &B::Device) -> Tensor<B, 2> {
        let bound = 1.0 / (d_model as f64).sqrt();
        Tensor::random([d_model, n], Distribution::Uniform(-bound, bound), device)
    }

    /// Number of experts this router scores.
    pub fn num_experts(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Router logits `[n, N_e]` for rows `x` `[n, d]`.
    pub fn logits(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        x.matmul(self.weight.val())
    }

    /// The next task's router: this one's columns copied, then `added` random columns for new
    /// experts (PGKE: `router_i = router_{i-1} + random rows`). The copy is a new parameter.
    pub fn extended(&self, added: usize) -> Self {
        let old = self.weight.val().detach();
        let [d, _] = old.dims();
        let weight = if added == 0 {
            old
        } else {
            // `detach`: a parameter must be a leaf of the autodiff graph.
            Tensor::cat(
                vec![old.clone(), Self::random_columns(d, added, &old.device())],
                1,
            )
            .detach()
        };
        Self {
            weight: Param::from_tensor(weight),
        }
    }
}

/// The routers of one MoE layer, indexed by task.
#[derive(Module, Debug)]
pub struct RouterBank<B: Backend> {
    /// `routers[t]` routes task `t`.
    pub routers: Vec<TaskRouter<B>>,
    /// The router trained with the initial experts in their own phase, before the first task
    /// (paper: "2 hours to train the initial eight experts"); the first task's router extends
    /// it. `None` when the first task trains the initial experts itself.
    pub initial: Option<TaskRouter<B>>,
}

impl<B: Backend> RouterBank<B> {
    /// A bank whose only router is task 0's.
    pub fn first(router: TaskRouter<B>) -> Self {
        Self {
            routers: vec![router],
            initial: None,
        }
    }

    /// Number of tasks with a router.
    pub fn num_tasks(&self) -> usize {
        self.routers.len()
    }

    /// The router of `task`.
    pub fn get(&self, task: usize) -> &TaskRouter<B> {
        &self.routers[task]
    }

    /// The router task `task`'s router starts from: task `task - 1`'s, or for the first task
    /// the initial phase's (`None` when there was no initial phase).
    pub fn previous(&self, task: usize) -> Option<&TaskRouter<B>> {
        match task {
            0 => self.initial.as_ref(),
            t => self.routers.get(t - 1),
        }
    }
}
