//! AdamW state keyed by each parameter's position in a module, so that a checkpoint reloads
//! onto a model whose parameter ids differ from the saved one's.

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{AdamW, Optimizer};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};

use crate::ptl::TaskVae;

/// Burn's record of an AdamW state: a map from parameter ids to
/// [`burn::optim::record::AdaptorRecord`]s.
pub type OptimState<B> =
    <OptimizerAdaptor<AdamW, TaskVae<B>, B> as Optimizer<TaskVae<B>, B>>::Record;

/// The ids of `module`'s float parameters, in the module's order.
fn param_ids<B: Backend, M: Module<B>>(module: &M) -> Vec<ParamId> {
    struct Ids(Vec<ParamId>);
    impl<B: Backend> ModuleVisitor<B> for Ids {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0.push(param.id);
        }
    }
    let mut ids = Ids(Vec::new());
    module.visit(&mut ids);
    ids.0
}

/// `record` keyed by each parameter's position in `module` instead of its id.
pub fn by_order<B: AutodiffBackend, M: Module<B>>(
    mut record: OptimState<B>,
    module: &M,
) -> OptimState<B> {
    param_ids(module)
        .into_iter()
        .enumerate()
        .filter_map(|(i, id)| record.remove(&id).map(|r| (ParamId::from(i as u64), r)))
        .collect()
}

/// The inverse of [`by_order`] for `module` (with the same structure).
pub fn by_id<B: AutodiffBackend, M: Module<B>>(
    mut record: OptimState<B>,
    module: &M,
) -> OptimState<B> {
    param_ids(module)
        .into_iter()
        .enumerate()
        .filter_map(|(i, id)| record.remove(&ParamId::from(i as u64)).map(|r| (id, r)))
        .collect()
}
