//! The streamed training set on a Mini-CoIN task damaged on purpose (one image missing, one
//! image corrupt): the missing image is found when the task is opened, the corrupt one when its
//! batch loads, each counted once however many passes are made; every pass yields the same
//! batches; a skip lands exactly on the batch a full read reaches; PGKE's two subsets are
//! disjoint; and `--bad-samples error` stops at the corrupt image, naming it.

mod common;

use std::sync::Arc;

use cmoe_test_support::scratch;
use common::fixture;
use llava_cmoe::coin::format::read_train;
use llava_cmoe::coin::mini::{MiniCoinConfig, generate};
use llava_cmoe::data::prompt::Conversation;
use llava_cmoe::dataset::CoinEncoder;
use llava_cmoe::loader::{BadSamples, ProblemKind, StreamSettings, StreamedTask};
use llava_cmoe::moe::train::TrainBatch;
use llava_cmoe::moe::train::{BatchSource, TaskSource};
use llava_cmoe::pipeline::LlavaPipeline;

type B = burn_flex::Flex;

/// A batch's rows, token ids and pixels, for comparing batches.
type Contents = (usize, Vec<i64>, Vec<f32>);

fn contents(batch: &TrainBatch<B>) -> Contents {
    let rows = batch.labels.dims()[0];
    let ids = batch.input.input_ids.to_data().iter::<i64>().collect();
    let pixels = batch.input.pixel_values.as_ref().unwrap().to_data();
    (rows, ids, pixels.iter::<f32>().collect())
}

fn pass(source: &mut dyn BatchSource<B>) -> Vec<(usize, Contents)> {
    (0..source.len())
        .map(|_| {
            let (position, batch) = source.next_batch().unwrap();
            (position, contents(&batch))
        })
        .collect()
}

#[test]
fn streamed_batches_repeat_skip_exactly_and_count_bad_samples_once() {
    let device = Default::default();
    let data = scratch("loader").join("data");
    let config = MiniCoinConfig {
        train_per_task: 10,
        test_per_task: 1,
        ..MiniCoinConfig::default()
    };
    generate(&config, &data, |_| {}).unwrap();
    let path = data.join("Instructions/GQA/train.json");
    let records = read_train(&path).unwrap();
    let images = data.join("images");
    std::fs::remove_file(images.join(&records[2].image)).unwrap();
    std::fs::write(images.join(&records[5].image), b"not an image").unwrap();

    let pipe = LlavaPipeline::<B>::load(&fixture("tiny-llava"), &device).unwrap();
    let encoder = Arc::new(CoinEncoder {
        tokenizer: pipe.tokenizer.clone(),
        processor: pipe.processor.clone(),
        conversation: Conversation::vicuna_v1(),
        tokens_per_image: pipe.config.image_tokens_per_image(),
        image_root: images,
    });
    let settings = StreamSettings {
        batch: 3,
        probe_fraction: 0.2,
        workers: 2,
        pad: 0,
        policy: BadSamples::Skip,
        seed: 7,
    };
    let task = StreamedTask::<B>::open(encoder.clone(), &path, settings, &device).unwrap();
    let opened = task.report();
    assert_eq!(opened.used, 9);
    assert_eq!(opened.count(ProblemKind::MissingImage), 1);
    assert_eq!(opened.problems[0].at, records[2].id);

    // Nine samples in batches of 3; one of them turns out unreadable.
    let mut train = task.train();
    assert_eq!(train.len(), 3);
    let first = pass(&mut *train);
    let second = pass(&mut *train);
    assert_eq!(first, second, "a second pass yields other batches");
    assert_eq!(
        first.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    let report = task.report();
    assert_eq!(report.used, 8);
    assert_eq!(report.count(ProblemKind::UnreadableImage), 1, "{report:?}");
    assert_eq!(report.problems.len(), 2, "each problem once: {report:?}");
    let rows: usize = first.iter().map(|(_, (rows, ..))| rows).sum();
    assert_eq!(rows, 8);

    // A fresh source skipping four batches (one pass and one batch) reads the second batch.
    let mut skipping = task.train();
    skipping.skip(4).unwrap();
    let (position, batch) = skipping.next_batch().unwrap();
    assert_eq!((position, contents(&batch)), first[1]);

    // PGKE's subsets: 2 samples each (20 % of 9, rounded up), disjoint.
    let probe_train = pass(&mut *task.probe_train());
    let probe_eval = pass(&mut *task.probe_eval());
    assert_eq!((probe_train.len(), probe_eval.len()), (1, 1));
    assert_ne!(probe_train[0].1, probe_eval[0].1);

    // Under --bad-samples error the corrupt image stops the pass that meets it.
    let strict = StreamSettings {
        policy: BadSamples::Error,
        ..settings
    };
    // (Without the missing image, which would stop the run when the task is opened.)
    let mut raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    raw.as_array_mut().unwrap().remove(2);
    std::fs::write(&path, raw.to_string()).unwrap();
    let task = StreamedTask::<B>::open(encoder, &path, strict, &device).unwrap();
    let mut train = task.train();
    let error = (0..train.len())
        .map(|_| train.next_batch())
        .find_map(Result::err)
        .expect("the corrupt image stops the pass");
    assert!(error.to_string().contains(&records[5].id), "{error}");
    let _ = std::fs::remove_dir_all(&data);
}
