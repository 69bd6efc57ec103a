//! Persistence of the whole continual state: every layer's experts, every task's routers, the
//! VAEs, the primitive bank, the PGKE plans and the config. A `state.json` manifest describes the
//! structure (experts per layer, router widths, VAE sizes), so a loader rebuilds the skeleton
//! without knowing it in advance and then reads `state.safetensors` into it; both files are
//! written atomically. An adapter pack holds one task's additions alone.

use std::path::Path;

use crate::error::MoeError;
use burn::module::Module;
use burn::tensor::{DType, backend::Backend};
use cmoe_store::{load_module, save_module};
use serde::{Deserialize, Serialize};

use crate::layer::{FfnExpert, MoeLoraFfn, RouterBank, TaskRouter, TaskRouterConfig};
use crate::model::MoeConfig;
use crate::pgke::ExpansionPlan;
use crate::ptl::{PrimitiveBank, PtlConfig, TaskVae, TaskVaeConfig};

/// Manifest format name.
pub const STATE_FORMAT: &str = "llava-cmoe/continual-state/1";
/// Adapter-pack format name.
pub const PACK_FORMAT: &str = "llava-cmoe/adapter-pack/1";

/// Sizes of a task VAE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VaeShape {
    /// Feature width.
    pub features: usize,
    /// Hidden width.
    pub hidden: usize,
    /// Latent width.
    pub latent: usize,
}

impl VaeShape {
    fn of<B: Backend>(vae: &TaskVae<B>) -> Self {
        let [features, hidden] = vae.encoder.weight.dims();
        Self {
            features,
            hidden,
            latent: vae.enc_mu.weight.dims()[1],
        }
    }

    /// The configuration of a VAE of this shape.
    fn config(&self) -> TaskVaeConfig {
        TaskVaeConfig::new(self.features)
            .with_hidden(self.hidden)
            .with_latent(self.latent)
    }
}

/// Shape of one MoE layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerShape {
    /// FFN width.
    pub hidden: usize,
    /// FFN inner width.
    pub intermediate: usize,
    /// Experts in the layer.
    pub experts: usize,
    /// Per task, the experts its router scores.
    pub router_experts: Vec<usize>,
    /// The experts the initial phase's router scores, when there was one.
    #[serde(default)]
    pub initial_router_experts: Option<usize>,
}

/// The tensors of the continual state.
#[derive(Module, Debug)]
pub struct ContinualTensors<B: Backend> {
    /// Per decoder layer: experts and router bank.
    pub moe: Vec<MoeLoraFfn<B>>,
    /// Per task: its VAE.
    pub vaes: Vec<TaskVae<B>>,
}

/// Everything beside the tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ContinualMeta {
    /// Expert shape settings.
    pub config: MoeConfig,
    /// Locator settings (VAE sizes, scoring draws).
    pub ptl: PtlConfig,
    /// The primitive bank.
    pub bank: PrimitiveBank,
    /// The expansion plan of every task that grew (PGKE's, or an ablation's placement).
    pub plans: Vec<ExpansionPlan>,
    /// `first_expert[task][layer]`: the first expert index the task added.
    pub first_expert: Vec<Vec<usize>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateManifest {
    format: String,
    layers: Vec<LayerShape>,
    vae: Option<VaeShape>,
    vaes: usize,
    meta: ContinualMeta,
}

fn io(path: &Path, e: impl std::fmt::Display) -> MoeError {
    MoeError::io(path, e)
}

fn write_json_atomic(path: &Path, value: &impl Serialize) -> Result<(), MoeError> {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_string_pretty(value).map_err(|e| io(path, e))?,
    )
    .map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| io(path, e))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, MoeError> {
    let text = std::fs::read_to_string(path).map_err(|e| io(path, e))?;
    serde_json::from_str(&text).map_err(|e| io(path, format!("malformed manifest: {e}")))
}

fn layer_shape<B: Backend>(
    layer: &MoeLoraFfn<B>,
    hidden: usize,
    intermediate: usize,
) -> LayerShape {
    LayerShape {
        hidden,
        intermediate,
        experts: layer.experts.len(),
        router_experts: layer
            .routers
            .routers
            .iter()
            .map(TaskRouter::num_experts)
            .collect(),
        initial_router_experts: layer.routers.initial.as_ref().map(TaskRouter::num_experts),
    }
}

fn skeleton_layer<B: Backend>(
    shape: &LayerShape,
    config: &MoeConfig,
    device: &B::Device,
) -> MoeLoraFfn<B> {
    let layer_config = config.layer(shape.hidden, shape.intermediate, 0);
    let router = |n| TaskRouterConfig::new(shape.hidden, n).init(device);
    let mut layer = layer_config.init(device);
    layer.experts = (0..shape.experts)
        .map(|_| layer_config.init_expert(device))
        .collect();
    layer.routers = RouterBank {
        routers: shape.router_experts.iter().map(|&n| router(n)).collect(),
        initial: shape.initial_router_experts.map(router),
    };
    layer
}

impl<B: Backend> ContinualTensors<B> {
    /// Saves to `dir/state.safetensors` + `dir/state.json`; `widths[layer]` is `(hidden, intermediate)`.
    pub fn save(
        &self,
        meta: &ContinualMeta,
        widths: &[(usize, usize)],
        dir: &Path,
    ) -> Result<(), MoeError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let manifest = StateManifest {
            format: STATE_FORMAT.into(),
            layers: self
                .moe
                .iter()
                .zip(widths)
                .map(|(l, &(h, i))| layer_shape(l, h, i))
                .collect(),
            vae: self.vaes.first().map(VaeShape::of),
            vaes: self.vaes.len(),
            meta: meta.clone(),
        };
        save_module(self, &dir.join("state.safetensors"))?;
        write_json_atomic(&dir.join("state.json"), &manifest)
    }

    /// Loads a state saved by [`Self::save`], rebuilding its structure from the manifest.
    pub fn load(dir: &Path, device: &B::Device) -> Result<(Self, ContinualMeta), MoeError> {
        let path = dir.join("state.json");
        let manifest: StateManifest = read_json(&path)?;
        if manifest.format != STATE_FORMAT {
            return Err(io(
                &path,
                format!("format {:?}, expected {STATE_FORMAT:?}", manifest.format),
            ));
        }
        let config = manifest.meta.config;
        let moe = manifest
            .layers
            .iter()
            .map(|shape| skeleton_layer(shape, &config, device))
            .collect();
        let vaes = match manifest.vae {
            Some(v) => (0..manifest.vaes)
                .map(|_| v.config().init(device))
                .collect(),
            None => Vec::new(),
        };
        let mut state = Self { moe, vaes };
        load_module(&mut state, &dir.join("state.safetensors"), DType::F32)?;
        Ok((state, manifest.meta))
    }
}

/// One task's additions: its new experts per layer, its routers, its VAE and bank entry.
#[derive(Module, Debug)]
pub struct AdapterPack<B: Backend> {
    /// `experts[layer]`: the experts the task added to that layer.
    pub experts: Vec<Vec<FfnExpert<B>>>,
    /// `routers[layer]`: the task's router.
    pub routers: Vec<TaskRouter<B>>,
    /// The task's VAE, when fitted.
    pub vae: Vec<TaskVae<B>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct PackManifest {
    format: String,
    task: usize,
    config: MoeConfig,
    ptl: PtlConfig,
    widths: Vec<(usize, usize)>,
    new_experts: Vec<usize>,
    router_experts: Vec<usize>,
    vae: Option<VaeShape>,
    bank_entry: Option<crate::ptl::BankEntry>,
    plan: Option<ExpansionPlan>,
}

impl<B: Backend> ContinualTensors<B> {
    /// Exports task `task`'s additions as an adapter pack in `dir`.
    pub fn export_pack(
        &self,
        meta: &ContinualMeta,
        widths: &[(usize, usize)],
        task: usize,
        dir: &Path,
    ) -> Result<(), MoeError> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let first = meta
            .first_expert
            .get(task)
            .ok_or_else(|| MoeError::Input(format!("task {task} is not in the state")))?;
        let end = |layer: usize| {
            meta.first_expert
                .get(task + 1)
                .map_or(self.moe[layer].experts.len(), |next| next[layer])
        };
        let pack = AdapterPack {
            experts: self
                .moe
                .iter()
                .enumerate()
                .map(|(l, layer)| {
                    layer.experts[first[l]..end(l)]
                        .iter()
                        .map(FfnExpert::duplicate)
                        .collect()
                })
                .collect(),
            routers: self
                .moe
                .iter()
                .map(|l| l.routers.get(task).extended(0))
                .collect(),
            vae: self.vaes.get(task).cloned().into_iter().collect(),
        };
        let manifest = PackManifest {
            format: PACK_FORMAT.into(),
            task,
            config: meta.config,
            ptl: meta.ptl,
            widths: widths.to_vec(),
            new_experts: pack.experts.iter().map(Vec::len).collect(),
            router_experts: pack.routers.iter().map(TaskRouter::num_experts).collect(),
            vae: pack.vae.first().map(VaeShape::of),
            bank_entry: meta.bank.entries.get(task).copied(),
            plan: meta.plans.iter().find(|p| p.task == task).cloned(),
        };
        save_module(&pack, &dir.join("pack.safetensors"))?;
        write_json_atomic(&dir.join("pack.json"), &manifest)
    }

    /// Appends an adapter pack as the next task: its experts go after every layer's current
    /// experts, its routers must score exactly the experts the layer then has.
    pub fn import_pack(
        &mut self,
        meta: &mut ContinualMeta,
        dir: &Path,
        device: &B::Device,
    ) -> Result<usize, MoeError> {
        let path = dir.join("pack.json");
        let m: PackManifest = read_json(&path)?;
        if m.format != PACK_FORMAT {
            return Err(io(
                &path,
                format!("format {:?}, expected {PACK_FORMAT:?}", m.format),
            ));
        }
        let task = meta.first_expert.len();
        if m.task != task || m.new_experts.len() != self.moe.len() {
            return Err(io(
                &path,
                format!(
                    "a pack for task {} with {} layers cannot follow {task} tasks of {} layers",
                    m.task,
                    m.new_experts.len(),
                    self.moe.len()
                ),
            ));
        }
        if m.config != meta.config || m.ptl != meta.ptl {
            return Err(io(
                &path,
                "the pack was trained with other expert or locator settings than this state",
            ));
        }
        for (l, layer) in self.moe.iter().enumerate() {
            if layer.experts.len() + m.new_experts[l] != m.router_experts[l] {
                return Err(io(
                    &path,
                    format!(
                        "layer {l}: the pack's router scores {} experts, the layer would have {}",
                        m.router_experts[l],
                        layer.experts.len() + m.new_experts[l]
                    ),
                ));
            }
        }
        let mut pack = AdapterPack {
            experts: m
                .widths
                .iter()
                .zip(&m.new_experts)
                .map(|(&(h, i), &n)| {
                    let layer = m.config.layer(h, i, 0);
                    (0..n).map(|_| layer.init_expert(device)).collect()
                })
                .collect(),
            routers: m
                .widths
                .iter()
                .zip(&m.router_experts)
                .map(|(&(h, _), &n)| TaskRouterConfig::new(h, n).init(device))
                .collect(),
            vae: m.vae.map(|v| v.config().init(device)).into_iter().collect(),
        };
        load_module(&mut pack, &dir.join("pack.safetensors"), DType::F32)?;
        meta.first_expert
            .push(self.moe.iter().map(|l| l.experts.len()).collect());
        for ((layer, experts), router) in self.moe.iter_mut().zip(pack.experts).zip(pack.routers) {
            layer.experts.extend(experts);
            layer.routers.routers.push(router);
        }
        self.vaes.extend(pack.vae);
        if let Some(entry) = m.bank_entry {
            meta.bank.entries.push(entry);
        }
        meta.plans.extend(m.plan);
        Ok(task)
    }
}
