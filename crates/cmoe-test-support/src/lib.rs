//! Helpers shared by the workspace's tests (not published): where the fixtures are, the tiny
//! HF LLaVA fixture, token rows and batches for it, scratch folders, and [`on_backends!`],
//! which instantiates generic tests once per backend.

use std::path::PathBuf;

use burn::module::Param;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Int, Tensor, TensorData};
use cmoe_llava::config::TextConfig;
use cmoe_llava::llama::LlamaMlp;
use cmoe_llava::{Llava, load_llava};
use cmoe_moe::train::TrainBatch;
use cmoe_moe::{ModelInput, MoeLoraFfn, MoeLoraFfnConfig};

/// Re-exported for [`on_backends!`], which names `$crate::burn`.
pub use burn;

/// The tiny fixture's image token.
pub const IMAGE: i64 = 32000;
/// The tiny fixture's padding token.
pub const PAD: i64 = 32001;
/// Label of a position that is not trained on.
pub const IGNORE: i64 = -100;

/// The workspace's test fixtures (`tests/fixtures`; its README says where each comes from).
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The tiny HF LLaVA fixture (`tests/fixtures/tiny-llava`) in f32.
pub fn tiny_llava<B: Backend>(device: &B::Device) -> Llava<B> {
    tiny_llava_in::<B>(DType::F32, device)
}

/// The tiny HF LLaVA fixture with its weights in `dtype`.
pub fn tiny_llava_in<B: Backend>(dtype: DType, device: &B::Device) -> Llava<B> {
    let dir = fixtures().join("tiny-llava");
    match load_llava::<B>(&dir, dtype, device) {
        Ok((_, model)) => model,
        Err(e) => panic!("cannot load the fixture {}: {e}", dir.display()),
    }
}

/// A prompt for the tiny fixture: `[bos, "USER:"]`, its 16 image tokens, then `text`.
pub fn prompt_ids(text: &[i64]) -> Vec<i64> {
    let mut ids = vec![1i64, 3148, 1001, 29901];
    ids.extend([IMAGE; 16]);
    ids.extend(text);
    ids
}

/// A row varying with `seed`: a prompt of 6 question tokens, then a 6-token answer; with the
/// position of the first answer token.
pub fn seeded_row(seed: i64) -> (Vec<i64>, usize) {
    let ids = prompt_ids(
        &(0..12)
            .map(|i| 100 + (seed * 37 + i * 11) % 5000)
            .collect::<Vec<_>>(),
    );
    let answer = ids.len() - 6;
    (ids, answer)
}

/// Labels for `ids` that train on the positions from `answer` on.
pub fn answer_labels(ids: &[i64], answer: usize) -> Vec<i64> {
    ids.iter()
        .enumerate()
        .map(|(i, &t)| if i >= answer { t } else { IGNORE })
        .collect()
}

/// Pixels of a flat grey image of `shade` for `rows` rows of the fixture (32 x 32).
pub fn grey_pixels<B: Backend>(rows: usize, shade: f64, device: &B::Device) -> Tensor<B, 4> {
    Tensor::ones([rows, 3, 32, 32], device) * shade
}

/// A batch of equally long `(ids, labels)` rows, each followed by `pad` padding positions
/// (attention mask 0, no label; no mask at all when `pad` is 0), on grey images of `shade`.
pub fn train_batch<B: Backend>(
    rows: &[(Vec<i64>, Vec<i64>)],
    pad: usize,
    shade: f64,
    device: &B::Device,
) -> TrainBatch<B> {
    let n = rows[0].0.len() + pad;
    let (mut ids, mut labels, mut mask) = (Vec::new(), Vec::new(), Vec::new());
    for (row_ids, row_labels) in rows {
        assert_eq!(row_ids.len() + pad, n, "rows of one batch have one length");
        ids.extend(row_ids.iter().copied().chain(std::iter::repeat_n(PAD, pad)));
        labels.extend(
            row_labels
                .iter()
                .copied()
                .chain(std::iter::repeat_n(IGNORE, pad)),
        );
        mask.extend(std::iter::repeat_n(1i64, row_ids.len()).chain(std::iter::repeat_n(0, pad)));
    }
    let int =
        |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, [rows.len(), n]), device);
    let input = ModelInput {
        input_ids: int(ids),
        pixel_values: Some(grey_pixels(rows.len(), shade, device)),
        attention_mask: (pad > 0).then(|| int(mask)),
    };
    TrainBatch::from_host(input, labels, [rows.len(), n], device)
}

/// Two seeded rows (`seed`, `seed + 1`) labelled on their answers, with `pad` padding
/// positions each, on a grey image whose shade follows `seed`.
pub fn seeded_batch<B: Backend>(seed: i64, pad: usize, device: &B::Device) -> TrainBatch<B> {
    let rows: Vec<_> = [seed, seed + 1]
        .map(|s| {
            let (ids, answer) = seeded_row(s);
            let labels = answer_labels(&ids, answer);
            (ids, labels)
        })
        .into();
    train_batch(&rows, pad, seeded_shade(seed), device)
}

/// The prompt part (no answer) of `seeded_batch(seed, ..)`'s first row, on its image.
pub fn seeded_prompt<B: Backend>(seed: i64, device: &B::Device) -> ModelInput<B> {
    let (ids, answer) = seeded_row(seed);
    prompt_input(&ids[..answer], seeded_shade(seed), device)
}

fn seeded_shade(seed: i64) -> f64 {
    (0.1f32 + 0.05 * seed as f32) as f64
}

/// A one-row input of `ids` on a grey image of `shade`, without a mask.
pub fn prompt_input<B: Backend>(ids: &[i64], shade: f64, device: &B::Device) -> ModelInput<B> {
    ModelInput {
        input_ids: Tensor::<B, 2, Int>::from_data(
            TensorData::new(ids.to_vec(), [1, ids.len()]),
            device,
        ),
        pixel_values: Some(grey_pixels(1, shade, device)),
        attention_mask: None,
    }
}

/// A small SwiGLU MLP (32 -> 48 -> 32) with random weights, as the MoE layer tests wrap.
pub fn small_mlp<B: Backend>(device: &B::Device) -> LlamaMlp<B> {
    let config: TextConfig = serde_json::from_value(serde_json::json!({
        "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
        "num_attention_heads": 4, "vocab_size": 10
    }))
    .expect("a valid text config");
    config.init::<B>(false, device).model.layers.remove(0).mlp
}

/// An MoE-LoRA layer around [`small_mlp`] (rank 8, alpha 16, no dropout) whose experts all
/// contribute (see [`randomize_experts`]).
pub fn small_moe_layer<B: Backend>(
    n_experts: usize,
    top_k: usize,
    device: &B::Device,
) -> MoeLoraFfn<B> {
    let mut layer = MoeLoraFfnConfig::new(32, 48)
        .with_experts(n_experts)
        .with_rank(8)
        .with_alpha(16.0)
        .with_dropout(0.0)
        .with_top_k(top_k)
        .init(device);
    randomize_experts(&mut layer, 0, device);
    layer
}

/// Gives experts `from..` of `layer` a random, non-zero LoRA `B` (fresh experts start at zero
/// and contribute nothing, which would make tests of their outputs vacuous).
pub fn randomize_experts<B: Backend>(layer: &mut MoeLoraFfn<B>, from: usize, device: &B::Device) {
    for expert in &mut layer.experts[from..] {
        for lora in [&mut expert.gate, &mut expert.up, &mut expert.down]
            .into_iter()
            .flatten()
        {
            let shape = lora.lora_b.dims();
            lora.lora_b = Param::from_tensor(Tensor::random(
                shape,
                Distribution::Normal(0.0, 0.5),
                device,
            ));
        }
    }
}

/// An empty folder for one test, `<temp>/cmoe-test-<pid>-<name>`, removed first if a
/// previous run left it.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cmoe-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("cannot create {}: {e}", dir.display());
    }
    dir
}

/// Instantiates generic test functions once per backend, each backend in its own module:
///
/// ```ignore
/// on_backends! {
///     flex: burn_flex::Flex,
///     #[cfg(feature = "wgpu")] wgpu: burn_wgpu::Wgpu;
///     fresh_experts_leave_the_base_model_unchanged: B,
///     gradients_reach_only_the_experts: AD,
/// }
/// ```
///
/// Each test `name: B` calls `name::<backend>()`, each `name: AD` calls
/// `name::<Autodiff<backend>>()`; attributes before a backend (`#[cfg(...)]`) go on its module.
#[macro_export]
macro_rules! on_backends {
    (@tests [$($test:ident: $kind:ident),* $(,)?]) => {
        $(
            #[test]
            fn $test() {
                super::$test::<$kind>();
            }
        )*
    };
    (@each $tests:tt) => {};
    (@each $tests:tt $(#[$meta:meta])* $module:ident: $backend:ty $(, $($rest:tt)*)?) => {
        $(#[$meta])*
        mod $module {
            #[allow(unused)]
            type B = $backend;
            #[allow(unused)]
            type AD = $crate::burn::backend::Autodiff<$backend>;
            $crate::on_backends!(@tests $tests);
        }
        $($crate::on_backends!(@each $tests $($rest)*);)?
    };
    ($($(#[$meta:meta])* $module:ident: $backend:ty),+ ; $($tests:tt)*) => {
        $crate::on_backends!(@each [$($tests)*] $($(#[$meta])* $module: $backend),+);
    };
}
