//! Progress for long loops: a bar with rate and ETA on a terminal, a plain line every few
//! seconds otherwise (logs stay readable when piped to a file).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// A progress display over `total` units.
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    pos: u64,
    start: Instant,
    last_line: Instant,
    quiet: bool,
}

impl Progress {
    /// A bar titled `label`. `quiet` silences everything (tests).
    pub fn new(label: &str, total: u64, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(total);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>10} [{elapsed_precise}] {wide_bar:.cyan/blue} {pos}/{len} {per_sec} ETA {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(label.to_string());
            b
        });
        let now = Instant::now();
        Self {
            bar,
            label: label.into(),
            total,
            pos: 0,
            start: now,
            last_line: now,
            quiet,
        }
    }

    /// Advances by `n` and shows `msg` (loss, learning rate, images/s...).
    pub fn inc(&mut self, n: u64, msg: &str) {
        self.pos += n;
        if let Some(b) = &self.bar {
            b.set_message(msg.to_string());
            b.inc(n);
        } else if !self.quiet
            && (self.last_line.elapsed() >= Duration::from_secs(10) || self.pos == self.total)
        {
            self.last_line = Instant::now();
            let el = self.start.elapsed().as_secs_f64();
            let rate = self.pos as f64 / el.max(1e-9);
            let eta = (self.total.saturating_sub(self.pos)) as f64 / rate.max(1e-9);
            eprintln!(
                "{} {}/{} ({:.1}/s, ETA {:.0}s) {msg}",
                self.label, self.pos, self.total, rate, eta
            );
        }
    }

    /// Prints a line without breaking the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None if !self.quiet => eprintln!("{line}"),
            None => {}
        }
    }

    /// Ends the display.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
