//! Progress lines on standard error, at most two a second.

use std::io::Write as _;
use std::time::{Duration, Instant};

/// A progress line for one phase of a run.
pub struct Progress {
    label: String,
    shown: Option<Instant>,
}

impl Progress {
    /// Starts a phase called `label`.
    pub fn new(label: String) -> Self {
        Self { label, shown: None }
    }

    /// Shows `done` of `total`, unless a line was shown in the last 500 ms.
    pub fn show(&mut self, done: usize, total: usize) {
        if self
            .shown
            .is_some_and(|t| t.elapsed() < Duration::from_millis(500))
        {
            return;
        }
        self.shown = Some(Instant::now());
        eprint!("\r{}: {done}/{total}   ", self.label);
        let _ = std::io::stderr().flush();
    }

    /// A line of its own.
    pub fn note(&mut self, text: &str) {
        eprintln!("\r{}: {text}", self.label);
        self.shown = None;
    }

    /// Ends the phase with `text`.
    pub fn finish(&mut self, text: &str) {
        eprintln!("\r{}: {text}            ", self.label);
    }
}
