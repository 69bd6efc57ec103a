//! Rotary position embedding in HF's `rotate_half` layout: the head dimension is split in two
//! halves `[x1, x2]` and rotated as `[x1 cos - x2 sin, x2 cos + x1 sin]` (not interleaved pairs,
//! which is what `burn::nn::RotaryEncoding` implements).

use burn::tensor::{DType, Int, Tensor, TensorData, backend::Backend};

/// `cos` and `sin` tables for a batch of explicit positions.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    /// `(cos, sin)`, each `[batch, seq, heads, head_dim]` and contiguous, for each head count
    /// the tables were built for: an element-wise product with a same-shaped contiguous
    /// operand runs on flat slices, where one broadcast over the heads would walk strided
    /// views element by element (forward and backward).
    per_heads: Vec<(usize, Tensor<B, 4>, Tensor<B, 4>)>,
    /// `rotate_half` as a `[head_dim, head_dim]` signed permutation:
    /// `x R = [-x2, x1]`, exact (one non-zero per column).
    rotate: Tensor<B, 2>,
}

impl<B: Backend> RopeTables<B> {
    /// Tables for `positions` `[batch, seq]`, laid out for the head counts in `heads` (the
    /// query heads and the key heads of a layer), computed in f32 and stored in `dtype` (the
    /// model's), so that no layer makes its own cast copy.
    pub fn new(
        positions: Tensor<B, 2, Int>,
        head_dim: usize,
        theta: f64,
        heads: &[usize],
        dtype: DType,
    ) -> Self {
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
        let (cos, sin) = (angles.clone().cos(), angles.sin()); // [b, s, 1, head_dim]
        let mut per_heads = Vec::new();
        for &h in heads {
            if per_heads.iter().all(|(known, _, _)| *known != h) {
                let spread = |t: &Tensor<B, 4>| Tensor::cat(vec![t.clone(); h], 2).cast(dtype);
                per_heads.push((h, spread(&cos), spread(&sin)));
            }
        }
        let mut rotate = vec![0f32; head_dim * head_dim];
        for j in 0..half {
            rotate[(j + half) * head_dim + j] = -1.0; // output j takes -x2[j]
            rotate[j * head_dim + j + half] = 1.0; // output half + j takes x1[j]
        }
        Self {
            per_heads,
            rotate: Tensor::<B, 2>::from_data(
                TensorData::new(rotate, [head_dim, head_dim]),
                &device,
            )
            .cast(dtype),
        }
    }

    /// Rotates `x` `[batch, seq, heads, head_dim]` (the layout a projection's output has, so
    /// that every operation here runs on contiguous data; the tables are cast to `x`'s dtype,
    /// a no-op when it is the one they were built in).
    pub fn apply(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, s, h, d] = x.dims();
        let dtype = x.dtype();
        let rotated = x
            .clone()
            .reshape([b * s * h, d])
            .matmul(self.rotate.clone().cast(dtype))
            .reshape([b, s, h, d]);
        let (_, cos, sin) = self
            .per_heads
            .iter()
            .find(|(heads, _, _)| *heads == h)
            .unwrap_or_else(|| {
                panic!(
                    "RoPE tables were built for {:?} heads, not {h}",
                    self.heads()
                )
            });
        x * cos.clone().cast(dtype) + rotated * sin.clone().cast(dtype)
    }

    /// The head counts the tables were built for.
    fn heads(&self) -> Vec<usize> {
        self.per_heads.iter().map(|(h, _, _)| *h).collect()
    }
}
