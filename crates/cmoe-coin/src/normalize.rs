//! The answer normalisation of the VQA / EvalAI evaluation (as in the m4c evaluator CoIN uses
//! for TextVQA): lower case, punctuation rules, number words to digits, articles dropped,
//! contractions restored.

/// Punctuation handled by [`punctuation`] (the `.` is treated separately).
const PUNCT: [char; 21] = [
    ';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<', '@', '`', ',',
    '?', '!',
];

const ARTICLES: [&str; 3] = ["a", "an", "the"];

fn number_word(word: &str) -> Option<&'static str> {
    Some(match word {
        "none" | "zero" => "0",
        "one" => "1",
        "two" => "2",
        "three" => "3",
        "four" => "4",
        "five" => "5",
        "six" => "6",
        "seven" => "7",
        "eight" => "8",
        "nine" => "9",
        "ten" => "10",
        _ => return None,
    })
}

/// Contractions written without their apostrophe, and the spelling the evaluation compares.
/// (The original table also has a few capitalised keys; text is lower-cased first, so they
/// never match and are left out.)
const CONTRACTIONS: &[(&str, &str)] = &[
    ("aint", "ain't"),
    ("arent", "aren't"),
    ("cant", "can't"),
    ("couldve", "could've"),
    ("couldnt", "couldn't"),
    ("couldn'tve", "couldn't've"),
    ("couldnt've", "couldn't've"),
    ("didnt", "didn't"),
    ("doesnt", "doesn't"),
    ("dont", "don't"),
    ("hadnt", "hadn't"),
    ("hadnt've", "hadn't've"),
    ("hadn'tve", "hadn't've"),
    ("hasnt", "hasn't"),
    ("havent", "haven't"),
    ("hed", "he'd"),
    ("hed've", "he'd've"),
    ("he'dve", "he'd've"),
    ("hes", "he's"),
    ("howd", "how'd"),
    ("howll", "how'll"),
    ("hows", "how's"),
    ("isnt", "isn't"),
    ("itd", "it'd"),
    ("itd've", "it'd've"),
    ("it'dve", "it'd've"),
    ("itll", "it'll"),
    ("let's", "let's"),
    ("maam", "ma'am"),
    ("mightnt", "mightn't"),
    ("mightnt've", "mightn't've"),
    ("mightn'tve", "mightn't've"),
    ("mightve", "might've"),
    ("mustnt", "mustn't"),
    ("mustve", "must've"),
    ("neednt", "needn't"),
    ("notve", "not've"),
    ("oclock", "o'clock"),
    ("oughtnt", "oughtn't"),
    ("ow's'at", "'ow's'at"),
    ("'ows'at", "'ow's'at"),
    ("'ow'sat", "'ow's'at"),
    ("shant", "shan't"),
    ("shed've", "she'd've"),
    ("she'dve", "she'd've"),
    ("she's", "she's"),
    ("shouldve", "should've"),
    ("shouldnt", "shouldn't"),
    ("shouldnt've", "shouldn't've"),
    ("shouldn'tve", "shouldn't've"),
    ("somebody'd", "somebodyd"),
    ("somebodyd've", "somebody'd've"),
    ("somebody'dve", "somebody'd've"),
    ("somebodyll", "somebody'll"),
    ("somebodys", "somebody's"),
    ("someoned", "someone'd"),
    ("someoned've", "someone'd've"),
    ("someone'dve", "someone'd've"),
    ("someonell", "someone'll"),
    ("someones", "someone's"),
    ("somethingd", "something'd"),
    ("somethingd've", "something'd've"),
    ("something'dve", "something'd've"),
    ("somethingll", "something'll"),
    ("thats", "that's"),
    ("thered", "there'd"),
    ("thered've", "there'd've"),
    ("there'dve", "there'd've"),
    ("therere", "there're"),
    ("theres", "there's"),
    ("theyd", "they'd"),
    ("theyd've", "they'd've"),
    ("they'dve", "they'd've"),
    ("theyll", "they'll"),
    ("theyre", "they're"),
    ("theyve", "they've"),
    ("twas", "'twas"),
    ("wasnt", "wasn't"),
    ("wed've", "we'd've"),
    ("we'dve", "we'd've"),
    ("weve", "we've"),
    ("werent", "weren't"),
    ("whatll", "what'll"),
    ("whatre", "what're"),
    ("whats", "what's"),
    ("whatve", "what've"),
    ("whens", "when's"),
    ("whered", "where'd"),
    ("wheres", "where's"),
    ("whereve", "where've"),
    ("whod", "who'd"),
    ("whod've", "who'd've"),
    ("who'dve", "who'd've"),
    ("wholl", "who'll"),
    ("whos", "who's"),
    ("whove", "who've"),
    ("whyll", "why'll"),
    ("whyre", "why're"),
    ("whys", "why's"),
    ("wont", "won't"),
    ("wouldve", "would've"),
    ("wouldnt", "wouldn't"),
    ("wouldnt've", "wouldn't've"),
    ("wouldn'tve", "wouldn't've"),
    ("yall", "y'all"),
    ("yall'll", "y'all'll"),
    ("y'allll", "y'all'll"),
    ("yall'd've", "y'all'd've"),
    ("y'alld've", "y'all'd've"),
    ("y'all'dve", "y'all'd've"),
    ("youd", "you'd"),
    ("youd've", "you'd've"),
    ("you'dve", "you'd've"),
    ("youll", "you'll"),
    ("youre", "you're"),
    ("youve", "you've"),
];

/// The EvalAI processing of one answer.
pub fn evalai(answer: &str) -> String {
    let tokenized = answer
        .to_lowercase()
        .replace([',', '?'], "")
        .replace("'s", " 's");
    let text = tokenized.trim().replace(['\n', '\t'], " ");
    digits_and_articles(&punctuation(text.trim()))
}

/// Whether `text` has a digit, a comma and a digit in a row.
fn has_digit_comma_digit(text: &str) -> bool {
    let c: Vec<char> = text.chars().collect();
    c.windows(3)
        .any(|w| w[0].is_ascii_digit() && w[1] == ',' && w[2].is_ascii_digit())
}

/// Punctuation: a mark next to a space (or any mark, when the text has "digit,digit") is
/// deleted, otherwise replaced by a space; then periods not followed by a digit are deleted
/// (at most 32 of them: the original passes `re.UNICODE` where `re.sub` expects a count).
pub fn punctuation(text: &str) -> String {
    let comma_number = has_digit_comma_digit(text);
    let mut out = text.to_string();
    for p in PUNCT {
        let glued = text.contains(&format!("{p} ")) || text.contains(&format!(" {p}"));
        out = out.replace(p, if glued || comma_number { "" } else { " " });
    }
    let chars: Vec<char> = out.chars().collect();
    let mut removed = 0;
    let mut kept = String::with_capacity(out.len());
    for (i, &c) in chars.iter().enumerate() {
        let before_digit = chars.get(i + 1).is_some_and(|n| n.is_ascii_digit());
        if c == '.' && !before_digit && removed < 32 {
            removed += 1;
        } else {
            kept.push(c);
        }
    }
    kept
}

/// Number words to digits, articles dropped, contractions restored; words joined by a space.
pub fn digits_and_articles(text: &str) -> String {
    text.to_lowercase()
        .split_whitespace()
        .map(|w| number_word(w).unwrap_or(w))
        .filter(|w| !ARTICLES.contains(w))
        .map(|w| {
            CONTRACTIONS
                .iter()
                .find(|(k, _)| *k == w)
                .map_or(w, |(_, v)| v)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evalai_examples() {
        assert_eq!(evalai("Two"), "2");
        assert_eq!(evalai("The Cat."), "cat");
        assert_eq!(evalai("  a red\tapple\n"), "red apple");
        assert_eq!(evalai("dont"), "don't");
        assert_eq!(evalai("Yes!"), "yes");
        // A mark glued between words becomes a space; next to a space it disappears.
        assert_eq!(evalai("t-shirt"), "t shirt");
        assert_eq!(evalai("red - blue"), "red blue");
        // Decimal points survive, sentence periods do not; commas vanish in tokenisation.
        assert_eq!(evalai("3.5 m."), "3.5 m");
        assert_eq!(evalai("1,000"), "1000");
        assert_eq!(evalai("the man's hat?"), "man 's hat");
    }

    #[test]
    fn at_most_32_periods_are_removed() {
        let dots = ".".repeat(40);
        assert_eq!(punctuation(&dots), ".".repeat(8));
    }
}
