//! Choosing a Burn backend at run time among those compiled in (cargo features `flex`,
//! `ndarray`, `wgpu`, `cuda`). Model code is generic; a [`BackendTask`] is the one place a
//! concrete backend type is picked.

use std::any::TypeId;
use std::fmt;
use std::str::FromStr;

use burn::tensor::backend::Backend;
use cmoe_moe::Dispatch;

/// A backend this crate knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// Burn's pure-Rust CPU backend (rayon + SIMD); the default.
    Flex,
    /// The ndarray CPU backend.
    Ndarray,
    /// wgpu (Vulkan / Metal / DX12; lavapipe on a CPU-only Linux).
    Wgpu,
    /// CUDA.
    Cuda,
}

impl BackendKind {
    /// Every backend, in the order they are listed.
    pub const ALL: [BackendKind; 4] = [Self::Flex, Self::Ndarray, Self::Wgpu, Self::Cuda];

    /// The cargo feature (and CLI name) of this backend.
    pub fn name(self) -> &'static str {
        match self {
            Self::Flex => "flex",
            Self::Ndarray => "ndarray",
            Self::Wgpu => "wgpu",
            Self::Cuda => "cuda",
        }
    }

    /// Whether this binary was built with the backend's feature.
    pub fn is_compiled(self) -> bool {
        match self {
            Self::Flex => cfg!(feature = "flex"),
            Self::Ndarray => cfg!(feature = "ndarray"),
            Self::Wgpu => cfg!(feature = "wgpu"),
            Self::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// The backends compiled into this binary.
    pub fn compiled() -> Vec<BackendKind> {
        Self::ALL.into_iter().filter(|b| b.is_compiled()).collect()
    }

    /// Where a run on this backend runs, for its memory plan: bytes per boolean (Burn 0.21's
    /// CUDA and flex store bytes, its wgpu backend 32-bit words, ndarray Rust `bool`s) and
    /// whether it is a GPU.
    pub fn target(self) -> crate::continual::Target {
        let (bool_bytes, gpu) = match self {
            Self::Flex | Self::Ndarray => (1, false),
            Self::Wgpu => (4, true),
            Self::Cuda => (1, true),
        };
        crate::continual::Target { bool_bytes, gpu }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for BackendKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|b| b.name() == s)
            .ok_or_else(|| format!("unknown backend {s:?} (flex, ndarray, wgpu or cuda)"))
    }
}

/// How the MoE layers send tokens to their experts on backend `B`: grouped on the CPU backends
/// (the routing is read back for free, and only `k` experts run per token), masked on the GPU
/// ones (nothing read back); docs/benchmarks.md has both measured.
pub fn dispatch_for<B: Backend>() -> Dispatch {
    let cpu = [
        #[cfg(feature = "flex")]
        TypeId::of::<burn_flex::Flex>(),
        #[cfg(feature = "ndarray")]
        TypeId::of::<burn_ndarray::NdArray>(),
    ];
    if cpu.contains(&TypeId::of::<B>()) {
        Dispatch::Grouped
    } else {
        Dispatch::Masked
    }
}

/// Work to run on whichever backend is chosen.
pub trait BackendTask {
    /// What the work returns.
    type Output;
    /// Runs on backend `B` and its default device.
    fn run<B: Backend>(self, device: B::Device) -> Self::Output;
}

/// Runs `task` on `kind`, or says how to build with it if it is not compiled in.
pub fn run_on<T: BackendTask>(kind: BackendKind, task: T) -> anyhow::Result<T::Output> {
    match kind {
        #[cfg(feature = "flex")]
        BackendKind::Flex => Ok(task.run::<burn_flex::Flex>(Default::default())),
        #[cfg(feature = "ndarray")]
        BackendKind::Ndarray => Ok(task.run::<burn_ndarray::NdArray>(Default::default())),
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => Ok(task.run::<burn_wgpu::Wgpu>(Default::default())),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => Ok(task.run::<burn_cuda::Cuda>(Default::default())),
        #[allow(unreachable_patterns)]
        other => anyhow::bail!(
            "backend {other} is not compiled into this binary (compiled: {:?}); rebuild with `--features {other}`",
            BackendKind::compiled()
                .iter()
                .map(|b| b.name())
                .collect::<Vec<_>>()
        ),
    }
}
