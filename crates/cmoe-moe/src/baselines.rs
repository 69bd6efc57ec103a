//! The regularisation baselines the paper compares against (Table 1, after CoIN): EWC and LwF,
//! each a [`Penalty`] added to the objective of a shared-router MoELoRA stage.
//!
//! - [`Ewc`]: online EWC (Schwarz et al. 2018, "Progress & Compress", the paper's citation):
//!   after each task the diagonal Fisher of the task's answer log-likelihood is added to a
//!   running sum `F` (decayed by `gamma`), the parameters are kept as the anchor `theta*`, and
//!   the next tasks train on `CE + kappa aux + lambda / 2 * sum F (theta - theta*)^2`.
//! - [`Lwf`]: Learning without Forgetting (Li & Hoiem 2017): the model as it was before the task
//!   (frozen) answers the new task's inputs, and the model in training is pulled towards those
//!   outputs by `alpha * T^2 * KL(p_old^T || p_new^T)` over the answer positions, with
//!   temperature `T`.
//!
//! Both cover the MoE layers' parameters (experts and routers; the base is frozen).

use std::path::Path;

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor, activation};
use cmoe_store::{load_module, save_module};

use crate::error::MoeError;
use crate::host::AutodiffHost;
use crate::layer::MoeLoraFfn;
use crate::model::CmoeModel;
use crate::train::{AnswerTargets, BatchSource, Penalty, StageError, TrainBatch};

/// The float parameters of the MoE layers, flattened, in the modules' order.
fn flat_params<B: Backend>(moe: &[MoeLoraFfn<B>]) -> Vec<Tensor<B, 1>> {
    struct Flat<B: Backend>(Vec<Tensor<B, 1>>);
    impl<B: Backend> ModuleVisitor<B> for Flat<B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            let n = value.shape().num_elements();
            self.0.push(value.reshape([n]));
        }
    }
    let mut flat = Flat(Vec::new());
    for layer in moe {
        layer.visit(&mut flat);
    }
    flat.0
}

/// The squared gradients of the MoE layers' parameters, flattened in [`flat_params`]' order
/// (zeros for a parameter without gradient).
fn squared_grads<B: AutodiffBackend>(
    moe: &[MoeLoraFfn<B>],
    grads: &B::Gradients,
) -> Vec<Tensor<B::InnerBackend, 1>> {
    struct Squares<'a, B: AutodiffBackend> {
        grads: &'a B::Gradients,
        out: Vec<Tensor<B::InnerBackend, 1>>,
    }
    impl<B: AutodiffBackend> ModuleVisitor<B> for Squares<'_, B> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            let n = value.shape().num_elements();
            let square = match value.grad(self.grads) {
                Some(grad) => grad.powi_scalar(2).reshape([n]),
                None => Tensor::zeros([n], &value.device()),
            };
            self.out.push(square);
        }
    }
    let mut squares = Squares::<B> {
        grads,
        out: Vec::new(),
    };
    for layer in moe {
        layer.visit(&mut squares);
    }
    squares.out
}

/// The consolidated Fisher diagonal, one flattened tensor per parameter (a module, so that it
/// is saved and reloaded like any other state).
#[derive(Module, Debug)]
pub struct FisherDiagonal<B: Backend> {
    /// Per parameter of the MoE layers, in their order.
    pub values: Vec<Param<Tensor<B, 1>>>,
}

/// Online EWC's state: the consolidated Fisher and the anchor parameters.
#[derive(Debug)]
pub struct Ewc<B: AutodiffBackend> {
    /// `lambda`: the penalty's weight.
    pub lambda: f64,
    /// `gamma`: how much of the earlier tasks' Fisher is kept at each consolidation (1: all).
    pub gamma: f64,
    fisher: Option<FisherDiagonal<B::InnerBackend>>,
    anchor: Vec<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> Ewc<B> {
    /// EWC before any task: no penalty yet.
    pub fn new(lambda: f64, gamma: f64) -> Self {
        Self {
            lambda,
            gamma,
            fisher: None,
            anchor: Vec::new(),
        }
    }

    /// Whether a task has been consolidated (the penalty is active).
    pub fn is_active(&self) -> bool {
        self.fisher.is_some()
    }

    /// After a task: the Fisher of `model` on up to `batches` batches of `source` (the task's
    /// training data; empirical Fisher from each batch's gradient of the answer cross-entropy,
    /// times the batch's rows, which estimates the per-sample mean) is added to the decayed
    /// running sum, and `model`'s parameters become the anchor.
    pub fn consolidate<H: AutodiffHost<B>>(
        &mut self,
        model: &CmoeModel<B, H>,
        source: &mut dyn BatchSource<B>,
        batches: usize,
    ) -> Result<(), StageError> {
        let count = batches.min(source.len()).max(1);
        let mut sum: Option<Vec<Tensor<B::InnerBackend, 1>>> = None;
        for _ in 0..count {
            let (position, batch) = source.next_batch()?;
            let rows = batch.labels.dims()[0] as f64;
            let answers = batch.answers();
            let out = model.forward_answers(batch.input, 0, &answers)?;
            let ce = answers
                .cross_entropy(out.logits)
                .ok_or(StageError::NoLabels(position))?;
            let grads = ce.backward();
            let squares = squared_grads::<B>(&model.moe, &grads);
            sum = Some(match sum {
                None => squares.into_iter().map(|s| s * rows).collect(),
                Some(sum) => sum
                    .into_iter()
                    .zip(squares)
                    .map(|(a, s)| a + s * rows)
                    .collect(),
            });
        }
        let new: Vec<_> = sum
            .expect("at least one batch")
            .into_iter()
            .map(|s| s / count as f64)
            .collect();
        let values = match self.fisher.take() {
            Some(old) if old.values.len() == new.len() => old
                .values
                .into_iter()
                .zip(new)
                .map(|(o, n)| o.val() * self.gamma + n)
                .collect(),
            Some(_) => {
                return Err(StageError::Config(
                    "EWC: the model's parameters changed shape between tasks".into(),
                ));
            }
            None => new,
        };
        self.fisher = Some(FisherDiagonal {
            values: values.into_iter().map(Param::from_tensor).collect(),
        });
        self.anchor = flat_params(&model.valid().moe);
        Ok(())
    }

    /// Saves the consolidated Fisher to `path` (the anchor is the saved model itself).
    pub fn save(&self, path: &Path) -> Result<(), MoeError> {
        match &self.fisher {
            Some(fisher) => Ok(save_module(fisher, path)?),
            None => Ok(()),
        }
    }

    /// Reloads a Fisher saved by [`Self::save`] for `model` (whose parameters, as saved with
    /// it, are the anchor).
    pub fn load<H: AutodiffHost<B>>(
        &mut self,
        path: &Path,
        model: &CmoeModel<B, H>,
    ) -> Result<(), MoeError> {
        let anchor = flat_params(&model.valid().moe);
        let mut fisher = FisherDiagonal {
            values: anchor
                .iter()
                .map(|a| Param::from_tensor(a.zeros_like()))
                .collect(),
        };
        load_module(&mut fisher, path, DType::F32)?;
        self.fisher = Some(fisher);
        self.anchor = anchor;
        Ok(())
    }
}

impl<B: AutodiffBackend> Penalty<B> for Ewc<B> {
    fn term(
        &self,
        moe: &[MoeLoraFfn<B>],
        _batch: &TrainBatch<B>,
        _answers: &AnswerTargets,
        logits: &Tensor<B, 2>,
    ) -> Result<Tensor<B, 1>, StageError> {
        let device = logits.device();
        let Some(fisher) = &self.fisher else {
            return Ok(Tensor::zeros([1], &device));
        };
        let params = flat_params(moe);
        if params.len() != self.anchor.len() {
            return Err(StageError::Config(
                "EWC: the model's parameters changed since the last consolidation".into(),
            ));
        }
        let mut total = Tensor::<B, 1>::zeros([1], &device);
        for ((theta, anchor), f) in params.into_iter().zip(&self.anchor).zip(&fisher.values) {
            let anchor = Tensor::<B, 1>::from_inner(anchor.clone());
            let f = Tensor::<B, 1>::from_inner(f.val());
            total = total + (f * (theta - anchor).powi_scalar(2)).sum();
        }
        Ok(total * (self.lambda / 2.0))
    }
}

/// LwF's state: the frozen model as it was before the task, and the distillation settings.
#[derive(Debug)]
pub struct Lwf<B: AutodiffBackend, H: AutodiffHost<B>> {
    /// `alpha`: the distillation term's weight.
    pub alpha: f64,
    /// `T`: the softmax temperature.
    pub temperature: f64,
    teacher: CmoeModel<B::InnerBackend, H::InnerModule>,
}

impl<B: AutodiffBackend, H: AutodiffHost<B>> Lwf<B, H> {
    /// Distillation towards `previous` (frozen: its inference copy is kept).
    pub fn new(previous: &CmoeModel<B, H>, alpha: f64, temperature: f64) -> Self {
        Self {
            alpha,
            temperature,
            teacher: previous.valid(),
        }
    }

    /// The frozen previous model's logits at `batch`'s answer positions (router 0, no
    /// dropout): the distillation target, `[answers, vocab]`.
    pub fn teacher_logits(
        &self,
        batch: &TrainBatch<B>,
        answers: &AnswerTargets,
    ) -> Result<Tensor<B::InnerBackend, 2>, StageError> {
        let input = batch.clone().inner().input;
        Ok(self.teacher.forward_answers(input, 0, answers)?.logits)
    }
}

impl<B: AutodiffBackend, H: AutodiffHost<B>> Penalty<B> for Lwf<B, H> {
    fn term(
        &self,
        _moe: &[MoeLoraFfn<B>],
        batch: &TrainBatch<B>,
        answers: &AnswerTargets,
        logits: &Tensor<B, 2>,
    ) -> Result<Tensor<B, 1>, StageError> {
        let target = Tensor::<B, 2>::from_inner(self.teacher_logits(batch, answers)?);
        Ok(distillation(logits.clone(), target, self.temperature) * self.alpha)
    }
}

/// `T^2 * KL(softmax(target / T) || softmax(logits / T))`, averaged over the answer positions
/// (both `[answers, vocab]`, as [`CmoeModel::forward_answers`] gives them).
pub fn distillation<B: Backend>(
    logits: Tensor<B, 2>,
    target: Tensor<B, 2>,
    temperature: f64,
) -> Tensor<B, 1> {
    let [n, _] = logits.dims();
    if n == 0 {
        return Tensor::zeros([1], &logits.device());
    }
    let scale = |x: Tensor<B, 2>| x.cast(DType::F32) / temperature;
    let log_p = activation::log_softmax(scale(target).detach(), 1);
    let log_q = activation::log_softmax(scale(logits), 1);
    let kl = (log_p.clone().exp() * (log_p - log_q)).sum();
    kl * (temperature * temperature / n as f64)
}
