//! Stage 0 of pretraining: the vision tower on its own, before any language model reads it,
//! as CLIP's pretraining is to LLaVA (whose tower is never trained from scratch).
//!
//! The tower and projector, with a linear head on their image tokens (max- and mean-pooled),
//! learn to predict the words of each picture's description (weakly supervised word
//! prediction, as in Joulin et al. 2016, "Learning Visual Features from Large Weakly Supervised
//! Data"): a softmax over the tokenizer's vocabulary against the description's distinct tokens,
//! weighted equally. The descriptions are stage 1's (`cmoe_coin::mini::captions`), so the
//! words name the shapes, colours, counts, positions and written words a picture shows. The
//! head is dropped after the stage.
//!
//! Why: trained only through the language loss, the shipped base's tower told the five shapes
//! apart no better than at its random initialisation (a linear probe: 48 % against 45 %), while
//! the same tower trained on shapes directly learns them in 300 steps
//! (`docs/results/2026-12-03-base-skills`).

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use cmoe_data::tokenizer::LlavaTokenizer;
use cmoe_llava::Llava;

/// A LLaVA's vision tower and projector with a head that predicts a picture's description
/// words.
#[derive(Module, Debug)]
pub struct CaptionWords<B: Backend> {
    /// The LLaVA whose tower and projector train (its language model is left alone).
    pub llava: Llava<B>,
    /// Pooled image tokens (max, mean) to vocabulary logits.
    head: Linear<B>,
}

impl<B: Backend> CaptionWords<B> {
    /// `llava` with a freshly initialised head over `vocab` tokens.
    pub fn new(llava: Llava<B>, hidden: usize, vocab: usize, device: &B::Device) -> Self {
        Self {
            llava,
            head: LinearConfig::new(2 * hidden, vocab).init(device),
        }
    }

    /// Vocabulary logits of each picture, `[n, vocab]`.
    pub fn forward(&self, pixel_values: Tensor<B, 4>) -> Tensor<B, 2> {
        let tokens = self.llava.image_features(pixel_values);
        let pooled = Tensor::cat(
            vec![
                tokens.clone().max_dim(1).squeeze_dim(1),
                tokens.mean_dim(1).squeeze_dim(1),
            ],
            1,
        );
        self.head.forward(pooled)
    }

    /// Cross-entropy of the predicted word distribution against `targets` (`[n, vocab]`, each
    /// row a distribution), averaged over the pictures.
    pub fn loss(&self, pixel_values: Tensor<B, 4>, targets: Tensor<B, 2>) -> Tensor<B, 1> {
        let log_p = log_softmax(self.forward(pixel_values), 1);
        (log_p * targets).sum_dim(1).mean().neg()
    }
}

/// Each description's distinct tokens (no special tokens) as a distribution over the
/// vocabulary, rows stacked into `[n, vocab]`.
pub fn word_targets<B: Backend>(
    tokenizer: &LlavaTokenizer,
    descriptions: &[&str],
    vocab: usize,
    device: &B::Device,
) -> anyhow::Result<Tensor<B, 2>> {
    let mut data = vec![0f32; descriptions.len() * vocab];
    for (row, text) in data.chunks_mut(vocab).zip(descriptions) {
        let encoding = tokenizer
            .inner()
            .encode(*text, false)
            .map_err(|e| anyhow::anyhow!("cannot encode {text:?}: {e}"))?;
        let mut ids: Vec<usize> = encoding.get_ids().iter().map(|&id| id as usize).collect();
        ids.sort_unstable();
        ids.dedup();
        anyhow::ensure!(
            !ids.is_empty() && ids.iter().all(|&id| id < vocab),
            "the description {text:?} has no tokens inside the vocabulary of {vocab}"
        );
        for id in &ids {
            row[*id] = 1.0 / ids.len() as f32;
        }
    }
    Ok(Tensor::from_data(
        TensorData::new(data, [descriptions.len(), vocab]),
        device,
    ))
}
