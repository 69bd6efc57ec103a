//! Progress bars with rate and ETA (indicatif) for long work; without a terminal (CI, logs
//! redirected to a file) they print a line every 5 % instead.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps named `prefix`.
pub fn progress(len: u64, prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix:>9} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} ETA {eta} {msg}",
        )
        .expect("valid template"),
    );
    bar.set_prefix(prefix.to_string());
    bar
}

/// One step done, with `message` (loss, ...) shown beside the bar or in the printed line.
pub fn tick(bar: &ProgressBar, message: String) {
    bar.set_message(message.clone());
    bar.inc(1);
    if bar.is_hidden() {
        let len = bar.length().unwrap_or(0);
        let pos = bar.position();
        if pos % (len / 20).max(1) == 0 || pos == len {
            eprintln!(
                "{:>9} {pos}/{len} {:.0}s {message}",
                bar.prefix(),
                bar.elapsed().as_secs_f64()
            );
        }
    }
}
