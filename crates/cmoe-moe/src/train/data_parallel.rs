//! Data-parallel training of a stage over several devices, on Burn's multi-device optimiser
//! step ([`Optimizer::step_multi`], the step of burn-train's multi-device strategy).
//!
//! - Each extra device holds a [`Replicas`] copy of the model, made once per stage (the frozen
//!   base is copied then, never again), and of the VAE being fitted.
//! - A step's micro-batches are dealt round-robin over the devices. Every device runs its
//!   forward and backward passes in its own thread (the first device on the caller's).
//! - [`MultiGradientsParams`] hands every device's gradients to the optimiser. Burn sums each
//!   trainable parameter's gradients on one device (chosen per parameter, so the AdamW state is
//!   spread over the devices) and updates the parameter there.
//! - The updated trainable modules (the task's experts and router, the VAE) are then copied to
//!   every replica. Frozen ones are never copied again.
//!
//! A step's loss is the mean over its micro-batches whichever device runs them, so the update
//! equals a one-device step on the same micro-batches, up to the order of the float sums
//! (`crates/cmoe-moe/tests/data_parallel.rs` checks it).
//!
//! Where it runs, with Burn 0.21:
//! - CUDA: across GPUs (tensors cross devices through CubeCL's CUDA server).
//! - flex / ndarray: one device, so "several devices" are replicas on it. The tests run the
//!   whole path that way.
//! - wgpu: one device only. Burn's wgpu backend cannot copy a tensor between two devices:
//!   burn-cubecl's `to_device` takes CubeCL's server-to-server path, which only the CUDA server
//!   implements. Two wgpu devices on lavapipe panicked in `comm_init` ("not implemented").
//!
//! Burn 0.21's other multi-GPU path, the all-reduce inside the backward pass
//! (`DistributedBackend`, NCCL), is implemented for CUDA only, so nothing here could test it;
//! the multi-device optimiser step used instead runs the same on every backend.

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::optim::{GradientsParams, MultiGradientsParams, Optimizer};
use burn::prelude::DeviceOps;
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};

use crate::host::MoeHost;
use crate::model::CmoeModel;
use crate::ptl::TaskVae;

/// The model and the VAE being fitted, copied on every device but the first.
pub struct Replicas<B: AutodiffBackend, H: Module<B>> {
    devices: Vec<B::Device>,
    copies: Vec<Replica<B, H>>,
}

/// One extra device's copy.
struct Replica<B: AutodiffBackend, H: Module<B>> {
    model: CmoeModel<B, H>,
    vae: Option<TaskVae<B>>,
}

impl<B: AutodiffBackend, H: MoeHost<B>> Replicas<B, H> {
    /// Copies of `model` and `vae` (on `devices[0]`) on `devices[1..]`; none for one device or
    /// none.
    pub fn new(model: &CmoeModel<B, H>, vae: Option<&TaskVae<B>>, devices: &[B::Device]) -> Self {
        let copies = devices
            .iter()
            .skip(1)
            .map(|device| Replica {
                model: model.clone().fork(device),
                vae: vae.map(|vae| vae.clone().fork(device)),
            })
            .collect();
        Self {
            devices: devices.to_vec(),
            copies,
        }
    }

    /// Devices taking part (at least one: the model's own when none were given).
    pub fn count(&self) -> usize {
        self.copies.len() + 1
    }

    /// Whether two replicas share one device (several replicas on the one CPU device): they
    /// then share its random generator too.
    pub fn share_a_device(&self) -> bool {
        self.devices
            .iter()
            .enumerate()
            .any(|(i, device)| self.devices[..i].contains(device))
    }

    /// Runs `work` on every device at once, `shards[d]` on device `d`: the first on this thread
    /// with `model` and `vae`, the others on their replicas in threads of their own. Returns
    /// the results in device order.
    pub fn run<W: Send, T: Send>(
        &mut self,
        model: &CmoeModel<B, H>,
        vae: Option<&TaskVae<B>>,
        shards: Vec<W>,
        work: impl Fn(&CmoeModel<B, H>, Option<&TaskVae<B>>, W) -> T + Sync,
    ) -> Vec<T> {
        let mut shards = shards.into_iter();
        let Some(first) = shards.next() else {
            return Vec::new();
        };
        let work = &work;
        std::thread::scope(|scope| {
            let others: Vec<_> = self
                .copies
                .iter_mut()
                .zip(shards)
                .map(|(copy, shard)| {
                    let copy = &*copy;
                    scope.spawn(move || work(&copy.model, copy.vae.as_ref(), shard))
                })
                .collect();
            let mut results = vec![work(model, vae, first)];
            for other in others {
                results.push(
                    other
                        .join()
                        .unwrap_or_else(|p| std::panic::resume_unwind(p)),
                );
            }
            results
        })
    }

    /// The device of shard `d` (none when no devices were given).
    pub fn device(&self, d: usize) -> Option<&B::Device> {
        self.devices.get(d)
    }

    /// One optimiser step of `module` (on the first device) on `grads`, one entry per device
    /// in device order: [`Optimizer::step`] for one device, else [`Optimizer::step_multi`],
    /// after which the module is gathered back on the first device.
    pub fn step<M, O>(
        &self,
        optim: &mut O,
        lr: f64,
        module: M,
        mut grads: Vec<GradientsParams>,
    ) -> M
    where
        M: AutodiffModule<B>,
        O: Optimizer<M, B>,
    {
        if grads.len() < 2 {
            return optim.step(lr, module, grads.pop().unwrap_or_default());
        }
        let grads = MultiGradientsParams {
            grads: grads
                .into_iter()
                .zip(&self.devices)
                .map(|(grads, device)| (grads, device.to_id()))
                .collect(),
        };
        let module = optim.step_multi(lr, module, grads);
        match self.devices.first() {
            Some(main) => module.fork(main),
            None => module,
        }
    }

    /// Copies `model`'s trainable experts and routers, and `vae`, to every replica.
    pub fn refresh(&mut self, model: &CmoeModel<B, H>, vae: Option<&TaskVae<B>>) {
        for (copy, device) in self.copies.iter_mut().zip(self.devices.iter().skip(1)) {
            for (to, from) in copy.model.moe.iter_mut().zip(&model.moe) {
                for (to, from) in to.experts.iter_mut().zip(&from.experts) {
                    if takes_gradients(from) {
                        *to = from.clone().fork(device);
                    }
                }
                let routers = to.routers.routers.iter_mut().zip(&from.routers.routers);
                for (to, from) in routers {
                    if takes_gradients(from) {
                        *to = from.clone().fork(device);
                    }
                }
            }
            copy.vae = vae.map(|vae| vae.clone().fork(device));
        }
    }
}

/// Whether any float parameter of `module` takes gradients.
fn takes_gradients<B: Backend, M: Module<B>>(module: &M) -> bool {
    struct Any(bool);
    impl<B: Backend> ModuleVisitor<B> for Any {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            self.0 |= param.is_require_grad();
        }
    }
    let mut any = Any(false);
    module.visit(&mut any);
    any.0
}
