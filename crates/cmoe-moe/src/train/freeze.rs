//! Which parameters a stage trains: every expert and router frozen but a task's own.

use std::ops::Range;

use burn::module::{AutodiffModule, Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};

use crate::host::AutodiffHost;
use crate::model::CmoeModel;

/// Freezes every expert and router (the initial phase's included), then makes trainable task
/// `task`'s router and, per layer, the experts in `trainable[layer]`.
pub fn set_trainable<B: AutodiffBackend, H: Module<B>>(
    mut model: CmoeModel<B, H>,
    task: usize,
    trainable: &[Range<usize>],
) -> CmoeModel<B, H> {
    for (layer, range) in model.moe.iter_mut().zip(trainable) {
        let experts = std::mem::take(&mut layer.experts);
        layer.experts = experts
            .into_iter()
            .enumerate()
            .map(|(i, e)| require_grad(e, range.contains(&i)))
            .collect();
        let routers = std::mem::take(&mut layer.routers.routers);
        layer.routers.routers = routers
            .into_iter()
            .enumerate()
            .map(|(t, r)| require_grad(r, t == task))
            .collect();
        layer.routers.initial = layer.routers.initial.take().map(|r| require_grad(r, false));
    }
    model
}

/// Per MoE layer, per expert: whether the expert takes gradients (what [`set_trainable`] left
/// trainable).
pub fn trainable_experts<B: Backend, H: Module<B>>(model: &CmoeModel<B, H>) -> Vec<Vec<bool>> {
    struct AnyTrainable(bool);
    impl<B: Backend> ModuleVisitor<B> for AnyTrainable {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0 |= param.is_require_grad();
        }
    }
    model
        .moe
        .iter()
        .map(|layer| {
            layer
                .experts
                .iter()
                .map(|expert| {
                    let mut any = AnyTrainable(false);
                    expert.visit(&mut any);
                    any.0
                })
                .collect()
        })
        .collect()
}

/// Sets whether every float parameter of `module` takes gradients.
fn require_grad<B: Backend, M: Module<B>>(module: M, on: bool) -> M {
    struct RequireGrad(bool);
    impl<B: Backend> ModuleMapper<B> for RequireGrad {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
            if param.is_require_grad() == self.0 {
                param
            } else {
                param.set_require_grad(self.0)
            }
        }
    }
    module.map(&mut RequireGrad(on))
}

/// The inference copy of a model (no autodiff).
pub fn inference<B: AutodiffBackend, H: AutodiffHost<B>>(
    model: &CmoeModel<B, H>,
) -> CmoeModel<B::InnerBackend, H::InnerModule> {
    model.valid()
}
