//! The accelerator memory a training run needs, from the shapes alone (no weights): what
//! `cmoe train --dry-run` prints, and what `cmoe memory-proxy` checks against a measurement.
//!
//! The activation term counts, operation by operation, the tensors Burn 0.21's autodiff keeps
//! for the backward pass of one LLaMA decoder layer with MoE-LoRA FFNs (the code in
//! `cmoe_llava::llama` and `cmoe_moe::layer`, masked dispatch), per token. A product keeps its
//! left operand only when its right one is tracked (and the other way round), so the frozen
//! base's products keep nothing; an element-wise product of two tracked tensors keeps both.
//! With `s` tokens per row, `d` the width, `f` the FFN width, `H` heads of width `hd`, `E`
//! experts of rank `r` on `P` projections, `h` bytes per base element and `m` per boolean:
//!
//! - each RMSNorm keeps its f32 input: `4 d`;
//! - attention keeps q, k, v: `3 h H hd`; in half precision the f32 softmax keeps its
//!   probabilities and the product with v their cast, `(4 + h) H s`
//!   (`cmoe_llava::attention::softmax_f32`); in f32, Burn's attention keeps the input of its
//!   exponential (autodiff recomputes `exp` from it), its output and the probabilities, `12 H s`;
//! - the router keeps its f32 input `4 d` and `~20 E` of logits and probabilities;
//! - LoRA dropout keeps a boolean mask and the dropped f32 input, for the gate / up input
//!   (`(m + 4) d`) and for the down input (`(m + 4) f`); without dropout, only the f32 inputs;
//! - each projection's experts keep `x A` and its weighted copy (`8 E r`), and the per-rank
//!   routing weights once (`4 E r`);
//! - SiLU keeps its input and its sigmoid (`2 h f`), the gated product both factors (`2 h f`).
//!
//! The first layer's attention and its second norm see no tracked input (no expert runs before
//! them), so they keep nothing. Besides the per-token terms, each layer keeps the experts'
//! weights concatenated for its two products (`E r (d_in + d_out)` f32 per projection); once
//! per pass, the attention mask (`rows H s^2` booleans) and RoPE's cos and sin tables
//! (`2 h H hd` per token) are kept by the tracked layers; and the backward pass holds one
//! layer's gradients of the attention scores and FFN activations at a time.
//!
//! `cmoe memory-proxy` measures these terms on the CPU at the 7B widths (docs/scale.md).

use serde::{Deserialize, Serialize};

use cmoe_llava::config::LlavaConfig;
use cmoe_moe::layer::FfnTargets;

/// Bytes in a GiB.
pub const GIB: f64 = (1u64 << 30) as f64;

/// Bytes per parameter that trains: its f32 value, AdamW's two moments, the gradients summed
/// over a step's micro-batches and the current backward pass's own.
pub const TRAINABLE_BYTES_PER_PARAM: u64 = 4 + 8 + 4 + 4;

/// What the runtime itself takes on a GPU (CUDA context, kernels, the allocator's first
/// pages), an assumption until the GPU check measures it.
pub const RUNTIME_BYTES: u64 = 1 << 30;

/// The shapes of one decoder layer's training pass.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerShape {
    /// Width `d`.
    pub hidden: usize,
    /// FFN width `f`.
    pub intermediate: usize,
    /// Attention heads `H` (queries; keys and values are repeated to as many).
    pub heads: usize,
    /// Per-head width `hd`.
    pub head_dim: usize,
    /// Experts the task's router scores, `E`.
    pub experts: usize,
    /// LoRA rank `r`.
    pub rank: usize,
    /// Projections carrying experts.
    pub targets: FfnTargets,
    /// Whether LoRA dropout is on.
    pub dropout: bool,
    /// Bytes per element of the frozen base (2 for bf16 / f16, 4 for f32).
    pub base_bytes: usize,
    /// Bytes per boolean on the backend (1 on CUDA and flex, 4 on wgpu).
    pub bool_bytes: usize,
}

impl LayerShape {
    /// Bytes the attention block of a tracked layer keeps per token, `seq` tokens per row.
    pub fn attention_bytes_per_token(&self, seq: usize) -> u64 {
        let (d, h, heads) = (
            self.hidden as u64,
            self.base_bytes as u64,
            self.heads as u64,
        );
        let qkv = 3 * h * heads * self.head_dim as u64;
        let softmax = if self.base_bytes == 4 {
            12 * heads * seq as u64
        } else {
            (4 + h) * heads * seq as u64
        };
        4 * d + qkv + softmax
    }

    /// Bytes the FFN block of a layer keeps per token (its norm included when `normed`: the
    /// first layer's norm sees no tracked input).
    pub fn ffn_bytes_per_token(&self, normed: bool) -> u64 {
        let (d, f, h, m) = (
            self.hidden as u64,
            self.intermediate as u64,
            self.base_bytes as u64,
            self.bool_bytes as u64,
        );
        let (e, r) = (self.experts as u64, self.rank as u64);
        let norm = if normed { 4 * d } else { 0 };
        let router = 4 * d + 20 * e;
        let dropout = |width: u64| {
            if self.dropout {
                (m + 4) * width
            } else {
                4 * width
            }
        };
        let upper = u64::from(self.targets.gate || self.targets.up);
        let inputs = upper * dropout(d) + u64::from(self.targets.down) * dropout(f);
        let projections = [self.targets.gate, self.targets.up, self.targets.down]
            .iter()
            .filter(|&&t| t)
            .count() as u64;
        let experts = if projections > 0 {
            projections * 8 * e * r + 4 * e * r
        } else {
            0
        };
        let gated = 2 * h * f + 2 * h * f;
        norm + router + inputs + experts + gated
    }

    /// Bytes a tracked layer keeps per token: `activation_bytes_per_token_per_layer`.
    pub fn bytes_per_token(&self, seq: usize) -> u64 {
        self.attention_bytes_per_token(seq) + self.ffn_bytes_per_token(true)
    }

    /// Bytes of the experts' weights each layer concatenates for its products (kept for the
    /// backward pass).
    pub fn concatenated_expert_bytes(&self) -> u64 {
        let (d, f) = (self.hidden as u64, self.intermediate as u64);
        let per_rank = u64::from(self.targets.gate) * (d + f)
            + u64::from(self.targets.up) * (d + f)
            + u64::from(self.targets.down) * (f + d);
        4 * (self.experts * self.rank) as u64 * per_rank
    }

    /// Activation bytes a pass of `layers` layers keeps for `rows` rows of `seq` tokens: the
    /// first layer without its attention and second norm, the final norm, and with a tracked
    /// attention the pass's RoPE tables and attention mask.
    pub fn activation_bytes(&self, layers: usize, rows: usize, seq: usize) -> u64 {
        if layers == 0 {
            return 0;
        }
        let tokens = (rows * seq) as u64;
        let first = self.ffn_bytes_per_token(false);
        let tracked = (layers as u64 - 1) * self.bytes_per_token(seq);
        let per_pass = if layers > 1 {
            self.pass_bytes_per_token(seq)
        } else {
            0
        };
        tokens * (first + tracked + 4 * self.hidden as u64 + per_pass)
    }

    /// What a pass keeps once per token for its tracked attention layers: RoPE's cos and sin
    /// tables (`[rows, s, H, hd]` each, in the base dtype) and the attention mask (`H s`
    /// booleans per token).
    pub fn pass_bytes_per_token(&self, seq: usize) -> u64 {
        let heads = self.heads as u64;
        2 * self.base_bytes as u64 * heads * self.head_dim as u64
            + self.bool_bytes as u64 * heads * seq as u64
    }

    /// The largest temporaries of one layer's backward pass: three `[rows, H, s, s]` f32
    /// tensors of the attention scores' gradient, four `[rows * s, f]` f32 ones of the FFN.
    pub fn backward_transient_bytes(&self, rows: usize, seq: usize) -> u64 {
        let (rows, seq) = (rows as u64, seq as u64);
        3 * 4 * rows * self.heads as u64 * seq * seq + 4 * 4 * rows * seq * self.intermediate as u64
    }
}

/// One line of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryComponent {
    /// What takes the memory.
    pub name: String,
    /// How much.
    pub bytes: u64,
}

/// The memory of one training stage at its peak (the end of the forward pass, when every
/// activation is kept and the backward pass's temporaries are about to come).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryPlan {
    /// The stage this plan is for (the run's largest).
    pub stage: String,
    /// Rows per micro-batch.
    pub rows: usize,
    /// Tokens per row (image tokens included).
    pub seq: usize,
    /// Bytes a tracked decoder layer keeps per token for the backward pass.
    pub activation_bytes_per_token_per_layer: u64,
    /// Every component, largest first.
    pub components: Vec<MemoryComponent>,
    /// Their sum.
    pub peak_bytes: u64,
    /// The peak of every stage compared, by name (this plan's stage is the largest).
    pub stage_peaks: Vec<MemoryComponent>,
}

impl MemoryPlan {
    /// The plan as text, one component per line, in GiB.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "memory plan for {} ({} rows x {} tokens per micro-batch):\n",
            self.stage, self.rows, self.seq
        );
        for c in &self.components {
            out.push_str(&format!(
                "  {:>8.2} GiB  {}\n",
                c.bytes as f64 / GIB,
                c.name
            ));
        }
        out.push_str(&format!(
            "  {:>8.2} GiB  peak ({} KiB per token per decoder layer)\n",
            self.peak_bytes as f64 / GIB,
            self.activation_bytes_per_token_per_layer / 1024
        ));
        let others: Vec<String> = self
            .stage_peaks
            .iter()
            .map(|s| format!("{} {:.2} GiB", s.name, s.bytes as f64 / GIB))
            .collect();
        if others.len() > 1 {
            out.push_str(&format!("  every stage's peak: {}\n", others.join(", ")));
        }
        out
    }
}

/// What a run trains, for the plan: the stages whose memory it compares.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct StageShape {
    /// Experts per layer the stage's router scores.
    pub experts: usize,
    /// Experts per layer that train.
    pub trainable: usize,
}

/// The inputs of a plan besides the model's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanSettings {
    /// Rows per micro-batch.
    pub rows: usize,
    /// Tokens per row.
    pub seq: usize,
    /// LoRA rank.
    pub rank: usize,
    /// Projections carrying experts.
    pub targets: FfnTargets,
    /// Whether LoRA dropout is on.
    pub dropout: bool,
    /// Bytes per element of the frozen base.
    pub base_bytes: usize,
    /// Bytes per boolean on the backend.
    pub bool_bytes: usize,
    /// Parameters of one task's VAE (trains with the experts in a task's main stage).
    pub vae_params: usize,
    /// The stages to compare, by name.
    pub stages: Vec<(String, StageShape)>,
    /// Whether the plan is for a GPU (adds [`RUNTIME_BYTES`]).
    pub gpu: bool,
}

/// Parameters of one expert on one layer of `config`'s decoder.
pub fn expert_params(config: &LlavaConfig, rank: usize, targets: FfnTargets) -> usize {
    let (d, f) = (
        config.text_config.hidden_size,
        config.text_config.intermediate_size,
    );
    let count = [targets.gate, targets.up, targets.down]
        .iter()
        .filter(|&&t| t)
        .count();
    count * rank * (d + f)
}

/// The plan of the largest of `settings.stages` for `config`'s model.
pub fn plan(config: &LlavaConfig, settings: &PlanSettings) -> MemoryPlan {
    let plans: Vec<MemoryPlan> = settings
        .stages
        .iter()
        .map(|(name, stage)| stage_plan(config, settings, name, *stage))
        .collect();
    let stage_peaks = plans
        .iter()
        .map(|p| MemoryComponent {
            name: p.stage.clone(),
            bytes: p.peak_bytes,
        })
        .collect();
    let mut largest = plans
        .into_iter()
        .max_by_key(|p| p.peak_bytes)
        .expect("at least one stage");
    largest.stage_peaks = stage_peaks;
    largest
}

/// The plan of one stage.
pub fn stage_plan(
    config: &LlavaConfig,
    settings: &PlanSettings,
    name: &str,
    stage: StageShape,
) -> MemoryPlan {
    let text = &config.text_config;
    let layers = text.num_hidden_layers;
    let shape = LayerShape {
        hidden: text.hidden_size,
        intermediate: text.intermediate_size,
        heads: text.num_attention_heads,
        head_dim: text.head_dim(),
        experts: stage.experts,
        rank: settings.rank,
        targets: settings.targets,
        dropout: settings.dropout,
        base_bytes: settings.base_bytes,
        bool_bytes: settings.bool_bytes,
    };
    let (rows, seq) = (settings.rows, settings.seq);
    let per_expert = expert_params(config, settings.rank, settings.targets) as u64;
    let trainable = layers as u64 * stage.trainable as u64 * per_expert;
    let frozen = layers as u64 * (stage.experts - stage.trainable) as u64 * per_expert;
    let routers = (layers * stage.experts * text.hidden_size) as u64;
    let base = config.parameter_counts().total as u64 * settings.base_bytes as u64;
    let vision = &config.vision_config;
    let vision_tokens = (vision.num_patches() + 1) as u64;
    let vision_transient = rows as u64
        * vision_tokens
        * (8 * vision.hidden_size as u64
            + 2 * vision.intermediate_size as u64
            + 2 * vision.num_attention_heads as u64 * vision_tokens)
        * 4;
    let mut components = vec![
        ("frozen base model".to_string(), base),
        (
            format!(
                "trainable experts ({} per layer) and routers: f32 weights, AdamW moments, \
                 summed and current gradients",
                stage.trainable
            ),
            (trainable + routers + settings.vae_params as u64) * TRAINABLE_BYTES_PER_PARAM,
        ),
        (
            format!(
                "frozen experts ({} per layer), f32",
                stage.experts - stage.trainable
            ),
            frozen * 4,
        ),
        (
            format!(
                "activations kept for the backward pass ({} KiB per token per layer; RoPE \
                 tables and attention mask once)",
                shape.bytes_per_token(seq) / 1024
            ),
            shape.activation_bytes(layers, rows, seq),
        ),
        (
            "experts' weights concatenated per layer (masked dispatch), kept for the backward pass"
                .to_string(),
            layers as u64 * shape.concatenated_expert_bytes(),
        ),
        (
            "one layer's backward temporaries (attention scores, FFN activations)".to_string(),
            shape.backward_transient_bytes(rows, seq),
        ),
        (
            "vision tower forward (no gradient), one layer's temporaries".to_string(),
            vision_transient,
        ),
    ];
    if settings.gpu {
        components.push((
            "runtime: CUDA context, kernels, allocator (assumed)".to_string(),
            RUNTIME_BYTES,
        ));
    }
    components.sort_by_key(|(_, bytes)| std::cmp::Reverse(*bytes));
    let peak_bytes = components.iter().map(|(_, b)| b).sum();
    MemoryPlan {
        stage: name.to_string(),
        rows,
        seq,
        activation_bytes_per_token_per_layer: shape.bytes_per_token(seq),
        components: components
            .into_iter()
            .map(|(name, bytes)| MemoryComponent { name, bytes })
            .collect(),
        peak_bytes,
        stage_peaks: Vec::new(),
    }
}
