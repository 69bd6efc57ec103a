//! The Probabilistic Task Locator: one small VAE per task on the frozen base model's feature of
//! an input (last decoder layer, last prompt token), a primitive bank of per-task score
//! statistics, and task-agnostic routing by the arg-max z-score.
//!
//! Scores are log-likelihoods,
//! `log p_rec(F) = logsumexp_r log N(F; mu_rec(z_r), sigma_rec(z_r)^2) - log N_rep`, over `N_rep`
//! reparameterised draws `z_r = mu(F) + sigma(F) * eps_r` (raw
//! densities under/overflow at d = 4096). Scoring uses a fixed set of `eps` so that a decision
//! is reproducible. All tasks' VAEs are stacked and scored in one batched computation.

use std::collections::VecDeque;

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Tensor, TensorData, activation, backend::Backend};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::noise;

/// Softplus floor keeping standard deviations away from zero.
const MIN_SIGMA: f64 = 1e-4;

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

/// Configuration of a [`TaskVae`] over features of width `d_feature` (the paper gives no VAE
/// sizes; the defaults are ours).
#[derive(Config, Debug)]
pub struct TaskVaeConfig {
    /// Width of the modelled feature.
    pub d_feature: usize,
    /// Hidden width of the encoder and decoder FFNs.
    #[config(default = 256)]
    pub hidden: usize,
    /// Latent width.
    #[config(default = 32)]
    pub latent: usize,
}

impl TaskVaeConfig {
    /// A randomly initialised VAE (Burn's default `Linear` initialisation).
    pub fn init<B: Backend>(&self, device: &B::Device) -> TaskVae<B> {
        let linear = |i, o| LinearConfig::new(i, o).init(device);
        let (d, hidden, latent) = (self.d_feature, self.hidden, self.latent);
        TaskVae {
            encoder: linear(d, hidden),
            enc_mu: linear(hidden, latent),
            enc_sigma: linear(hidden, latent),
            decoder: linear(latent, hidden),
            dec_mu: linear(hidden, d),
            dec_sigma: linear(hidden, d),
        }
    }
}

/// A task's VAE: `mu = FFN_mu(F)`, `sigma = softplus(FFN_sigma(F))`, a decoder giving
/// `(mu_rec, sigma_rec)`. Each FFN is one hidden GELU layer shared by its two heads.
#[derive(Module, Debug)]
pub struct TaskVae<B: Backend> {
    /// `d -> hidden`.
    pub encoder: Linear<B>,
    /// `hidden -> latent`: the posterior mean.
    pub enc_mu: Linear<B>,
    /// `hidden -> latent`: the posterior std before softplus.
    pub enc_sigma: Linear<B>,
    /// `latent -> hidden`.
    pub decoder: Linear<B>,
    /// `hidden -> d`: the reconstruction mean.
    pub dec_mu: Linear<B>,
    /// `hidden -> d`: the reconstruction std before softplus.
    pub dec_sigma: Linear<B>,
}

/// The two VAE loss terms of paper Eq. 6, averaged over the batch: with `lambda = eta` their
/// weighted sum is a standard VAE's negative ELBO (up to the draws' log-mean-exp).
#[derive(Debug, Clone)]
pub struct VaeLoss<B: Backend> {
    /// `-log p_rec(F)`, summed over the feature's dimensions (paper Eq. 5, as a
    /// log-likelihood).
    pub rec: Tensor<B, 1>,
    /// `KL(N(mu, sigma^2) || N(0, 1))`.
    pub kl: Tensor<B, 1>,
}

impl<B: Backend> TaskVae<B> {
    /// Posterior `(mu, sigma)` `[n, latent]` of features `[n, d]`.
    pub fn encode(&self, features: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 2>) {
        let h = activation::gelu(self.encoder.forward(features));
        let sigma = activation::softplus(self.enc_sigma.forward(h.clone()), 1.0) + MIN_SIGMA;
        (self.enc_mu.forward(h), sigma)
    }

    /// `log p_rec(F)` `[n]` with the draws `eps` `[n_rep, latent]`.
    pub fn log_likelihood(&self, features: Tensor<B, 2>, eps: Tensor<B, 2>) -> Tensor<B, 1> {
        let (mu, sigma) = self.encode(features.clone());
        self.log_likelihood_given(features, mu, sigma, eps)
    }

    fn log_likelihood_given(
        &self,
        features: Tensor<B, 2>,
        mu: Tensor<B, 2>,
        sigma: Tensor<B, 2>,
        eps: Tensor<B, 2>,
    ) -> Tensor<B, 1> {
        let [n, d] = features.dims();
        let [reps, latent] = eps.dims();
        let z = mu.unsqueeze_dim::<3>(0) + sigma.unsqueeze_dim::<3>(0) * eps.unsqueeze_dim::<3>(1); // [r, n, z]
        let h = activation::gelu(self.decoder.forward(z.reshape([reps * n, latent])));
        let rec_mu = self.dec_mu.forward(h.clone()).reshape([reps, n, d]);
        let rec_sigma = (activation::softplus(self.dec_sigma.forward(h), 1.0) + MIN_SIGMA)
            .reshape([reps, n, d]);
        gaussian_log_likelihood(features.unsqueeze_dim::<3>(0), rec_mu, rec_sigma)
    }

    /// Reconstruction and KL terms on a batch, with fresh draws.
    pub fn loss(&self, features: Tensor<B, 2>, n_rep: usize) -> VaeLoss<B> {
        let (mu, sigma) = self.encode(features.clone());
        let latent = mu.dims()[1];
        let eps = noise::standard_normal([n_rep, latent], &mu.device());
        let log_p = self.log_likelihood_given(features, mu.clone(), sigma.clone(), eps);
        let kl = (mu.powi_scalar(2) + sigma.clone().powi_scalar(2) - 1.0 - sigma.log() * 2.0)
            .sum_dim(1)
            * 0.5;
        VaeLoss {
            rec: log_p.mean().neg(),
            kl: kl.mean(),
        }
    }
}

/// `logsumexp_r sum_d log N(x; mu, sigma^2) - log r` for `x` `[1|r, n, d]`, `mu`/`sigma`
/// `[r, n, d]`: the log of the average density over the `r` draws, `[n]`.
fn gaussian_log_likelihood<B: Backend>(
    x: Tensor<B, 3>,
    mu: Tensor<B, 3>,
    sigma: Tensor<B, 3>,
) -> Tensor<B, 1> {
    const LOG_2PI: f64 = 1.837_877_066_409_345_3;
    let z = (x - mu) / sigma.clone();
    let per_dim = z.powi_scalar(2) * -0.5 - sigma.log() - 0.5 * LOG_2PI;
    let per_draw = per_dim.sum_dim(2).squeeze_dim::<2>(2); // [r, n]
    log_mean_exp(per_draw)
}

/// `log(mean_r exp(x[r, n]))`, stable.
fn log_mean_exp<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 1> {
    let [reps, _] = x.dims();
    let max = x.clone().max_dim(0).detach(); // [1, n]
    let sum = (x - max.clone()).exp().sum_dim(0);
    (sum.log() + max - (reps as f64).ln()).squeeze_dim::<1>(0)
}

/// A bank entry: the statistics of a task's scores on its last training instances.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BankEntry {
    /// Mean `log p_rec` of the task's own instances.
    pub mean: f64,
    /// Their std (floored, so that a z-score is always defined).
    pub std: f64,
    /// How many instances they came from.
    pub count: usize,
}

impl BankEntry {
    /// Statistics of `scores` (population std, floored at 1e-6).
    pub fn from_scores(scores: &[f64]) -> Self {
        let n = scores.len().max(1) as f64;
        let mean = scores.iter().sum::<f64>() / n;
        let var = scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n;
        Self {
            mean,
            std: var.sqrt().max(1e-6),
            count: scores.len(),
        }
    }
}

/// The frozen base's features of the batches a training stage went through, the most recent
/// last, keeping at least `capacity` rows and no older batch than needed. A batch seen again
/// (the same position of the next pass) is moved to the end, not stored twice.
#[derive(Debug, Clone)]
pub struct FeatureMemory<B: Backend> {
    capacity: usize,
    rows: usize,
    batches: VecDeque<(usize, Tensor<B, 2>)>,
}

impl<B: Backend> FeatureMemory<B> {
    /// An empty memory keeping `capacity` rows.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            rows: 0,
            batches: VecDeque::new(),
        }
    }

    /// The features of the batch at `position` of its pass: the stored ones if it is still
    /// held, else `compute()`'s; either way stored as the most recent.
    pub fn features<E>(
        &mut self,
        position: usize,
        compute: impl FnOnce() -> Result<Tensor<B, 2>, E>,
    ) -> Result<Tensor<B, 2>, E> {
        let features = match self.get(position) {
            Some(features) => features,
            None => compute()?,
        };
        self.insert(position, features.clone());
        Ok(features)
    }

    /// The stored features of the batch at `position`, if still held.
    pub fn get(&self, position: usize) -> Option<Tensor<B, 2>> {
        self.batches
            .iter()
            .find(|(p, _)| *p == position)
            .map(|(_, features)| features.clone())
    }

    /// Stores `features` as the batch at `position`'s, the most recent (replacing what was
    /// held for it), and drops the oldest batches the capacity no longer needs.
    pub fn insert(&mut self, position: usize, features: Tensor<B, 2>) {
        let held = self.batches.iter().position(|(p, _)| *p == position);
        if let Some((_, replaced)) = held.and_then(|index| self.batches.remove(index)) {
            self.rows -= replaced.dims()[0];
        }
        self.rows += features.dims()[0];
        self.batches.push_back((position, features));
        while let Some((_, oldest)) = self.batches.front() {
            let rows = oldest.dims()[0];
            if self.rows - rows < self.capacity {
                break;
            }
            self.rows -= rows;
            self.batches.pop_front();
        }
    }

    /// The batches held, oldest first.
    pub fn batches(&self) -> impl Iterator<Item = &Tensor<B, 2>> {
        self.batches.iter().map(|(_, features)| features)
    }

    /// The batches held with their positions, oldest first (for a checkpoint).
    pub fn entries(&self) -> impl Iterator<Item = &(usize, Tensor<B, 2>)> {
        self.batches.iter()
    }

    /// A memory holding `entries` (as [`Self::entries`] gave them).
    pub fn from_entries(capacity: usize, entries: Vec<(usize, Tensor<B, 2>)>) -> Self {
        let mut memory = Self::new(capacity);
        for (position, features) in entries {
            memory.insert(position, features);
        }
        memory
    }

    /// The last `rows` rows (fewer if fewer are held), `None` when empty.
    pub fn recent(&self, rows: usize) -> Option<Tensor<B, 2>> {
        let mut taken = 0;
        let mut recent = Vec::new();
        for (_, features) in self.batches.iter().rev() {
            if taken >= rows.max(1) {
                break;
            }
            taken += features.dims()[0];
            recent.push(features.clone());
        }
        recent.reverse();
        (!recent.is_empty()).then(|| {
            let all = Tensor::cat(recent, 0);
            let n = all.dims()[0];
            all.slice(n.saturating_sub(rows.max(1))..n)
        })
    }
}

/// The primitive bank: one entry per task, in task order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PrimitiveBank {
    /// `entries[t]` belongs to task `t`.
    pub entries: Vec<BankEntry>,
}

/// Every task's VAE stacked along a leading task axis, for one batched scoring pass.
#[derive(Module, Debug)]
pub struct StackedVaes<B: Backend> {
    weights: Vec<Param<Tensor<B, 3>>>,
    biases: Vec<Param<Tensor<B, 3>>>,
    eps: Param<Tensor<B, 2>>,
}

/// What the locator decided for a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Location {
    /// Per input, the chosen task.
    pub tasks: Vec<usize>,
    /// Per input, every task's z-score `(log p_rec - mean) / std` (row-major `[n, T]`).
    pub z_scores: Vec<Vec<f64>>,
    /// Per input, every task's raw `log p_rec`.
    pub log_likelihoods: Vec<Vec<f64>>,
}

impl<B: Backend> StackedVaes<B> {
    /// Stacks `vaes` (all of the same shape) with the scoring draws `eps` `[n_rep, latent]`.
    pub fn new(vaes: &[&TaskVae<B>], eps: Tensor<B, 2>) -> Self {
        // References, not clones: a clone of a lazily initialised parameter draws its own values.
        let per_task: Vec<[&Linear<B>; 6]> = vaes
            .iter()
            .map(|v| {
                [
                    &v.encoder,
                    &v.enc_mu,
                    &v.enc_sigma,
                    &v.decoder,
                    &v.dec_mu,
                    &v.dec_sigma,
                ]
            })
            .collect();
        let stack = |i: usize| {
            let w = Tensor::stack::<3>(
                per_task
                    .iter()
                    .map(|l| l[i].weight.val().detach())
                    .collect(),
                0,
            );
            let b = Tensor::stack::<3>(
                per_task
                    .iter()
                    .map(|l| {
                        l[i].bias
                            .as_ref()
                            .expect("VAE linears have biases")
                            .val()
                            .detach()
                            .unsqueeze_dim::<2>(0)
                    })
                    .collect(),
                0,
            );
            // Stacking computes new tensors: detach them into leaves (parameters must be).
            (
                Param::from_tensor(w.detach()),
                Param::from_tensor(b.detach()),
            )
        };
        let (weights, biases) = (0..6).map(stack).unzip();
        Self {
            weights,
            biases,
            eps: Param::from_tensor(eps.detach()),
        }
    }

    fn linear(&self, i: usize, x: Tensor<B, 3>) -> Tensor<B, 3> {
        x.matmul(self.weights[i].val()) + self.biases[i].val()
    }

    /// `log p_rec` of `features` `[n, d]` under every task's VAE: `[T, n]`.
    pub fn log_likelihoods(&self, features: Tensor<B, 2>) -> Tensor<B, 2> {
        let [n, d] = features.dims();
        let tasks = self.weights[0].dims()[0];
        let eps = self.eps.val();
        let [reps, latent] = eps.dims();
        let x = features.unsqueeze_dim::<3>(0).expand([tasks, n, d]);
        let h = activation::gelu(self.linear(0, x.clone()));
        let mu = self.linear(1, h.clone()); // [T, n, z]
        let sigma = activation::softplus(self.linear(2, h), 1.0) + MIN_SIGMA;
        let z = mu.unsqueeze_dim::<4>(1)
            + sigma.unsqueeze_dim::<4>(1) * eps.reshape([1, reps, 1, latent]); // [T, r, n, z]
        let h = activation::gelu(self.linear(3, z.reshape([tasks, reps * n, latent])));
        let rec_mu = self.linear(4, h.clone()).reshape([tasks * reps, n, d]);
        let rec_sigma = (activation::softplus(self.linear(5, h), 1.0) + MIN_SIGMA).reshape([
            tasks * reps,
            n,
            d,
        ]);
        let x = x
            .unsqueeze_dim::<4>(1)
            .expand([tasks, reps, n, d])
            .reshape([tasks * reps, n, d]);
        // Per task: log-mean-exp over its draws.
        let z = (x - rec_mu) / rec_sigma.clone();
        const LOG_2PI: f64 = 1.837_877_066_409_345_3;
        let per_draw = (z.powi_scalar(2) * -0.5 - rec_sigma.log() - 0.5 * LOG_2PI)
            .sum_dim(2)
            .reshape([tasks, reps, n]);
        let max = per_draw.clone().max_dim(1);
        let sum = (per_draw - max.clone()).exp().sum_dim(1);
        (sum.log() + max - (reps as f64).ln()).reshape([tasks, n])
    }

    /// Task-agnostic routing: the arg-max z-score against `bank`, with every score returned.
    pub fn locate(&self, features: Tensor<B, 2>, bank: &PrimitiveBank) -> Location {
        let scores = self.log_likelihoods(features);
        let [tasks, n] = scores.dims();
        assert_eq!(tasks, bank.entries.len(), "one bank entry per stacked VAE");
        let flat: Vec<f64> = scores.into_data().iter::<f64>().collect();
        let mut location = Location {
            tasks: Vec::new(),
            z_scores: Vec::new(),
            log_likelihoods: Vec::new(),
        };
        for i in 0..n {
            let ll: Vec<f64> = (0..tasks).map(|t| flat[t * n + i]).collect();
            let z: Vec<f64> = ll
                .iter()
                .zip(&bank.entries)
                .map(|(l, e)| (l - e.mean) / e.std)
                .collect();
            let best = z
                .iter()
                .enumerate()
                .fold(0, |b, (t, &v)| if v > z[b] { t } else { b });
            location.tasks.push(best);
            location.z_scores.push(z);
            location.log_likelihoods.push(ll);
        }
        location
    }
}

/// Configuration of a [`TaskLocator`]: how its scores are drawn and which feature it reads.
#[derive(Config, Debug)]
pub struct TaskLocatorConfig {
    /// Latent width of the VAEs.
    pub latent: usize,
    /// `N_rep`: reparameterised draws per feature.
    #[config(default = 8)]
    pub n_rep: usize,
    /// Seed of the fixed draws every score uses (bank entries and inference).
    #[config(default = 0x5EED)]
    pub seed: u64,
    /// The input feature the VAEs model.
    #[config(default = "PtlFeature::Last")]
    pub feature: PtlFeature,
}

impl TaskLocatorConfig {
    /// The locator over `vaes` (task `t`'s VAE at `t`, stacked with the scoring draws) and the
    /// primitive bank `bank`.
    pub fn init<B: Backend>(
        &self,
        vaes: &[TaskVae<B>],
        bank: PrimitiveBank,
        device: &B::Device,
    ) -> TaskLocator<B> {
        let refs: Vec<&TaskVae<B>> = vaes.iter().collect();
        TaskLocator {
            vaes: (!refs.is_empty()).then(|| StackedVaes::new(&refs, self.scoring_draws(device))),
            bank,
            feature: self.feature,
        }
    }

    /// The fixed standard-normal draws `[n_rep, latent]` every score uses, the same on every
    /// backend (drawn on the host from [`Self::seed`], Box-Muller).
    pub fn scoring_draws<B: Backend>(&self, device: &B::Device) -> Tensor<B, 2> {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let values: Vec<f32> = (0..self.n_rep * self.latent)
            .map(|_| {
                let u: f64 = 1.0 - rng.random::<f64>(); // (0, 1]
                let v: f64 = rng.random();
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect();
        Tensor::from_data(TensorData::new(values, [self.n_rep, self.latent]), device)
    }
}

/// Task-agnostic routing: every task's VAE (stacked, scored in one pass) and the bank.
#[derive(Debug)]
pub struct TaskLocator<B: Backend> {
    vaes: Option<StackedVaes<B>>,
    bank: PrimitiveBank,
    feature: PtlFeature,
}

impl<B: Backend> TaskLocator<B> {
    /// The input feature the locator reads (the host model computes it).
    pub fn feature(&self) -> PtlFeature {
        self.feature
    }

    /// Which task each row of `features` `[n, width]` belongs to, with every task's scores;
    /// `None` before any task has been learned.
    pub fn locate(&self, features: Tensor<B, 2>) -> Option<Location> {
        Some(self.vaes.as_ref()?.locate(features, &self.bank))
    }
}
