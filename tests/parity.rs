//! Numerical parity with HF transformers on two transformers-generated checkpoints, on every
//! compiled backend: prompt ids, pixel values, full logits, batched left-padded logits and
//! greedy tokens (single and batched). References: `scripts/make_parity_fixtures.py`.
//!
//! - `tiny-llava`: v5 key layout, fp16, sharded, GQA, CLIP layer -2 of 4, CLS dropped.
//! - `tiny-llava-b`: v4 key layout, bf16, one file, MHA, CLIP layer -1, CLS kept, pad-to-square.
//!
//! And the bf16 base against transformers run in bf16 (`scripts/make_bf16_fixture.py`).

mod common;

use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use cmoe_test_support::on_backends;
use common::{max_abs_diff, photo, reference};
use llava_cmoe::backend::BackendTask;
use llava_cmoe::llava::{GenerationConfig, LlavaInput, Sampling, generate};
use llava_cmoe::parity::ParityTask;
use llava_cmoe::pipeline::{LlavaPipeline, Precision};
use llava_cmoe::tensor_io::HostTensor;

/// The tolerances.
const LOGIT_TOL: f32 = 1e-3;
/// The issue allows 2e-2; with libjpeg-turbo decoding and Pillow-exact resampling we hold 1e-5.
const PIXEL_TOL: f32 = 1e-5;

fn tensor4<B: Backend>(t: &HostTensor, device: &B::Device) -> Tensor<B, 4> {
    Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), device)
}

fn ids2<B: Backend>(rows: &[Vec<u32>], device: &B::Device) -> Tensor<B, 2, Int> {
    let flat: Vec<i64> = rows.iter().flatten().map(|&x| x as i64).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), rows[0].len()]), device)
}

fn check_model<B: Backend>(model: &str, device: &B::Device) {
    let (r, tensor) = reference(model);
    let pipe = LlavaPipeline::<B>::load(&common::fixture(model), device).expect("model loads");

    // Prompt ids: tokenizer + <image> expansion equal LlavaProcessor's.
    assert_eq!(pipe.config.image_tokens_per_image(), r.num_image_tokens);
    assert_eq!(
        pipe.prompt_ids(&r.prompt).unwrap(),
        r.prompt_ids,
        "{model}: prompt ids"
    );

    // Pixel values from the JPEG.
    let pixels = pipe.preprocess(&photo()).unwrap();
    let reference_pixels = tensor("pixel_values");
    let pixel_diff = max_abs_diff(&pixels, &reference_pixels);
    assert!(
        pixel_diff <= PIXEL_TOL,
        "{model}: pixel values differ by {pixel_diff}"
    );

    // Full logits, on the reference's own pixel values so that only the model is compared.
    let logits = pipe.logits(&r.prompt_ids, Some(&reference_pixels)).unwrap();
    let expected = tensor("logits");
    let [_, seq, vocab] = [logits.shape[0], logits.shape[1], logits.shape[2]];
    let tail = HostTensor {
        data: logits.data[r.logits_from * vocab..].to_vec(),
        shape: vec![1, seq - r.logits_from, vocab],
    };
    let logit_diff = max_abs_diff(&tail, &expected);
    println!(
        "{model} on {}: max |logit diff| {logit_diff:.2e}, max |pixel diff| {pixel_diff:.2e}",
        B::name(device)
    );
    assert!(
        logit_diff <= LOGIT_TOL,
        "{model}: logits differ by {logit_diff}"
    );

    // Greedy decoding with the KV cache.
    let out = pipe
        .generate(
            &r.prompt,
            Some(&reference_pixels),
            r.greedy_max_new_tokens,
            Sampling::Greedy,
        )
        .unwrap();
    assert_eq!(out.prompt_ids, r.prompt_ids);
    assert_eq!(out.generated_ids, r.greedy_ids, "{model}: greedy tokens");

    // A left-padded batch with an attention mask: last-position logits and greedy tokens.
    let batch = || LlavaInput {
        input_ids: ids2::<B>(&r.batch_input_ids, device),
        pixel_values: Some(tensor4::<B>(&tensor("batch_pixel_values"), device)),
        attention_mask: Some(ids2::<B>(&r.batch_attention_mask, device)),
    };
    let logits = pipe.model.forward(batch()).unwrap();
    let [b, s, v] = logits.dims();
    let last = logits.slice([0..b, s - 1..s, 0..v]).reshape([b, v]);
    let last = HostTensor {
        data: last.into_data().iter::<f32>().collect(),
        shape: vec![b, v],
    };
    let batch_diff = max_abs_diff(&last, &tensor("batch_last_logits"));
    assert!(
        batch_diff <= LOGIT_TOL,
        "{model}: batched logits differ by {batch_diff}"
    );
    let config = GenerationConfig {
        max_new_tokens: r.greedy_max_new_tokens,
        eos_token_ids: vec![2],
        pad_token_id: 32001,
        sampling: Sampling::Greedy,
    };
    let generated = generate(&pipe.model, batch(), &config).unwrap();
    assert_eq!(
        generated, r.batch_greedy_ids,
        "{model}: batched greedy tokens"
    );
}

/// Transformers' bf16 run of `tiny-llava` (softmax and RMSNorm in f32 inside, as LLaVA-1.5
/// trains) beside the same bf16-rounded weights run in f32, at the prompt's last 6 positions
/// (`llava_cmoe::parity`): bf16 keeps 8 significant bits, so no bf16 run matches the f32 one;
/// the bf16 base must stay as close to the f32 run as transformers' bf16 run is (within 1.5x)
/// and within twice that of transformers' bf16 logits. Attention softmax and RMSNorm left in
/// bf16 round the attention weights and normalised states to 8 bits: the printed line gives
/// the figures.
fn tiny_llava_in_bf16_like_transformers<B: Backend>() {
    let result = ParityTask {
        model: common::fixture("tiny-llava"),
        precision: Precision::Bf16,
    }
    .run::<B>(Default::default())
    .unwrap();
    let (ours, theirs) = (
        result.ours_to_f32.unwrap(),
        result.transformers_to_f32.unwrap(),
    );
    println!(
        "bf16 on {}: max |logit diff| to the f32 run: ours {ours:.4}, transformers' {theirs:.4}; \
         ours to transformers' bf16 {:.4}",
        result.backend, result.max_logit_diff
    );
    assert!(result.passed, "{result:?}");
    assert!(result.max_logit_diff <= 2.0 * theirs, "{result:?}");
}

fn tiny_llava_v5_fp16_sharded_gqa<B: Backend>() {
    check_model::<B>("tiny-llava", &Default::default());
}

fn tiny_llava_b_v4_bf16_full_pad<B: Backend>() {
    check_model::<B>("tiny-llava-b", &Default::default());
}

on_backends! {
    #[cfg(feature = "flex")] flex: burn_flex::Flex,
    #[cfg(feature = "ndarray")] ndarray: burn_ndarray::NdArray,
    #[cfg(feature = "wgpu")] wgpu: burn_wgpu::Wgpu,
    #[cfg(feature = "cuda")] cuda: burn_cuda::Cuda;
    tiny_llava_v5_fp16_sharded_gqa: B,
    tiny_llava_b_v4_bf16_full_pad: B,
}

// bf16 arithmetic: flex and CUDA (ndarray has no bf16 matmul, lavapipe no bf16 shaders).
on_backends! {
    #[cfg(feature = "flex")] flex_bf16: burn_flex::Flex,
    #[cfg(feature = "cuda")] cuda_bf16: burn_cuda::Cuda;
    tiny_llava_in_bf16_like_transformers: B,
}
