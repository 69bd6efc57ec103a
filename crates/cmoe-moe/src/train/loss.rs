//! The training objective `L = CE + lambda * KL + eta * rec + kappa * aux` (paper Eq. 6), plus
//! a baseline's regulariser (EWC's penalty, LwF's distillation) when one is trained, with each
//! term kept for logging.

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Int, Tensor, TensorData, activation};
use serde::{Deserialize, Serialize};

/// Label value of positions without loss.
pub const IGNORE_INDEX: i64 = -100;

/// The weights of the auxiliary terms (paper: all 1e-3).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossWeights {
    /// `lambda`, on the VAE's KL term.
    pub kl: f64,
    /// `eta`, on the VAE's reconstruction term.
    pub rec: f64,
    /// `kappa`, on the load-balancing term.
    pub aux: f64,
}

impl Default for LossWeights {
    fn default() -> Self {
        Self {
            kl: 1e-3,
            rec: 1e-3,
            aux: 1e-3,
        }
    }
}

/// Every term of the objective and their weighted sum.
#[derive(Debug, Clone)]
pub struct LossTerms<B: Backend> {
    /// Next-token cross-entropy on answer tokens.
    pub ce: Tensor<B, 1>,
    /// VAE KL term.
    pub kl: Tensor<B, 1>,
    /// VAE reconstruction term.
    pub rec: Tensor<B, 1>,
    /// Load-balancing term (mean over MoE layers).
    pub aux: Tensor<B, 1>,
    /// A baseline's regulariser, already weighted (zero for LLaVA-CMoE).
    pub penalty: Tensor<B, 1>,
    /// `ce + lambda kl + eta rec + kappa aux + penalty`.
    pub total: Tensor<B, 1>,
}

/// The terms as numbers, for logs and reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LossValues {
    /// Cross-entropy.
    pub ce: f64,
    /// KL.
    pub kl: f64,
    /// Reconstruction.
    pub rec: f64,
    /// Load balancing.
    pub aux: f64,
    /// A baseline's regulariser (EWC, LwF), weighted.
    #[serde(default)]
    pub penalty: f64,
    /// Weighted total.
    pub total: f64,
    /// The share of the routed top-k slots, over every MoE layer, that went to the experts
    /// the stage trains (LLaVA-CMoE: the task's new experts against the frozen old ones; 1
    /// for a baseline that trains every expert; a layer's `new` experts can take at most
    /// `min(new, k) / k` of its slots). The mean over the step's micro-batches. Not a loss
    /// term.
    #[serde(default)]
    pub trained_share: f64,
}

impl LossValues {
    /// Adds `scale` times `other`, term by term (for means over micro-batches).
    pub fn add_scaled(&mut self, other: &LossValues, scale: f64) {
        self.ce += scale * other.ce;
        self.kl += scale * other.kl;
        self.rec += scale * other.rec;
        self.aux += scale * other.aux;
        self.penalty += scale * other.penalty;
        self.total += scale * other.total;
        self.trained_share += scale * other.trained_share;
    }
}

impl<B: Backend> LossTerms<B> {
    /// Weights and sums the terms (`penalty` is added as it is).
    pub fn new(
        ce: Tensor<B, 1>,
        kl: Tensor<B, 1>,
        rec: Tensor<B, 1>,
        aux: Tensor<B, 1>,
        penalty: Tensor<B, 1>,
        w: LossWeights,
    ) -> Self {
        let total = ce.clone()
            + kl.clone() * w.kl
            + rec.clone() * w.rec
            + aux.clone() * w.aux
            + penalty.clone();
        Self {
            ce,
            kl,
            rec,
            aux,
            penalty,
            total,
        }
    }

    /// The terms `[ce, kl, rec, aux, penalty, total]` as one tensor `[6]`, to be read back
    /// with others in one transfer ([`LossValues::from_terms`]).
    pub fn stacked(&self) -> Tensor<B, 1> {
        Tensor::cat(
            vec![
                self.ce.clone(),
                self.kl.clone(),
                self.rec.clone(),
                self.aux.clone(),
                self.penalty.clone(),
                self.total.clone(),
            ],
            0,
        )
    }

    /// Reads the terms back (one device read); `trained_share` is left at 0.
    pub fn values(&self) -> LossValues {
        let read: Vec<f64> = self
            .stacked()
            .into_data()
            .convert::<f64>()
            .into_vec()
            .expect("float terms");
        LossValues::from_terms(&read)
    }
}

impl<B: AutodiffBackend> LossTerms<B> {
    /// The terms without autodiff (for reading them back).
    pub fn inner(&self) -> LossTerms<B::InnerBackend> {
        LossTerms {
            ce: self.ce.clone().inner(),
            kl: self.kl.clone().inner(),
            rec: self.rec.clone().inner(),
            aux: self.aux.clone().inner(),
            penalty: self.penalty.clone().inner(),
            total: self.total.clone().inner(),
        }
    }
}

impl LossValues {
    /// The values of [`LossTerms::stacked`] read back; `trained_share` is left at 0.
    pub fn from_terms(terms: &[f64]) -> Self {
        let [ce, kl, rec, aux, penalty, total]: [f64; 6] =
            terms[..6].try_into().expect("six loss terms");
        Self {
            ce,
            kl,
            rec,
            aux,
            penalty,
            total,
            trained_share: 0.0,
        }
    }
}

/// The positions of a batch whose logits predict an answer token: position `i` of row `r`
/// predicts label `i + 1`, and counts when that label is not [`IGNORE_INDEX`]. Rows of the
/// batch flattened to `batch * seq` positions, with the token each predicts.
///
/// The training step computes logits (the `[hidden, vocab]` head and its softmax) at these
/// positions only: every other position carries no loss.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerTargets {
    rows: Vec<i64>,
    tokens: Vec<i64>,
}

impl AnswerTargets {
    /// The answer positions of `labels` (`[batch, seq]`; reads them from the device).
    pub fn from_labels<B: Backend>(labels: &Tensor<B, 2, Int>) -> Self {
        let [_, s] = labels.dims();
        let values = labels
            .to_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .expect("integer labels");
        Self::from_host(&values, s)
    }

    /// The answer positions of row-major labels with `seq` positions per row.
    pub fn from_host(labels: &[i64], seq: usize) -> Self {
        let mut rows = Vec::new();
        let mut tokens = Vec::new();
        for (flat, &label) in labels.iter().enumerate() {
            if flat % seq != 0 && label != IGNORE_INDEX {
                rows.push(flat as i64 - 1);
                tokens.push(label);
            }
        }
        Self { rows, tokens }
    }

    /// Number of answer positions.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no position carries a label.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The positions in `batch * seq` order.
    pub fn rows(&self) -> &[i64] {
        &self.rows
    }

    /// `x` (`[batch, seq, width]`) at the answer positions: `[answers, width]`.
    pub fn select<B: Backend>(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let [b, s, w] = x.dims();
        let device = x.device();
        let rows = Tensor::<B, 1, Int>::from_data(
            TensorData::new(self.rows.clone(), [self.rows.len()]),
            &device,
        );
        x.reshape([b * s, w]).select(0, rows)
    }

    /// Mean cross-entropy of `logits` (`[answers, vocab]`, as [`Self::select`] gives them)
    /// against the answer tokens, in f32 whatever the model's dtype. `None` when there are no
    /// answer positions.
    pub fn cross_entropy<B: Backend>(&self, logits: Tensor<B, 2>) -> Option<Tensor<B, 1>> {
        if self.is_empty() {
            return None;
        }
        let n = self.len();
        let device = logits.device();
        let tokens =
            Tensor::<B, 2, Int>::from_data(TensorData::new(self.tokens.clone(), [n, 1]), &device);
        let picked = activation::log_softmax(logits.cast(DType::F32), 1).gather(1, tokens);
        Some(picked.sum().neg() / n as f64)
    }
}

/// Mean next-token cross-entropy of full logits (`[batch, seq, vocab]`): position `i`'s logits
/// predict label `i + 1`; labels equal to [`IGNORE_INDEX`] carry no loss. `None` when no
/// position carries a label.
pub fn causal_lm_loss<B: Backend>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> Option<Tensor<B, 1>> {
    let answers = AnswerTargets::from_labels(&labels);
    answers.cross_entropy(answers.select(logits))
}
