//! The Probabilistic Task Locator: one small VAE per task on the frozen base model's feature of
//! an input (last decoder layer, last prompt token), a primitive bank of per-task score
//! statistics, and task-agnostic routing by the arg-max z-score.
//!
//! Scores are log-likelihoods,
//! `log p_rec(F) = logsumexp_r log N(F; mu_rec(z_r), sigma_rec(z_r)^2) - log N_rep`, over `N_rep`
//! reparameterised draws `z_r = mu(F) + sigma(F) * eps_r` (raw
//! densities under/overflow at d = 4096). Scoring uses a fixed set of `eps` so that a decision
//! is reproducible. All tasks' VAEs are stacked and scored in one batched computation.

mod bank;
mod fit;
mod locator;
mod vae;

pub use bank::{BankEntry, FeatureMemory, PrimitiveBank};
pub use fit::{VaeFit, bank_entry, batch_features, fit_vae};
pub use locator::{Location, StackedVaes, TaskLocator, TaskLocatorConfig};
pub use vae::{TaskVae, TaskVaeConfig, VaeLoss};

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

/// Which feature of an input PTL models (paper Sec. 3.3 and Table 5 / appendix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PtlFeature {
    /// The last decoder layer's hidden state at the last prompt token (the paper's `F_end`).
    #[default]
    Last,
    /// The mean of the last decoder layer's hidden states over the question's tokens (the
    /// prompt after the image; all of the prompt when it has no image): the pooled ablation.
    Mean,
    /// `Last` and `Mean` concatenated (width `2 d`).
    Both,
}

impl std::str::FromStr for PtlFeature {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "last" => Ok(Self::Last),
            "mean" => Ok(Self::Mean),
            "both" => Ok(Self::Both),
            other => Err(format!(
                "PTL feature `{other}`: expected last, mean or both"
            )),
        }
    }
}

impl PtlFeature {
    /// The feature's width for a decoder of hidden width `hidden`.
    pub fn width(self, hidden: usize) -> usize {
        match self {
            Self::Last | Self::Mean => hidden,
            Self::Both => 2 * hidden,
        }
    }
}

/// Sizes and settings of the locator. The paper gives no VAE sizes; these defaults are ours.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PtlConfig {
    /// Hidden width of the encoder and decoder FFNs.
    pub hidden: usize,
    /// Latent width.
    pub latent: usize,
    /// `N_rep`: reparameterised draws per feature.
    pub n_rep: usize,
    /// `T`: the last training instances whose scores make a bank entry.
    pub bank_instances: usize,
    /// Learning rate of the VAE; `None`: the stage's (the paper trains it in the same loss).
    pub lr: Option<f64>,
    /// Passes of VAE-only training over the task's cached features after the joint stage, so
    /// that the bank is built "after the VAE converges" (paper); 0 for none. Cheap: the base
    /// model is not run again.
    #[serde(default)]
    pub fit_epochs: usize,
    /// Rows of base features kept from a training stage, the most recent ones: the bank takes
    /// its last `bank_instances` from them and the VAE-only passes run over them. Bounds the
    /// memory a large task's features take (at least `bank_instances` are kept).
    #[serde(default = "default_feature_memory")]
    pub feature_memory: usize,
    /// Seed of the fixed draws used for scoring (bank entries and inference).
    pub seed: u64,
    /// The input feature the VAEs model.
    #[serde(default)]
    pub feature: PtlFeature,
}

impl Default for PtlConfig {
    fn default() -> Self {
        Self {
            hidden: 256,
            latent: 32,
            n_rep: 8,
            bank_instances: 256,
            lr: None,
            fit_epochs: 0,
            feature_memory: default_feature_memory(),
            seed: 0x5EED,
            feature: PtlFeature::Last,
        }
    }
}

fn default_feature_memory() -> usize {
    4096
}

impl PtlConfig {
    /// A fresh VAE for features of width `d`.
    pub fn init_vae<B: Backend>(&self, d: usize, device: &B::Device) -> TaskVae<B> {
        self.vae(d).init(device)
    }

    /// The configuration of a task VAE for features of width `d`.
    pub fn vae(&self, d: usize) -> TaskVaeConfig {
        TaskVaeConfig::new(d)
            .with_hidden(self.hidden)
            .with_latent(self.latent)
    }

    /// The configuration of the locator over VAEs made with these settings.
    pub fn locator(&self) -> TaskLocatorConfig {
        TaskLocatorConfig::new(self.latent)
            .with_n_rep(self.n_rep)
            .with_seed(self.seed)
            .with_feature(self.feature)
    }
}
