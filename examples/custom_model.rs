//! LLaVA-CMoE's continual core on a model of your own. A small causal text transformer, written
//! here with Burn's own modules, becomes a host for MoE-LoRA experts by describing its FFN
//! blocks ([`GatedFfn`]) and its forward pass ([`MoeHost`]); it then learns two tasks in
//! sequence with PGKE and PTL, and answers questions of both without being told which task they
//! belong to.
//!
//! The tasks read the same prompts `[marker, a, b, SEP]` (values `a`, `b` in 4..24) and answer
//! one token: task 0 ("first", marker 1) answers `a + 20`, task 1 ("second", marker 2) answers
//! `b + 20`. One shared adapter would have to unlearn the first task to learn the second; here
//! the second task gets its own router (and new experts where PGKE finds them needed), and PTL
//! picks the router from the prompt. The base is randomly initialised and frozen: it stands in
//! for a pretrained model.
//!
//! ```text
//! cargo run --release --example custom_model
//! ```

use burn::backend::Autodiff;
use burn::module::{AutodiffModule, Module};
use burn::nn::attention::{
    MhaInput, MultiHeadAttention, MultiHeadAttentionConfig, generate_autoregressive_mask,
};
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData, activation};
use llava_cmoe::moe::fingerprint::fingerprint;
use llava_cmoe::moe::learner::TaskRecipe;
use llava_cmoe::moe::train::{IGNORE_INDEX, StageConfig, TaskData, TrainBatch};
use llava_cmoe::moe::{
    ContinualLearner, FfnHook, GatedFfn, InferenceModel, ModelInput, MoeConfig, MoeError, MoeHost,
    PtlConfig,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

type B = Autodiff<burn_flex::Flex>;

/// Vocabulary: 0 padding, 1 and 2 the task markers, 3 the separator, 4..24 values, 24..44
/// answers.
const VOCAB: usize = 48;
const SEP: i64 = 3;
const VALUES: std::ops::Range<i64> = 4..24;
/// Width of the model and of its FFN's intermediate layer.
const D_MODEL: usize = 64;
const D_FF: usize = 128;

/// A GEGLU feed-forward block: `down(gelu(gate(x)) * up(x))`.
#[derive(Module, Debug)]
struct GegluFfn<B: Backend> {
    gate: Linear<B>,
    up: Linear<B>,
    down: Linear<B>,
}

impl<B: Backend> GegluFfn<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let gate = activation::gelu(self.gate.forward(x.clone()));
        self.down.forward(gate * self.up.forward(x))
    }
}

/// What the continual core needs to attach experts to the block.
impl<B: Backend> GatedFfn<B> for GegluFfn<B> {
    fn widths(&self) -> [usize; 2] {
        self.gate.weight.dims()
    }
    fn gate(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.gate.forward(x)
    }
    fn up(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.up.forward(x)
    }
    fn down(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.down.forward(x)
    }
    fn activate(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        activation::gelu(x)
    }
}

/// A pre-norm transformer block.
#[derive(Module, Debug)]
struct Block<B: Backend> {
    attention_norm: LayerNorm<B>,
    attention: MultiHeadAttention<B>,
    ffn_norm: LayerNorm<B>,
    ffn: GegluFfn<B>,
}

/// A small causal language model.
#[derive(Module, Debug)]
struct TinyLm<B: Backend> {
    tokens: Embedding<B>,
    positions: Embedding<B>,
    blocks: Vec<Block<B>>,
    norm: LayerNorm<B>,
    head: Linear<B>,
}

impl<B: Backend> TinyLm<B> {
    fn new(layers: usize, device: &B::Device) -> Self {
        let linear = |i, o| LinearConfig::new(i, o).init(device);
        Self {
            tokens: EmbeddingConfig::new(VOCAB, D_MODEL).init(device),
            positions: EmbeddingConfig::new(16, D_MODEL).init(device),
            blocks: (0..layers)
                .map(|_| Block {
                    attention_norm: LayerNormConfig::new(D_MODEL).init(device),
                    attention: MultiHeadAttentionConfig::new(D_MODEL, 4).init(device),
                    ffn_norm: LayerNormConfig::new(D_MODEL).init(device),
                    ffn: GegluFfn {
                        gate: linear(D_MODEL, D_FF),
                        up: linear(D_MODEL, D_FF),
                        down: linear(D_FF, D_MODEL),
                    },
                })
                .collect(),
            norm: LayerNormConfig::new(D_MODEL).init(device),
            head: linear(D_MODEL, VOCAB),
        }
    }
}

/// The model as a host: every block's FFN gets a MoE-LoRA layer, run through `hook`.
impl<B: Backend> MoeHost<B> for TinyLm<B> {
    fn ffn_widths(&self) -> Vec<[usize; 2]> {
        self.blocks.iter().map(|b| b.ffn.widths()).collect()
    }

    fn forward_hidden(
        &self,
        input: ModelInput<B>,
        hook: Option<&dyn FfnHook<B>>,
    ) -> Result<Tensor<B, 3>, MoeError> {
        let [batch, seq] = input.input_ids.dims();
        let device = input.input_ids.device();
        let positions = Tensor::<B, 1, Int>::arange(0..seq as i64, &device)
            .reshape([1, seq])
            .repeat_dim(0, batch);
        let mut x = self.tokens.forward(input.input_ids) + self.positions.forward(positions);
        let causal = generate_autoregressive_mask::<B>(batch, seq, &device);
        for (layer, block) in self.blocks.iter().enumerate() {
            let h = block.attention_norm.forward(x.clone());
            let attended = block
                .attention
                .forward(MhaInput::self_attn(h).mask_attn(causal.clone()));
            x = x + attended.context;
            let h = block.ffn_norm.forward(x.clone());
            x = x + match hook {
                Some(hook) => hook.forward(layer, &block.ffn, h),
                None => block.ffn.forward(h),
            };
        }
        Ok(self.norm.forward(x))
    }

    fn logits(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        self.head.forward(hidden)
    }
}

/// `n` prompts `[marker, a, b, SEP]` of task `task` with their answers.
fn prompts(task: usize, n: usize, rng: &mut StdRng) -> Vec<([i64; 4], i64)> {
    (0..n)
        .map(|_| {
            let (a, b) = (rng.random_range(VALUES), rng.random_range(VALUES));
            let answer = if task == 0 { a } else { b } + 20;
            ([task as i64 + 1, a, b, SEP], answer)
        })
        .collect()
}

/// The prompts as one input (no padding: every prompt has four tokens).
fn input<Be: Backend>(rows: &[([i64; 4], i64)], device: &Be::Device) -> ModelInput<Be> {
    let ids: Vec<i64> = rows.iter().flat_map(|(p, _)| *p).collect();
    ModelInput::tokens(Tensor::from_data(
        TensorData::new(ids, [rows.len(), 4]),
        device,
    ))
}

/// Prompt and answer as one sequence, the answer labelled.
fn batch<Be: Backend>(rows: &[([i64; 4], i64)], device: &Be::Device) -> TrainBatch<Be> {
    let ids: Vec<i64> = rows
        .iter()
        .flat_map(|(p, a)| [p[0], p[1], p[2], p[3], *a])
        .collect();
    let labels: Vec<i64> = rows
        .iter()
        .flat_map(|(_, a)| [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, *a])
        .collect();
    let shape = [rows.len(), 5];
    let input = ModelInput::tokens(Tensor::from_data(TensorData::new(ids, shape), device));
    TrainBatch::from_host(input, labels, shape, device)
}

/// The share of `rows` whose answer is the arg-max of `logits` `[rows, 4, vocab]` at the last
/// prompt position.
fn accuracy<Be: Backend>(logits: Tensor<Be, 3>, rows: &[([i64; 4], i64)]) -> f64 {
    let [n, s, v] = logits.dims();
    let last = logits.slice([0..n, s - 1..s, 0..v]).reshape([n, v]);
    let predicted: Vec<i64> = last.argmax(1).into_data().iter::<i64>().collect();
    let right = predicted
        .iter()
        .zip(rows)
        .filter(|(p, (_, a))| *p == a)
        .count();
    right as f64 / n as f64
}

/// The inference model's logits for `rows` with task `task`'s router.
fn logits_with<Be: AutodiffBackend>(
    learner: &ContinualLearner<Be, TinyLm<Be>>,
    rows: &[([i64; 4], i64)],
    task: usize,
) -> anyhow::Result<Tensor<Be::InnerBackend, 3>> {
    let model = learner.model.valid();
    let device = Default::default();
    Ok(model.forward(input(rows, &device), task)?.logits)
}

fn main() -> anyhow::Result<()> {
    let device = Default::default();
    B::seed(&device, 0);
    let mut rng = StdRng::seed_from_u64(0);
    let base = TinyLm::<B>::new(3, &device);
    let base_print = fingerprint(&base);

    let moe = MoeConfig {
        rank: 8,
        alpha: 16.0,
        dropout: 0.0,
        initial_experts: 4,
        ..MoeConfig::default()
    };
    let ptl = PtlConfig {
        hidden: 64,
        latent: 8,
        ..PtlConfig::default()
    };
    let stage = StageConfig {
        lr: 3e-3,
        steps: 400,
        seed: Some(0),
        ..TaskRecipe::paper(0, 0).stage
    };
    let recipe = TaskRecipe {
        probe_stage: StageConfig { steps: 50, ..stage },
        stage,
        ..TaskRecipe::paper(0, 0)
    };
    let mut learner = ContinualLearner::new(base, moe, ptl, &device);

    let names = ["first", "second"];
    let tests: Vec<_> = (0..2).map(|t| prompts(t, 64, &mut rng)).collect();
    let mut after_own_task = Vec::new();
    for (task, name) in names.iter().enumerate() {
        let train: Vec<_> = (0..24)
            .map(|_| batch(&prompts(task, 8, &mut rng), &device))
            .collect();
        let data = TaskData {
            probe_train: train[..8].to_vec(),
            probe_eval: train[8..12].to_vec(),
            train,
        };
        learner = learner.learn_task(&data, &recipe, |_| {})?;
        let logits = logits_with(&learner, &tests[task], task)?;
        println!(
            "task {task} ({name}): accuracy {:.1} % with its own router; experts per layer {:?}",
            100.0 * accuracy(logits.clone(), &tests[task]),
            learner.model.experts_per_layer()
        );
        after_own_task.push(logits);
    }

    // Nothing of the first task moved while the second trained, nor anything of the base.
    let first_now = logits_with(&learner, &tests[0], 0)?;
    assert_eq!(
        first_now.into_data(),
        after_own_task[0].clone().into_data(),
        "the first task's answers changed"
    );
    assert_eq!(
        fingerprint(&learner.model.base),
        base_print,
        "the base changed"
    );
    println!("task 0's outputs are bit-identical after task 1; the base is unchanged");

    // Unlabelled questions: PTL picks the task, its router answers.
    let InferenceModel { model, locator } = learner.valid();
    for (task, rows) in tests.iter().enumerate() {
        let location = model.locate(&locator, input(rows, &device))?;
        let located = location.tasks.iter().filter(|&&t| t == task).count();
        let share = located as f64 / rows.len() as f64;
        // Each question answered with the router PTL chose for it.
        let mut right = 0;
        for router in 0..names.len() {
            let chosen: Vec<_> = rows
                .iter()
                .zip(&location.tasks)
                .filter(|&(_, &t)| t == router)
                .map(|(row, _)| *row)
                .collect();
            if !chosen.is_empty() {
                let logits = model.forward(input(&chosen, &device), router)?.logits;
                right += (accuracy(logits, &chosen) * chosen.len() as f64).round() as usize;
            }
        }
        let answered = right as f64 / rows.len() as f64;
        println!(
            "task {task} ({}): PTL located {located} of {} questions ({:.1} %); accuracy through \
             PTL {:.1} %",
            names[task],
            rows.len(),
            100.0 * share,
            100.0 * answered
        );
        assert!(share >= 0.9, "PTL located only {:.1} %", 100.0 * share);
        assert!(
            answered >= 0.8,
            "only {:.1} % answered right",
            100.0 * answered
        );
    }
    Ok(())
}
