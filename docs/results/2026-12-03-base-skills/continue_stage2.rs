//! Experiment: does more stage-2 training teach the shipped base the skills it lacks? Continues
//! instruction tuning of `assets/llava-mini` (the pretraining's mixture, 20 % captions, batch
//! 16, AdamW, warmup 5 % then cosine) and measures the held-out instruction accuracy per kind
//! every `EVERY` steps. With `weighted`, the kinds the shipped base has mastered (colour,
//! colour choice: 100 %) are drawn half as often as the others. The result is saved in HF
//! layout (float16, the shipped tokenizer and processor) to OUT. The environment's BASE names
//! another base to start from.
//!
//! cargo run --release --features flex --example continue_stage2 -- STEPS PEAK_LR OUT [weighted]

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::ElementConversion;
use burn_flex::Flex;
use llava_cmoe::coin::format::{TrainRecord, Turn};
use llava_cmoe::coin::mini::{captions, instructions};
use llava_cmoe::data::prompt::Conversation;
use llava_cmoe::dataset::{CoinEncoder, collate_train};
use llava_cmoe::instruction_accuracy::instruction_accuracy;
use llava_cmoe::moe::train::{causal_lm_loss, learning_rate};
use llava_cmoe::observer::Silent;
use llava_cmoe::pipeline::LlavaPipeline;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const EVERY: usize = 200;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = args.get(1).map_or(Ok(800), |s| s.parse())?;
    let peak: f64 = args.get(2).map_or(Ok(5e-4), |s| s.parse())?;
    let out = std::path::PathBuf::from(args.get(3).expect("OUT"));
    let weighted = args.get(4).is_some_and(|a| a == "weighted");
    // The kinds drawn: every kind once, the unmastered ones twice when weighted.
    let kinds: Vec<instructions::Kind> = instructions::Kind::ALL
        .into_iter()
        .flat_map(|k| {
            let mastered = matches!(
                k,
                instructions::Kind::Colour | instructions::Kind::ColourChoice
            );
            std::iter::repeat_n(k, if weighted && !mastered { 2 } else { 1 })
        })
        .collect();
    type B = Autodiff<Flex>;
    let device = Default::default();
    let base = std::env::var("BASE").unwrap_or("assets/llava-mini".into());
    let pipe = LlavaPipeline::<B>::load(base.as_ref(), &device)?;
    let config = pipe.config.clone();
    let size = config.vision_config.image_size as u32;
    let pad = config.pad_token_id.unwrap_or(0);
    let encoder = CoinEncoder {
        tokenizer: pipe.tokenizer,
        processor: pipe.processor,
        conversation: Conversation::vicuna_v1(),
        tokens_per_image: config.image_tokens_per_image(),
        image_root: Default::default(),
    };
    let mut model = pipe.model;
    let mut optim = AdamWConfig::new()
        .with_weight_decay(0.0)
        .with_grad_clipping(Some(burn::grad_clipping::GradientClippingConfig::Norm(1.0)))
        .init();
    let report = |model: &llava_cmoe::llava::Llava<B>, step: usize, loss: f64| {
        let (a, _) =
            instruction_accuracy(&model.valid(), &encoder, &config, (0, 50), &device, &Silent)?;
        let kinds: Vec<String> = a
            .kinds
            .iter()
            .map(|k| format!("{} {:.0}", k.kind, k.accuracy))
            .collect();
        println!(
            "step {step} loss {loss:.3} mean {:.2}: {}",
            a.mean,
            kinds.join(", ")
        );
        anyhow::Ok(())
    };
    report(&model, 0, f64::NAN)?;
    let mut rng = StdRng::seed_from_u64(77);
    let mut losses = Vec::new();
    for step in 0..steps {
        let samples = (0..16)
            .map(|i| {
                let s = if rng.random_bool(0.2) {
                    captions::sample(&mut rng, size)
                } else {
                    let kind = kinds[rng.random_range(0..kinds.len())];
                    instructions::sample_of(kind, &mut rng, size)
                };
                let record = TrainRecord {
                    id: format!("{step}-{i}"),
                    image: String::new(),
                    conversations: vec![
                        Turn {
                            from: "human".into(),
                            value: format!("<image>\n{}", s.question),
                        },
                        Turn {
                            from: "gpt".into(),
                            value: s.answer,
                        },
                    ],
                };
                encoder.encode_conversation(&record, encoder.processor.preprocess(&s.image))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let batch = collate_train::<B>(&samples, pad, &device);
        let logits = model.forward(batch.input.into())?;
        let loss = causal_lm_loss(logits, batch.labels).expect("labels");
        losses.push(loss.clone().into_scalar().elem::<f64>());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(learning_rate(step, steps, peak, 0.05), model, grads);
        if (step + 1) % EVERY == 0 || step + 1 == steps {
            let recent = &losses[losses.len().saturating_sub(EVERY)..];
            report(
                &model,
                step + 1,
                recent.iter().sum::<f64>() / recent.len() as f64,
            )?;
        }
    }
    std::fs::create_dir_all(&out)?;
    for file in ["tokenizer.json", "preprocessor_config.json"] {
        std::fs::copy(
            std::path::Path::new("assets/llava-mini").join(file),
            out.join(file),
        )?;
    }
    llava_cmoe::llava::export::save_hf(&model.valid(), &config, &out, burn::tensor::DType::F16)?;
    Ok(())
}
