//! A model written in the HF layout loads back (through the same importer that reads
//! transformers' checkpoints) with identical outputs.

mod common;

use burn::tensor::{DType, Int, Tensor, TensorData};
use cmoe_test_support::scratch;
use common::fixture;
use llava_cmoe::llava::export::save_hf;
use llava_cmoe::llava::{LlavaInput, load_llava};

type B = burn_flex::Flex;

#[test]
fn hf_export_round_trips() {
    let device = Default::default();
    let (config, model) = load_llava::<B>(&fixture("tiny-llava"), DType::F32, &device).unwrap();
    let dir = scratch("export");
    save_hf(&model, &config, &dir, DType::F32).unwrap();
    let (_, again) = load_llava::<B>(&dir, DType::F32, &device).unwrap();
    let mut ids = vec![1i64, 3148];
    ids.extend([config.image_token_index as i64; 16]);
    ids.extend([13, 5618, 338]);
    let n = ids.len();
    let input = || LlavaInput {
        input_ids: Tensor::<B, 2, Int>::from_data(TensorData::new(ids.clone(), [1, n]), &device),
        pixel_values: Some(Tensor::ones([1, 3, 32, 32], &device) * 0.25),
        attention_mask: None,
    };
    assert_eq!(
        model.forward(input()).unwrap().into_data(),
        again.forward(input()).unwrap().into_data()
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(json["model_type"], "llava");
    assert_eq!(json["text_config"]["model_type"], "llama");
    let _ = std::fs::remove_dir_all(&dir);
}
