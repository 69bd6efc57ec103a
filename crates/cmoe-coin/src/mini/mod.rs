//! Mini-CoIN: eight synthetic vision-language tasks that mirror CoIN's skills and order,
//! generated deterministically from a seed and written in CoIN's own formats, so that the CoIN
//! loader and scorers serve both.
//!
//! Layout under the output folder:
//! - `Instructions/<Task>/train.json`: LLaVA conversation JSON;
//! - `Instructions/<Task>/test.json`: CoIN test JSON (grounding adds `answer_bbox` and `size`);
//! - `images/<Task>/{train,test}/<index>.png`: the images (paths in the JSON are relative to
//!   `images/`);
//! - `Initialisation/train.json` and `images/Initialisation/<index>.png` (when `init_samples`
//!   is not 0): the initial phase's data, descriptions from the small LLaVA's pretraining
//!   mixture ([`captions`]) drawn from a stream of their own, none of the eight tasks;
//! - `mini-coin.json`: the config it was generated with and the task list in order.
//!
//! Train and test samples come from separate random streams (seeded by seed, task and split),
//! so a test image is never a training image by construction of the stream (duplicates by
//! chance are possible for the smallest tasks' answer spaces, as in any sampled benchmark).

pub mod captions;
pub mod draw;
pub mod instructions;
pub mod tasks;

use std::path::Path;

use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::error::CoinError;
use crate::format::{QuestionId, TestRecord, TrainRecord, Turn, write_json};
use crate::score::TaskType;

/// Mini-CoIN's tasks in CoIN's order: folder name and task type.
pub const TASKS: [(&str, TaskType); 8] = [
    ("ScienceQA", TaskType::ScienceQa),
    ("TextVQA", TaskType::TextVqa),
    ("ImageNet", TaskType::ImageNet),
    ("GQA", TaskType::Gqa),
    ("VizWiz", TaskType::VizWiz),
    ("Grounding", TaskType::Grounding),
    ("VQAv2", TaskType::Vqav2),
    ("OCRVQA", TaskType::OcrVqa),
];

/// Sizes and seed of a Mini-CoIN build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MiniCoinConfig {
    /// Seed of every random stream.
    pub seed: u64,
    /// Image side in pixels.
    pub image_size: u32,
    /// Training samples per task.
    pub train_per_task: usize,
    /// Test questions per task.
    pub test_per_task: usize,
    /// Samples of the initialisation set (0: none written).
    #[serde(default)]
    pub init_samples: usize,
}

/// The initialisation set's folder (under the output folder and under `images/`).
pub const INIT_FOLDER: &str = "Initialisation";

impl Default for MiniCoinConfig {
    fn default() -> Self {
        Self {
            seed: 2024,
            image_size: 64,
            train_per_task: 1500,
            test_per_task: 100,
            init_samples: 0,
        }
    }
}

#[derive(Serialize)]
struct Manifest<'a> {
    format: &'static str,
    config: &'a MiniCoinConfig,
    tasks: Vec<&'static str>,
}

/// The random stream of one task's split.
fn stream(config: &MiniCoinConfig, task: usize, test: bool) -> StdRng {
    let salt = ((task as u64 + 1) * 0x9E37_79B9_7F4A_7C15) ^ if test { 0xA5A5_0000 } else { 0 };
    StdRng::seed_from_u64(config.seed ^ salt)
}

/// Generates Mini-CoIN into `out` (created if needed; existing files are overwritten).
/// `on_task` is called after each task with its name.
pub fn generate(
    config: &MiniCoinConfig,
    out: &Path,
    mut on_task: impl FnMut(&str),
) -> Result<(), CoinError> {
    if config.image_size < 32 || config.train_per_task == 0 || config.test_per_task == 0 {
        return Err(CoinError::invalid(
            out,
            None,
            "Mini-CoIN needs images of at least 32 px and at least one train and test sample",
        ));
    }
    for (index, &(name, task)) in TASKS.iter().enumerate() {
        let mut train = Vec::with_capacity(config.train_per_task);
        let mut rng = stream(config, index, false);
        for i in 0..config.train_per_task {
            let sample = tasks::sample(task, &mut rng, config.image_size);
            let image = format!("{name}/train/{i:06}.png");
            save_png(&sample.image, &out.join("images").join(&image))?;
            train.push(conversation(
                format!("{name}-train-{i}"),
                image,
                &sample.question,
                sample.answer,
            ));
        }
        let mut test = Vec::with_capacity(config.test_per_task);
        let mut rng = stream(config, index, true);
        for i in 0..config.test_per_task {
            let sample = tasks::sample(task, &mut rng, config.image_size);
            let image = format!("{name}/test/{i:06}.png");
            save_png(&sample.image, &out.join("images").join(&image))?;
            let size = config.image_size as f64;
            test.push(TestRecord {
                question_id: QuestionId(format!("{name}-{i}")),
                image,
                text: sample.question,
                answer: Some(sample.answer),
                answers: None,
                answer_bbox: sample
                    .bbox
                    .map(|b| format!("[{:.2},{:.2},{:.2},{:.2}]", b[0], b[1], b[2], b[3])),
                size: sample.bbox.map(|_| [size, size]),
            });
        }
        let dir = out.join("Instructions").join(name);
        write_json(&dir.join("train.json"), &train)?;
        write_json(&dir.join("test.json"), &test)?;
        on_task(name);
    }
    if config.init_samples > 0 {
        let mut rng = StdRng::seed_from_u64(config.seed ^ 0x1_417_1A15);
        let init: Vec<TrainRecord> = (0..config.init_samples)
            .map(|i| {
                let sample = captions::sample(&mut rng, config.image_size);
                let image = format!("{INIT_FOLDER}/{i:06}.png");
                save_png(&sample.image, &out.join("images").join(&image))?;
                Ok(conversation(
                    format!("init-{i}"),
                    image,
                    &sample.question,
                    sample.answer,
                ))
            })
            .collect::<Result<_, CoinError>>()?;
        write_json(&out.join(INIT_FOLDER).join("train.json"), &init)?;
        on_task(INIT_FOLDER);
    }
    write_json(
        &out.join("mini-coin.json"),
        &Manifest {
            format: "llava-cmoe/mini-coin/1",
            config,
            tasks: TASKS.iter().map(|t| t.0).collect(),
        },
    )
}

/// A one-turn LLaVA conversation record about `image`.
fn conversation(id: String, image: String, question: &str, answer: String) -> TrainRecord {
    TrainRecord {
        id,
        image,
        conversations: vec![
            Turn {
                from: "human".into(),
                value: format!("<image>\n{question}"),
            },
            Turn {
                from: "gpt".into(),
                value: answer,
            },
        ],
    }
}

fn save_png(image: &image::RgbImage, path: &Path) -> Result<(), CoinError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| CoinError::io(dir, e))?;
    }
    image.save(path).map_err(|e| CoinError::io(path, e))
}
