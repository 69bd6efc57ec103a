//! The devices a run trains on: replicas on a CPU backend, devices of a GPU backend.

use burn::prelude::DeviceOps;
use burn::tensor::backend::{Backend, DeviceId};

use crate::backend::BackendKind;

/// Whether `backend` (a backend's name) computes on the CPU (flex, ndarray).
pub(super) fn is_cpu_backend(backend: &str) -> bool {
    [BackendKind::Flex, BackendKind::Ndarray]
        .iter()
        .any(|kind| kind.name() == backend)
}

/// How many replicas of the model train side by side on `backend` when no devices are named:
/// one per core up to `most_replicas` on a CPU backend (whose operations on a small model mostly
/// run on one core), one elsewhere.
pub fn default_replicas(backend: &str, most_replicas: usize) -> usize {
    if is_cpu_backend(backend) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.min(most_replicas).max(1)
    } else {
        1
    }
}

/// The devices `indices` name on backend `B` (`backend` is its name), of the default device's
/// kind.
///
/// On a CPU backend (flex, ndarray) a device may be named several times: each naming is one
/// replica of the model working in a thread of its own, since Burn's CPU backends run most
/// operations of a small model on one core. With none named, a CPU backend gets one replica per
/// core up to `most_replicas` (a step's micro-batches are dealt over them), any other backend
/// its default device.
pub(super) fn training_devices<B: Backend>(
    indices: &[usize],
    backend: &str,
    default: &B::Device,
    most_replicas: usize,
) -> anyhow::Result<Vec<B::Device>> {
    let on_cpu = is_cpu_backend(backend);
    if indices.is_empty() {
        return Ok(vec![
            default.clone();
            default_replicas(backend, most_replicas)
        ]);
    }
    if indices.len() > 1 && backend == BackendKind::Wgpu.name() {
        anyhow::bail!(
            "--devices: Burn 0.21's wgpu backend cannot copy tensors between devices (only its \
             CUDA backend can), so data-parallel training needs --backend cuda"
        );
    }
    let kind = default.to_id().type_id;
    let available = B::device_count(kind);
    let mut seen = Vec::new();
    for &index in indices {
        if index >= available {
            anyhow::bail!(
                "--devices: there is no device {index}; backend {backend} has {available} device(s)"
            );
        }
        if seen.contains(&index) && !on_cpu {
            anyhow::bail!(
                "--devices: device {index} is named twice (only a CPU backend runs several \
                 replicas on one device)"
            );
        }
        seen.push(index);
    }
    Ok(indices
        .iter()
        .map(|&index| B::Device::from_id(DeviceId::new(kind, index as u16)))
        .collect())
}
