//! Experiment: can the base's vision tower see shapes at all? Its tower and projector, with a
//! linear head on the image tokens' features (max- and mean-pooled), trained end to end on the
//! five shapes (Adam, batch 32, fresh one-shape pictures of the stage-2 shape question each
//! step) and tested every 50 steps on 1,000 others.
//!
//! With OUT, the result (the head dropped) is saved in HF layout there, float16, with the
//! model directory's tokenizer and processor.
//!
//! cargo run --release --features flex --example shape_train -- [MODEL_DIR] [LR] [OUT]

use burn::backend::Autodiff;
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

/// The tower, projector and a linear head trained end to end on the shape labels.
#[derive(burn::module::Module, Debug)]
struct Classifier<B: Backend> {
    model: Llava<B>,
    head: Linear<B>,
}

fn pixels<B: Backend>(
    processor: &ImageProcessorConfig,
    chunk: &[(Sample, usize)],
) -> Tensor<B, 4> {
    let data: Vec<f32> = chunk
        .iter()
        .flat_map(|(s, _)| processor.preprocess(&s.image).data)
        .collect();
    let side = chunk[0].0.image.width() as usize;
    Tensor::from_data(
        TensorData::new(data, [chunk.len(), 3, side, side]),
        &Default::default(),
    )
}

impl<B: Backend> Classifier<B> {
    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 2> {
        let f = self.model.image_features(x);
        let pooled = Tensor::cat(
            vec![f.clone().max_dim(1).squeeze_dim(1), f.mean_dim(1).squeeze_dim(1)],
            1,
        );
        self.head.forward(pooled)
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).cloned().unwrap_or("assets/llava-mini".into());
    let lr: f64 = args.get(2).map_or(Ok(1e-3), |s| s.parse())?;
    let device = Default::default();
    let pipe = llava_cmoe::pipeline::LlavaPipeline::<AD>::load(dir.as_ref(), &device)?;
    let size = pipe.config.vision_config.image_size as u32;
    let test = pictures(2, 1000, size);
    let hidden = pipe.config.text_config.hidden_size;
    let mut classifier = Classifier {
        model: pipe.model,
        head: LinearConfig::new(2 * hidden, 5).init(&device),
    };
    let mut optim = AdamConfig::new().init();
    let loss = CrossEntropyLossConfig::new().init(&device);
    let evaluate = |c: &Classifier<AD>| {
        let mut right = 0;
        for chunk in test.chunks(100) {
            let p: Vec<i64> = c
                .forward(pixels::<AD>(&pipe.processor, chunk))
                .argmax(1)
                .into_data()
                .convert::<i64>()
                .to_vec()
                .unwrap();
            right += p.iter().zip(chunk).filter(|(p, s)| **p as usize == s.1).count();
        }
        right as f64 / 10.0
    };
    println!("step 0 test accuracy {:.1}", evaluate(&classifier));
    for step in 0..300 {
        let batch = pictures(1000 + step as u64, 32, size);
        let y = Tensor::<AD, 1, Int>::from_data(
            TensorData::new(batch.iter().map(|s| s.1 as i64).collect::<Vec<_>>(), [32]),
            &device,
        );
        let l = loss.forward(classifier.forward(pixels::<AD>(&pipe.processor, &batch)), y);
        let grads = GradientsParams::from_grads(l.backward(), &classifier);
        classifier = optim.step(lr, classifier, grads);
        if (step + 1) % 50 == 0 {
            println!("step {} test accuracy {:.1}", step + 1, evaluate(&classifier));
        }
    }
    if let Some(out) = args.get(3).map(std::path::PathBuf::from) {
        std::fs::create_dir_all(&out)?;
        for file in ["tokenizer.json", "preprocessor_config.json"] {
            std::fs::copy(std::path::Path::new(&dir).join(file), out.join(file))?;
        }
        let model = burn::module::AutodiffModule::valid(&classifier.model);
        llava_cmoe::llava::export::save_hf(&model, &pipe.config, &out, burn::tensor::DType::F16)?;
    }
    Ok(())
}
