//! Experiment: can stage 2 teach the shipped base to look up the label of the option it
//! perceives (ScienceQA's missing skill)? Continues instruction tuning of a base (the
//! pretraining's mixture, 20 % captions, batch 16, AdamW, warmup 5 % then cosine) with a share
//! `LOOKUP` of the instruction samples replaced by labelled colour choices: the mixture's own
//! colour-choice picture, its options listed with labels (capital letters, lower-case letters
//! or digits; `A.`, `A)` or `(A)`; one per line or inline), answered `Option B.`. Prints the
//! held-out accuracy per kind of the shipped mixture (50 per kind) and of 100 held-out labelled
//! choices (with the answers' labels counted) every `EVERY` steps, and saves the result in HF
//! layout (float16, the shipped tokenizer and processor) to OUT. With `KEY=text` the question
//! names the colour to find ("Which option is red?"): a lookup in the text alone.
//!
//! It is `../2026-12-03-base-skills/continue_stage2.rs` (the same loading, optimiser and
//! training loop) with the labelled choices and their held-out check added; each stays a
//! single file to copy into `examples/` (a diff between them would be longer than this file).
//!
//! Copied to `examples/` and registered in Cargo.toml as an `[[example]]` with
//! `required-features = ["flex"]`, on d5ccb6a:
//!
//! [BASE=DIR] [KEY=text] cargo run --release --features flex --example continue_lookup -- \
//!     STEPS PEAK_LR LOOKUP OUT

use std::collections::BTreeMap;

use burn::backend::Autodiff;
use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::ElementConversion;
use burn_flex::Flex;
use llava_cmoe::coin::format::{TrainRecord, Turn};
use llava_cmoe::coin::mini::tasks::Sample;
use llava_cmoe::coin::mini::{captions, instructions};
use llava_cmoe::data::prompt::Conversation;
use llava_cmoe::dataset::{CoinEncoder, collate_prompts, collate_train};
use llava_cmoe::instruction_accuracy::instruction_accuracy;
use llava_cmoe::llava::{GenerationConfig, Sampling};
use llava_cmoe::moe::train::{causal_lm_loss, learning_rate};
use llava_cmoe::observer::Silent;
use llava_cmoe::pipeline::LlavaPipeline;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

const EVERY: usize = 200;

/// The mixture's colour choice with its options labelled, answered with the right one's label.
fn labelled_choice(rng: &mut impl Rng, size: u32) -> Sample {
    let mut s = instructions::sample_of(instructions::Kind::ColourChoice, rng, size);
    // "Which of these colours is in the picture: red, blue or green?" -> "Red."
    let list = s.question.split_once(": ").expect("options").1.trim_end_matches('?');
    let (rest, last) = list.rsplit_once(" or ").expect("or");
    let mut options: Vec<&str> = rest.split(", ").collect();
    options.push(last);
    let present = s.answer.trim_end_matches('.').to_lowercase();
    let labels: [&str; 4] = match rng.random_range(0..3) {
        0 => ["A", "B", "C", "D"],
        1 => ["a", "b", "c", "d"],
        _ => ["1", "2", "3", "4"],
    };
    let style = rng.random_range(0..3);
    let listed: Vec<String> = options
        .iter()
        .zip(labels)
        .map(|(o, l)| match style {
            0 => format!("{l}. {o}"),
            1 => format!("{l}) {o}"),
            _ => format!("({l}) {o}"),
        })
        .collect();
    let listed = if rng.random_bool(0.5) {
        format!("\n{}", listed.join("\n"))
    } else {
        format!(" {}", listed.join(", "))
    };
    let label = labels[options.iter().position(|o| *o == present).expect("present")];
    s.question = if std::env::var("KEY").is_ok_and(|k| k == "text") {
        format!("Which option is {present}?{listed}")
    } else {
        format!("Which option names a colour in the picture?{listed}")
    };
    s.answer = format!("Option {label}.");
    s
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = args[1].parse()?;
    let peak: f64 = args[2].parse()?;
    let lookup: f64 = args[3].parse()?;
    let out = std::path::PathBuf::from(&args[4]);
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
    let held_out: Vec<Sample> = {
        let mut rng = StdRng::seed_from_u64(4242);
        (0..100).map(|_| labelled_choice(&mut rng, size)).collect()
    };
    let generation = GenerationConfig {
        max_new_tokens: 8,
        eos_token_ids: config.text_config.eos_token_id.clone(),
        pad_token_id: pad,
        sampling: Sampling::Greedy,
    };
    let report = |model: &llava_cmoe::llava::Llava<B>, step: usize, loss: f64| {
        let valid = model.valid();
        let (a, _) = instruction_accuracy(&valid, &encoder, &config, (0, 50), &device, &Silent)?;
        let kinds: Vec<String> =
            a.kinds.iter().map(|k| format!("{} {:.0}", k.kind, k.accuracy)).collect();
        let mut right = 0;
        let mut said: BTreeMap<String, usize> = BTreeMap::new();
        for chunk in held_out.chunks(16) {
            let prompts = chunk
                .iter()
                .map(|s| {
                    encoder.encode_question(&s.question, encoder.processor.preprocess(&s.image))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let input = collate_prompts(&prompts, pad, &device);
            let ids = llava_cmoe::llava::generation::generate(&valid, input.into(), &generation)?;
            for (s, ids) in chunk.iter().zip(ids) {
                let answer = encoder.tokenizer.decode(&ids)?.trim().to_string();
                right += usize::from(answer == s.answer);
                let label = answer.trim_start_matches("Option ").trim_end_matches('.');
                *said.entry(label.to_string()).or_default() += 1;
            }
        }
        println!(
            "step {step} loss {loss:.3} mean {:.2}: {}; labelled choice {right}/100, labels said {said:?}",
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
                } else if rng.random_bool(lookup) {
                    labelled_choice(&mut rng, size)
                } else {
                    let kind = *instructions::Kind::ALL.choose(&mut rng).expect("kinds");
                    instructions::sample_of(kind, &mut rng, size)
                };
                let record = TrainRecord {
                    id: format!("{step}-{i}"),
                    image: String::new(),
                    conversations: vec![
                        Turn { from: "human".into(), value: format!("<image>\n{}", s.question) },
                        Turn { from: "gpt".into(), value: s.answer },
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
            report(&model, step + 1, recent.iter().sum::<f64>() / recent.len() as f64)?;
        }
    }
    std::fs::create_dir_all(&out)?;
    for file in ["tokenizer.json", "preprocessor_config.json"] {
        std::fs::copy(std::path::Path::new(&base).join(file), out.join(file))?;
    }
    llava_cmoe::llava::export::save_hf(&model.valid(), &config, &out, burn::tensor::DType::F16)?;
    Ok(())
}
