//! The perception mixture a small LLaVA is pretrained on: scenes of shapes, rendered words,
//! book covers and degraded images, each paired with a short description. It teaches what
//! Mini-CoIN's images contain (colours, shapes, positions, counts, text) but none of the eight
//! tasks' question formats: every instruction here asks for a description.

use rand::Rng;
use rand::seq::{IndexedRandom, SliceRandom};

use super::draw::{COLOURS, Canvas, PixelBox, Shape};
use super::tasks::{
    AUTHORS, BACKGROUND, Sample, TITLES, draw_cover, reading_vocabulary, word_position, write_word,
};

const INSTRUCTIONS: [&str; 4] = [
    "Describe the image.",
    "Give a short caption of the picture.",
    "What do you see?",
    "Describe this picture briefly.",
];

fn number(n: usize) -> &'static str {
    ["no", "one", "two", "three", "four", "five", "six"][n.min(6)]
}

/// `n` copies of `shape` in distinct cells of a 3 x 3 grid (the counting scenes).
pub(super) fn draw_copies(
    rng: &mut impl Rng,
    canvas: &mut Canvas,
    n: usize,
    shape: Shape,
    rgb: [u8; 3],
) {
    let mut cells: Vec<u32> = (0..9).collect();
    cells.shuffle(rng);
    let cell = canvas.image.width() / 3;
    for &c in &cells[..n] {
        let side = cell * 2 / 3;
        let (x0, y0) = ((c % 3) * cell + cell / 6, (c / 3) * cell + cell / 6);
        canvas.shape(shape, [x0, y0, x0 + side, y0 + side], rgb);
    }
}

/// Where a box sits: "top left", "center", "bottom right", ...
pub(super) fn position(b: PixelBox, size: u32) -> String {
    let third = |v: u32| (v * 3 / size).min(2);
    let (cx, cy) = ((b[0] + b[2]) / 2, (b[1] + b[3]) / 2);
    let row = ["top", "middle", "bottom"][third(cy) as usize];
    let col = ["left", "center", "right"][third(cx) as usize];
    match (row, col) {
        ("middle", "center") => "center".into(),
        ("middle", c) => c.into(),
        (r, "center") => r.into(),
        (r, c) => format!("{r} {c}"),
    }
}

/// One pretraining sample: an image and its description (the instruction in `question`).
pub fn sample(rng: &mut impl Rng, size: u32) -> Sample {
    let mut canvas = Canvas::new(size, BACKGROUND);
    let s = size;
    let unit = (s / 4).max(8);
    let caption = match rng.random_range(0..6) {
        0 | 1 => {
            // One to three objects with their positions.
            let n = rng.random_range(1..=3);
            let mut cells: Vec<u32> = (0..9).collect();
            cells.shuffle(rng);
            let cell = s / 3;
            let parts: Vec<String> = cells[..n]
                .iter()
                .map(|&c| {
                    let (name, rgb) = *COLOURS.choose(rng).expect("colours");
                    let sh = *Shape::ALL.choose(rng).expect("shapes");
                    let side = rng.random_range(cell * 2 / 3..=cell);
                    let x0 = (c % 3) * cell + (cell - side.min(cell)) / 2;
                    let y0 = (c / 3) * cell + (cell - side.min(cell)) / 2;
                    let b = [x0, y0, x0 + side, y0 + side];
                    canvas.shape(sh, b, rgb);
                    format!("a {name} {} at the {}", sh.name(), position(b, s))
                })
                .collect();
            parts.join(", ")
        }
        2 => {
            // Several copies of one object: counts.
            let (name, rgb) = *COLOURS.choose(rng).expect("colours");
            let sh = *Shape::ALL.choose(rng).expect("shapes");
            let n = rng.random_range(2..=6);
            draw_copies(rng, &mut canvas, n, sh, rgb);
            format!("{} {name} {}s", number(n), sh.name())
        }
        3 => {
            let words: Vec<&str> = reading_vocabulary().collect();
            let word = *words.choose(rng).expect("words");
            let (x, y) = word_position(rng, s, word);
            write_word(&mut canvas, word, x, y, [20, 20, 20]);
            format!("the word {} written in black", word.to_lowercase())
        }
        4 => {
            let (cname, cover) = *COLOURS.choose(rng).expect("colours");
            let title = *TITLES.choose(rng).expect("titles");
            let author = *AUTHORS.choose(rng).expect("authors");
            draw_cover(&mut canvas, cover, title, author);
            format!(
                "a {cname} book cover with the title {} by {}",
                title.to_lowercase(),
                author.to_lowercase()
            )
        }
        _ => {
            let (name, rgb) = *COLOURS.choose(rng).expect("colours");
            let sh = *Shape::ALL.choose(rng).expect("shapes");
            let side = rng.random_range(unit..=2 * unit);
            let x0 = rng.random_range(0..=s - side);
            let y0 = rng.random_range(0..=s - side);
            canvas.shape(sh, [x0, y0, x0 + side, y0 + side], rgb);
            match rng.random_range(0..3) {
                0 => {
                    canvas.blur(rng.random_range(1.0..2.5));
                    format!("a blurry {name} {}", sh.name())
                }
                1 => {
                    canvas.darken(rng.random_range(0.02..0.06));
                    "a very dark picture".to_string()
                }
                _ => {
                    canvas.darken(rng.random_range(0.35..0.7));
                    format!("a dim picture of a {name} {}", sh.name())
                }
            }
        }
    };
    Sample {
        image: canvas.image,
        question: INSTRUCTIONS.choose(rng).expect("instructions").to_string(),
        answer: caption,
        bbox: None,
    }
}
