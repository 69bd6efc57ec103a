//! One LoRA expert: the low-rank pair `A: d_in -> r`, `B: r -> d_out` of paper Eq. 1.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{Distribution, Tensor, backend::Backend};

/// Configuration of a [`LoraExpert`] on a projection `d_input -> d_output`.
#[derive(Config, Debug)]
pub struct LoraExpertConfig {
    /// Input width of the wrapped projection.
    pub d_input: usize,
    /// Output width of the wrapped projection.
    pub d_output: usize,
    /// Rank `r` (the paper's 64).
    #[config(default = 64)]
    pub rank: usize,
}

impl LoraExpertConfig {
    /// A fresh expert as PEFT initialises one: `A` uniform in `±1/sqrt(d_input)`, `B` zero (so
    /// a new expert starts as the identity on the base projection).
    pub fn init<B: Backend>(&self, device: &B::Device) -> LoraExpert<B> {
        let bound = 1.0 / (self.d_input as f64).sqrt();
        LoraExpert {
            lora_a: Param::from_tensor(Tensor::random(
                [self.d_input, self.rank],
                Distribution::Uniform(-bound, bound),
                device,
            )),
            lora_b: Param::from_tensor(Tensor::zeros([self.rank, self.d_output], device)),
        }
    }
}

/// A LoRA pair; its contribution to a projection is `scale * x A B`.
#[derive(Module, Debug)]
pub struct LoraExpert<B: Backend> {
    /// Down-projection `[d_in, r]`.
    pub lora_a: Param<Tensor<B, 2>>,
    /// Up-projection `[r, d_out]`.
    pub lora_b: Param<Tensor<B, 2>>,
}

impl<B: Backend> LoraExpert<B> {
    /// `x A B` for rows `x` `[n, d_in]` (the caller applies the scale and routing weight).
    pub fn delta(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        x.matmul(self.lora_a.val()).matmul(self.lora_b.val())
    }

    /// A trainable copy with new parameter ids (PGKE initialises new experts this way).
    pub fn duplicate(&self) -> Self {
        Self {
            lora_a: Param::from_tensor(self.lora_a.val().detach()),
            lora_b: Param::from_tensor(self.lora_b.val().detach()),
        }
    }

    /// The element-wise mean of `experts` (PGKE's probe initialisation).
    pub fn mean(experts: &[&LoraExpert<B>]) -> Self {
        assert!(!experts.is_empty(), "the mean of no experts");
        let n = experts.len() as f64;
        let a = Tensor::stack::<3>(experts.iter().map(|e| e.lora_a.val().detach()).collect(), 0);
        let b = Tensor::stack::<3>(experts.iter().map(|e| e.lora_b.val().detach()).collect(), 0);
        // `detach`: a parameter must be a leaf of the autodiff graph.
        Self {
            lora_a: Param::from_tensor((a.sum_dim(0).squeeze_dim(0) / n).detach()),
            lora_b: Param::from_tensor((b.sum_dim(0).squeeze_dim(0) / n).detach()),
        }
    }
}
