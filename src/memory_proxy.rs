//! `cmoe memory-proxy`: the memory plan's activation term checked by measurement on the CPU,
//! at the model's true widths (e.g. LLaVA-1.5-7B's 4096 / 11008) but with few layers.
//!
//! Two cases, both with the masked dispatch the GPU runs and every expert trainable:
//! - one MoE-LoRA FFN around a frozen FFN in the base dtype, on a tracked input of `rows x
//!   seq` tokens: the bytes it keeps for the backward pass per token;
//! - a decoder of 2 and of 3 layers at 1 and 2 rows: the mixed difference of the kept bytes
//!   over layers and rows is what one more tracked layer keeps per token, free of every fixed
//!   cost (weights, concatenated experts, the loss, and what a pass keeps once for its tracked
//!   layers: RoPE tables, the attention mask; the first layer's attention is untracked, so a
//!   1-layer decoder keeps none of those).
//!
//! "Kept" is what the process's heap holds at the end of the forward pass beyond what it held
//! before (counted by [`crate::alloc_meter::AllocMeter`], which the `cmoe` binary installs);
//! "peak" adds the backward pass's temporaries. [`crate::memory_plan::LayerShape`] predicts the
//! same quantities; the report gives both and their ratio.

use std::path::PathBuf;
use std::time::Instant;

use burn::backend::Autodiff;
use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Int, Tensor, TensorData};
use cmoe_llava::config::LlavaConfig;
use cmoe_moe::model::MoeConfig;
use cmoe_moe::train::{AnswerTargets, IGNORE_INDEX};
use cmoe_moe::{Dispatch, LlavaCmoe, ModelInput, MoeLoraFfnConfig};
use serde::{Deserialize, Serialize};

use crate::alloc_meter::AllocMeter;
use crate::backend::BackendTask;
use crate::memory_plan::LayerShape;
use crate::pipeline::{Precision, cast_floats};

/// What to measure.
#[derive(Debug, Clone)]
pub struct MemoryProxyTask {
    /// A LLaVA `config.json` whose decoder widths the proxy takes.
    pub config: PathBuf,
    /// Tokens per row.
    pub seq: usize,
    /// Experts per layer (all trainable).
    pub experts: usize,
    /// LoRA rank.
    pub rank: usize,
    /// Experts per token.
    pub top_k: usize,
    /// LoRA dropout.
    pub dropout: f64,
    /// The frozen base's dtype.
    pub base_dtype: Precision,
    /// Decoder layers of the decoder passes.
    pub layers: Vec<usize>,
    /// Rows of every pass.
    pub rows: Vec<usize>,
    /// Which passes: `ffn` and / or `decoder`.
    pub cases: Vec<String>,
}

/// One measured pass.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyPass {
    /// `ffn` (one MoE-LoRA FFN) or `decoder`.
    pub case: String,
    /// Decoder layers (1 for the FFN case).
    pub layers: usize,
    /// Rows of `seq` tokens.
    pub rows: usize,
    /// Bytes held at the end of the forward pass beyond those held before it.
    pub kept_bytes: u64,
    /// The most bytes held during the pass (forward and backward) beyond those held before.
    pub peak_bytes: u64,
    /// Wall time of the forward and backward pass.
    pub seconds: f64,
}

/// A measured figure beside the plan's prediction of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Compared {
    /// Measured bytes.
    pub measured: f64,
    /// The memory plan's bytes.
    pub predicted: f64,
    /// `predicted / measured`.
    pub ratio: f64,
}

impl Compared {
    fn new(measured: f64, predicted: f64) -> Self {
        Self {
            measured,
            predicted,
            ratio: predicted / measured,
        }
    }
}

/// What `cmoe memory-proxy` reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryProxyReport {
    /// The backend measured on.
    pub backend: String,
    /// The CPU it ran on.
    pub cpu: String,
    /// The shapes measured.
    pub shape: LayerShape,
    /// Tokens per row.
    pub seq: usize,
    /// Every pass.
    pub passes: Vec<ProxyPass>,
    /// Bytes one MoE-LoRA FFN keeps per token on a tracked input (with FFN passes at 1 and 2
    /// rows).
    pub ffn_bytes_per_token: Option<Compared>,
    /// Bytes one more tracked decoder layer keeps per token: the plan's
    /// `activation_bytes_per_token_per_layer` (with decoder passes at 2 and 3 layers, 1 and 2
    /// rows).
    pub bytes_per_token_per_layer: Option<Compared>,
}

impl MemoryProxyReport {
    /// The report as text.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "memory proxy on {} ({}), {} tokens per row, {} experts r{}, base {} B/element:\n",
            self.backend,
            self.cpu,
            self.seq,
            self.shape.experts,
            self.shape.rank,
            self.shape.base_bytes
        );
        for p in &self.passes {
            out.push_str(&format!(
                "  {:<8} {} layer(s) x {} row(s): kept {:>8.1} MiB, peak {:>8.1} MiB, {:.1} s\n",
                p.case,
                p.layers,
                p.rows,
                p.kept_bytes as f64 / (1 << 20) as f64,
                p.peak_bytes as f64 / (1 << 20) as f64,
                p.seconds
            ));
        }
        let compared = [
            ("FFN bytes per token", &self.ffn_bytes_per_token),
            (
                "decoder layer bytes per token",
                &self.bytes_per_token_per_layer,
            ),
        ];
        for (what, c) in compared
            .iter()
            .filter_map(|(w, c)| c.as_ref().map(|c| (w, c)))
        {
            out.push_str(&format!(
                "  {what}: measured {:.0}, planned {:.0} (plan / measured {:.3})\n",
                c.measured, c.predicted, c.ratio
            ));
        }
        out
    }
}

/// The CPU's model name (from `/proc/cpuinfo`), or "unknown".
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

impl BackendTask for MemoryProxyTask {
    type Output = anyhow::Result<MemoryProxyReport>;

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<MemoryProxyReport> {
        if !AllocMeter::is_installed() {
            anyhow::bail!("the memory proxy needs the counting allocator (run it through `cmoe`)");
        }
        anyhow::ensure!(
            self.seq > 8,
            "--seq must be above 8 (the last 8 tokens are answers)"
        );
        let full = LlavaConfig::from_file(&self.config)?;
        let text = &full.text_config;
        let shape = LayerShape {
            hidden: text.hidden_size,
            intermediate: text.intermediate_size,
            heads: text.num_attention_heads,
            head_dim: text.head_dim(),
            experts: self.experts,
            rank: self.rank,
            targets: Default::default(),
            dropout: self.dropout > 0.0,
            base_bytes: self.base_dtype.bytes(),
            bool_bytes: 1,
        };
        let mut passes = Vec::new();
        let case = |name: &str| self.cases.iter().any(|c| c == name);
        if case("ffn") {
            for &rows in &self.rows {
                passes.push(self.ffn_pass::<Autodiff<B>>(&full, rows, &device));
            }
        }
        if case("decoder") {
            for &layers in &self.layers {
                for &rows in &self.rows {
                    passes.push(self.decoder_pass::<Autodiff<B>>(&full, layers, rows, &device)?);
                }
            }
        }
        let kept = |case: &str, layers: usize, rows: usize| {
            passes
                .iter()
                .find(|p| p.case == case && p.layers == layers && p.rows == rows)
                .map(|p| p.kept_bytes as f64)
        };
        let seq = self.seq as f64;
        // Differences over rows (and layers) cancel every fixed cost; `None` without the passes.
        let ffn = (|| Some((kept("ffn", 1, 2)? - kept("ffn", 1, 1)?) / seq))();
        let layer = (|| {
            Some(
                (kept("decoder", 3, 2)? - kept("decoder", 3, 1)? - kept("decoder", 2, 2)?
                    + kept("decoder", 2, 1)?)
                    / seq,
            )
        })();
        Ok(MemoryProxyReport {
            backend: B::name(&device),
            cpu: cpu_model(),
            shape,
            seq: self.seq,
            passes,
            ffn_bytes_per_token: ffn
                .map(|m| Compared::new(m, shape.ffn_bytes_per_token(false) as f64)),
            bytes_per_token_per_layer: layer
                .map(|m| Compared::new(m, shape.bytes_per_token(self.seq) as f64)),
        })
    }
}

impl MemoryProxyTask {
    fn moe_config(&self) -> MoeConfig {
        MoeConfig {
            rank: self.rank,
            alpha: 2.0 * self.rank as f64,
            dropout: self.dropout,
            top_k: self.top_k,
            initial_experts: self.experts,
            targets: Default::default(),
        }
    }

    /// One MoE-LoRA FFN on a tracked input of `rows x seq` tokens.
    fn ffn_pass<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        full: &LlavaConfig,
        rows: usize,
        device: &B::Device,
    ) -> ProxyPass {
        let mut text = full.text_config.clone();
        text.num_hidden_layers = 1;
        text.vocab_size = 16;
        let ffn = text.init::<B>(false, device).model.layers.remove(0).mlp;
        let ffn = cast_floats(ffn, self.base_dtype.dtype()).no_grad();
        let moe = self.moe_config();
        let mut layer = MoeLoraFfnConfig::new(text.hidden_size, text.intermediate_size)
            .with_experts(moe.initial_experts)
            .with_rank(moe.rank)
            .with_alpha(moe.alpha)
            .with_dropout(moe.dropout)
            .with_top_k(moe.top_k)
            .init::<B>(device);
        layer.dispatch = Dispatch::Masked;
        let x = Tensor::<B::InnerBackend, 3>::random(
            [rows, self.seq, text.hidden_size],
            Distribution::Normal(0.0, 1.0),
            device,
        )
        .cast(self.base_dtype.dtype());
        let x = Tensor::<B, 3>::from_inner(x).require_grad();
        measure("ffn", 1, rows, device, || {
            let (out, routing) = layer.forward(&ffn, x.clone(), 0, None);
            out.cast(DType::F32).sum() + routing.aux_loss
        })
    }

    /// A text-only decoder of `layers` layers at the config's widths (vocabulary 1024, a tiny
    /// vision tower: neither keeps anything per decoder layer) on `rows x seq` tokens, the last
    /// 8 of each row answers.
    fn decoder_pass<B: burn::tensor::backend::AutodiffBackend>(
        &self,
        full: &LlavaConfig,
        layers: usize,
        rows: usize,
        device: &B::Device,
    ) -> anyhow::Result<ProxyPass> {
        let mut config = full.clone();
        config.text_config.num_hidden_layers = layers;
        config.text_config.vocab_size = 1024;
        config.image_token_index = 1023;
        config.pad_token_id = Some(0);
        config.vision_config.num_hidden_layers = 2;
        config.vision_config.hidden_size = 32;
        config.vision_config.intermediate_size = 64;
        config.vision_config.num_attention_heads = 2;
        let base = cast_floats(config.init::<B>(device), self.base_dtype.dtype());
        let mut model = LlavaCmoe::new(base, &self.moe_config(), device);
        model.set_dispatch(Dispatch::Masked);
        let n = rows * self.seq;
        let ids: Vec<i64> = (0..n).map(|i| 1 + (i as i64 * 7919) % 1000).collect();
        let labels: Vec<i64> = (0..n)
            .map(|i| {
                if i % self.seq >= self.seq - 8 {
                    ids[i]
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();
        let ids = Tensor::<B, 2, Int>::from_data(TensorData::new(ids, [rows, self.seq]), device);
        let labels =
            Tensor::<B, 2, Int>::from_data(TensorData::new(labels, [rows, self.seq]), device);
        let answers = AnswerTargets::from_labels(&labels);
        let input = ModelInput::tokens(ids);
        let mut failed = None;
        let pass = measure("decoder", layers, rows, device, || {
            match model.forward_answers(input.clone(), 0, &answers) {
                Ok(out) => {
                    let ce = answers.cross_entropy(out.logits).expect("answer tokens");
                    let aux = out
                        .routing
                        .into_iter()
                        .map(|r| r.aux_loss)
                        .reduce(|a, b| a + b)
                        .expect("layers");
                    ce + aux * 1e-3
                }
                Err(e) => {
                    failed = Some(e);
                    Tensor::zeros([1], device)
                }
            }
        });
        match failed {
            Some(e) => Err(e.into()),
            None => Ok(pass),
        }
    }
}

/// Runs `forward`, then the backward pass of the loss it returns, counting the heap.
fn measure<B: burn::tensor::backend::AutodiffBackend>(
    case: &str,
    layers: usize,
    rows: usize,
    device: &B::Device,
    forward: impl FnOnce() -> Tensor<B, 1>,
) -> ProxyPass {
    B::sync(device).expect("device sync");
    let before = AllocMeter::in_use();
    AllocMeter::reset_peak();
    let start = Instant::now();
    let loss = forward();
    B::sync(device).expect("device sync");
    let kept = AllocMeter::in_use().saturating_sub(before);
    let grads = loss.backward();
    B::sync(device).expect("device sync");
    let seconds = start.elapsed().as_secs_f64();
    let peak = AllocMeter::peak().saturating_sub(before);
    drop(grads);
    ProxyPass {
        case: case.to_string(),
        layers,
        rows,
        kept_bytes: kept as u64,
        peak_bytes: peak as u64,
        seconds,
    }
}
