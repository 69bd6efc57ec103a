//! The instruction mixture a small LLaVA is tuned on after its caption pretraining (LLaVA-1.5's
//! second stage in small): questions about the same kinds of images as Mini-CoIN's (objects,
//! colours, counts, positions, reading, covers, boxes, yes/no, multiple choice, degraded
//! pictures), asked and answered in words of their own. No template of the eight tasks appears
//! here: answers are short sentences ("It is red.", "I count three.", "From (8, 16) to (24,
//! 32)."), never a bare word, an option letter, a digit count or a box in fractions, so each
//! task still has to learn its own format, and the classification task's class names are never
//! attached to objects.

use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};

use super::captions::{draw_copies, position};
use super::draw::{COLOURS, Canvas, PixelBox, Shape};
use super::tasks::{
    AUTHORS, BACKGROUND, Sample, TITLES, draw_cover, lattice_box, reading_vocabulary,
    word_position, write_word,
};

fn number(n: usize) -> &'static str {
    ["zero", "one", "two", "three", "four", "five", "six"][n.min(6)]
}

fn any_colour(rng: &mut impl Rng) -> (&'static str, [u8; 3]) {
    *COLOURS.choose(rng).expect("colours")
}

fn any_shape(rng: &mut impl Rng) -> Shape {
    *Shape::ALL.choose(rng).expect("shapes")
}

/// A box of side `side` at a random place inside the image.
fn anywhere(rng: &mut impl Rng, size: u32, side: u32) -> PixelBox {
    let x = rng.random_range(0..=size - side);
    let y = rng.random_range(0..=size - side);
    [x, y, x + side, y + side]
}

/// Two or three distinct objects, one per quadrant, on the patch lattice.
fn scene(
    rng: &mut impl Rng,
    canvas: &mut Canvas,
    n: usize,
) -> Vec<(&'static str, Shape, PixelBox)> {
    let size = canvas.image.width();
    let mut quadrants: Vec<u32> = (0..4).collect();
    quadrants.shuffle(rng);
    let mut pairs: Vec<_> = COLOURS
        .iter()
        .flat_map(|&c| Shape::ALL.map(|s| (c, s)))
        .collect();
    pairs.shuffle(rng);
    pairs
        .into_iter()
        .zip(quadrants)
        .take(n)
        .map(|(((name, rgb), sh), q)| {
            let cells = rng.random_range(2..=3);
            let b = lattice_box(rng, size, q, cells);
            canvas.shape(sh, b, rgb);
            (name, sh, b)
        })
        .collect()
}

/// The kinds of question in the mixture, one per skill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// The colour of the one shape ("The circle is red.").
    Colour,
    /// The kind of the one shape ("It is a star.").
    Shape,
    /// How many copies of a shape ("I count three.").
    Count,
    /// Where one of two or three objects is ("It is at the top left.").
    Position,
    /// Whether one object is left of or above another ("Yes, it is.").
    Relation,
    /// Whether an object is in the picture ("No, there is not.").
    Presence,
    /// The word written in the picture ("It says apple.").
    Reading,
    /// A book cover's title or writer ("The title is ...").
    Cover,
    /// An object's box in pixel corners ("From (8, 16) to (24, 32).").
    Corners,
    /// Which listed colour is present ("Red.").
    ColourChoice,
    /// Whether a dark or blurred object can be made out ("No, the picture is too dark ...").
    Visibility,
}

impl Kind {
    /// Every kind, in the order [`sample`] draws them from.
    pub const ALL: [Kind; 11] = [
        Kind::Colour,
        Kind::Shape,
        Kind::Count,
        Kind::Position,
        Kind::Relation,
        Kind::Presence,
        Kind::Reading,
        Kind::Cover,
        Kind::Corners,
        Kind::ColourChoice,
        Kind::Visibility,
    ];

    /// Its name in reports (`colour`, `colour-choice`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Colour => "colour",
            Kind::Shape => "shape",
            Kind::Count => "count",
            Kind::Position => "position",
            Kind::Relation => "relation",
            Kind::Presence => "presence",
            Kind::Reading => "reading",
            Kind::Cover => "cover",
            Kind::Corners => "corners",
            Kind::ColourChoice => "colour-choice",
            Kind::Visibility => "visibility",
        }
    }

    /// Whether `prediction` answers a question of this kind whose reference answer is
    /// `reference`: the same sentence up to case, punctuation and spacing, except for
    /// [`Kind::Corners`], right when the boxes overlap with IoU > 0.5 (Grounding's criterion).
    pub fn is_correct(self, prediction: &str, reference: &str) -> bool {
        match self {
            Kind::Corners => match (corners(prediction), corners(reference)) {
                (Some(p), Some(r)) => iou(p, r) > 0.5,
                _ => false,
            },
            _ => plain(prediction) == plain(reference),
        }
    }
}

/// Lowercase words, punctuation dropped (`"It is red."` -> `"it is red"`).
fn plain(text: &str) -> String {
    text.to_lowercase()
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The first four integers of a corners answer (`From (x0, y0) to (x1, y1).`).
fn corners(text: &str) -> Option<[f64; 4]> {
    let numbers: Vec<f64> = text
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .take(4)
        .collect();
    numbers.try_into().ok()
}

fn iou(a: [f64; 4], b: [f64; 4]) -> f64 {
    let area = |r: [f64; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let inter = area([
        a[0].max(b[0]),
        a[1].max(b[1]),
        a[2].min(b[2]),
        a[3].min(b[3]),
    ]);
    let union = area(a) + area(b) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// One instruction-tuning sample of a kind drawn uniformly.
pub fn sample(rng: &mut impl Rng, size: u32) -> Sample {
    // An i32 draw: the stream the shipped base was pretrained on.
    let kind = Kind::ALL[rng.random_range(0..Kind::ALL.len() as i32) as usize];
    sample_of(kind, rng, size)
}

/// One instruction-tuning sample of `kind`. (Long on purpose: one arm per kind of question in
/// the mixture, side by side.)
pub fn sample_of(kind: Kind, rng: &mut impl Rng, size: u32) -> Sample {
    let mut canvas = Canvas::new(size, BACKGROUND);
    let s = size;
    let unit = (s / 4).max(8);
    let (question, answer): (String, String) = match kind {
        Kind::Colour => {
            let ((name, rgb), sh) = (any_colour(rng), any_shape(rng));
            let side = rng.random_range(unit..=2 * unit);
            canvas.shape(sh, anywhere(rng, s, side), rgb);
            let q = *[
                "Tell me the colour of the {}.",
                "Which colour has the {} got?",
            ]
            .choose(rng)
            .expect("phrasings");
            (
                q.replace("{}", sh.name()),
                format!("The {} is {name}.", sh.name()),
            )
        }
        Kind::Shape => {
            let ((_, rgb), sh) = (any_colour(rng), any_shape(rng));
            let side = rng.random_range(unit..=2 * unit);
            canvas.shape(sh, anywhere(rng, s, side), rgb);
            let q = *[
                "Which kind of shape is drawn here?",
                "Name the shape you see.",
            ]
            .choose(rng)
            .expect("phrasings");
            (q.to_string(), format!("It is a {}.", sh.name()))
        }
        Kind::Count => {
            let ((_, rgb), sh) = (any_colour(rng), any_shape(rng));
            let n = rng.random_range(1..=6);
            draw_copies(rng, &mut canvas, n, sh, rgb);
            (
                format!("Count the {}s in the picture.", sh.name()),
                format!("I count {}.", number(n)),
            )
        }
        Kind::Position => {
            let n = rng.random_range(1..=3);
            let objects = scene(rng, &mut canvas, n);
            let (name, sh, b) = *objects.choose(rng).expect("objects");
            (
                format!("Where is the {name} {} placed?", sh.name()),
                format!("It is at the {}.", position(b, s)),
            )
        }
        Kind::Relation => {
            let objects = scene(rng, &mut canvas, 2);
            let ((n1, s1, b1), (n2, s2, b2)) = (objects[0], objects[1]);
            let (relation, holds) = if rng.random_bool(0.5) {
                ("to the left of", b1[2] <= b2[0])
            } else {
                ("above", b1[3] <= b2[1])
            };
            (
                format!(
                    "Is the {n1} {} {relation} the {n2} {}? Reply yes or no.",
                    s1.name(),
                    s2.name()
                ),
                if holds {
                    "Yes, it is."
                } else {
                    "No, it is not."
                }
                .to_string(),
            )
        }
        Kind::Presence => {
            let n = rng.random_range(1..=3);
            let objects = scene(rng, &mut canvas, n);
            let (name, sh) = if rng.random_bool(0.5) {
                let (n, sh, _) = *objects.choose(rng).expect("objects");
                (n, sh)
            } else {
                (any_colour(rng).0, any_shape(rng))
            };
            let present = objects.iter().any(|o| o.0 == name && o.1 == sh);
            (
                format!("Is there a {name} {} in this picture?", sh.name()),
                if present {
                    "Yes, there is."
                } else {
                    "No, there is not."
                }
                .to_string(),
            )
        }
        Kind::Reading => {
            let words: Vec<&str> = reading_vocabulary().collect();
            let word = *words.choose(rng).expect("words");
            let (x, y) = word_position(rng, s, word);
            write_word(&mut canvas, word, x, y, [20, 20, 20]);
            let q = *["Read the text aloud.", "What does the sign spell?"]
                .choose(rng)
                .expect("phrasings");
            (q.to_string(), format!("It says {}.", word.to_lowercase()))
        }
        Kind::Cover => {
            let (_, rgb) = any_colour(rng);
            let title = *TITLES.choose(rng).expect("titles");
            let author = *AUTHORS.choose(rng).expect("authors");
            draw_cover(&mut canvas, rgb, title, author);
            if rng.random_bool(0.5) {
                (
                    "Read the title on this cover.".to_string(),
                    format!("The title is {}.", title.to_lowercase()),
                )
            } else {
                (
                    "Name the writer shown on the cover.".to_string(),
                    format!("The writer is {}.", author.to_lowercase()),
                )
            }
        }
        Kind::Corners => {
            let n = rng.random_range(1..=3);
            let objects = scene(rng, &mut canvas, n);
            let (name, sh, b) = *objects.choose(rng).expect("objects");
            (
                format!("Give the pixel corners of the {name} {}.", sh.name()),
                format!("From ({}, {}) to ({}, {}).", b[0], b[1], b[2], b[3]),
            )
        }
        Kind::ColourChoice => {
            let objects = scene(rng, &mut canvas, 1);
            let present = objects[0].0;
            let mut options: Vec<&str> = COLOURS
                .iter()
                .map(|c| c.0)
                .filter(|c| *c != present)
                .collect();
            options.shuffle(rng);
            options.truncate(rng.random_range(1..=3));
            options.push(present);
            options.shuffle(rng);
            let (last, rest) = options.split_last().expect("options");
            (
                format!(
                    "Which of these colours is in the picture: {} or {last}?",
                    rest.join(", ")
                ),
                format!("{}{}.", present[..1].to_uppercase(), &present[1..]),
            )
        }
        Kind::Visibility => {
            let ((name, rgb), sh) = (any_colour(rng), any_shape(rng));
            let side = rng.random_range(unit..=2 * unit);
            canvas.shape(sh, anywhere(rng, s, side), rgb);
            let answer = match rng.random_range(0..3) {
                0 => {
                    canvas.darken(rng.random_range(0.02..0.06));
                    "No, the picture is too dark to tell.".to_string()
                }
                1 => {
                    canvas.blur(rng.random_range(1.0..2.5));
                    format!("Yes, a blurry {name} {}.", sh.name())
                }
                _ => format!("Yes, a {name} {}.", sh.name()),
            };
            ("Can you make out the object?".to_string(), answer)
        }
    };
    Sample {
        image: canvas.image,
        question,
        answer,
        bbox: None,
    }
}
