//! Autoregressive generation with the KV cache: greedy, or temperature + nucleus (top-p)
//! sampling, stopping at end-of-sequence per row.

use burn::tensor::{Int, Tensor, backend::Backend};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::cache::KvCache;
use crate::error::LlavaError;
use crate::llama::MlpOverride;
use crate::llava::{Llava, LlavaInput, int_tensor};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    /// Arg-max (the first maximum on ties, as `torch.argmax`).
    Greedy,
    /// Softmax at `temperature`, restricted to the smallest set of tokens whose probability
    /// reaches `top_p`, drawn with a seeded RNG.
    TopP {
        /// Softmax temperature (> 0).
        temperature: f32,
        /// Nucleus mass in (0, 1].
        top_p: f32,
        /// RNG seed.
        seed: u64,
    },
}

/// Generation settings.
#[derive(Debug, Clone)]
pub struct GenerationConfig {
    /// Most tokens generated per row.
    pub max_new_tokens: usize,
    /// Ids that end a row (the row's output includes it).
    pub eos_token_ids: Vec<u32>,
    /// Id fed to finished rows while others continue.
    pub pad_token_id: u32,
    /// Token choice.
    pub sampling: Sampling,
}

/// Generates continuations for every row of `input`; returns the new ids per row (up to and
/// including the first end-of-sequence id).
pub fn generate<B: Backend>(
    model: &Llava<B>,
    input: LlavaInput<B>,
    config: &GenerationConfig,
) -> Result<Vec<Vec<u32>>, LlavaError> {
    generate_with(model, input, config, None)
}

/// [`generate`] with the decoder's MLPs computed by `mlp` (e.g. a task's MoE adapters).
pub fn generate_with<B: Backend>(
    model: &Llava<B>,
    input: LlavaInput<B>,
    config: &GenerationConfig,
    mlp: Option<&dyn MlpOverride<B>>,
) -> Result<Vec<Vec<u32>>, LlavaError> {
    if let Sampling::TopP {
        temperature, top_p, ..
    } = config.sampling
        && !(temperature > 0.0 && temperature.is_finite() && top_p > 0.0 && top_p <= 1.0)
    {
        return Err(LlavaError::Input(format!(
            "sampling needs temperature > 0 and 0 < top_p <= 1 (got {temperature}, {top_p})"
        )));
    }
    let device = input.input_ids.device();
    let [batch, seq] = input.input_ids.dims();
    let mut mask: Tensor<B, 2, Int> = input
        .attention_mask
        .clone()
        .unwrap_or_else(|| Tensor::ones([batch, seq], &device));
    let mut cache = KvCache::new(model.num_decoder_layers());
    let mut rng = match config.sampling {
        Sampling::TopP { seed, .. } => Some(StdRng::seed_from_u64(seed)),
        Sampling::Greedy => None,
    };
    let mut outputs = vec![Vec::new(); batch];
    let mut finished = vec![false; batch];

    let mut hidden = model.forward_hidden_with(
        LlavaInput {
            attention_mask: Some(mask.clone()),
            ..input
        },
        Some(&mut cache),
        mlp,
    )?;
    for _ in 0..config.max_new_tokens {
        let [_, s, d] = hidden.dims();
        let last = hidden.slice([0..batch, s - 1..s, 0..d]);
        let logits = model
            .language_model
            .logits(last)
            .reshape([batch, model_vocab(model)]);
        let mut logits: Vec<f32> = logits.into_data().iter::<f32>().collect();
        let vocab = logits.len() / batch;
        // `<image>` stands for image features, never for text: it is not generated (fed back,
        // it would ask for an image the step does not have).
        let image = model.image_token_index as usize;
        if image < vocab {
            for row in 0..batch {
                logits[row * vocab + image] = f32::NEG_INFINITY;
            }
        }
        let mut next = Vec::with_capacity(batch);
        for (row, out) in outputs.iter_mut().enumerate() {
            if finished[row] {
                next.push(config.pad_token_id as i64);
                continue;
            }
            let row_logits = &logits[row * vocab..(row + 1) * vocab];
            if let Some(bad) = row_logits
                .iter()
                .find(|x| x.is_nan() || **x == f32::INFINITY)
            {
                return Err(LlavaError::NonFinite(format!(
                    "the model's next-token logits of row {row} hold {bad} at step {}: its \
                     weights, its preprocessing (e.g. an image_std of 0) or its input \
                     produce non-finite values",
                    out.len() + 1
                )));
            }
            let token = match (config.sampling, rng.as_mut()) {
                (
                    Sampling::TopP {
                        temperature, top_p, ..
                    },
                    Some(rng),
                ) => sample_top_p(row_logits, temperature, top_p, rng),
                _ => argmax(row_logits),
            };
            out.push(token);
            finished[row] = config.eos_token_ids.contains(&token);
            next.push(token as i64);
        }
        if finished.iter().all(|&f| f) {
            break;
        }
        mask = Tensor::cat(vec![mask, Tensor::ones([batch, 1], &device)], 1);
        hidden = model.forward_hidden_with(
            LlavaInput {
                input_ids: int_tensor(next, [batch, 1], &device),
                pixel_values: None,
                attention_mask: Some(mask.clone()),
            },
            Some(&mut cache),
            mlp,
        )?;
    }
    Ok(outputs)
}

fn model_vocab<B: Backend>(model: &Llava<B>) -> usize {
    model.language_model.model.embed_tokens.weight.dims()[0]
}

/// Index of the first maximum.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in logits.iter().enumerate() {
        if x > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Draws from the temperature-scaled softmax restricted to the top-p nucleus.
pub fn sample_top_p(logits: &[f32], temperature: f32, top_p: f32, rng: &mut impl Rng) -> u32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i as u32, ((x - max) / temperature).exp()))
        .collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0;
    let mut mass = 0.0;
    for (_, p) in &probs {
        kept += 1;
        mass += p / total;
        if mass >= top_p {
            break;
        }
    }
    let nucleus = &probs[..kept];
    let nucleus_total: f32 = nucleus.iter().map(|p| p.1).sum();
    let mut draw = rng.random::<f32>() * nucleus_total;
    for &(id, p) in nucleus {
        if draw < p {
            return id;
        }
        draw -= p;
    }
    nucleus[kept - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum() {
        assert_eq!(argmax(&[0.0, 3.0, 1.0, 3.0]), 1);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        let logits = [5.0, 4.9, -10.0, -10.0];
        let mut rng = StdRng::seed_from_u64(0);
        for _ in 0..200 {
            let t = sample_top_p(&logits, 1.0, 0.9, &mut rng);
            assert!(t < 2, "sampled {t} outside the nucleus");
        }
        // top_p tiny: always the most probable token.
        for _ in 0..50 {
            assert_eq!(sample_top_p(&logits, 1.0, 1e-6, &mut rng), 0);
        }
    }
}
