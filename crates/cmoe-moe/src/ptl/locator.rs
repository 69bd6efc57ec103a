//! Every task's VAE scored in one batched pass, and task location by the arg-max z-score.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{Tensor, TensorData, activation, backend::Backend};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::vae::MIN_SIGMA;
use super::{PrimitiveBank, PtlFeature, TaskVae};

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
