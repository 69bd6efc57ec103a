//! Rotary position embedding in HF's `rotate_half` layout: the head dimension is split in two
//! halves `[x1, x2]` and rotated as `[x1 cos - x2 sin, x2 cos + x1 sin]` (not interleaved pairs,
//! which is what `burn::nn::RotaryEncoding` implements).

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};

/// `cos` and `sin` tables for a batch of explicit positions.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    /// `[batch, seq, 1, head_dim]`.
    cos: Tensor<B, 4>,
    /// `[batch, seq, 1, head_dim]`.
    sin: Tensor<B, 4>,
    /// `rotate_half` as a `[head_dim, head_dim]` signed permutation:
    /// `x R = [-x2, x1]`, exact (one non-zero per column).
    rotate: Tensor<B, 2>,
}

impl<B: Backend> RopeTables<B> {
    /// Tables for `positions` `[batch, seq]`.
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
        let angles = Tensor::cat(vec![freqs.clone(), freqs], 2).unsqueeze_dim::<4>(2);
        let mut rotate = vec![0f32; head_dim * head_dim];
        for j in 0..half {
            rotate[(j + half) * head_dim + j] = -1.0; // output j takes -x2[j]
            rotate[j * head_dim + j + half] = 1.0; // output half + j takes x1[j]
        }
        Self {
            cos: angles.clone().cos(),
            sin: angles.sin(),
            rotate: Tensor::from_data(TensorData::new(rotate, [head_dim, head_dim]), &device),
        }
    }

    /// Rotates `x` `[batch, seq, heads, head_dim]` (the layout a projection's output has, so
    /// that every operation here runs on contiguous data; the tables, computed in f32, are
    /// cast to `x`'s dtype).
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, s, h, d] = x.dims();
        let dtype = x.dtype();
        let rotated = x
            .clone()
            .reshape([b * s * h, d])
            .matmul(self.rotate.clone().cast(dtype))
            .reshape([b, s, h, d]);
        x * self.cos.clone().cast(dtype) + rotated * self.sin.clone().cast(dtype)
    }
}
