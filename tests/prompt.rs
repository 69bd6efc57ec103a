//! Tokenisation and the LLaVA-1.5 template on the real LLaMA-2 vocabulary (ids checked against
//! transformers' tokenizer on the same tokenizer.json).

mod common;

use llava_cmoe::data::LlavaTokenizer;
use llava_cmoe::data::prompt::{Conversation, IGNORE_INDEX};

fn tokenizer() -> LlavaTokenizer {
    LlavaTokenizer::from_model_dir(&common::fixture("tiny-llava"), 32000, 32064).unwrap()
}

#[test]
fn llama_ids_and_bos() {
    let t = tokenizer();
    assert_eq!(
        t.encode("Hello world!").unwrap(),
        vec![1, 15043, 3186, 29991]
    );
    assert_eq!(t.image_token_id(), 32000);
    assert_eq!(t.token_id("</s>"), Some(2));
    assert_eq!(t.decode(&[15043, 3186, 29991, 2]).unwrap(), "Hello world!");
}

#[test]
fn image_tokens_expand_in_place() {
    let t = tokenizer();
    let ids = t.encode_prompt("USER: <image>\nHi", 3).unwrap();
    assert_eq!(
        ids,
        vec![
            1, 3148, 1001, 29901, 29871, 32000, 32000, 32000, 29871, 13, 18567
        ]
    );
}

#[test]
fn only_answer_tokens_carry_labels() {
    let t = tokenizer();
    let turns = vec![
        (
            "<image>\nWhat colour is the square?".to_string(),
            "Dark red".to_string(),
        ),
        ("And the circle?".to_string(), "Blue".to_string()),
    ];
    let example = Conversation::vicuna_v1()
        .training_example(&t, &turns, 4)
        .unwrap();
    // transformers' ids for the rendered text, with the single <image> (32000) then expanded to 4.
    let mut expected_ids: Vec<u32> = vec![
        1, 319, 13563, 1546, 263, 12758, 1404, 322, 385, 23116, 21082, 20255, 29889, 450, 20255,
        4076, 8444, 29892, 13173, 29892, 322, 1248, 568, 6089, 304, 278, 1404, 29915, 29879, 5155,
        29889, 3148, 1001, 29901, 29871, 32000, 29871, 13, 5618, 12384, 338, 278, 6862, 29973, 319,
        1799, 9047, 13566, 29901, 15317, 2654, 2, 3148, 1001, 29901, 1126, 278, 8607, 29973, 319,
        1799, 9047, 13566, 29901, 10924, 2,
    ];
    let image_at = expected_ids.iter().position(|&i| i == 32000).unwrap();
    expected_ids.splice(image_at..=image_at, [32000; 4]);
    assert_eq!(example.input_ids, expected_ids);
    let labelled: Vec<(usize, i64)> = example
        .labels
        .iter()
        .enumerate()
        .filter(|(_, l)| **l != IGNORE_INDEX)
        .map(|(i, l)| (i, *l))
        .collect();
    let n = expected_ids.len();
    // "▁Dark" "▁red" "</s>" of turn one, "▁Blue" "</s>" of turn two.
    assert_eq!(
        labelled,
        vec![(52, 15317), (53, 2654), (54, 2), (n - 2, 10924), (n - 1, 2)]
    );
}

#[test]
fn tokenizer_must_match_the_model() {
    let dir = common::fixture("tiny-llava");
    let err = LlavaTokenizer::from_model_dir(&dir, 32001, 32064)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tokenizer.json") && err.contains("do not match"),
        "{err}"
    );
    let err = LlavaTokenizer::from_model_dir(&dir, 32000, 32000)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("32002 tokens") && err.contains("32000"),
        "{err}"
    );
}
