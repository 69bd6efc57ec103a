//! The training objective `L = CE + lambda * KL + eta * rec + kappa * aux` (paper Eq. 6), plus
//! a baseline's regulariser (EWC's penalty, LwF's distillation) when one is trained, with each
//! term kept for logging.

use burn::tensor::{DType, ElementConversion, Int, Tensor, activation, backend::Backend};
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

    /// Reads the terms back (one device sync each).
    pub fn values(&self) -> LossValues {
        let v = |t: &Tensor<B, 1>| t.clone().into_scalar().elem::<f64>();
        LossValues {
            ce: v(&self.ce),
            kl: v(&self.kl),
            rec: v(&self.rec),
            aux: v(&self.aux),
            penalty: v(&self.penalty),
            total: v(&self.total),
        }
    }
}

/// Mean next-token cross-entropy: position `i`'s logits predict label `i + 1`; labels equal to
/// [`IGNORE_INDEX`] carry no loss. `None` when no position carries a label.
pub fn causal_lm_loss<B: Backend>(
    logits: Tensor<B, 3>,
    labels: Tensor<B, 2, Int>,
) -> Option<Tensor<B, 1>> {
    let [b, s, v] = logits.dims();
    if s < 2 {
        return None;
    }
    // In f32 whatever the model's dtype (a bf16 base gives bf16 logits).
    let logits = logits
        .cast(DType::F32)
        .slice([0..b, 0..s - 1, 0..v])
        .reshape([b * (s - 1), v]);
    let labels = labels.slice([0..b, 1..s]).reshape([b * (s - 1)]);
    let keep = labels.clone().not_equal_elem(IGNORE_INDEX);
    let count = keep.clone().int().sum().into_scalar().elem::<i64>();
    if count == 0 {
        return None;
    }
    let targets = labels.clamp_min(0).unsqueeze_dim::<2>(1);
    let log_probs = activation::log_softmax(logits, 1)
        .gather(1, targets)
        .reshape([b * (s - 1)]);
    let picked = log_probs.mask_fill(keep.bool_not(), 0.0);
    Some(picked.sum().neg() / count as f64)
}
