//! Rotary position embedding in HF's `rotate_half` layout: the head dimension is split in two
//! halves `[x1, x2]` and rotated as `[x1 cos - x2 sin, x2 cos + x1 sin]` (not interleaved pairs,
//! which is what `burn::nn::RotaryEncoding` implements).

use burn::tensor::{Int, Tensor, backend::Backend};

/// `cos` and `sin` tables for a batch of explicit positions.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
}

impl<B: Backend> RopeTables<B> {
    /// Tables for `positions` `[batch, seq]`, shaped `[batch, 1, seq, head_dim]`.
    pub fn new(positions: Tensor<B, 2, Int>, head_dim: usize, theta: f64) -> Self {
        let device = positions.device();
        let [batch, seq] = positions.dims();
        let half = head_dim / 2;
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| (1.0 / theta.powf(2.0 * i as f64 / head_dim as f64)) as f32)
            .collect();
        let inv_freq =
            Tensor::<B, 1>::from_floats(inv_freq.as_slice(), &device).reshape([1, 1, half]);
        let freqs = positions.float().reshape([batch, seq, 1]) * inv_freq; // [b, s, half]
        let angles = Tensor::cat(vec![freqs.clone(), freqs], 2).unsqueeze_dim::<4>(1);
        Self {
            cos: angles.clone().cos(),
            sin: angles.sin(),
        }
    }

    /// Rotates `x` `[batch, heads, seq, head_dim]` (the tables, computed in f32, are cast to
    /// `x`'s dtype).
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, h, s, d] = x.dims();
        let dtype = x.dtype();
        let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..d / 2]);
        let x2 = x.clone().slice([0..b, 0..h, 0..s, d / 2..d]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * self.cos.clone().cast(dtype) + rotated * self.sin.clone().cast(dtype)
    }
}
