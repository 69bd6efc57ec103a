//! LLaVA-1.5's conversation template (`vicuna_v1`, the one CoIN trains with) and label
//! masking so that only the assistant's answers (and their closing `</s>`) carry loss.
//!
//! Template: `{system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>`; a prompt
//! for generation ends with `ASSISTANT:`. Masking works on the tokenizer's character offsets
//! rather than on re-tokenised fragments, so a token that straddles a boundary cannot shift
//! the labels (LLaVA's own `preprocess_v1` counts fragment lengths and is off by one with some
//! tokenizers).

use crate::error::DataError;
use crate::tokenizer::LlavaTokenizer;

/// Label of positions that carry no loss.
pub const IGNORE_INDEX: i64 = -100;

/// The vicuna_v1 system prompt.
pub const VICUNA_SYSTEM: &str = "A chat between a curious user and an artificial intelligence assistant. \
The assistant gives helpful, detailed, and polite answers to the user's questions.";

/// A conversation template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conversation {
    /// System prompt, placed first.
    pub system: String,
    /// The user role's name.
    pub user: String,
    /// The assistant role's name.
    pub assistant: String,
    /// Between the system prompt / a question and the next role.
    pub sep: String,
    /// After each answer.
    pub sep2: String,
}

impl Conversation {
    /// LLaVA-1.5 / Vicuna v1.
    pub fn vicuna_v1() -> Self {
        Self {
            system: VICUNA_SYSTEM.to_string(),
            user: "USER".into(),
            assistant: "ASSISTANT".into(),
            sep: " ".into(),
            sep2: "</s>".into(),
        }
    }

    /// The generation prompt for one question (which holds `<image>` where the image goes).
    pub fn prompt(&self, question: &str) -> String {
        format!(
            "{}{}{}: {} {}:",
            self.system, self.sep, self.user, question, self.assistant
        )
    }

    /// The full text of a conversation of `(question, answer)` turns, and the character spans
    /// of each answer including its `sep2`.
    pub fn render(&self, turns: &[(String, String)]) -> (String, Vec<(usize, usize)>) {
        let mut text = format!("{}{}", self.system, self.sep);
        let mut answers = Vec::new();
        for (question, answer) in turns {
            text.push_str(&format!(
                "{}: {}{}{}:",
                self.user, question, self.sep, self.assistant
            ));
            // The space before the answer belongs to its first token ("▁Yes").
            let start = text.len();
            text.push(' ');
            text.push_str(answer);
            text.push_str(&self.sep2);
            answers.push((start, text.len()));
        }
        (text, answers)
    }

    /// Tokenises a conversation for training: `<image>` expanded, labels equal to the ids on
    /// answer tokens and [`IGNORE_INDEX`] everywhere else.
    pub fn training_example(
        &self,
        tokenizer: &LlavaTokenizer,
        turns: &[(String, String)],
        tokens_per_image: usize,
    ) -> Result<TrainingExample, DataError> {
        if turns.is_empty() {
            return Err(DataError::Tokenizer(
                "a conversation needs at least one turn".into(),
            ));
        }
        let (text, answers) = self.render(turns);
        let (ids, offsets) = tokenizer.encode_with_offsets(&text)?;
        let mut input_ids = Vec::with_capacity(ids.len() + tokens_per_image);
        let mut labels = Vec::with_capacity(ids.len() + tokens_per_image);
        for (&id, &(start, end)) in ids.iter().zip(&offsets) {
            let in_answer = end > start && answers.iter().any(|&(a, b)| start >= a && end <= b);
            if id == tokenizer.image_token_id() {
                input_ids.extend(std::iter::repeat_n(id, tokens_per_image));
                labels.extend(std::iter::repeat_n(IGNORE_INDEX, tokens_per_image));
            } else {
                input_ids.push(id);
                labels.push(if in_answer { id as i64 } else { IGNORE_INDEX });
            }
        }
        if labels.iter().all(|&l| l == IGNORE_INDEX) {
            return Err(DataError::Tokenizer(format!(
                "no answer token found in {text:?}"
            )));
        }
        Ok(TrainingExample { input_ids, labels })
    }
}

/// Token ids and labels of one training conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainingExample {
    /// Input ids, `<image>` expanded.
    pub input_ids: Vec<u32>,
    /// Per position: the id to predict there (the loss shifts by one) or [`IGNORE_INDEX`].
    pub labels: Vec<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vicuna_prompt_text() {
        let c = Conversation::vicuna_v1();
        assert_eq!(
            c.prompt("<image>\nWhat is it?"),
            format!("{VICUNA_SYSTEM} USER: <image>\nWhat is it? ASSISTANT:")
        );
        let (text, spans) = c.render(&[("q1".into(), "a1".into()), ("q2".into(), "a2".into())]);
        assert_eq!(
            text,
            format!("{VICUNA_SYSTEM} USER: q1 ASSISTANT: a1</s>USER: q2 ASSISTANT: a2</s>")
        );
        assert_eq!(&text[spans[0].0..spans[0].1], " a1</s>");
        assert_eq!(&text[spans[1].0..spans[1].1], " a2</s>");
    }
}
