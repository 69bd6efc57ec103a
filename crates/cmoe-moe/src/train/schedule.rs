//! The optimiser every stage uses and its learning-rate schedule (paper: AdamW, warmup 0.03
//! then cosine).

use burn::optim::AdamWConfig;

/// The AdamW every stage uses: PyTorch's defaults (betas 0.9 / 0.999, epsilon 1e-8, which the
/// paper's trainer used) and `weight_decay`. Burn's default epsilon, 1e-5, would swamp the
/// VAE's gradients, which the loss scales by `eta = 1e-3`.
pub fn adamw(weight_decay: f32) -> AdamWConfig {
    AdamWConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay(weight_decay)
}

/// Learning rate at `step` of `total`: linear warmup to `peak`, then cosine to zero.
pub fn learning_rate(step: usize, total: usize, peak: f64, warmup_ratio: f64) -> f64 {
    let warmup = ((total as f64 * warmup_ratio).ceil() as usize).max(1);
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let progress = (step - warmup) as f64 / (total - warmup).max(1) as f64;
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress.min(1.0)).cos())
}
