//! Mini-CoIN: deterministic from its seed, in CoIN's formats, and self-consistent (the
//! reference answers score 100 with the CoIN scorers, in both modes).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use cmoe_coin::format::{Prediction, read_test, read_train};
use cmoe_coin::mini::{MiniCoinConfig, TASKS, generate};
use cmoe_coin::score::{Compat, TaskType, score};

fn build(name: &str, config: &MiniCoinConfig) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("cmoe-mini-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut done = Vec::new();
    generate(config, &dir, |t| done.push(t.to_string())).unwrap();
    let mut expected: Vec<String> = TASKS.map(|t| t.0.to_string()).to_vec();
    if config.init_samples > 0 {
        expected.push(cmoe_coin::mini::INIT_FOLDER.to_string());
    }
    assert_eq!(done, expected);
    dir
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, std::fs::read(&path).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_same_seed_gives_the_same_files_and_another_seed_does_not() {
    let config = MiniCoinConfig {
        train_per_task: 6,
        test_per_task: 4,
        init_samples: 3,
        ..MiniCoinConfig::default()
    };
    let a = build("a", &config);
    let b = build("b", &config);
    let fa = files(&a);
    // Per task 6 + 4 images and two JSON files; the manifest; the initialisation set's 3
    // images and its train.json.
    assert_eq!(fa.len(), 8 * (6 + 4 + 2) + 1 + 3 + 1);
    let init = read_train(&a.join("Initialisation/train.json")).unwrap();
    assert_eq!(init.len(), 3);
    for r in &init {
        assert!(a.join("images").join(&r.image).is_file(), "{}", r.image);
    }
    assert_eq!(fa, files(&b));
    let c = build("c", &MiniCoinConfig { seed: 7, ..config });
    assert_ne!(fa, files(&c));
    for d in [a, b, c] {
        let _ = std::fs::remove_dir_all(d);
    }
}

#[test]
fn reference_answers_score_100_and_answers_vary() {
    let config = MiniCoinConfig {
        train_per_task: 40,
        test_per_task: 60,
        ..MiniCoinConfig::default()
    };
    let dir = build("score", &config);
    for (name, task) in TASKS {
        let train = read_train(&dir.join("Instructions").join(name).join("train.json")).unwrap();
        assert_eq!(train.len(), 40);
        for r in &train {
            assert!(dir.join("images").join(&r.image).is_file(), "{}", r.image);
            assert!(r.conversations[0].value.starts_with("<image>\n"));
            assert_eq!(r.conversations[1].from, "gpt");
        }
        let test = read_test(&dir.join("Instructions").join(name).join("test.json")).unwrap();
        let oracle: Vec<Prediction> = test
            .iter()
            .map(|t| Prediction {
                question_id: t.question_id.clone(),
                text: t.answer.clone().unwrap(),
            })
            .collect();
        for compat in [Compat::Correct, Compat::Coin] {
            let s = score(task, &test, &oracle, compat).unwrap();
            // CoIN's own quirks cost its scripts points on a perfect answer sheet: its
            // grounding parser cuts the box text, its OCR-VQA skips "Unanswerable".
            if compat == Compat::Correct || task != TaskType::Grounding {
                assert_eq!(s.accuracy, 100.0, "{name} {compat:?}");
            }
        }
        let answers: HashSet<&str> = test.iter().map(|t| t.answer.as_deref().unwrap()).collect();
        assert!(answers.len() >= 3, "{name}: answers {answers:?}");
        if task == TaskType::VizWiz {
            let unanswerable = test
                .iter()
                .filter(|t| t.answer.as_deref() == Some("unanswerable"))
                .count();
            assert!((5..=35).contains(&unanswerable), "{unanswerable} of 60");
        }
        if task == TaskType::Grounding {
            assert!(
                test.iter()
                    .all(|t| t.answer_bbox.is_some() && t.size == Some([64.0, 64.0]))
            );
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn class_names_are_no_other_tasks_answers_and_words_fit_a_row() {
    use cmoe_coin::mini::tasks::{CLASSES, reading_vocabulary};
    let config = MiniCoinConfig {
        train_per_task: 1,
        test_per_task: 100,
        ..MiniCoinConfig::default()
    };
    let dir = build("classes", &config);
    let mut imagenet = HashSet::new();
    let mut others = HashSet::new();
    for (name, task) in TASKS {
        for t in read_test(&dir.join("Instructions").join(name).join("test.json")).unwrap() {
            let answer = t.answer.unwrap();
            if task == TaskType::ImageNet {
                imagenet.insert(answer);
            } else {
                others.insert(answer);
            }
        }
    }
    let classes: HashSet<String> = CLASSES.iter().map(|c| c.2.to_string()).collect();
    assert!(
        imagenet.is_subset(&classes) && imagenet.len() >= 10,
        "{imagenet:?}"
    );
    assert!(
        imagenet.is_disjoint(&others),
        "{:?}",
        imagenet.intersection(&others).collect::<Vec<_>>()
    );
    // Two-patch glyphs: four letters fill a 64 px row.
    for word in reading_vocabulary() {
        assert!(word.len() <= 4, "{word}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_instruction_mixture_uses_none_of_the_tasks_templates_or_answer_formats() {
    use cmoe_coin::mini::instructions;
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut questions = HashSet::new();
    for _ in 0..2000 {
        let s = instructions::sample(&mut rng, 64);
        for template in [
            "single word or phrase",
            "option's letter",
            "Unanswerable",
            "bounding box",
            "What is the object in the image?",
        ] {
            assert!(!s.question.contains(template), "{}", s.question);
        }
        // Sentences, never a bare word, letter, digit or fractional box.
        assert!(s.answer.ends_with('.'), "{}", s.answer);
        assert!(!s.answer.contains("0."), "{}", s.answer);
        questions.insert(s.question.split(' ').take(3).collect::<Vec<_>>().join(" "));
    }
    assert!(questions.len() >= 11, "{questions:?}");
}

#[test]
fn held_out_scoring_takes_the_reference_and_rejects_other_answers() {
    use cmoe_coin::mini::instructions::{Kind, sample_of};
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    for kind in Kind::ALL {
        for _ in 0..20 {
            let s = sample_of(kind, &mut rng, 64);
            assert!(
                kind.is_correct(&s.answer, &s.answer),
                "{kind:?}: {}",
                s.answer
            );
            let shouted = format!("  {}!", s.answer.to_uppercase().trim_end_matches('.'));
            assert!(kind.is_correct(&shouted, &s.answer), "{kind:?}: {shouted}");
            assert!(!kind.is_correct("", &s.answer), "{kind:?}");
        }
    }
    let sentence = Kind::Colour;
    assert!(!sentence.is_correct("The circle is blue.", "The circle is red."));
    assert!(!sentence.is_correct("The circle is red, I think.", "The circle is red."));
    // Boxes count from IoU > 0.5 (Grounding's criterion), not the digits.
    let reference = "From (8, 16) to (24, 32).";
    assert!(Kind::Corners.is_correct("From (9, 16) to (24, 31).", reference));
    assert!(!Kind::Corners.is_correct("From (16, 16) to (32, 32).", reference));
    assert!(!Kind::Corners.is_correct("From (8, 16) to", reference));
}

#[test]
fn the_mixture_is_the_stream_the_shipped_base_was_pretrained_on() {
    // A fingerprint (FNV-1a) of the first 2,000 instruction samples of one stream: changing the
    // mixture or its draws changes what `cargo xtask pretrain` trains on, so the shipped base
    // (assets/llava-mini) must be pretrained again and this fingerprint updated with it.
    use cmoe_coin::mini::instructions;
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for _ in 0..2000 {
        let s = instructions::sample(&mut rng, 64);
        let bytes = [s.question.as_bytes(), s.answer.as_bytes(), s.image.as_raw()];
        for byte in bytes.into_iter().flatten() {
            hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    assert_eq!(hash, FINGERPRINT, "{hash:#x}");
}

const FINGERPRINT: u64 = 0x3f23_1e41_fa16_b911;
