//! The terminal view of long work: progress bars with rate and ETA (indicatif) and notes on
//! stderr; without a terminal (CI, logs redirected to a file) a line every 5 % instead.

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use llava_cmoe::observer::{RunEvent, RunObserver};

/// Draws [`RunEvent`]s on stderr.
#[derive(Default)]
pub struct Terminal {
    bar: Mutex<Option<ProgressBar>>,
}

impl RunObserver for Terminal {
    fn event(&self, event: RunEvent<'_>) {
        let mut current = self.bar.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            // Above a drawn bar; a hidden one (no terminal) would drop the line.
            RunEvent::Note(text) => match current.as_ref() {
                Some(bar) if !bar.is_hidden() => bar.println(text),
                _ => eprintln!("{text}"),
            },
            RunEvent::Started { name, len, done } => {
                if let Some(bar) = current.take() {
                    bar.finish_and_clear();
                }
                let bar = ProgressBar::new(len);
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>9} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} ETA {eta} {msg}",
                    )
                    .expect("valid template"),
                );
                bar.set_prefix(name.to_string());
                bar.set_position(done);
                *current = Some(bar);
            }
            RunEvent::Advanced { steps, status } => {
                if let Some(bar) = current.as_ref() {
                    advance(bar, steps, status);
                }
            }
            RunEvent::Finished => {
                if let Some(bar) = current.take() {
                    bar.finish_and_clear();
                }
            }
        }
    }
}

/// `steps` more done, with `status` beside the bar; without a terminal, work that reports a
/// status (a loss) prints it every 5 % of the way.
fn advance(bar: &ProgressBar, steps: u64, status: Option<&str>) {
    let before = bar.position();
    bar.inc(steps);
    let Some(status) = status else { return };
    bar.set_message(status.to_string());
    if bar.is_hidden() {
        let len = bar.length().unwrap_or(0);
        let pos = bar.position();
        let every = (len / 20).max(1);
        if pos / every != before / every || pos == len {
            eprintln!(
                "{:>9} {pos}/{len} {:.0}s {status}",
                bar.prefix(),
                bar.elapsed().as_secs_f64()
            );
        }
    }
}
