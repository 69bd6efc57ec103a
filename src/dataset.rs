//! CoIN records to model inputs: a training conversation becomes token ids, answer-only labels
//! and pixels ([`CoinEncoder::encode_train`]); a test question becomes a generation prompt
//! ([`CoinEncoder::encode_prompt`]). [`collate_train`] pads training examples on the right
//! (labels `-100` there), [`collate_prompts`] pads prompts on the left, as generation wants.

use std::path::PathBuf;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use cmoe_coin::format::{TestRecord, TrainRecord};
use cmoe_data::image::{ImageProcessorConfig, PixelValues};
use cmoe_data::prompt::{Conversation, IGNORE_INDEX};
use cmoe_data::tokenizer::{IMAGE_TOKEN, LlavaTokenizer};
use cmoe_moe::ModelInput;
use cmoe_moe::train::TrainBatch;

/// One tokenised sample with its pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// Token ids, `<image>` expanded.
    pub input_ids: Vec<u32>,
    /// Training labels (answer tokens) or empty for a prompt.
    pub labels: Vec<i64>,
    /// The preprocessed image.
    pub pixels: PixelValues,
}

/// Turns CoIN records into [`Encoded`] samples with a model's tokenizer and processor.
pub struct CoinEncoder {
    /// The tokenizer.
    pub tokenizer: LlavaTokenizer,
    /// The image processor.
    pub processor: ImageProcessorConfig,
    /// The chat template (LLaVA-1.5: vicuna_v1).
    pub conversation: Conversation,
    /// `<image>` expands to this many tokens.
    pub tokens_per_image: usize,
    /// Folder the records' image paths are relative to.
    pub image_root: PathBuf,
}

impl CoinEncoder {
    fn pixels(&self, image: &str) -> anyhow::Result<PixelValues> {
        let path = self.image_root.join(image);
        Ok(self.processor.preprocess_file(&path)?)
    }

    /// A training conversation: human / gpt turns in pairs, `<image>` in the first question.
    pub fn encode_train(&self, record: &TrainRecord) -> anyhow::Result<Encoded> {
        self.encode_conversation(record, self.pixels(&record.image)?)
    }

    /// [`Self::encode_train`] with the image already preprocessed (`record.image` unused).
    pub fn encode_conversation(
        &self,
        record: &TrainRecord,
        pixels: PixelValues,
    ) -> anyhow::Result<Encoded> {
        let turns = &record.conversations;
        let paired = turns.len().is_multiple_of(2)
            && turns
                .chunks(2)
                .all(|pair| pair[0].from == "human" && pair[1].from == "gpt");
        if turns.is_empty() || !paired {
            anyhow::bail!(
                "sample {}: conversations must alternate human / gpt turns",
                record.id
            );
        }
        if !turns[0].value.contains(IMAGE_TOKEN) {
            anyhow::bail!(
                "sample {}: the first question has no {IMAGE_TOKEN}",
                record.id
            );
        }
        let pairs: Vec<(String, String)> = turns
            .chunks(2)
            .map(|p| (p[0].value.clone(), p[1].value.clone()))
            .collect();
        let example = self
            .conversation
            .training_example(&self.tokenizer, &pairs, self.tokens_per_image)
            .map_err(|e| anyhow::anyhow!("sample {}: {e}", record.id))?;
        Ok(Encoded {
            input_ids: example.input_ids,
            labels: example.labels,
            pixels,
        })
    }

    /// The tokens of a training conversation besides its image's (no image is read).
    pub fn text_tokens(&self, record: &TrainRecord) -> anyhow::Result<usize> {
        let empty = PixelValues {
            data: Vec::new(),
            height: 0,
            width: 0,
        };
        let encoded = self.encode_conversation(record, empty)?;
        Ok(encoded.input_ids.len() - self.tokens_per_image)
    }

    /// A test question as a generation prompt (`<image>` then the question).
    pub fn encode_prompt(&self, record: &TestRecord) -> anyhow::Result<Encoded> {
        self.encode_question(&record.text, self.pixels(&record.image)?)
    }

    /// [`Self::encode_prompt`] for a question about an image already preprocessed.
    pub fn encode_question(&self, question: &str, pixels: PixelValues) -> anyhow::Result<Encoded> {
        let prompt = self
            .conversation
            .prompt(&format!("{IMAGE_TOKEN}\n{question}"));
        Ok(Encoded {
            input_ids: self
                .tokenizer
                .encode_prompt(&prompt, self.tokens_per_image)?,
            labels: Vec::new(),
            pixels,
        })
    }
}

/// Stacks pictures of one size into `[n, 3, h, w]`.
pub(crate) fn stack_pixels<'a, B: Backend>(
    pictures: impl ExactSizeIterator<Item = &'a PixelValues>,
    device: &B::Device,
) -> Tensor<B, 4> {
    let n = pictures.len();
    let (mut h, mut w) = (0, 0);
    let mut data = Vec::new();
    for p in pictures {
        (h, w) = (p.height, p.width);
        data.extend_from_slice(&p.data);
    }
    Tensor::from_data(TensorData::new(data, [n, 3, h, w]), device)
}

/// Pads rows to the longest one, on the right or the left; returns ids, labels and mask.
fn pad(samples: &[Encoded], pad_id: u32, left: bool) -> (Vec<i64>, Vec<i64>, Vec<i64>, usize) {
    let len = samples.iter().map(|s| s.input_ids.len()).max().unwrap_or(0);
    let (mut ids, mut labels, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for s in samples {
        let n = s.input_ids.len();
        let fill = len - n;
        let row_ids = s.input_ids.iter().map(|&i| i as i64);
        let row_labels = (0..n).map(|i| s.labels.get(i).copied().unwrap_or(IGNORE_INDEX));
        let pads = std::iter::repeat_n;
        if left {
            ids.extend(pads(pad_id as i64, fill).chain(row_ids));
            labels.extend(pads(IGNORE_INDEX, fill).chain(row_labels));
            mask.extend(pads(0, fill).chain(pads(1, n)));
        } else {
            ids.extend(row_ids.chain(pads(pad_id as i64, fill)));
            labels.extend(row_labels.chain(pads(IGNORE_INDEX, fill)));
            mask.extend(pads(1, n).chain(pads(0, fill)));
        }
    }
    (ids, labels, mask, len)
}

/// A training batch: rows padded on the right with `pad_id`, labels `-100` on padding.
pub fn collate_train<B: Backend>(
    samples: &[Encoded],
    pad_id: u32,
    device: &B::Device,
) -> TrainBatch<B> {
    assert!(!samples.is_empty(), "a batch needs at least one sample");
    let (ids, labels, mask, len) = pad(samples, pad_id, false);
    let shape = [samples.len(), len];
    let input = ModelInput {
        input_ids: Tensor::<B, 2, Int>::from_data(TensorData::new(ids, shape), device),
        pixel_values: Some(stack_pixels(samples.iter().map(|s| &s.pixels), device)),
        attention_mask: Some(Tensor::from_data(TensorData::new(mask, shape), device)),
    };
    TrainBatch::from_host(input, labels, shape, device)
}

/// A generation batch: prompts padded on the left with `pad_id`.
pub fn collate_prompts<B: Backend>(
    samples: &[Encoded],
    pad_id: u32,
    device: &B::Device,
) -> ModelInput<B> {
    assert!(!samples.is_empty(), "a batch needs at least one sample");
    let (ids, _, mask, len) = pad(samples, pad_id, true);
    let shape = [samples.len(), len];
    ModelInput {
        input_ids: Tensor::<B, 2, Int>::from_data(TensorData::new(ids, shape), device),
        pixel_values: Some(stack_pixels(samples.iter().map(|s| &s.pixels), device)),
        attention_mask: Some(Tensor::from_data(TensorData::new(mask, shape), device)),
    }
}
