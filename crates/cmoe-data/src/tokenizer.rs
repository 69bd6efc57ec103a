//! The model directory's `tokenizer.json` (HF `tokenizers`), checked against the model.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::error::DataError;

/// LLaVA's image placeholder.
pub const IMAGE_TOKEN: &str = "<image>";

/// A tokenizer that knows the model's `<image>` id.
#[derive(Debug, Clone)]
pub struct LlavaTokenizer {
    inner: Tokenizer,
    image_token_id: u32,
}

impl LlavaTokenizer {
    /// Loads `dir/tokenizer.json` and checks it against the model: `<image>` must be one token
    /// with id `image_token_index`, and every id must fit in `model_vocab`.
    pub fn from_model_dir(
        dir: &Path,
        image_token_index: u32,
        model_vocab: usize,
    ) -> Result<Self, DataError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(DataError::io(
                &path,
                "no tokenizer.json in the model directory",
            ));
        }
        let inner = Tokenizer::from_file(&path).map_err(|e| DataError::parse(&path, e))?;
        let image_token_id = inner.token_to_id(IMAGE_TOKEN).ok_or_else(|| {
            DataError::parse(
                &path,
                format!("has no {IMAGE_TOKEN} token: it does not belong to a LLaVA model"),
            )
        })?;
        if image_token_id != image_token_index {
            return Err(DataError::parse(
                &path,
                format!(
                    "{IMAGE_TOKEN} is id {image_token_id} but the model's image_token_index is \
                     {image_token_index}: tokenizer and model do not match"
                ),
            ));
        }
        let vocab = inner.get_vocab_size(true);
        if vocab > model_vocab {
            return Err(DataError::parse(
                &path,
                format!(
                    "has {vocab} tokens but the model's vocabulary is {model_vocab}: tokenizer and model do not match"
                ),
            ));
        }
        Ok(Self {
            inner,
            image_token_id,
        })
    }

    /// The `<image>` id.
    pub fn image_token_id(&self) -> u32 {
        self.image_token_id
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Token id of a special token such as `</s>`.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Encodes `text` with the tokenizer's special tokens (bos for LLaMA).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        Ok(self.encode_with_offsets(text)?.0)
    }

    /// Encodes `text`; also returns each token's character span in `text`.
    pub fn encode_with_offsets(
        &self,
        text: &str,
    ) -> Result<(Vec<u32>, Vec<(usize, usize)>), DataError> {
        let encoding = self
            .inner
            .encode(text, true)
            .map_err(|e| DataError::Tokenizer(format!("cannot encode {text:?}: {e}")))?;
        Ok((encoding.get_ids().to_vec(), encoding.get_offsets().to_vec()))
    }

    /// Encodes a prompt and expands each `<image>` to `tokens_per_image` copies, as
    /// `LlavaProcessor` does.
    pub fn encode_prompt(
        &self,
        text: &str,
        tokens_per_image: usize,
    ) -> Result<Vec<u32>, DataError> {
        Ok(self.expand_image_tokens(&self.encode(text)?, tokens_per_image))
    }

    /// Repeats every `<image>` id `tokens_per_image` times.
    pub fn expand_image_tokens(&self, ids: &[u32], tokens_per_image: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(ids.len() + tokens_per_image);
        for &id in ids {
            if id == self.image_token_id {
                out.extend(std::iter::repeat_n(id, tokens_per_image));
            } else {
                out.push(id);
            }
        }
        out
    }

    /// Decodes ids to text, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, DataError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| DataError::Tokenizer(format!("cannot decode: {e}")))
    }
}
