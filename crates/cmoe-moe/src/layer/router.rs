//! Routers: one per task and per MoE layer (the router bank). A task's router only knows the
//! experts that existed when that task was trained; growing a layer adds columns to the *new*
//! task's router and never touches an older one.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{Distribution, Int, Tensor, TensorData, backend::Backend};

/// Configuration of a [`TaskRouter`], and of a [`RouterBank`] whose first router it is.
#[derive(Config, Debug)]
pub struct TaskRouterConfig {
    /// Width of the tokens routed.
    pub d_model: usize,
    /// Experts the router scores.
    pub n_experts: usize,
}

impl TaskRouterConfig {
    /// A router with weights uniform in `±1/sqrt(d_model)`.
    pub fn init<B: Backend>(&self, device: &B::Device) -> TaskRouter<B> {
        TaskRouter {
            weight: Param::from_tensor(random_columns(self.d_model, self.n_experts, device)),
        }
    }

    /// A bank whose only router (task 0's) is [`Self::init`]'s.
    pub fn init_bank<B: Backend>(&self, device: &B::Device) -> RouterBank<B> {
        RouterBank {
            routers: vec![self.init(device)],
            initial: None,
        }
    }
}

/// `n` router columns `[d_model, n]`, uniform in `±1/sqrt(d_model)`.
fn random_columns<B: Backend>(d_model: usize, n: usize, device: &B::Device) -> Tensor<B, 2> {
    let bound = 1.0 / (d_model as f64).sqrt();
    Tensor::random([d_model, n], Distribution::Uniform(-bound, bound), device)
}

/// Router `G: d -> N_e` without bias (paper Eq. 1: `g = G x`), stored `[d, N_e]`.
#[derive(Module, Debug)]
pub struct TaskRouter<B: Backend> {
    /// Routing weights `[d, N_e]`.
    pub weight: Param<Tensor<B, 2>>,
}

impl<B: Backend> TaskRouter<B> {
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
                vec![old.clone(), random_columns(d, added, &old.device())],
                1,
            )
            .detach()
        };
        Self {
            weight: Param::from_tensor(weight),
        }
    }

    /// The next task's router: this one's columns copied, then one column per new expert,
    /// `source`'s column `c` for each `c` in `copied` (a new expert that copies expert `c`
    /// starts routed as `source` routes `c`). The copy is a new parameter.
    pub fn extended_with_copies(&self, source: &TaskRouter<B>, copied: &[usize]) -> Self {
        if copied.is_empty() {
            return self.extended(0);
        }
        let old = self.weight.val().detach();
        let device = old.device();
        let columns: Vec<i64> = copied.iter().map(|&c| c as i64).collect();
        let columns =
            Tensor::<B, 1, Int>::from_data(TensorData::new(columns, [copied.len()]), &device);
        let picked = source.weight.val().detach().select(1, columns);
        Self {
            weight: Param::from_tensor(Tensor::cat(vec![old, picked], 1).detach()),
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
