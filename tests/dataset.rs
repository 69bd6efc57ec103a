//! CoIN records to batches on the tiny HF fixture: answer-only labels, padding, and PTL's
//! training-time feature (read inside a training sequence) equal to its inference-time one
//! (the prompt alone, left-padded in a batch).

mod common;

use burn::tensor::ElementConversion;
use cmoe_test_support::scratch;
use common::fixture;
use llava_cmoe::coin::format::{QuestionId, TestRecord, TrainRecord, read_test, read_train};
use llava_cmoe::coin::mini::{MiniCoinConfig, generate};
use llava_cmoe::data::prompt::{Conversation, IGNORE_INDEX};
use llava_cmoe::dataset::{CoinEncoder, collate_prompts, collate_train};
use llava_cmoe::moe::LlavaCmoe;
use llava_cmoe::moe::model::MoeConfig;
use llava_cmoe::moe::ptl::PtlFeature;
use llava_cmoe::moe::ptl::batch_features;
use llava_cmoe::pipeline::LlavaPipeline;

type B = burn_flex::Flex;

/// A training record's first question as a test question.
fn as_question(record: &TrainRecord) -> TestRecord {
    TestRecord {
        question_id: QuestionId(record.id.clone()),
        image: record.image.clone(),
        text: record.conversations[0]
            .value
            .trim_start_matches("<image>\n")
            .to_string(),
        answer: None,
        answers: None,
        answer_bbox: None,
        size: None,
    }
}

#[test]
fn coin_records_become_batches_and_ptl_features_match_inference() {
    let device = Default::default();
    let data = scratch("dataset").join("data");
    let config = MiniCoinConfig {
        train_per_task: 3,
        test_per_task: 3,
        ..MiniCoinConfig::default()
    };
    generate(&config, &data, |_| {}).unwrap();
    let pipe = LlavaPipeline::<B>::load(&fixture("tiny-llava"), &device).unwrap();
    let tokens_per_image = pipe.config.image_tokens_per_image();
    let encoder = CoinEncoder {
        tokenizer: pipe.tokenizer.clone(),
        processor: pipe.processor.clone(),
        conversation: Conversation::vicuna_v1(),
        tokens_per_image,
        image_root: data.join("images"),
    };
    let train = read_train(&data.join("Instructions/GQA/train.json")).unwrap();
    let encoded: Vec<_> = train
        .iter()
        .map(|r| encoder.encode_train(r).unwrap())
        .collect();

    // Labels are exactly the answer (and its end of sequence).
    for (record, e) in train.iter().zip(&encoded) {
        let answer_ids: Vec<u32> = e
            .labels
            .iter()
            .filter(|&&l| l != IGNORE_INDEX)
            .map(|&l| l as u32)
            .collect();
        let text = encoder.tokenizer.decode(&answer_ids).unwrap();
        assert_eq!(text.trim(), record.conversations[1].value);
        // The prompt part equals the generation prompt's ids.
        let first = e.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap();
        let prompt = encoder.encode_prompt(&as_question(record)).unwrap();
        assert_eq!(prompt.input_ids, e.input_ids[..first]);
        assert_eq!(prompt.pixels, e.pixels);
    }

    // Right-padded training batch, left-padded prompt batch.
    let batch = collate_train::<B>(&encoded, 0, &device);
    let [rows, len] = batch.labels.dims();
    assert_eq!(rows, 3);
    assert_eq!(
        len,
        encoded.iter().map(|e| e.input_ids.len()).max().unwrap()
    );
    let mask_sum: i64 = batch
        .input
        .attention_mask
        .clone()
        .unwrap()
        .sum()
        .into_scalar()
        .elem();
    assert_eq!(
        mask_sum as usize,
        encoded.iter().map(|e| e.input_ids.len()).sum::<usize>()
    );

    let model = LlavaCmoe::new(
        pipe.model,
        &MoeConfig {
            initial_experts: 2,
            rank: 4,
            ..MoeConfig::default()
        },
        &device,
    );
    let prompts: Vec<_> = train
        .iter()
        .map(|r| encoder.encode_prompt(&as_question(r)).unwrap())
        .collect();
    // Right-padded training rows and left-padded prompts give the same feature, pooled too.
    for feature in [PtlFeature::Last, PtlFeature::Mean, PtlFeature::Both] {
        let inside = batch_features(&model, &batch, 0, feature).unwrap();
        let alone = model
            .task_features(collate_prompts::<B>(&prompts, 0, &device), feature)
            .unwrap();
        let diff: f32 = (inside - alone).abs().max().into_scalar().elem();
        assert!(
            diff < 1e-4,
            "training-time vs inference-time PTL feature {feature:?}: {diff}"
        );
    }

    // Test questions encode too.
    let test = read_test(&data.join("Instructions/GQA/test.json")).unwrap();
    assert!(encoder.encode_prompt(&test[0]).is_ok());
    let _ = std::fs::remove_dir_all(&data);
}
