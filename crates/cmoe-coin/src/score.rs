//! CoIN's scorers, one per task type (METHOD.md section 6; CoIN's `ETrain/Eval/LLaVA/CoIN`).
//!
//! By default ([`Compat::Correct`]) every task is scored as its metric intends; with
//! [`Compat::Coin`] the scripts' behaviour is reproduced exactly. The deviations:
//!
//! | task | CoIN's script | default |
//! |---|---|---|
//! | all | denominator = result lines; questions without a result are not counted | denominator = test questions; a missing result scores 0; duplicate or unknown ids are errors |
//! | grounding | cuts one character off each end of the box text after removing the brackets (`"[0.1,0.2,0.3,0.4]"` is read as `.1, 0.2, 0.3, 0.`) | reads the four numbers of the box as written |
//! | ocrvqa | a prediction containing "Unanswerable" is skipped but stays in the denominator | compared like any other answer |
//! | imagenet | results matched to questions by line order; an empty prediction is a substring of every answer, so it counts as right | matched by `question_id`; an empty prediction is wrong |
//! | gqa | strips trailing `.` then one leading space, lower-cases the prediction only | trims whitespace and trailing `.` and lower-cases both sides |
//! | vizwiz, vqav2 | upper-cased exact match | the same after trimming whitespace |
//!
//! ScienceQA (option letter read as CoIN reads it) and TextVQA (VQA accuracy over the
//! annotators' answers after EvalAI normalisation) have no deviation. A single `answer` stands
//! for ten identical annotator answers, which is what TextVQA accuracy gives it.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::CoinError;
use crate::format::{Prediction, QuestionId, TestRecord, read_predictions, read_test};
use crate::normalize::evalai;

/// CoIN's eight task types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskType {
    /// ScienceQA: multiple choice answered with an option letter.
    ScienceQa,
    /// TextVQA: reading text in the image, VQA accuracy.
    TextVqa,
    /// ImageNet: classification, substring match either way.
    ImageNet,
    /// GQA: compositional questions, exact match.
    Gqa,
    /// VizWiz: degraded images, "unanswerable" allowed, exact match.
    VizWiz,
    /// Grounding (RefCOCO): a box, IoU > 0.5.
    Grounding,
    /// VQAv2: exact match.
    Vqav2,
    /// OCR-VQA: reading covers, exact match.
    OcrVqa,
}

impl TaskType {
    /// Every task type, in CoIN's order.
    pub const ALL: [TaskType; 8] = [
        Self::ScienceQa,
        Self::TextVqa,
        Self::ImageNet,
        Self::Gqa,
        Self::VizWiz,
        Self::Grounding,
        Self::Vqav2,
        Self::OcrVqa,
    ];

    /// The command-line name (`scienceqa`, `textvqa`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::ScienceQa => "scienceqa",
            Self::TextVqa => "textvqa",
            Self::ImageNet => "imagenet",
            Self::Gqa => "gqa",
            Self::VizWiz => "vizwiz",
            Self::Grounding => "grounding",
            Self::Vqav2 => "vqav2",
            Self::OcrVqa => "ocrvqa",
        }
    }
}

impl std::str::FromStr for TaskType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|t| t.name() == lower)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|t| t.name()).collect();
                format!("unknown task type {s:?} (one of {})", names.join(", "))
            })
    }
}

/// Which behaviour to score with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compat {
    /// The metric as intended (the table in the module docs).
    #[default]
    Correct,
    /// CoIN's scripts exactly, quirks included.
    Coin,
}

/// A score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Percent.
    pub accuracy: f64,
    /// Questions in the denominator.
    pub total: usize,
    /// Sum of per-question scores (fractional for TextVQA).
    pub correct: f64,
    /// Test questions with no result: scored 0 (by default and in CoIN's ScienceQA script),
    /// or left out of the denominator (CoIN's other scripts).
    pub missing: usize,
}

impl Score {
    fn of(correct: f64, total: usize, missing: usize) -> Self {
        Self {
            missing,
            accuracy: if total == 0 {
                0.0
            } else {
                100.0 * correct / total as f64
            },
            total,
            correct,
        }
    }
}

/// Why a set of results cannot be scored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScoreError {
    /// A result for a question the test file does not have.
    #[error("result for question {0}, which is not in the test file")]
    UnknownQuestion(QuestionId),
    /// Two results for one question.
    #[error("two results for question {0}")]
    Duplicate(QuestionId),
    /// A test record lacks what its task needs.
    #[error("question {id}: {problem}")]
    Annotation {
        /// The question.
        id: QuestionId,
        /// What is missing.
        problem: String,
    },
    /// Nothing to score.
    #[error("no results to score")]
    Empty,
}

/// Scores `predictions` against `annotations`.
pub fn score(
    task: TaskType,
    annotations: &[TestRecord],
    predictions: &[Prediction],
    compat: Compat,
) -> Result<Score, ScoreError> {
    let by_id: HashMap<&QuestionId, &TestRecord> =
        annotations.iter().map(|a| (&a.question_id, a)).collect();
    match compat {
        Compat::Correct => {
            let mut answered: HashMap<&QuestionId, &str> = HashMap::new();
            for p in predictions {
                if !by_id.contains_key(&p.question_id) {
                    return Err(ScoreError::UnknownQuestion(p.question_id.clone()));
                }
                if answered.insert(&p.question_id, &p.text).is_some() {
                    return Err(ScoreError::Duplicate(p.question_id.clone()));
                }
            }
            if annotations.is_empty() {
                return Err(ScoreError::Empty);
            }
            let mut correct = 0.0;
            for a in annotations {
                if let Some(text) = answered.get(&a.question_id) {
                    correct += judge(task, a, text, compat)?;
                }
            }
            let missing = annotations.len() - answered.len();
            Ok(Score::of(correct, annotations.len(), missing))
        }
        Compat::Coin if task == TaskType::ScienceQa => {
            // The ScienceQA script walks the questions; a missing result reads "FAILED".
            let answered: HashMap<&QuestionId, &str> = predictions
                .iter()
                .map(|p| (&p.question_id, p.text.as_str()))
                .collect();
            let mut correct = 0.0;
            for a in annotations {
                let text = answered.get(&a.question_id).copied().unwrap_or("FAILED");
                correct += judge(task, a, text, compat)?;
            }
            let missing = annotations
                .iter()
                .filter(|a| !answered.contains_key(&a.question_id))
                .count();
            Ok(Score::of(correct, annotations.len(), missing))
        }
        Compat::Coin => {
            if predictions.is_empty() {
                return Err(ScoreError::Empty);
            }
            let mut correct = 0.0;
            for (i, p) in predictions.iter().enumerate() {
                let a = if task == TaskType::ImageNet {
                    // The ImageNet script pairs results and questions by position.
                    annotations
                        .get(i)
                        .ok_or_else(|| ScoreError::UnknownQuestion(p.question_id.clone()))?
                } else {
                    by_id
                        .get(&p.question_id)
                        .ok_or_else(|| ScoreError::UnknownQuestion(p.question_id.clone()))?
                };
                correct += judge(task, a, &p.text, compat)?;
            }
            let answered: std::collections::HashSet<&QuestionId> =
                predictions.iter().map(|p| &p.question_id).collect();
            let missing = annotations
                .iter()
                .filter(|a| !answered.contains(&a.question_id))
                .count();
            Ok(Score::of(correct, predictions.len(), missing))
        }
    }
}

/// Scores CoIN files: a test JSON and a results JSONL.
pub fn score_files(
    task: TaskType,
    annotations: &Path,
    predictions: &Path,
    compat: Compat,
) -> Result<Score, CoinError> {
    let a = read_test(annotations)?;
    let p = read_predictions(predictions)?;
    score(task, &a, &p, compat).map_err(|e| CoinError::invalid(predictions, None, e.to_string()))
}

fn reference(a: &TestRecord) -> Result<&str, ScoreError> {
    a.answer.as_deref().ok_or_else(|| ScoreError::Annotation {
        id: a.question_id.clone(),
        problem: "no \"answer\"".into(),
    })
}

/// The score in `[0, 1]` of one prediction.
pub fn judge(
    task: TaskType,
    a: &TestRecord,
    prediction: &str,
    compat: Compat,
) -> Result<f64, ScoreError> {
    let hit = |b: bool| if b { 1.0 } else { 0.0 };
    Ok(match (task, compat) {
        (TaskType::ScienceQa, compat) => {
            let truth = reference(a)?.trim();
            let letter = match compat {
                Compat::Coin => option_letter(prediction),
                Compat::Correct => stated_option(prediction),
            };
            hit(letter.is_some() && truth.chars().next() == letter)
        }
        (TaskType::TextVqa, _) => vqa_accuracy(a, prediction)?,
        (TaskType::ImageNet, Compat::Coin) => {
            let truth = reference(a)?;
            hit(truth.contains(prediction) || prediction.contains(truth))
        }
        (TaskType::ImageNet, Compat::Correct) => {
            let (truth, p) = (reference(a)?.trim(), prediction.trim());
            hit(!p.is_empty() && (truth.contains(p) || p.contains(truth)))
        }
        (TaskType::Gqa, Compat::Coin) => {
            let p = prediction.trim_end_matches('.').to_lowercase();
            let p = p.strip_prefix(' ').unwrap_or(&p);
            hit(p == reference(a)?)
        }
        (TaskType::Gqa, Compat::Correct) => {
            let clean = |s: &str| s.trim().trim_end_matches('.').trim().to_lowercase();
            hit(clean(prediction) == clean(reference(a)?))
        }
        (TaskType::VizWiz | TaskType::Vqav2, Compat::Coin) => {
            hit(prediction.to_uppercase() == reference(a)?.to_uppercase())
        }
        (TaskType::VizWiz | TaskType::Vqav2, Compat::Correct) => {
            hit(prediction.trim().to_uppercase() == reference(a)?.trim().to_uppercase())
        }
        (TaskType::OcrVqa, Compat::Coin) => hit(!prediction.contains("Unanswerable")
            && prediction.to_lowercase() == reference(a)?.to_lowercase()),
        (TaskType::OcrVqa, Compat::Correct) => {
            hit(prediction.trim().to_lowercase() == reference(a)?.trim().to_lowercase())
        }
        (TaskType::Grounding, compat) => {
            let truth = a
                .answer_bbox
                .as_deref()
                .and_then(|s| parse_box(&s.replace(['[', ']'], "")))
                .ok_or_else(|| ScoreError::Annotation {
                    id: a.question_id.clone(),
                    problem: "no readable \"answer_bbox\"".into(),
                })?;
            let predicted = match compat {
                Compat::Coin => {
                    let p = prediction.strip_prefix(' ').unwrap_or(prediction);
                    let p: Vec<char> = p.replace(['[', ']'], "").chars().collect();
                    let cut: String = if p.len() >= 2 {
                        p[1..p.len() - 1].iter().collect()
                    } else {
                        String::new()
                    };
                    parse_box(&cut)
                }
                Compat::Correct => box_in_text(prediction),
            };
            hit(predicted.is_some_and(|p| iou(p, truth) > 0.5))
        }
    })
}

/// ScienceQA's reading of an answer: the text is a letter A-E, or starts with "X. ", or else
/// the first single-character word (upper-cased); `None` when there is none.
pub fn option_letter(text: &str) -> Option<char> {
    const OPTIONS: [char; 5] = ['A', 'B', 'C', 'D', 'E'];
    let chars: Vec<char> = text.chars().collect();
    if chars.len() == 1 && OPTIONS.contains(&chars[0]) {
        return Some(chars[0]);
    }
    if chars.len() >= 3 && OPTIONS.contains(&chars[0]) && chars[1] == '.' && chars[2] == ' ' {
        return Some(chars[0]);
    }
    let word = |c: Option<&char>| c.is_some_and(|c| c.is_alphanumeric() || *c == '_');
    (0..chars.len())
        .find(|&i| {
            word(chars.get(i))
                && !word(i.checked_sub(1).and_then(|j| chars.get(j)))
                && !word(chars.get(i + 1))
        })
        .and_then(|i| chars[i].to_uppercase().next())
}

/// The option letter an answer states, as the metric intends: the text is a capital A-E on
/// its own or followed by `.`, `)` or `:` (`"B"`, `"C. water"`, `"(D)"`), or else the first
/// capital A-E standing alone in it (`"The answer is B."`). Lower-case letters are words, not
/// options, and a leading "A" followed by a lower-case word is the article ("A blue square"):
/// CoIN's own reading ([`option_letter`]) takes both as option A.
pub fn stated_option(text: &str) -> Option<char> {
    const OPTIONS: [char; 5] = ['A', 'B', 'C', 'D', 'E'];
    let text = text.trim();
    let bare = text.strip_prefix('(').unwrap_or(text);
    let mut chars = bare.chars();
    if let Some(first) = chars.next()
        && OPTIONS.contains(&first)
        && matches!(chars.next(), None | Some('.' | ')' | ':'))
    {
        return Some(first);
    }
    let chars: Vec<char> = text.chars().collect();
    let word = |i: Option<usize>| {
        i.and_then(|i| chars.get(i))
            .is_some_and(|c| c.is_alphanumeric())
    };
    (0..chars.len()).find_map(|i| {
        let c = chars[i];
        let alone = OPTIONS.contains(&c) && !word(i.checked_sub(1)) && !word(Some(i + 1));
        let article = c == 'A'
            && chars.get(i + 1) == Some(&' ')
            && chars.get(i + 2).is_some_and(|n| n.is_lowercase());
        (alone && !article).then_some(c)
    })
}

/// TextVQA accuracy: the average over annotators of `min(1, matches among the others / 3)`,
/// answers compared after EvalAI normalisation. One reference answer counts as ten.
fn vqa_accuracy(a: &TestRecord, prediction: &str) -> Result<f64, ScoreError> {
    let answers: Vec<String> = match (&a.answers, &a.answer) {
        (Some(list), _) if !list.is_empty() => list.iter().map(|s| evalai(s)).collect(),
        (_, Some(one)) => vec![evalai(one); 10],
        _ => {
            return Err(ScoreError::Annotation {
                id: a.question_id.clone(),
                problem: "no \"answer\" or \"answers\"".into(),
            });
        }
    };
    let p = evalai(prediction);
    let matches = answers.iter().filter(|x| **x == p).count();
    if matches == 0 {
        return Ok(0.0);
    }
    // Leaving annotator i out, the others hold `matches - [i matches]` copies of p.
    let total: f64 = answers
        .iter()
        .map(|x| {
            let others = matches - usize::from(*x == p);
            (others as f64 / 3.0).min(1.0)
        })
        .sum();
    Ok(total / answers.len() as f64)
}

/// `[x1, y1, x2, y2]`.
pub type BBox = [f64; 4];

/// Four comma-separated numbers (Python's `float` accepts surrounding spaces).
fn parse_box(text: &str) -> Option<BBox> {
    let values: Vec<f64> = text
        .split(',')
        .map(|v| v.trim().parse::<f64>().ok())
        .collect::<Option<_>>()?;
    <BBox>::try_from(values).ok()
}

/// The box of an answer such as `"[0.12, 0.3, 0.5, 0.61]"`: the four numbers inside its first
/// brackets (or the whole text when it has none); a box with `x2 < x1` or `y2 < y1` is invalid.
pub fn box_in_text(text: &str) -> Option<BBox> {
    let inner = match (text.find('['), text.find(']')) {
        (Some(open), Some(close)) if open < close => &text[open + 1..close],
        _ => text.trim(),
    };
    parse_box(inner).filter(|b| b[2] >= b[0] && b[3] >= b[1] && b.iter().all(|v| v.is_finite()))
}

/// Intersection over union as CoIN computes it (0 when the union is not positive).
pub fn iou(a: BBox, b: BBox) -> f64 {
    let inter =
        (a[2].min(b[2]) - a[0].max(b[0])).max(0.0) * (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}
