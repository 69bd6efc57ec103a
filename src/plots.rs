//! The report's PNG figures, drawn with the `image` crate and the embedded 8x8 font (no
//! system fonts needed): the accuracy matrix, the task-location confusion matrix, and the
//! experts per layer after each task with the parameters each task trained.

use std::path::Path;

use anyhow::Context;
use cmoe_coin::mini::draw::Canvas;

const CELL: u32 = 44;
const LABEL: u32 = 84;
const WHITE: [u8; 3] = [255, 255, 255];
const INK: [u8; 3] = [20, 20, 20];

/// A colour from white (0) to deep blue (1).
fn shade(v: f64) -> [u8; 3] {
    let v = v.clamp(0.0, 1.0);
    let mix = |a: f64, b: f64| (a + (b - a) * v).round() as u8;
    [mix(247.0, 8.0), mix(251.0, 69.0), mix(255.0, 148.0)]
}

/// Short labels that fit a cell (at most 5 characters of the 8 px font).
fn short(label: &str) -> String {
    label.chars().take(5).collect()
}

/// A `rows x cols` grid of numbers with row and column labels; `None` cells stay blank.
/// Colours scale with `value / max`.
pub fn heatmap(
    path: &Path,
    title: &str,
    rows: &[String],
    cols: &[String],
    values: &[Vec<Option<f64>>],
    max: f64,
    decimals: usize,
) -> anyhow::Result<()> {
    let width = LABEL + CELL * cols.len() as u32 + 8;
    let height = 24 + 16 + CELL * rows.len() as u32 + 8;
    let mut c = Canvas::with_size(width.max(8 * title.len() as u32 + 16), height, WHITE);
    c.text(title, 8, 6, 1, INK);
    for (j, col) in cols.iter().enumerate() {
        c.text(&short(col), LABEL + j as u32 * CELL + 2, 26, 1, INK);
    }
    for (i, row) in rows.iter().enumerate() {
        let y = 40 + i as u32 * CELL;
        c.text(&short(row), 8, y + CELL / 2 - 4, 1, INK);
        let Some(row_values) = values.get(i) else {
            continue;
        };
        for (j, v) in row_values.iter().enumerate() {
            let x = LABEL + j as u32 * CELL;
            let Some(v) = v else { continue };
            let fill = shade(if max > 0.0 { v / max } else { 0.0 });
            c.rect([x + 1, y + 1, x + CELL - 1, y + CELL - 1], fill);
            let text = format!("{v:.decimals$}");
            let ink = if v / max.max(1e-12) > 0.55 {
                WHITE
            } else {
                INK
            };
            let tx = x + (CELL.saturating_sub(8 * text.len() as u32)) / 2;
            c.text(&text, tx, y + CELL / 2 - 4, 1, ink);
        }
    }
    c.image
        .save(path)
        .with_context(|| format!("cannot write {}", path.display()))
}
