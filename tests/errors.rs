#![cfg(feature = "flex")]
//! Broken model directories give errors that name the file and the problem, never a panic.

mod common;

use std::path::Path;

use common::{rewrite_config, rewrite_weights, scratch_copy};
use llava_cmoe::pipeline::LlavaPipeline;

type B = burn_flex::Flex;

fn load_error(dir: &Path) -> String {
    match LlavaPipeline::<B>::load(dir, &Default::default()) {
        Ok(_) => panic!("{} loaded although it is broken", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_mentions(err: &str, parts: &[&str]) {
    for part in parts {
        assert!(
            err.contains(part),
            "error does not mention {part:?}:\n{err}"
        );
    }
}

#[test]
fn missing_and_unexpected_tensors_are_listed_by_key() {
    let dir = scratch_copy("tiny-llava-b", "missing");
    rewrite_weights(&dir, |t| {
        t.retain(|(name, ..)| name != "multi_modal_projector.linear_2.bias");
        let extra = t[0].clone();
        t.push((
            "vision_tower.vision_model.extra_head.weight".into(),
            extra.1,
            extra.2,
            extra.3,
        ));
    });
    let err = load_error(&dir);
    assert_mentions(
        &err,
        &[
            &dir.display().to_string(),
            "missing (1): multi_modal_projector.linear_2.bias",
            "unexpected (1): vision_tower.vision_model.extra_head.weight",
        ],
    );
}

#[test]
fn shape_mismatches_name_the_tensor_and_both_shapes() {
    let dir = scratch_copy("tiny-llava-b", "shape");
    rewrite_config(&dir, |c| c["text_config"]["intermediate_size"] = 100.into());
    let err = load_error(&dir);
    assert_mentions(
        &err,
        &[
            "language_model.model.layers.0.mlp.up_proj.weight",
            "Shape mismatch",
            "100",
            "96",
        ],
    );
}

#[test]
fn non_float_tensors_are_rejected() {
    let dir = scratch_copy("tiny-llava-b", "dtype");
    rewrite_weights(&dir, |t| {
        let entry = t
            .iter_mut()
            .find(|(name, ..)| name == "multi_modal_projector.linear_1.bias")
            .unwrap();
        entry.1 = safetensors::Dtype::I16;
    });
    assert_mentions(
        &load_error(&dir),
        &[
            "multi_modal_projector.linear_1.bias",
            "I16",
            "not a float type",
        ],
    );
}

#[test]
fn corrupt_and_absent_weight_files() {
    let dir = scratch_copy("tiny-llava-b", "corrupt");
    let weights = dir.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..1000]).unwrap();
    assert_mentions(
        &load_error(&dir),
        &["model.safetensors", "not a valid safetensors file"],
    );
    std::fs::remove_file(&weights).unwrap();
    assert_mentions(
        &load_error(&dir),
        &["no model.safetensors or model.safetensors.index.json"],
    );

    let sharded = scratch_copy("tiny-llava", "shard");
    std::fs::remove_file(sharded.join("model-00002-of-00003.safetensors")).unwrap();
    assert_mentions(
        &load_error(&sharded),
        &[
            "model.safetensors.index.json",
            "model-00002-of-00003.safetensors",
            "does not exist",
        ],
    );
}

#[test]
fn malformed_and_unsupported_configs() {
    let dir = scratch_copy("tiny-llava-b", "config");
    std::fs::write(dir.join("config.json"), "{\"text_config\": [").unwrap();
    assert_mentions(&load_error(&dir), &["config.json", "invalid LLaVA config"]);
    std::fs::write(
        dir.join("config.json"),
        r#"{"text_config": {"hidden_size": 48, "num_attention_heads": 5}}"#,
    )
    .unwrap();
    assert_mentions(&load_error(&dir), &["config.json", "not divisible"]);
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_mentions(&load_error(&dir), &["config.json"]);
}

#[test]
fn tokenizer_that_does_not_match_the_model() {
    let dir = scratch_copy("tiny-llava-b", "tokenizer");
    rewrite_config(&dir, |c| c["image_token_index"] = 32001.into());
    assert_mentions(
        &load_error(&dir),
        &["tokenizer.json", "32000", "32001", "do not match"],
    );
    rewrite_config(&dir, |c| {
        c["image_token_index"] = 32000.into();
        c["text_config"]["vocab_size"] = 1000.into();
    });
    // The smaller vocabulary also breaks the weights' shapes; the weights are checked first.
    assert_mentions(&load_error(&dir), &["embed_tokens"]);
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    rewrite_config(&dir, |c| c["text_config"]["vocab_size"] = 32064.into());
    assert_mentions(&load_error(&dir), &["tokenizer.json", "no tokenizer.json"]);
}

#[test]
fn inputs_that_do_not_fit_the_model() {
    let dir = common::fixture("tiny-llava");
    let pipe = LlavaPipeline::<B>::load(&dir, &Default::default()).unwrap();
    let pixels = pipe.preprocess(&common::photo()).unwrap();
    // <image> not expanded.
    let ids = pipe
        .tokenizer
        .encode("USER: <image>\nHi ASSISTANT:")
        .unwrap();
    let err = pipe.logits(&ids, Some(&pixels)).unwrap_err().to_string();
    assert_mentions(
        &err,
        &["1 <image> tokens", "expand each <image> to 16 tokens"],
    );
    // Image tokens without an image.
    let ids = pipe.prompt_ids("USER: <image>\nHi ASSISTANT:").unwrap();
    assert_mentions(
        &pipe.logits(&ids, None).unwrap_err().to_string(),
        &["no image"],
    );
    // Ids outside the vocabulary.
    assert_mentions(
        &pipe.logits(&[1, 40000], None).unwrap_err().to_string(),
        &["40000", "outside the vocabulary"],
    );
    // Pixel values of the wrong size.
    let wrong = llava_cmoe::tensor_io::HostTensor {
        data: vec![0.0; 3 * 8 * 8],
        shape: vec![1, 3, 8, 8],
    };
    assert_mentions(
        &pipe
            .check_pixels(&wrong, "x.safetensors")
            .unwrap_err()
            .to_string(),
        &["x.safetensors", "[1, 3, 8, 8]"],
    );
}
