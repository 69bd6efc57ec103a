//! Training a byte-level BPE tokenizer for a small LLaVA (HF `tokenizers`' own trainer), with
//! the special tokens a LLaVA checkpoint expects at fixed ids.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper};
use tokenizers::{PreTokenizerWrapper, Tokenizer, TokenizerBuilder};

use crate::error::DataError;
use crate::tokenizer::IMAGE_TOKEN;

/// The special tokens, in id order: `<unk>` 0, `<s>` 1, `</s>` 2, `<pad>` 3, `<image>` 4.
pub const SPECIAL_TOKENS: [&str; 5] = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN];

/// Trains a byte-level BPE of `vocab_size` tokens (specials included) on `corpus` and writes
/// it to `path` as `tokenizer.json`; encodings start with `<s>`.
pub fn train_bpe(
    corpus: impl Iterator<Item = String> + Send,
    vocab_size: usize,
    path: &Path,
) -> Result<(), DataError> {
    let fail = |e: tokenizers::Error| DataError::parse(path, format!("tokenizer training: {e}"));
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let template = |e: String| DataError::parse(path, format!("template: {e}"));
    let bos = TemplateProcessing::builder()
        .try_single("<s> $A")
        .map_err(template)?
        .special_tokens(vec![("<s>", 1)])
        .build()
        .map_err(|e| template(e.to_string()))?;
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(ByteLevel::default().into()))
    .with_post_processor(Some(bos.into()))
    .with_decoder(Some(ByteLevelDecoder::default().into()))
    .build()
    .map_err(fail)?;
    tokenizer.train(&mut trainer, corpus).map_err(fail)?;
    let tokenizer: Tokenizer = tokenizer.into();
    for (id, token) in SPECIAL_TOKENS.iter().enumerate() {
        if tokenizer.token_to_id(token) != Some(id as u32) {
            return Err(DataError::parse(
                path,
                format!("{token} did not get id {id}"),
            ));
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    }
    let tmp = path.with_extension("json.tmp");
    tokenizer
        .save(&tmp, false)
        .map_err(|e| DataError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| DataError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::{Conversation, IGNORE_INDEX};
    use crate::tokenizer::LlavaTokenizer;

    #[test]
    fn a_trained_tokenizer_serves_llava() {
        let dir = std::env::temp_dir().join(format!("cmoe-bpe-{}", std::process::id()));
        let corpus = (0..200).map(|i| {
            format!(
                "USER: <image>\nWhat colour is the circle number {i}? ASSISTANT: red</s> \
                 a blue square on the left"
            )
        });
        train_bpe(corpus, 300, &dir.join("tokenizer.json")).unwrap();
        let tok = LlavaTokenizer::from_model_dir(&dir, 4, 300).unwrap();
        let ids = tok.encode("USER: <image>\nWhat colour?").unwrap();
        assert_eq!(ids[0], 1, "starts with <s>");
        assert!(ids.contains(&4));
        let turns = [("<image>\nWhat colour is it?".to_string(), "red".to_string())];
        let ex = Conversation::vicuna_v1()
            .training_example(&tok, &turns, 3)
            .unwrap();
        let answer: Vec<u32> = ex
            .labels
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .map(|&l| l as u32)
            .collect();
        assert_eq!(answer.last(), Some(&2), "the answer ends with </s>");
        assert_eq!(tok.decode(&answer).unwrap().trim(), "red");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
