//! Scaled dot-product attention, shared by LLaMA and CLIP.
//!
//! In f32 it is Burn's `attention` (a fused kernel where the backend has one). In half
//! precision it computes as transformers' eager attention does in bf16: the two products in
//! the inputs' dtype, the softmax in f32 (`softmax(..., dtype=torch.float32).to(query.dtype)`).
//! Under autodiff, the softmax's backward pass then keeps only its f32 probabilities and their
//! cast, `(4 + 2) H s` bytes per token and head, where Burn's composed softmax keeps the f32
//! input of its exponential as well (`(8 + 2) H s`): see [`softmax_f32`].

use burn::tensor::activation::softmax;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, DType, Tensor, backend::Backend};

/// `softmax(q k^T / sqrt(d), masked) v` for `q`, `k`, `v` `[batch, heads, seq, head_dim]`;
/// `mask` (`[batch, heads, seq, keys]`, true where attention is forbidden) hides keys.
pub fn scaled_dot_product<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
) -> Tensor<B, 4> {
    if q.dtype() == DType::F32 {
        return attention(q, k, v, mask, None, AttentionModuleOptions::default());
    }
    let [.., head_dim] = q.dims();
    let scores = q.matmul(k.swap_dims(2, 3)) * (1.0 / (head_dim as f64).sqrt());
    softmax_f32(scores, mask).matmul(v)
}

/// The softmax over the last dimension of `scores` computed in f32 (masked to zero where
/// `mask` is true) and cast back to `scores`' dtype.
///
/// Under autodiff the probabilities `p` are computed from a detached copy of the scores, and
/// the softmax's Jacobian `p_i (delta_ik - p_k)` is attached through two terms whose value is
/// zero: `p * z - p * sum(p * z)` with `z = scores - detach(scores)`. The value is `p` exactly,
/// the gradient the softmax's, and the backward pass keeps `p` (f32) and its cast only.
pub fn softmax_f32<B: Backend>(
    scores: Tensor<B, 4>,
    mask: Option<Tensor<B, 4, Bool>>,
) -> Tensor<B, 4> {
    let dtype = scores.dtype();
    let scores = scores.cast(DType::F32);
    let masked = |t: Tensor<B, 4>| match &mask {
        Some(mask) => t.mask_fill(mask.clone(), f32::NEG_INFINITY),
        None => t,
    };
    if !B::ad_enabled(&scores.device()) {
        return softmax(masked(scores), 3).cast(dtype);
    }
    let p = softmax(masked(scores.clone().detach()), 3);
    let z = scores.clone() - scores.detach();
    let pz = p.clone() * z;
    let jacobian = pz.clone() - p.clone() * pz.sum_dim(3);
    p.cast(dtype) + jacobian.cast(dtype)
}

#[cfg(test)]
mod tests {
    use burn::backend::Autodiff;
    use burn::tensor::{Distribution, Tensor, Tolerance, activation::softmax};

    type B = Autodiff<burn_flex::Flex>;

    #[test]
    fn the_lean_softmax_has_the_softmax_value_and_gradient() {
        let device = Default::default();
        let x = Tensor::<B, 4>::random([2, 3, 5, 7], Distribution::Normal(0.0, 2.0), &device)
            .require_grad();
        // About a third of the keys hidden, never the first (a row keeps a key).
        let mask = Tensor::<B, 4>::random([2, 3, 5, 7], Distribution::Uniform(0.0, 1.0), &device)
            .slice_assign(
                [0..2, 0..3, 0..5, 0..1],
                Tensor::zeros([2, 3, 5, 1], &device),
            )
            .greater_elem(0.7);
        let weights = Tensor::<B, 4>::random([2, 3, 5, 7], Distribution::Normal(0.0, 1.0), &device);
        let reference = softmax(x.clone().mask_fill(mask.clone(), f32::NEG_INFINITY), 3);
        let lean = super::softmax_f32(x.clone(), Some(mask));
        lean.clone()
            .into_data()
            .assert_approx_eq::<f32>(&reference.clone().into_data(), Tolerance::absolute(1e-7));
        let grad = |y: Tensor<B, 4>| (y * weights.clone()).sum().backward();
        let (g_ref, g_lean) = (grad(reference), grad(lean));
        x.grad(&g_lean)
            .unwrap()
            .into_data()
            .assert_approx_eq::<f32>(
                &x.grad(&g_ref).unwrap().into_data(),
                Tolerance::absolute(1e-6),
            );
    }
}
