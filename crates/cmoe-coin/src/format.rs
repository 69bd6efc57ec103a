//! CoIN's file formats.
//!
//! - Training: LLaVA conversation JSON, `[{"id", "image", "conversations": [{"from", "value"}]}]`.
//! - Test: `[{"question_id", "image", "text", "answer"}]`; grounding adds `answer_bbox`
//!   (`"[x1,y1,x2,y2]"`, normalised to the padded square) and `size` (`[w, h]`). TextVQA's own
//!   `{"data": [{"question_id", "answers": [...]}]}` is read as well.
//! - Results: JSON lines `{"question_id", "text"}`.
//!
//! Question ids are numbers in some CoIN files and strings in others; both are kept as text.

use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::CoinError;

/// A question id, whether the file wrote it as a number or a string.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct QuestionId(pub String);

impl<'de> Deserialize<'de> for QuestionId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(d)? {
            serde_json::Value::String(s) => Ok(Self(s)),
            serde_json::Value::Number(n) => Ok(Self(n.to_string())),
            other => Err(serde::de::Error::custom(format!(
                "question_id must be a string or a number, not {other}"
            ))),
        }
    }
}

impl std::fmt::Display for QuestionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// One turn of a training conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    /// `"human"` or `"gpt"`.
    pub from: String,
    /// The text; the human's first turn holds `<image>`.
    pub value: String,
}

/// One training sample.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRecord {
    /// Sample id.
    pub id: String,
    /// Image path relative to the image folder.
    pub image: String,
    /// Alternating human / gpt turns.
    pub conversations: Vec<Turn>,
}

/// One test question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestRecord {
    /// Its id.
    pub question_id: QuestionId,
    /// Image path relative to the image folder.
    #[serde(default)]
    pub image: String,
    /// The prompt (without `<image>`).
    #[serde(default)]
    pub text: String,
    /// The reference answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer: Option<String>,
    /// Several annotators' answers (TextVQA / VQAv2 style).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answers: Option<Vec<String>>,
    /// Grounding: the reference box `"[x1,y1,x2,y2]"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_bbox: Option<String>,
    /// Grounding: the image's `[width, height]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<[f64; 2]>,
}

/// One model answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// The question it answers.
    pub question_id: QuestionId,
    /// The generated text.
    pub text: String,
}

/// A file's text, without the byte-order mark some editors write first.
fn read_text(path: &Path) -> Result<String, CoinError> {
    let text = std::fs::read_to_string(path).map_err(|e| CoinError::io(path, e))?;
    Ok(match text.strip_prefix('\u{feff}') {
        Some(rest) => rest.to_string(),
        None => text,
    })
}

/// Reads a test file (a JSON array, or TextVQA's `{"data": [...]}`).
pub fn read_test(path: &Path) -> Result<Vec<TestRecord>, CoinError> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum File {
        List(Vec<TestRecord>),
        TextVqa { data: Vec<TestRecord> },
    }
    let text = read_text(path)?;
    let records = match serde_json::from_str::<File>(&text) {
        Ok(File::List(r)) | Ok(File::TextVqa { data: r }) => r,
        Err(_) => {
            // Say precisely what is wrong: parse as a plain list for the detailed message.
            let err = serde_json::from_str::<Vec<TestRecord>>(&text)
                .err()
                .map_or_else(|| "not a CoIN test file".to_string(), |e| e.to_string());
            return Err(CoinError::invalid(
                path,
                None,
                format!("malformed test file: {err}"),
            ));
        }
    };
    if records.is_empty() {
        return Err(CoinError::invalid(
            path,
            None,
            "the test file has no questions",
        ));
    }
    Ok(records)
}

/// Reads a training file.
pub fn read_train(path: &Path) -> Result<Vec<TrainRecord>, CoinError> {
    let text = read_text(path)?;
    serde_json::from_str(&text)
        .map_err(|e| CoinError::invalid(path, None, format!("malformed training file: {e}")))
}

/// A training record that could not be read, with where it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BadRecord {
    /// `file:line` (JSONL) or `file[index]` (JSON array).
    pub at: String,
    /// What is wrong with it.
    pub problem: String,
}

/// Reads a training file record by record, keeping going past malformed records: a JSON
/// array (CoIN's `train.json`) or, for a `.jsonl` file, one record per line. A file that is
/// not JSON at all (or not an array) is still an error; each record that does not have the
/// training-record shape is returned as a [`BadRecord`] instead.
pub fn read_train_lenient(path: &Path) -> Result<(Vec<TrainRecord>, Vec<BadRecord>), CoinError> {
    let text = read_text(path)?;
    let mut records = Vec::new();
    let mut bad = Vec::new();
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let mut take = |at: String, value: Result<serde_json::Value, serde_json::Error>| match value
        .and_then(serde_json::from_value::<TrainRecord>)
    {
        Ok(r) => records.push(r),
        Err(e) => bad.push(BadRecord {
            at,
            problem: e.to_string(),
        }),
    };
    if jsonl {
        for (i, line) in text.lines().enumerate() {
            if !line.trim().is_empty() {
                take(
                    format!("{}:{}", path.display(), i + 1),
                    serde_json::from_str(line),
                );
            }
        }
    } else {
        let values: Vec<serde_json::Value> = serde_json::from_str(&text)
            .map_err(|e| CoinError::invalid(path, None, format!("malformed training file: {e}")))?;
        for (i, value) in values.into_iter().enumerate() {
            take(format!("{}[{i}]", path.display()), Ok(value));
        }
    }
    Ok((records, bad))
}

/// Reads results `{"question_id", "text"}`: one per line (JSONL, CoIN's format; blank lines are
/// skipped), or a JSON array of them.
pub fn read_predictions(path: &Path) -> Result<Vec<Prediction>, CoinError> {
    let text = read_text(path)?;
    if text.trim_start().starts_with('[') {
        return serde_json::from_str(&text)
            .map_err(|e| CoinError::invalid(path, None, format!("malformed results array: {e}")));
    }
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str(line).map_err(|e| {
                CoinError::invalid(path, Some(i + 1), format!("malformed result line: {e}"))
            })
        })
        .collect()
}

/// Writes `value` as pretty JSON, atomically (temporary file, then rename).
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), CoinError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| CoinError::io(path, e))?;
    write_atomic(path, text.as_bytes())
}

/// Writes one JSON object per line, atomically.
pub fn write_jsonl<T: Serialize>(path: &Path, items: &[T]) -> Result<(), CoinError> {
    let mut text = String::new();
    for item in items {
        text.push_str(&serde_json::to_string(item).map_err(|e| CoinError::io(path, e))?);
        text.push('\n');
    }
    write_atomic(path, text.as_bytes())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CoinError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| CoinError::io(dir, e))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| CoinError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| CoinError::io(path, e))
}
