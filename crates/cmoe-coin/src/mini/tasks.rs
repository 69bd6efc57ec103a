//! The eight Mini-CoIN tasks: one sampler per CoIN task type, each drawing an image and a
//! question in CoIN's instruction style with its answer.
//!
//! Styles overlap on purpose, as CoIN's do: GQA-like and VQAv2-like both ask about colours of
//! shapes, TextVQA-like and OCR-VQA-like both read rendered words, VizWiz-like asks about the
//! colours and shapes of degraded images. Each keeps its CoIN task's instruction text and answer
//! format (option letters, single words, class names no other task answers with, boxes as
//! `[x0,y0,x1,y1]` in fractions of the image, scored at IoU > 0.5), and everything it asks is
//! drawn large enough for a vision tower with 8 px patches: letters two patches wide, boxes on
//! the patch lattice.

use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};

use super::draw::{COLOURS, Canvas, PixelBox, Shape};
use crate::score::TaskType;

/// CoIN's instruction suffixes.
const SHORT: &str = "Answer the question using a single word or phrase.";
const LETTER: &str = "Answer with the option's letter from the given choices directly.";
const UNANSWERABLE: &str =
    "When the provided information is insufficient, respond with 'Unanswerable'.";

/// Words for the reading task (four letters at most: a word fills at most one row of the
/// image in glyphs two patches wide).
pub const WORDS: [&str; 32] = [
    "STOP", "OPEN", "EXIT", "SALE", "CAFE", "BANK", "PARK", "TAXI", "MILK", "SHOP", "GATE", "ROAD",
    "LAKE", "FIRE", "RAIN", "SNOW", "WIND", "GOLD", "FISH", "BIRD", "DOOR", "FARM", "HILL", "SHIP",
    "BELL", "LAMP", "DESK", "MAP", "BUS", "ZOO", "INN", "SPA",
];

/// Book titles for the cover task.
pub const TITLES: [&str; 16] = [
    "DUNE", "EMMA", "KIM", "MOBY", "IVAN", "NANA", "ODES", "SHE", "ZAZA", "AIDA", "LILA", "OMOO",
    "UBIK", "WATT", "ZAMA", "RIZA",
];
/// Authors for the cover task.
pub const AUTHORS: [&str; 12] = [
    "KING", "DAHL", "POE", "HUGO", "ZOLA", "GIDE", "ECO", "OZ", "ROTH", "SAND", "WOOD", "NIN",
];

/// The classification task's classes: an object of one colour and shape, and its name (names
/// no other task answers with).
pub const CLASSES: [(&str, Shape, &str); 16] = [
    ("red", Shape::Circle, "jam"),
    ("green", Shape::Circle, "lime"),
    ("yellow", Shape::Circle, "egg"),
    ("purple", Shape::Circle, "plum"),
    ("orange", Shape::Circle, "yam"),
    ("blue", Shape::Circle, "gum"),
    ("red", Shape::Square, "cake"),
    ("yellow", Shape::Square, "corn"),
    ("green", Shape::Square, "kiwi"),
    ("blue", Shape::Square, "ink"),
    ("red", Shape::Triangle, "taco"),
    ("orange", Shape::Triangle, "pie"),
    ("green", Shape::Triangle, "pear"),
    ("purple", Shape::Diamond, "fig"),
    ("yellow", Shape::Diamond, "rice"),
    ("red", Shape::Cross, "bean"),
];

/// Every word a small LLaVA learns to read in pretraining: the reading tasks' words, the
/// covers' titles and authors, and the class names (so that they are words it can write).
pub fn reading_vocabulary() -> impl Iterator<Item = &'static str> {
    WORDS
        .into_iter()
        .chain(TITLES)
        .chain(AUTHORS)
        .chain(CLASSES.iter().map(|c| c.2))
}

/// Glyph scale for a `size`-pixel image: 2 at 64 px, so that a letter covers 2 x 2 patches of
/// 8 px (a 1-scale 8 px glyph straddles four patches and is not learnable at this size).
pub fn glyph_scale(size: u32) -> u32 {
    (size / 32).max(1)
}

/// Writes `word` with its top-left corner at `(x, y)` at the image's glyph scale.
pub fn write_word(canvas: &mut Canvas, word: &str, x: u32, y: u32, colour: [u8; 3]) {
    let scale = glyph_scale(canvas.image.width());
    canvas.text(word, x, y, scale, colour);
}

/// A word placed at random on the glyph lattice (half a glyph): `(x, y)`.
pub fn word_position(rng: &mut impl Rng, size: u32, word: &str) -> (u32, u32) {
    let glyph = 8 * glyph_scale(size);
    let step = glyph / 2;
    let width = glyph * word.len() as u32;
    let x = rng.random_range(0..=size.saturating_sub(width) / step) * step;
    let y = rng.random_range(0..=size.saturating_sub(glyph) / step) * step;
    (x, y)
}

/// A square box of `cells` lattice cells (an eighth of the image) inside quadrant `quadrant`
/// (0..4, row-major), at a random lattice position: the grounding task's boxes, which a vision
/// tower with 8 x 8 patches can locate exactly.
pub fn lattice_box(rng: &mut impl Rng, size: u32, quadrant: u32, cells: u32) -> PixelBox {
    let step = size / 8;
    let (qx, qy) = ((quadrant % 2) * 4, (quadrant / 2) * 4);
    let x = qx + rng.random_range(0..=4 - cells);
    let y = qy + rng.random_range(0..=4 - cells);
    [x * step, y * step, (x + cells) * step, (y + cells) * step]
}

/// One generated question.
pub struct Sample {
    /// The image.
    pub image: image::RgbImage,
    /// The prompt (CoIN style, without `<image>`).
    pub question: String,
    /// The reference answer.
    pub answer: String,
    /// Grounding: the answer box, normalised.
    pub bbox: Option<[f64; 4]>,
}

/// The light background of every Mini-CoIN image.
pub(super) const BACKGROUND: [u8; 3] = [245, 245, 240];

fn colour(rng: &mut impl Rng) -> (&'static str, [u8; 3]) {
    *COLOURS.choose(rng).expect("colours")
}

fn shape(rng: &mut impl Rng) -> Shape {
    *Shape::ALL.choose(rng).expect("shapes")
}

/// A random box of side `side` inside `[x_lo, x_hi) x [y_lo, y_hi)`.
fn place(rng: &mut impl Rng, side: u32, x: (u32, u32), y: (u32, u32)) -> PixelBox {
    let x0 = rng.random_range(x.0..=x.1.saturating_sub(side).max(x.0));
    let y0 = rng.random_range(y.0..=y.1.saturating_sub(side).max(y.0));
    [x0, y0, x0 + side, y0 + side]
}

/// `count` distinct (colour, shape) pairs.
fn distinct_objects(rng: &mut impl Rng, count: usize) -> Vec<((&'static str, [u8; 3]), Shape)> {
    let mut all: Vec<_> = COLOURS
        .iter()
        .flat_map(|&c| Shape::ALL.map(|s| (c, s)))
        .collect();
    all.shuffle(rng);
    all.truncate(count);
    all
}

/// A book cover filling the canvas: the title near the top in white on the cover's colour, the
/// author near the bottom in black on a light band, both centred on the glyph lattice.
pub fn draw_cover(canvas: &mut Canvas, cover: [u8; 3], title: &str, author: &str) {
    let s = canvas.image.width();
    let glyph = 8 * glyph_scale(s);
    canvas.rect([0, 0, s, s], cover);
    let band = s - s / 8 - glyph;
    canvas.rect(
        [0, band - glyph / 4, s, band + glyph + glyph / 4],
        BACKGROUND,
    );
    let centre = |w: &str| {
        let step = glyph / 2;
        (s.saturating_sub(w.len() as u32 * glyph) / 2) / step * step
    };
    write_word(canvas, title, centre(title), s / 8, [250, 250, 250]);
    write_word(canvas, author, centre(author), band, [15, 15, 15]);
}

/// Cover colours (dark enough for a white title).
const COVERS: [&str; 4] = ["red", "green", "blue", "purple"];

/// Draws one sample of `task` on a `size` x `size` image. (Long on purpose: one arm per task,
/// the eight samplers side by side so that their question styles can be compared.)
pub fn sample(task: TaskType, rng: &mut impl Rng, size: u32) -> Sample {
    let mut canvas = Canvas::new(size, BACKGROUND);
    let s = size;
    let unit = (s / 4).max(8);
    let (question, answer, bbox) = match task {
        TaskType::ScienceQa => {
            // Several objects share one colour; pick it among lettered options.
            let (name, rgb) = colour(rng);
            let n = rng.random_range(2..=3);
            let mut shapes = Shape::ALL.to_vec();
            shapes.shuffle(rng);
            for (i, sh) in shapes.iter().take(n).enumerate() {
                let band = s / n as u32;
                let b = place(rng, unit, (i as u32 * band, (i as u32 + 1) * band), (0, s));
                canvas.shape(*sh, b, rgb);
            }
            let mut options: Vec<&str> =
                COLOURS.iter().map(|c| c.0).filter(|c| *c != name).collect();
            options.shuffle(rng);
            options.truncate(rng.random_range(2..=3));
            options.push(name);
            options.shuffle(rng);
            let letters = ['A', 'B', 'C', 'D'];
            let listed: Vec<String> = options
                .iter()
                .zip(letters)
                .map(|(o, l)| format!("{l}. {o}"))
                .collect();
            let right = letters[options.iter().position(|o| *o == name).expect("listed")];
            (
                format!(
                    "Which colour do the objects in the picture have in common?\n{}\n{LETTER}",
                    listed.join("\n")
                ),
                right.to_string(),
                None,
            )
        }
        TaskType::TextVqa => {
            let word = *WORDS.choose(rng).expect("words");
            let (x, y) = word_position(rng, s, word);
            let glyph = 8 * glyph_scale(s);
            // A distractor shape in the larger free band above or below the text.
            let (_, other) = colour(rng);
            let side = s / 4;
            let b = if y >= s - (y + glyph) {
                place(rng, side, (0, s), (0, y))
            } else {
                place(rng, side, (0, s), (y + glyph, s))
            };
            canvas.shape(shape(rng), b, other);
            write_word(&mut canvas, word, x, y, [20, 20, 20]);
            let q = *[
                "What word is written in the image?",
                "What does the text in the image say?",
                "What is written here?",
            ]
            .choose(rng)
            .expect("questions");
            (format!("{q}\n{SHORT}"), word.to_lowercase(), None)
        }
        TaskType::ImageNet => {
            let (name, sh, class) = *CLASSES.choose(rng).expect("classes");
            let rgb = COLOURS
                .iter()
                .find(|c| c.0 == name)
                .expect("a named colour")
                .1;
            let side = rng.random_range(unit..=2 * unit);
            canvas.shape(sh, place(rng, side, (0, s), (0, s)), rgb);
            (
                format!("What is the object in the image?\n{SHORT}"),
                class.to_string(),
                None,
            )
        }
        TaskType::Gqa => {
            let objects = distinct_objects(rng, 2);
            let ((n1, c1), s1) = objects[0];
            let ((n2, c2), s2) = objects[1];
            let horizontal = rng.random_bool(0.5);
            let (b1, b2) = if horizontal {
                (
                    place(rng, unit, (0, s / 2), (0, s)),
                    place(rng, unit, (s / 2, s), (0, s)),
                )
            } else {
                (
                    place(rng, unit, (0, s), (0, s / 2)),
                    place(rng, unit, (0, s), (s / 2, s)),
                )
            };
            // Object 1 is left of / above object 2; ask in either direction.
            let flip = rng.random_bool(0.5);
            canvas.shape(s1, b1, c1);
            canvas.shape(s2, b2, c2);
            let (a, b) = if flip {
                ((n2, s2), (n1, s1))
            } else {
                ((n1, s1), (n2, s2))
            };
            let (q, ans) = match (horizontal, rng.random_bool(0.5)) {
                (true, true) => (
                    format!(
                        "Is the {} {} to the left or to the right of the {} {}?",
                        a.0,
                        a.1.name(),
                        b.0,
                        b.1.name()
                    ),
                    if flip { "right" } else { "left" }.to_string(),
                ),
                (false, true) => (
                    format!(
                        "Is the {} {} above or below the {} {}?",
                        a.0,
                        a.1.name(),
                        b.0,
                        b.1.name()
                    ),
                    if flip { "below" } else { "above" }.to_string(),
                ),
                (true, false) => (
                    "What colour is the shape on the left side?".to_string(),
                    n1.to_string(),
                ),
                (false, false) => (
                    format!("Which shape is below the {} {}?", n1, s1.name()),
                    s2.name().to_string(),
                ),
            };
            (format!("{q}\n{SHORT}"), ans, None)
        }
        TaskType::VizWiz => {
            let (name, rgb) = colour(rng);
            let sh = shape(rng);
            let side = rng.random_range(unit..=2 * unit);
            let mut b = place(rng, side, (0, s), (0, s));
            let degradation = rng.random_range(0..4);
            let mut answerable = true;
            if degradation == 3 {
                // Cropped: the object mostly leaves the frame.
                let shift = rng.random_range(side * 3 / 4..side);
                b = [s - side + shift, b[1], s + shift, b[3]];
                answerable = false;
            }
            canvas.shape(sh, b, rgb);
            match degradation {
                0 => canvas.blur(rng.random_range(0.5..2.0)),
                1 => {
                    let dark = rng.random_bool(0.4);
                    canvas.darken(if dark {
                        rng.random_range(0.02..0.06)
                    } else {
                        rng.random_range(0.35..0.7)
                    });
                    answerable = !dark;
                }
                2 => canvas.blur(rng.random_range(2.0..3.0)),
                _ => {}
            }
            let ask_colour = rng.random_bool(0.5);
            let q = if ask_colour {
                "What colour is this?"
            } else {
                "What shape is this?"
            };
            let ans = match (answerable, ask_colour) {
                (false, _) => "unanswerable".to_string(),
                (true, true) => name.to_string(),
                (true, false) => sh.name().to_string(),
            };
            (format!("{q}\n{UNANSWERABLE}\n{SHORT}"), ans, None)
        }
        TaskType::Grounding => {
            let n = rng.random_range(2..=3);
            let objects = distinct_objects(rng, n);
            let mut quadrants: Vec<u32> = (0..4).collect();
            quadrants.shuffle(rng);
            let mut boxes = Vec::new();
            for (((_, rgb), sh), &q) in objects.iter().zip(&quadrants) {
                let cells = rng.random_range(2..=3);
                let b = lattice_box(rng, s, q, cells);
                canvas.shape(*sh, b, *rgb);
                boxes.push(b);
            }
            let target = rng.random_range(0..n);
            let ((name, _), sh) = objects[target];
            let b = boxes[target];
            let norm = |v: u32| (v as f64 / s as f64 * 100.0).round() / 100.0;
            let bbox = [norm(b[0]), norm(b[1]), norm(b[2]), norm(b[3])];
            (
                format!(
                    "Please provide the bounding box coordinate of the region this sentence \
                     describes: the {name} {}.",
                    sh.name()
                ),
                format!(
                    "[{:.2},{:.2},{:.2},{:.2}]",
                    bbox[0], bbox[1], bbox[2], bbox[3]
                ),
                Some(bbox),
            )
        }
        TaskType::Vqav2 => {
            let (name, rgb) = colour(rng);
            let sh = shape(rng);
            if rng.random_bool(0.5) {
                // Counting in a 3 x 3 grid.
                let count = rng.random_range(1..=5);
                let mut cells: Vec<u32> = (0..9).collect();
                cells.shuffle(rng);
                let cell = s / 3;
                for &c in cells.iter().take(count) {
                    let side = cell * 2 / 3;
                    let b = place(
                        rng,
                        side,
                        ((c % 3) * cell, (c % 3 + 1) * cell),
                        ((c / 3) * cell, (c / 3 + 1) * cell),
                    );
                    canvas.shape(sh, b, rgb);
                }
                (
                    format!("How many {}s are there?\n{SHORT}", sh.name()),
                    count.to_string(),
                    None,
                )
            } else {
                let side = rng.random_range(unit..=2 * unit);
                canvas.shape(sh, place(rng, side, (0, s), (0, s)), rgb);
                (
                    format!("What colour is the {}?\n{SHORT}", sh.name()),
                    name.to_string(),
                    None,
                )
            }
        }
        TaskType::OcrVqa => {
            let cover = *COVERS.choose(rng).expect("covers");
            let rgb = COLOURS
                .iter()
                .find(|c| c.0 == cover)
                .expect("a named colour")
                .1;
            let title = *TITLES.choose(rng).expect("titles");
            let author = *AUTHORS.choose(rng).expect("authors");
            draw_cover(&mut canvas, rgb, title, author);
            let (q, ans) = if rng.random_bool(0.5) {
                ("What is the title of this book?", title)
            } else {
                ("Who is the author of this book?", author)
            };
            (format!("{q}\n{SHORT}"), ans.to_lowercase(), None)
        }
    };
    Sample {
        image: canvas.image,
        question,
        answer,
        bbox,
    }
}
