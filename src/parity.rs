//! `cmoe parity`: a fixture model's logits (and greedy tokens) on the backend against the
//! transformers references shipped beside it, as the GPU check runs it (the integration tests
//! check the same and more on the CPU backends).
//!
//! - f32: `reference.json` and `reference.safetensors` (`scripts/make_parity_fixtures.py`):
//!   the full logits within [`F32_TOLERANCE`] and the greedy tokens equal.
//! - bf16: `reference-bf16.safetensors` (`scripts/make_bf16_fixture.py`): transformers' bf16
//!   logits and the same weights run in f32, at the prompt's last positions. bf16 keeps 8
//!   significant bits, so no bf16 run equals the f32 one: the bf16 base passes when it is as
//!   close to the f32 run as transformers' bf16 run is, within [`BF16_FACTOR`].

use std::path::PathBuf;

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use crate::backend::BackendTask;
use crate::pipeline::{LlavaPipeline, Precision};
use crate::tensor_io::{HostTensor, read_tensor};

/// Largest |logit difference| allowed in f32 (the parity tests' tolerance).
pub const F32_TOLERANCE: f32 = 1e-3;

/// How much farther from the f32 run than transformers' bf16 run the bf16 base may be.
pub const BF16_FACTOR: f32 = 1.5;

/// `reference.json`'s fields this check reads.
#[derive(Debug, Deserialize)]
struct Reference {
    prompt: String,
    prompt_ids: Vec<u32>,
    greedy_max_new_tokens: usize,
    greedy_ids: Vec<u32>,
}

/// What one parity check found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParityResult {
    /// The model directory.
    pub model: PathBuf,
    /// The backend.
    pub backend: String,
    /// The weights' dtype.
    pub dtype: Precision,
    /// Largest |logit difference| to the reference run in the same precision (f32: the f32
    /// reference; bf16: transformers' bf16 run).
    pub max_logit_diff: f32,
    /// bf16: largest |logit difference| to the f32 run of the same weights, ours.
    pub ours_to_f32: Option<f32>,
    /// bf16: the same for transformers' bf16 run.
    pub transformers_to_f32: Option<f32>,
    /// f32: whether the greedy tokens equal transformers'.
    pub greedy_equal: Option<bool>,
    /// Whether the check passed.
    pub passed: bool,
}

/// Checks `model` (a fixture directory with references) in `precision` on the backend.
pub struct ParityTask {
    /// The fixture model directory.
    pub model: PathBuf,
    /// f32 or bf16.
    pub precision: Precision,
}

impl BackendTask for ParityTask {
    type Output = anyhow::Result<ParityResult>;

    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<ParityResult> {
        let json = std::fs::read_to_string(self.model.join("reference.json"))?;
        let reference: Reference = serde_json::from_str(&json)?;
        let pixels = read_tensor(&self.model.join("reference.safetensors"), "pixel_values")?;
        let pipe = LlavaPipeline::<B>::load_in(&self.model, self.precision, &device)?;
        let logits = pipe.logits(&reference.prompt_ids, Some(&pixels))?;
        let mut result = ParityResult {
            model: self.model.clone(),
            backend: B::name(&device),
            dtype: self.precision,
            max_logit_diff: f32::NAN,
            ours_to_f32: None,
            transformers_to_f32: None,
            greedy_equal: None,
            passed: false,
        };
        if self.precision == Precision::F32 {
            let expected = read_tensor(&self.model.join("reference.safetensors"), "logits")?;
            result.max_logit_diff = max_abs_diff(&tail(&logits, &expected), &expected)?;
            let generated = pipe.generate(
                &reference.prompt,
                Some(&pixels),
                reference.greedy_max_new_tokens,
                crate::llava::Sampling::Greedy,
            )?;
            let equal = generated.generated_ids == reference.greedy_ids;
            result.greedy_equal = Some(equal);
            result.passed = equal && result.max_logit_diff <= F32_TOLERANCE;
        } else {
            let file = self.model.join("reference-bf16.safetensors");
            let truth = read_tensor(&file, "logits_f32")?;
            let theirs = read_tensor(&file, "logits_bf16")?;
            let ours = tail(&logits, &truth);
            let (ours_truth, theirs_truth) =
                (max_abs_diff(&ours, &truth)?, max_abs_diff(&theirs, &truth)?);
            result.max_logit_diff = max_abs_diff(&ours, &theirs)?;
            result.ours_to_f32 = Some(ours_truth);
            result.transformers_to_f32 = Some(theirs_truth);
            result.passed = ours_truth <= BF16_FACTOR * theirs_truth;
        }
        Ok(result)
    }
}

/// The last positions of `logits` `[1, seq, vocab]` that `like` `[1, n, vocab]` covers.
fn tail(logits: &HostTensor, like: &HostTensor) -> HostTensor {
    let n: usize = like.shape.iter().product();
    HostTensor {
        data: logits.data[logits.data.len().saturating_sub(n)..].to_vec(),
        shape: like.shape.clone(),
    }
}

/// Largest absolute difference of two equally shaped tensors.
pub fn max_abs_diff(a: &HostTensor, b: &HostTensor) -> anyhow::Result<f32> {
    anyhow::ensure!(
        a.shape == b.shape,
        "shapes differ: {:?} and {:?}",
        a.shape,
        b.shape
    );
    Ok(a.data
        .iter()
        .zip(&b.data)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max))
}
