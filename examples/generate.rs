//! A HF LLaVA directory answers a question about an image (greedy decoding, on the CPU).
//!
//! ```text
//! cargo run --release --example generate
//! cargo run --release --example generate -- MODEL_DIR IMAGE "What is in the picture?"
//! ```
//!
//! With no arguments the shipped small LLaVA (`assets/llava-mini`) is asked one question of
//! the kind it was instruction-tuned on, about a picture it never saw (drawn here by
//! Mini-CoIN's instruction generator with a seed of its own), and the reference answer is
//! printed beside its own. With arguments, any LLaVA-1.5 directory in HF layout (config,
//! safetensors, `tokenizer.json`) answers the question; the prompt is LLaVA-1.5's (Vicuna v1).

use std::path::PathBuf;

use anyhow::Context;
use llava_cmoe::coin::mini::instructions;
use llava_cmoe::data::prompt::Conversation;
use llava_cmoe::llava::Sampling;
use llava_cmoe::pipeline::LlavaPipeline;
use rand::SeedableRng;
use rand::rngs::StdRng;

type B = burn_flex::Flex;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model, image, question, reference) = match args.as_slice() {
        [] => {
            // A question of the small LLaVA's own instruction mixture, on a fresh picture.
            let sample = instructions::sample(&mut StdRng::seed_from_u64(7), 64);
            let image =
                std::env::temp_dir().join(format!("cmoe-generate-{}.png", std::process::id()));
            sample
                .image
                .save(&image)
                .with_context(|| format!("cannot write {}", image.display()))?;
            let model = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("assets/llava-mini");
            (model, image, sample.question, Some(sample.answer))
        }
        [model, image, question] => (model.into(), image.into(), question.clone(), None),
        _ => anyhow::bail!("usage: generate [MODEL_DIR IMAGE QUESTION]"),
    };
    let device = Default::default();
    let pipe = LlavaPipeline::<B>::load(&model, &device)?;
    let pixels = pipe.preprocess(&image)?;
    let prompt = Conversation::vicuna_v1().prompt(&format!("<image>\n{question}"));
    let answer = pipe.generate(&prompt, Some(&pixels), 24, Sampling::Greedy)?;
    println!("model:     {}", model.display());
    println!("image:     {}", image.display());
    println!("question:  {question}");
    println!("answer:    {}", answer.text.trim());
    if let Some(reference) = reference {
        println!("reference: {reference}");
    }
    Ok(())
}
