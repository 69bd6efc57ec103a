//! A task's VAE on the base model's feature of an input, and its loss terms.

use burn::config::Config;
use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Tensor, activation, backend::Backend};

use crate::train::noise;

/// Softplus floor keeping standard deviations away from zero.
pub(super) const MIN_SIGMA: f64 = 1e-4;

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
