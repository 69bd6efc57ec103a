//! The activation functions named in HF configs.

use burn::tensor::{Tensor, activation, backend::Backend};

use crate::config::Activation;

impl Activation {
    /// Applies the activation element-wise.
    pub fn forward<B: Backend, const D: usize>(self, x: Tensor<B, D>) -> Tensor<B, D> {
        match self {
            Activation::QuickGelu => x.clone() * activation::sigmoid(x * 1.702),
            Activation::Gelu => activation::gelu(x),
            Activation::GeluTanh => activation::gelu_approximate(x),
            Activation::Silu => activation::silu(x),
        }
    }
}
