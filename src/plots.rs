//! The report's figures as PNG, drawn with plotters: heatmaps (the accuracy matrix, task
//! location, experts per layer), grouped bars (zero-shot / Immediate / Last per task, the
//! methods of a comparison, parameters per task) and line charts (loss curves). Text is set in
//! DejaVu Sans, shipped in `assets/fonts` and embedded in the binary, so no system font is
//! needed.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::Context;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// DejaVu Sans (Bitstream Vera license, `assets/fonts/DejaVuSans-LICENSE.txt`).
static FONT: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");
/// The family name the font is registered under.
const FAMILY: &str = "sans-serif";

/// Series colours (Tableau 10).
const PALETTE: [RGBColor; 6] = [
    RGBColor(78, 121, 167),
    RGBColor(242, 142, 43),
    RGBColor(89, 161, 79),
    RGBColor(225, 87, 89),
    RGBColor(118, 183, 178),
    RGBColor(176, 122, 161),
];
const INK: RGBColor = RGBColor(30, 30, 30);
const GREY: RGBColor = RGBColor(90, 90, 90);

/// Registers the embedded font with plotters (once).
fn register_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    anyhow::ensure!(ok, "the embedded DejaVu Sans font could not be read");
    Ok(())
}

fn text(size: u32, colour: &'static RGBColor, h: HPos, v: VPos) -> TextStyle<'static> {
    TextStyle::from((FAMILY, size).into_font())
        .color(colour)
        .pos(Pos::new(h, v))
}

/// Rough width in pixels of `s` at `size` px (for layout; DejaVu Sans averages ~0.6 em).
fn width_of(s: &str, size: u32) -> u32 {
    (s.chars().count() as f64 * size as f64 * 0.62).ceil() as u32
}

/// A colour from white (0) to deep blue (1).
fn shade(v: f64) -> RGBColor {
    let v = v.clamp(0.0, 1.0);
    let mix = |a: f64, b: f64| (a + (b - a) * v).round() as u8;
    RGBColor(mix(247.0, 8.0), mix(251.0, 69.0), mix(255.0, 148.0))
}

fn drawing_error(path: &Path, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("cannot draw {}: {e}", path.display())
}

/// A table of numbers drawn as coloured cells.
pub struct Heatmap<'a> {
    /// Title above the figure.
    pub title: &'a str,
    /// What the rows are (printed above the row labels).
    pub rows_label: &'a str,
    /// What the columns are (printed above the column labels).
    pub cols_label: &'a str,
    /// Row labels.
    pub rows: &'a [String],
    /// Column labels.
    pub cols: &'a [String],
    /// `values[row][col]`; `None` cells stay blank.
    pub values: &'a [Vec<Option<f64>>],
    /// The value drawn in the darkest colour.
    pub max: f64,
    /// Decimals printed in each cell.
    pub decimals: usize,
}

/// Draws `h` into `path`.
pub fn heatmap(path: &Path, h: &Heatmap) -> anyhow::Result<()> {
    register_font()?;
    let label_size = 15;
    let cell_w = h
        .cols
        .iter()
        .map(|c| width_of(c, label_size) + 16)
        .max()
        .unwrap_or(60)
        .max(64);
    let cell_h = 36;
    let left = h
        .rows
        .iter()
        .map(|r| width_of(r, label_size))
        .chain([width_of(h.rows_label, 14)])
        .max()
        .unwrap_or(60)
        + 24;
    let top = 92;
    let width = (left + cell_w * h.cols.len() as u32 + 20).max(width_of(h.title, 19) + 40);
    let height = top + cell_h * h.rows.len() as u32 + 20;
    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    let draw = |root: &DrawingArea<BitMapBackend, Shift>| -> Result<(), String> {
        let e = |e: DrawingAreaErrorKind<_>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        root.draw(&Text::new(
            h.title.to_string(),
            (width as i32 / 2, 18),
            text(19, &INK, HPos::Center, VPos::Center),
        ))
        .map_err(e)?;
        let grid_x = left as i32;
        let grid_w = (cell_w * h.cols.len() as u32) as i32;
        root.draw(&Text::new(
            h.cols_label.to_string(),
            (grid_x + grid_w / 2, 46),
            text(14, &GREY, HPos::Center, VPos::Center),
        ))
        .map_err(e)?;
        root.draw(&Text::new(
            h.rows_label.to_string(),
            (grid_x - 12, 72),
            text(14, &GREY, HPos::Right, VPos::Center),
        ))
        .map_err(e)?;
        for (j, col) in h.cols.iter().enumerate() {
            let x = grid_x + (j as u32 * cell_w + cell_w / 2) as i32;
            root.draw(&Text::new(
                col.clone(),
                (x, 72),
                text(label_size, &INK, HPos::Center, VPos::Center),
            ))
            .map_err(e)?;
        }
        for (i, row) in h.rows.iter().enumerate() {
            let y = (top + i as u32 * cell_h) as i32;
            root.draw(&Text::new(
                row.clone(),
                (grid_x - 12, y + cell_h as i32 / 2),
                text(label_size, &INK, HPos::Right, VPos::Center),
            ))
            .map_err(e)?;
            let Some(values) = h.values.get(i) else {
                continue;
            };
            for (j, v) in values.iter().enumerate() {
                let x = grid_x + (j as u32 * cell_w) as i32;
                let Some(v) = v else { continue };
                let level = if h.max > 0.0 { v / h.max } else { 0.0 };
                root.draw(&Rectangle::new(
                    [
                        (x + 1, y + 1),
                        (x + cell_w as i32 - 1, y + cell_h as i32 - 1),
                    ],
                    shade(level).filled(),
                ))
                .map_err(e)?;
                let ink = if level > 0.55 { &WHITE } else { &INK };
                root.draw(&Text::new(
                    format!("{v:.*}", h.decimals),
                    (x + cell_w as i32 / 2, y + cell_h as i32 / 2),
                    text(14, ink, HPos::Center, VPos::Center),
                ))
                .map_err(e)?;
            }
        }
        root.present().map_err(e)
    };
    draw(&root).map_err(|e| drawing_error(path, e))
}

/// Bars grouped by category, one colour per series, with a legend under the chart.
pub struct Bars<'a> {
    /// Title above the chart.
    pub title: &'a str,
    /// The value axis' description.
    pub y_label: &'a str,
    /// The groups along the horizontal axis.
    pub groups: &'a [String],
    /// Each series: its name and one value per group.
    pub series: &'a [(String, Vec<f64>)],
    /// Per series, per group: an error bar's half-height (± one standard deviation), drawn
    /// when above 0; empty for none.
    pub spread: &'a [Vec<f64>],
    /// Top of the value axis (`None`: 10 % above the largest value).
    pub y_max: Option<f64>,
    /// Decimals of the value printed above each bar (`None`: no value).
    pub decimals: Option<usize>,
}

/// Draws `b` into `path`.
pub fn bars(path: &Path, b: &Bars) -> anyhow::Result<()> {
    register_font()?;
    let n = b.groups.len().max(1);
    let label_w = b
        .groups
        .iter()
        .map(|g| width_of(g, 14) + 12)
        .max()
        .unwrap_or(60);
    let group_w = label_w.max(36 * b.series.len() as u32 + 16);
    let width = (90 + group_w * n as u32 + 30)
        .max(520)
        .max(width_of(b.title, 19) + 40);
    let height = 460;
    let largest = b
        .series
        .iter()
        .enumerate()
        .flat_map(|(k, (_, v))| {
            v.iter()
                .enumerate()
                .map(move |(g, &x)| x + b.spread.get(k).and_then(|s| s.get(g)).unwrap_or(&0.0))
        })
        .fold(0.0f64, f64::max);
    let y_max = b.y_max.unwrap_or(largest * 1.1).max(1e-9);
    let root = BitMapBackend::new(path, (width, height)).into_drawing_area();
    let draw = |root: &DrawingArea<BitMapBackend, Shift>| -> Result<(), String> {
        let e = |e: DrawingAreaErrorKind<_>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(root)
            .caption(b.title, (FAMILY, 19).into_font().color(&INK))
            .margin(12)
            .x_label_area_size(62)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..n as f64, 0f64..y_max * 1.08)
            .map_err(e)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_label_formatter(&|v| format!("{v:.0}"))
            .y_desc(b.y_label)
            .axis_desc_style((FAMILY, 15).into_font().color(&INK))
            .label_style((FAMILY, 13).into_font().color(&INK))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(e)?;
        let m = b.series.len().max(1) as f64;
        let bar = 0.8 / m;
        for (k, (name, values)) in b.series.iter().enumerate() {
            let colour = PALETTE[k % PALETTE.len()];
            let left = |g: usize| g as f64 + 0.1 + k as f64 * bar;
            chart
                .draw_series(values.iter().enumerate().map(|(g, &v)| {
                    Rectangle::new([(left(g), 0.0), (left(g) + bar * 0.92, v)], colour.filled())
                }))
                .map_err(e)?;
            // The legend, in one row under the group names.
            let (x, y) = (90 + k as i32 * 230, height as i32 - 20);
            root.draw(&Rectangle::new(
                [(x, y - 7), (x + 14, y + 7)],
                colour.filled(),
            ))
            .map_err(e)?;
            root.draw(&Text::new(
                name.clone(),
                (x + 20, y),
                text(14, &INK, HPos::Left, VPos::Center),
            ))
            .map_err(e)?;
            let spread = b.spread.get(k);
            let half = |g: usize| spread.and_then(|s| s.get(g)).copied().unwrap_or(0.0);
            for (g, &v) in values.iter().enumerate().filter(|&(g, _)| half(g) > 0.0) {
                let (mid, cap) = (left(g) + bar * 0.46, bar * 0.2);
                let (low, high) = ((v - half(g)).max(0.0), v + half(g));
                let ink = INK.stroke_width(2);
                chart
                    .draw_series([
                        PathElement::new([(mid, low), (mid, high)], ink),
                        PathElement::new([(mid - cap, low), (mid + cap, low)], ink),
                        PathElement::new([(mid - cap, high), (mid + cap, high)], ink),
                    ])
                    .map_err(e)?;
            }
            if let Some(decimals) = b.decimals {
                for (g, &v) in values.iter().enumerate() {
                    // Above the error bar, when there is one.
                    let (x, y) = chart.backend_coord(&(left(g) + bar * 0.46, v + half(g)));
                    root.draw(&Text::new(
                        format!("{v:.decimals$}"),
                        (x, y - 3),
                        text(11, &INK, HPos::Center, VPos::Bottom),
                    ))
                    .map_err(e)?;
                }
            }
        }
        for (g, group) in b.groups.iter().enumerate() {
            let (x, y) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
            root.draw(&Text::new(
                group.clone(),
                (x, y + 8),
                text(14, &INK, HPos::Center, VPos::Top),
            ))
            .map_err(e)?;
        }
        root.present().map_err(e)
    };
    draw(&root).map_err(|e| drawing_error(path, e))
}

/// Lines over a common horizontal axis, one colour per series, with a legend.
pub struct Lines<'a> {
    /// Title above the chart.
    pub title: &'a str,
    /// The horizontal axis' description.
    pub x_label: &'a str,
    /// The value axis' description.
    pub y_label: &'a str,
    /// Each series: its name and its points.
    pub series: &'a [(String, Vec<(f64, f64)>)],
}

/// Draws `l` into `path`.
pub fn lines(path: &Path, l: &Lines) -> anyhow::Result<()> {
    register_font()?;
    let points = || l.series.iter().flat_map(|(_, p)| p.iter().copied());
    let x_max = points().map(|p| p.0).fold(1.0f64, f64::max);
    let y_max = points().map(|p| p.1).fold(1e-9f64, f64::max);
    let root = BitMapBackend::new(path, (760, 420)).into_drawing_area();
    let draw = |root: &DrawingArea<BitMapBackend, Shift>| -> Result<(), String> {
        let e = |e: DrawingAreaErrorKind<_>| e.to_string();
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(root)
            .caption(l.title, (FAMILY, 19).into_font().color(&INK))
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max * 1.05)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_label_formatter(&|v| format!("{v:.0}"))
            .x_desc(l.x_label)
            .y_desc(l.y_label)
            .axis_desc_style((FAMILY, 15).into_font().color(&INK))
            .label_style((FAMILY, 13).into_font().color(&INK))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(e)?;
        for (k, (name, series)) in l.series.iter().enumerate() {
            let colour = PALETTE[k % PALETTE.len()];
            chart
                .draw_series(LineSeries::new(
                    series.iter().copied(),
                    colour.stroke_width(2),
                ))
                .map_err(e)?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 18, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FAMILY, 14).into_font().color(&INK))
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(160, 160, 160))
            .draw()
            .map_err(e)?;
        root.present().map_err(e)
    };
    draw(&root).map_err(|e| drawing_error(path, e))
}

/// The figures of a comparison (`cargo xtask compare` writes `<name>.json`: the rows of Table 1
/// with `--paper`, the runs' reports otherwise): `<name>-methods.png`, mean Immediate and mean
/// Last per method (over the seeds of a run, if several), and `<name>-params.png`, the
/// parameters each method trains per task. Returns their paths.
pub fn comparison_figures(table: &Path) -> anyhow::Result<Vec<std::path::PathBuf>> {
    let text = std::fs::read_to_string(table)
        .with_context(|| format!("cannot read {}", table.display()))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: malformed", table.display()))?;
    let mut methods: Vec<String> = Vec::new();
    let (mut immediate, mut last, mut params) = (Vec::new(), Vec::new(), Vec::new());
    // Sample standard deviations over a run's seeds (0 for one seed or a paper row).
    let (mut immediate_std, mut last_std) = (Vec::new(), Vec::new());
    let mut seeds = 1;
    if let Some(runs) = json["runs"].as_array() {
        for run in runs {
            let reports = run["reports"]
                .as_array()
                .with_context(|| format!("{}: a run without \"reports\"", table.display()))?;
            let mean_of = |value: &dyn Fn(&serde_json::Value) -> Option<f64>| {
                let values: Vec<f64> = reports.iter().filter_map(value).collect();
                values.iter().sum::<f64>() / values.len().max(1) as f64
            };
            let std_of = |key: &str| {
                let values: Vec<f64> = reports.iter().filter_map(|r| r[key].as_f64()).collect();
                sample_std(&values)
            };
            seeds = seeds.max(reports.len());
            methods.push(run["run"].as_str().unwrap_or("?").to_string());
            immediate.push(mean_of(&|r| r["mean_immediate"].as_f64()));
            last.push(mean_of(&|r| r["mean_last"].as_f64()));
            immediate_std.push(std_of("mean_immediate"));
            last_std.push(std_of("mean_last"));
            params.push(
                mean_of(&|r| {
                    let p: Vec<f64> = r["trainable_params_per_task"]
                        .as_array()?
                        .iter()
                        .filter_map(serde_json::Value::as_f64)
                        .collect();
                    Some(p.iter().sum::<f64>() / p.len().max(1) as f64)
                }) / 1e3,
            );
        }
    }
    let rows = match json["rows"].as_array() {
        Some(rows) => rows.as_slice(),
        None if !methods.is_empty() => &[],
        None => anyhow::bail!("{}: no \"rows\" or \"runs\" array", table.display()),
    };
    let field = |row: &serde_json::Value, key: &str| -> anyhow::Result<f64> {
        row[key]
            .as_f64()
            .with_context(|| format!("{}: a row without a numeric {key:?}", table.display()))
    };
    for row in rows {
        let method = row["method"].as_str().unwrap_or("?").to_string();
        let mean = field(row, "mean")?;
        match row["setting"].as_str() {
            Some("Multitask") => {
                methods.insert(0, format!("{method} (multitask)"));
                immediate.insert(0, mean);
                last.insert(0, mean);
                immediate_std.insert(0, 0.0);
                last_std.insert(0, 0.0);
                params.insert(0, field(row, "trainable_params_per_task")? / 1e3);
            }
            Some("Immediate") => {
                methods.push(method);
                immediate.push(mean);
                immediate_std.push(0.0);
                params.push(field(row, "trainable_params_per_task")? / 1e3);
            }
            Some("Last") => {
                last.push(mean);
                last_std.push(0.0);
            }
            other => anyhow::bail!("{}: unknown setting {other:?}", table.display()),
        }
    }
    anyhow::ensure!(
        immediate.len() == last.len() && !methods.is_empty(),
        "{}: every method needs an Immediate and a Last row",
        table.display()
    );
    let stem = table.with_extension("");
    let methods_png = stem.with_file_name(format!(
        "{}-methods.png",
        stem.file_name().unwrap_or_default().to_string_lossy()
    ));
    let params_png = methods_png.with_file_name(
        methods_png
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .replace("-methods.png", "-params.png"),
    );
    let title = if seeds > 1 {
        format!("Mini-CoIN: mean accuracy per method (± std over {seeds} seeds)")
    } else {
        "Mini-CoIN: mean accuracy per method".to_string()
    };
    bars(
        &methods_png,
        &Bars {
            title: &title,
            y_label: "mean accuracy over the tasks (%)",
            groups: &methods,
            series: &[
                ("Immediate".to_string(), immediate),
                ("Last".to_string(), last),
            ],
            spread: &[immediate_std, last_std],
            y_max: Some(100.0),
            decimals: Some(1),
        },
    )?;
    bars(
        &params_png,
        &Bars {
            title: "Mini-CoIN: parameters trained per task",
            y_label: "trainable parameters (thousands)",
            groups: &methods,
            series: &[("mean over the tasks".to_string(), params)],
            spread: &[],
            y_max: None,
            decimals: Some(0),
        },
    )?;
    Ok(vec![methods_png, params_png])
}

/// The sample standard deviation of `values` (0 for fewer than two).
fn sample_std(values: &[f64]) -> f64 {
    if values.len() < 2 {
        return 0.0;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
}

#[cfg(test)]
mod tests {
    use super::{Bars, bars, comparison_figures, sample_std};

    #[test]
    fn sample_std_divides_by_n_minus_one() {
        assert_eq!(sample_std(&[5.0]), 0.0);
        assert!((sample_std(&[1.0, 3.0]) - 2f64.sqrt()).abs() < 1e-12);
    }

    /// The same bars without value labels, with and without a spread: only the error bars
    /// can tell the two figures apart.
    #[test]
    fn bars_with_a_spread_draw_error_bars() {
        let dir = std::env::temp_dir().join(format!("cmoe-bars-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let groups = ["cmoe".to_string(), "lora".to_string()];
        let series = [("Immediate".to_string(), vec![50.0, 60.0])];
        let draw = |name: &str, spread: &[Vec<f64>]| {
            let path = dir.join(name);
            let b = Bars {
                title: "t",
                y_label: "y",
                groups: &groups,
                series: &series,
                spread,
                y_max: Some(100.0),
                decimals: None,
            };
            bars(&path, &b).unwrap();
            std::fs::read(&path).unwrap()
        };
        let plain = draw("plain.png", &[]);
        let zero = draw("zero.png", &[vec![0.0, 0.0]]);
        let spread = draw("spread.png", &[vec![5.0, 2.0]]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(plain, zero, "a zero spread draws nothing");
        assert_ne!(plain, spread);
    }

    /// Two comparisons with the same seed means: only the one whose seeds differ has error
    /// bars, so its figure differs.
    #[test]
    fn a_comparison_over_seeds_draws_the_spread() {
        let dir = std::env::temp_dir().join(format!("cmoe-plots-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let figure = |name: &str, immediate: [f64; 2]| {
            let reports: Vec<serde_json::Value> = immediate
                .iter()
                .map(|&i| {
                    serde_json::json!({
                        "mean_immediate": i, "mean_last": 40.0,
                        "trainable_params_per_task": [1000, 3000],
                    })
                })
                .collect();
            let table = dir.join(format!("{name}.json"));
            let json = serde_json::json!({"runs": [{"run": "cmoe", "reports": reports}]});
            std::fs::write(&table, json.to_string()).unwrap();
            let paths = comparison_figures(&table).unwrap();
            assert!(paths[0].ends_with(format!("{name}-methods.png")));
            std::fs::read(&paths[0]).unwrap()
        };
        let spread = figure("spread", [50.0, 60.0]);
        let same = figure("same", [55.0, 55.0]);
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(!spread.is_empty() && spread != same);
    }
}
