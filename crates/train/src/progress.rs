//! Progress for long loops: a bar with rate and ETA on a terminal, a plain line every few
//! seconds otherwise (logs stay readable when piped to a file).

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressState, ProgressStyle};

/// A progress display over `total` units.
pub struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    pos: u64,
    /// Units done before this process started (a resumed run): not part of the rate.
    base: u64,
    start: Instant,
    last_line: Instant,
    quiet: bool,
    deadline: Option<Instant>,
}

/// The bar's look; its ETA ends at `deadline` when that comes first.
fn style(deadline: Option<Instant>) -> ProgressStyle {
    ProgressStyle::with_template(
        "{prefix:>10} [{elapsed_precise}] {wide_bar:.cyan/blue} {pos}/{len} {per_sec} ETA {eta} {msg}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .with_key(
        "eta",
        move |state: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(w, "{:.0}s", eta(state.eta(), deadline).as_secs_f64());
        },
    )
    .progress_chars("=> ")
}

/// The time left: by the work's rate, or until `deadline` if that comes first.
fn eta(by_rate: Duration, deadline: Option<Instant>) -> Duration {
    deadline.map_or(by_rate, |d| {
        by_rate.min(d.saturating_duration_since(Instant::now()))
    })
}

impl Progress {
    /// A bar titled `label`. `quiet` silences everything (tests).
    pub fn new(label: &str, total: u64, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(total);
            b.set_style(style(None));
            b.set_prefix(label.to_string());
            b
        });
        let now = Instant::now();
        Self {
            bar,
            label: label.into(),
            total,
            pos: 0,
            base: 0,
            start: now,
            last_line: now,
            quiet,
            deadline: None,
        }
    }

    /// Starts the count at `pos` (a resumed run) without counting those units in the rate.
    pub fn start_at(&mut self, pos: u64) {
        (self.pos, self.base) = (pos, pos);
        self.start = Instant::now();
        if let Some(b) = &self.bar {
            b.set_position(pos);
            b.reset_eta();
        }
    }

    /// Ends the ETA at `deadline` when that comes first: a run with a time limit.
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = Some(deadline);
        if let Some(b) = &self.bar {
            b.set_style(style(Some(deadline)));
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
            let rate = (self.pos - self.base) as f64 / el.max(1e-9);
            let left = (self.total.saturating_sub(self.pos)) as f64 / rate.max(1e-9);
            let eta = eta(Duration::from_secs_f64(left.min(1e9)), self.deadline).as_secs_f64();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eta_ends_at_the_deadline_when_that_comes_first() {
        let by_rate = Duration::from_secs(300);
        assert_eq!(eta(by_rate, None), by_rate);
        let far = Instant::now() + Duration::from_secs(1000);
        assert_eq!(eta(by_rate, Some(far)), by_rate);
        let near = eta(by_rate, Some(Instant::now() + Duration::from_secs(60)));
        assert!(
            near <= Duration::from_secs(60) && near > Duration::from_secs(58),
            "{near:?}"
        );
        let past = Instant::now() - Duration::from_secs(1);
        assert_eq!(eta(by_rate, Some(past)), Duration::ZERO);
    }
}
