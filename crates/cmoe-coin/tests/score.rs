//! The scorers on hand-written cases, in both modes, including CoIN's quirks.

use cmoe_coin::format::{Prediction, QuestionId, TestRecord, read_predictions, read_test};
use cmoe_coin::score::{
    Compat, ScoreError, TaskType, box_in_text, iou, option_letter, score, stated_option,
};

fn q(id: &str, answer: &str) -> TestRecord {
    TestRecord {
        question_id: QuestionId(id.into()),
        image: format!("{id}.png"),
        text: "question".into(),
        answer: Some(answer.into()),
        answers: None,
        answer_bbox: None,
        size: None,
    }
}

fn p(id: &str, text: &str) -> Prediction {
    Prediction {
        question_id: QuestionId(id.into()),
        text: text.into(),
    }
}

fn acc(task: TaskType, a: &[TestRecord], r: &[Prediction], compat: Compat) -> f64 {
    score(task, a, r, compat).unwrap().accuracy
}

#[test]
fn scienceqa_reads_the_option_letter_like_coin() {
    assert_eq!(option_letter("B"), Some('B'));
    assert_eq!(option_letter("C. a fox"), Some('C'));
    assert_eq!(option_letter("The answer is b."), Some('B'));
    assert_eq!(option_letter("(d)"), Some('D'));
    assert_eq!(option_letter("none of these"), None);
    let a = [
        q("1", "A"),
        q("2", "C"),
        q("3", "B"),
        q("4", "D"),
        q("5", "A"),
    ];
    let r = [
        p("1", "A"),
        p("2", "C. water"),
        p("3", "It is a cat"),
        p("5", "a blue square"),
    ];
    // CoIN reads "It is a cat" and "a blue square" as "A" (their first one-letter word), so
    // free text about a square scores on question 5; question 4 has no result.
    assert_eq!(acc(TaskType::ScienceQa, &a, &r, Compat::Coin), 60.0);
    // Read as the metric intends, neither states an option.
    assert_eq!(acc(TaskType::ScienceQa, &a, &r, Compat::Correct), 40.0);
}

#[test]
fn scienceqa_by_default_reads_only_a_stated_option() {
    for (text, letter) in [
        ("B", Some('B')),
        ("C. a fox", Some('C')),
        ("(D)", Some('D')),
        ("E:", Some('E')),
        ("The answer is B.", Some('B')),
        (" A", Some('A')),
        ("A blue square", None),
        ("a blue square", None),
        ("It is a cat", None),
        ("The answer is b.", None),
        ("ABC", None),
        ("", None),
    ] {
        assert_eq!(stated_option(text), letter, "{text:?}");
    }
}

#[test]
fn textvqa_is_vqa_accuracy_over_annotators() {
    let mut rec = q("1", "");
    rec.answer = None;
    rec.answers = Some(
        [
            "Coca Cola",
            "coca-cola",
            "coca cola",
            "coke",
            "coca cola",
            "coca cola",
            "cola",
            "cola",
            "coca cola.",
            "pepsi",
        ]
        .map(String::from)
        .to_vec(),
    );
    // "coca cola" after normalisation: 5 annotators ("Coca Cola", "coca cola" x3, "coca cola.");
    // each of them sees 4 others (min(1, 4/3) = 1), each other annotator sees 5: all 1.
    let s = score(
        TaskType::TextVqa,
        &[rec.clone()],
        &[p("1", "Coca Cola")],
        Compat::Correct,
    )
    .unwrap();
    assert_eq!(s.accuracy, 100.0);
    // "cola": 2 annotators. Each of those sees 1 other (1/3); the 8 others see 2 (2/3).
    let s = score(
        TaskType::TextVqa,
        &[rec.clone()],
        &[p("1", "the cola")],
        Compat::Correct,
    )
    .unwrap();
    assert!((s.correct - (2.0 / 3.0 + 8.0 * 2.0 / 3.0) / 10.0).abs() < 1e-12);
    // "coke": 1 annotator: 0 for that one, 1/3 for the 9 others.
    let s = score(TaskType::TextVqa, &[rec], &[p("1", "Coke")], Compat::Coin).unwrap();
    assert!((s.correct - 0.3).abs() < 1e-12);
    // A single reference answer: an exact match after normalisation.
    let s = score(
        TaskType::TextVqa,
        &[q("2", "Two Dogs")],
        &[p("2", "2 dogs.")],
        Compat::Correct,
    )
    .unwrap();
    assert_eq!(s.correct, 1.0);
}

#[test]
fn imagenet_substring_either_way_and_coins_empty_prediction() {
    let a = [
        q("1", "golden retriever"),
        q("2", "tabby cat"),
        q("3", "goldfish"),
    ];
    let r = [
        p("1", "retriever"),
        p("2", "a tabby cat sitting"),
        p("3", ""),
    ];
    assert!((acc(TaskType::ImageNet, &a, &r, Compat::Correct) - 200.0 / 3.0).abs() < 1e-9);
    // CoIN: "" is in every answer.
    assert_eq!(acc(TaskType::ImageNet, &a, &r, Compat::Coin), 100.0);
    // Case-sensitive in both.
    assert_eq!(
        acc(
            TaskType::ImageNet,
            &a[..1],
            &[p("1", "Golden Retriever")],
            Compat::Correct
        ),
        0.0
    );
}

#[test]
fn gqa_lowercase_exact_match_without_trailing_period() {
    let a = [q("1", "left"), q("2", "wooden table")];
    let r = [p("1", "Left."), p("2", "  wooden table ")];
    assert_eq!(acc(TaskType::Gqa, &a, &r, Compat::Correct), 100.0);
    // CoIN strips one leading space only, and not trailing spaces.
    assert_eq!(acc(TaskType::Gqa, &a, &r, Compat::Coin), 50.0);
}

#[test]
fn vizwiz_vqav2_case_insensitive_exact_match() {
    let a = [q("1", "unanswerable"), q("2", "yes")];
    let r = [p("1", "Unanswerable"), p("2", "yes ")];
    for task in [TaskType::VizWiz, TaskType::Vqav2] {
        assert_eq!(acc(task, &a, &r, Compat::Correct), 100.0);
        assert_eq!(acc(task, &a, &r, Compat::Coin), 50.0);
    }
}

#[test]
fn ocrvqa_coin_skips_unanswerable_but_counts_it() {
    let a = [q("1", "Unanswerable"), q("2", "The Hobbit")];
    let r = [p("1", "Unanswerable"), p("2", "the hobbit")];
    assert_eq!(acc(TaskType::OcrVqa, &a, &r, Compat::Correct), 100.0);
    assert_eq!(acc(TaskType::OcrVqa, &a, &r, Compat::Coin), 50.0);
}

#[test]
fn grounding_iou_and_coins_cut_box() {
    assert_eq!(
        box_in_text("[0.1, 0.2, 0.5, 0.6]"),
        Some([0.1, 0.2, 0.5, 0.6])
    );
    assert_eq!(box_in_text("0.1,0.2,0.5,0.6"), Some([0.1, 0.2, 0.5, 0.6]));
    assert_eq!(box_in_text("[0.5, 0.2, 0.1, 0.6]"), None, "x2 < x1");
    assert_eq!(box_in_text("[0.1, 0.2, 0.5]"), None);
    assert!((iou([0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 3.0]) - 1.0 / 7.0).abs() < 1e-12);
    let mut a = q("1", "");
    a.answer = None;
    a.answer_bbox = Some("[0.10,0.20,0.50,0.60]".into());
    a.size = Some([640.0, 480.0]);
    let mut b = a.clone();
    b.question_id = QuestionId("2".into());
    let a = [a, b];
    // Both results are right as written. CoIN removes the brackets, then one more character
    // at each end: result 1 becomes ".12,0.2,0.5,0.6" (still a hit), result 2 becomes
    // ".1,0.2,0.5,0." (y2 = 0: a miss).
    let r = [p("1", "[0.12,0.2,0.5,0.61]"), p("2", "[0.1,0.2,0.5,0.6]")];
    assert_eq!(acc(TaskType::Grounding, &a, &r, Compat::Correct), 100.0);
    assert_eq!(acc(TaskType::Grounding, &a, &r, Compat::Coin), 50.0);
}

#[test]
fn denominators_missing_duplicate_and_unknown_results() {
    let a = [q("1", "yes"), q("2", "no")];
    // One question unanswered: the correct denominator is 2, CoIN's is 1.
    let r = [p("1", "yes")];
    assert_eq!(acc(TaskType::Vqav2, &a, &r, Compat::Correct), 50.0);
    assert_eq!(acc(TaskType::Vqav2, &a, &r, Compat::Coin), 100.0);
    // Either way the unanswered question is counted, for the user to be told.
    for compat in [Compat::Correct, Compat::Coin] {
        assert_eq!(score(TaskType::Vqav2, &a, &r, compat).unwrap().missing, 1);
        assert_eq!(
            score(TaskType::ScienceQa, &a, &r, compat).unwrap().missing,
            1
        );
    }
    assert_eq!(
        score(
            TaskType::Vqav2,
            &a,
            &[p("1", "yes"), p("2", "no")],
            Compat::Correct
        )
        .unwrap()
        .missing,
        0
    );
    let dup = [p("1", "yes"), p("1", "no")];
    assert_eq!(
        score(TaskType::Vqav2, &a, &dup, Compat::Correct),
        Err(ScoreError::Duplicate(QuestionId("1".into())))
    );
    let unknown = [p("9", "yes")];
    for compat in [Compat::Correct, Compat::Coin] {
        assert_eq!(
            score(TaskType::Vqav2, &a, &unknown, compat),
            Err(ScoreError::UnknownQuestion(QuestionId("9".into())))
        );
    }
}

#[test]
fn files_numeric_ids_textvqa_layout_and_errors_name_the_place() {
    let dir = std::env::temp_dir().join(format!("cmoe-coin-score-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let test = dir.join("test.json");
    std::fs::write(&test, r#"{"data": [{"question_id": 7, "answers": ["a"]}]}"#).unwrap();
    let records = read_test(&test).unwrap();
    assert_eq!(records[0].question_id, QuestionId("7".into()));
    let results = dir.join("results.jsonl");
    std::fs::write(
        &results,
        "{\"question_id\": 7, \"text\": \"x\"}\n\n{\"question_id\": 8,\n",
    )
    .unwrap();
    let err = read_predictions(&results).unwrap_err().to_string();
    assert!(
        err.contains("results.jsonl:3") && err.contains("malformed"),
        "{err}"
    );
    std::fs::write(&test, "[]").unwrap();
    let err = read_test(&test).unwrap_err().to_string();
    assert!(
        err.contains("test.json") && err.contains("no questions"),
        "{err}"
    );
    std::fs::write(&test, "[{\"image\": \"x.png\"}]").unwrap();
    let err = read_test(&test).unwrap_err().to_string();
    assert!(
        err.contains("test.json") && err.contains("question_id"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn results_as_a_json_array_or_after_a_byte_order_mark_read_as_lines_do() {
    let dir = std::env::temp_dir().join(format!("cmoe-coin-results-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lines = dir.join("lines.jsonl");
    std::fs::write(
        &lines,
        "{\"question_id\": 1, \"text\": \"yes\"}\n{\"question_id\": \"2\", \"text\": \"no\"}\n",
    )
    .unwrap();
    let expected = read_predictions(&lines).unwrap();
    assert_eq!(expected.len(), 2);
    let array = dir.join("array.json");
    std::fs::write(
        &array,
        "[{\"question_id\": 1, \"text\": \"yes\"}, {\"question_id\": \"2\", \"text\": \"no\"}]",
    )
    .unwrap();
    assert_eq!(read_predictions(&array).unwrap(), expected);
    let bom = dir.join("bom.jsonl");
    let mut text = "\u{feff}".to_string();
    text.push_str(&std::fs::read_to_string(&lines).unwrap());
    std::fs::write(&bom, text).unwrap();
    assert_eq!(read_predictions(&bom).unwrap(), expected);
    std::fs::write(&array, "[{\"question_id\": 1}]").unwrap();
    let error = read_predictions(&array).unwrap_err().to_string();
    assert!(
        error.contains("array.json") && error.contains("malformed results array"),
        "{error}"
    );
}
