//! What long work (a continual run, an evaluation, a pretraining) reports while it runs. The
//! library prints nothing itself: a front end receives the events and shows them (the `cmoe`
//! CLI draws progress bars with rate and ETA and prints the notes).

/// One thing long work reports.
#[derive(Debug, Clone, Copy)]
pub enum RunEvent<'a> {
    /// A line of status: a task starting, an accuracy, a resumed stage.
    Note(&'a str),
    /// Work of `len` steps named `name` starts, `done` of them already done (a resumed stage).
    Started {
        /// What the work is ("train", "evaluate", "pretrain captions").
        name: &'a str,
        /// Its length in steps.
        len: u64,
        /// Steps done before this process took it up.
        done: u64,
    },
    /// `steps` more steps of the current work are done; `status` (a loss) describes the last.
    Advanced {
        /// Steps done since the last event.
        steps: u64,
        /// The latest figures, when the work has any.
        status: Option<&'a str>,
    },
    /// The current work ended.
    Finished,
}

/// Receives the events of long work, from whichever thread does it.
pub trait RunObserver: Send + Sync {
    /// One event.
    fn event(&self, event: RunEvent<'_>);

    /// A line of status ([`RunEvent::Note`]).
    fn note(&self, text: &str) {
        self.event(RunEvent::Note(text));
    }
}

/// An observer that ignores every event (the default for library callers).
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl RunObserver for Silent {
    fn event(&self, _: RunEvent<'_>) {}
}
