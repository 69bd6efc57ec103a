//! The random draws of a training step: LoRA dropout masks and the VAE's reparameterisation
//! noise.
//!
//! By default they come from the backend's generator (`Tensor::random`), which the training
//! stage seeds once per step. Burn's CPU backends keep one generator per process, so replicas
//! of the model that share a CPU device (data parallel on the cores of one machine) would draw
//! from it in whatever order their threads reach it, and a run would not repeat. A
//! [`NoiseStream`] installed on a thread for one micro-batch replaces that generator there: the
//! draws are made on the host by a generator seeded from the step and the micro-batch, so they
//! do not depend on which thread runs the micro-batch or when.

use std::cell::RefCell;
use std::marker::PhantomData;

use burn::nn::Dropout;
use burn::tensor::{Bool, Distribution, Tensor, TensorData, backend::Backend};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;

thread_local! {
    static STREAM: RefCell<Option<SmallRng>> = const { RefCell::new(None) };
}

/// The current thread's own stream of draws, from [`NoiseStream::install`] until dropped.
pub struct NoiseStream {
    /// Bound to the thread it was installed on.
    _thread: PhantomData<*const ()>,
}

impl NoiseStream {
    /// Makes this thread's draws come from a generator seeded with `seed` until the returned
    /// guard is dropped.
    pub fn install(seed: u64) -> Self {
        STREAM.with(|stream| *stream.borrow_mut() = Some(SmallRng::seed_from_u64(seed)));
        Self {
            _thread: PhantomData,
        }
    }
}

impl Drop for NoiseStream {
    fn drop(&mut self) {
        STREAM.with(|stream| *stream.borrow_mut() = None);
    }
}

/// `draw` on this thread's stream, or `None` when none is installed.
fn from_stream<T>(draw: impl FnOnce(&mut SmallRng) -> T) -> Option<T> {
    STREAM.with(|stream| stream.borrow_mut().as_mut().map(draw))
}

/// `dropout` on `x`: with probability `prob` an element is zeroed, the others are scaled by
/// `1 / (1 - prob)`, in training (autodiff) mode only, with the draws of [`Dropout::forward`].
/// The mask is a boolean tensor (`mask_fill`, then a scalar product), so the backward pass
/// keeps one byte per element on backends whose booleans are bytes (CUDA, flex), where
/// [`Dropout::forward`]'s product with a float mask keeps four.
pub fn dropout<B: Backend, const D: usize>(dropout: &Dropout, x: Tensor<B, D>) -> Tensor<B, D> {
    let device = x.device();
    if !B::ad_enabled(&device) || dropout.prob == 0.0 {
        return x;
    }
    let keep = 1.0 - dropout.prob;
    let shape = x.shape();
    let drawn = from_stream(|rng| {
        (0..shape.num_elements())
            .map(|_| rng.random::<f64>() >= keep)
            .collect::<Vec<bool>>()
    });
    let dropped = match drawn {
        Some(dropped) => Tensor::<B, D, Bool>::from_data(TensorData::new(dropped, shape), &device),
        // The draws `Dropout::forward` makes: 1 (kept) with probability `keep`.
        None => x.random_like(Distribution::Bernoulli(keep)).equal_elem(0.0),
    };
    x.mask_fill(dropped, 0.0) * (1.0 / keep)
}

/// Standard normal draws of `shape`.
pub fn standard_normal<B: Backend, const D: usize>(
    shape: [usize; D],
    device: &B::Device,
) -> Tensor<B, D> {
    let n = shape.iter().product();
    match from_stream(|rng| {
        (0..n)
            .map(|_| rng.sample::<f32, _>(StandardNormal))
            .collect::<Vec<f32>>()
    }) {
        Some(values) => Tensor::from_data(TensorData::new(values, shape), device),
        None => Tensor::random(shape, Distribution::Normal(0.0, 1.0), device),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Autodiff;

    type B = Autodiff<burn_ndarray::NdArray>;

    fn drawn(seed: u64) -> (Vec<f32>, Vec<f32>) {
        let device = Default::default();
        let _stream = NoiseStream::install(seed);
        let masked = dropout(
            &burn::nn::DropoutConfig::new(0.25).init(),
            Tensor::<B, 2>::ones([64, 32], &device),
        );
        let normal = standard_normal::<B, 2>([8, 16], &device);
        (
            masked.into_data().to_vec().unwrap(),
            normal.into_data().to_vec().unwrap(),
        )
    }

    #[test]
    fn a_stream_repeats_its_draws_on_any_thread() {
        let here = drawn(11);
        let there = std::thread::spawn(|| drawn(11)).join().unwrap();
        assert_eq!(here, there);
        assert_ne!(here, drawn(12));
    }

    #[test]
    fn dropout_keeps_the_expected_share_scaled() {
        let (masked, normal) = drawn(3);
        let kept = masked.iter().filter(|&&v| v != 0.0).count() as f64 / masked.len() as f64;
        assert!((kept - 0.75).abs() < 0.05, "kept {kept}");
        assert!(
            masked
                .iter()
                .all(|&v| v == 0.0 || (v - 1.0 / 0.75).abs() < 1e-6)
        );
        let mean = normal.iter().sum::<f32>() / normal.len() as f32;
        assert!(mean.abs() < 0.3, "mean {mean}");
    }

    #[test]
    fn without_a_stream_nothing_is_drawn_from_one() {
        assert!(from_stream(|rng| rng.random::<u64>()).is_none());
        let _stream = NoiseStream::install(1);
        assert!(from_stream(|rng| rng.random::<u64>()).is_some());
    }
}
