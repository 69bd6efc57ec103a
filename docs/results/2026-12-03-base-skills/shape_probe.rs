//! Experiment: do the shipped base's image features (what the projector hands the decoder)
//! tell the five shapes apart? A linear probe (softmax regression on the image tokens'
//! features, max- and mean-pooled) trained on 3,000 one-shape pictures of the stage-2 shape
//! question and tested on 1,000 others, for the shipped base and for the same model at its
//! seeded initialisation (untrained features).
//!
//! cargo run --release --features flex --example shape_probe -- [MODEL_DIR]

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use burn_flex::Flex;
use llava_cmoe::coin::mini::draw::Shape;
use llava_cmoe::coin::mini::instructions::{Kind, sample_of};
use llava_cmoe::coin::mini::tasks::Sample;
use llava_cmoe::data::image::ImageProcessorConfig;
use llava_cmoe::llava::Llava;
use rand::SeedableRng;
use rand::rngs::StdRng;

type B = Flex;
type AD = Autodiff<Flex>;

/// Pictures of one shape each, with the shape's index.
fn pictures(seed: u64, n: usize, size: u32) -> Vec<(Sample, usize)> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let s = sample_of(Kind::Shape, &mut rng, size);
            let label = Shape::ALL
                .iter()
                .position(|sh| s.answer.contains(sh.name()))
                .expect("a shape answer");
            (s, label)
        })
        .collect()
}

/// Max- and mean-pooled projected image features `[n, 2 * hidden]`.
fn features(
    model: &Llava<B>,
    processor: &ImageProcessorConfig,
    data: &[(Sample, usize)],
) -> Tensor<B, 2> {
    let device = Default::default();
    let chunks: Vec<Tensor<B, 2>> = data
        .chunks(100)
        .map(|chunk| {
            let pixels: Vec<f32> = chunk
                .iter()
                .flat_map(|(s, _)| processor.preprocess(&s.image).data)
                .collect();
            let side = chunk[0].0.image.width() as usize;
            let x = Tensor::<B, 4>::from_data(
                TensorData::new(pixels, [chunk.len(), 3, side, side]),
                &device,
            );
            let f = model.image_features(x);
            Tensor::cat(vec![f.clone().max_dim(1).squeeze_dim(1), f.mean_dim(1).squeeze_dim(1)], 1)
        })
        .collect();
    Tensor::cat(chunks, 0)
}

/// Test accuracy (percent) of a softmax regression trained on standardised features.
fn probe(train: (Tensor<B, 2>, Vec<usize>), test: (Tensor<B, 2>, Vec<usize>)) -> f64 {
    let device = Default::default();
    let (mean, var) = (train.0.clone().mean_dim(0), train.0.clone().var(0));
    let std = var.sqrt().add_scalar(1e-5);
    let norm = |x: Tensor<B, 2>| (x - mean.clone()) / std.clone();
    let labels = |y: &[usize]| {
        Tensor::<AD, 1, Int>::from_data(
            TensorData::new(y.iter().map(|&v| v as i64).collect::<Vec<_>>(), [y.len()]),
            &device,
        )
    };
    let x = Tensor::<AD, 2>::from_inner(norm(train.0));
    let y = labels(&train.1);
    let mut linear: Linear<AD> = LinearConfig::new(x.dims()[1], 5).init(&device);
    let mut optim = AdamConfig::new().init();
    let loss = CrossEntropyLossConfig::new().init(&device);
    for _ in 0..400 {
        let l = loss.forward(linear.forward(x.clone()), y.clone());
        let grads = GradientsParams::from_grads(l.backward(), &linear);
        linear = optim.step(1e-2, linear, grads);
    }
    let logits = linear.valid().forward(norm(test.0));
    let predicted: Vec<i64> = logits.argmax(1).into_data().convert::<i64>().to_vec().unwrap();
    let right = predicted
        .iter()
        .zip(&test.1)
        .filter(|(p, y)| **p as usize == **y)
        .count();
    100.0 * right as f64 / test.1.len() as f64
}

fn main() -> anyhow::Result<()> {
    let dir = std::env::args().nth(1).unwrap_or("assets/llava-mini".into());
    let device = Default::default();
    let pipe = llava_cmoe::pipeline::LlavaPipeline::<B>::load(dir.as_ref(), &device)?;
    let size = pipe.config.vision_config.image_size as u32;
    let (train, test) = (pictures(1, 3000, size), pictures(2, 1000, size));
    let labels = |d: &[(Sample, usize)]| d.iter().map(|p| p.1).collect::<Vec<_>>();
    <B as Backend>::seed(&device, 0);
    let untrained = pipe.config.init::<B>(&device);
    for (name, model) in [("trained", &pipe.model), ("untrained", &untrained)] {
        let accuracy = probe(
            (features(model, &pipe.processor, &train), labels(&train)),
            (features(model, &pipe.processor, &test), labels(&test)),
        );
        println!("{dir} {name}: shape probe accuracy {accuracy:.1} % (chance 20 %)");
    }
    Ok(())
}
