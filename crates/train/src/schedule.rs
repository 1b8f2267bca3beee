//! Learning rate by step: linear warm-up, then the tutorial's step schedule (`lr * decay^k`
//! after the `k`-th boundary), plus optional boundaries placed at fractions of the run's budget
//! (steps or time, whichever runs out first).

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// A step schedule with optional linear warm-up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    /// Learning rate after warm-up and before the first boundary.
    pub lr: f64,
    /// Steps at which the rate is multiplied by `decay`.
    pub boundaries: Vec<usize>,
    /// Fractions of the run, in (0, 1), after which the rate is also multiplied by `decay`. A
    /// run's progress is the larger of steps done / total steps and time used / time limit, so
    /// a time-limited run decays at the same point of its budget on a fast or a slow machine.
    pub progress_boundaries: Vec<f64>,
    /// Factor applied at each boundary.
    pub decay: f64,
    /// Steps of linear warm-up from `lr * warmup_factor` to `lr` (0: none).
    pub warmup_steps: usize,
    /// Starting fraction of the warm-up.
    pub warmup_factor: f64,
}

impl LrSchedule {
    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("lr = {} must be positive", self.lr);
        }
        if !(self.decay > 0.0 && self.decay.is_finite()) {
            bail!("decay = {} must be positive", self.decay);
        }
        if self.boundaries.windows(2).any(|w| w[0] >= w[1]) {
            bail!("boundaries = {:?} must increase", self.boundaries);
        }
        let pb = &self.progress_boundaries;
        if pb.iter().any(|f| !(*f > 0.0 && *f < 1.0)) || pb.windows(2).any(|w| w[0] >= w[1]) {
            bail!("progress_boundaries = {pb:?} must increase and lie strictly between 0 and 1");
        }
        if !(0.0..=1.0).contains(&self.warmup_factor) {
            bail!("warmup_factor = {} must lie in [0, 1]", self.warmup_factor);
        }
        Ok(())
    }

    /// The rate at step `step` (0-based).
    pub fn at(&self, step: usize) -> f64 {
        let k = self.boundaries.iter().filter(|&&b| step >= b).count();
        let base = self.lr * self.decay.powi(k as i32);
        if step < self.warmup_steps {
            let t = step as f64 / self.warmup_steps as f64;
            base * (self.warmup_factor + (1.0 - self.warmup_factor) * t)
        } else {
            base
        }
    }

    /// The rate at `step` once the progress boundaries in `decays` have taken effect.
    pub fn at_progress(&self, step: usize, decays: &ProgressDecays) -> f64 {
        self.at(step) * self.decay.powi(decays.fired_at.len() as i32)
    }

    /// Records, before step `step` runs, the progress boundaries that `progress` has reached.
    pub fn advance(&self, decays: &mut ProgressDecays, step: usize, progress: f64) {
        while let Some(&f) = self.progress_boundaries.get(decays.fired_at.len()) {
            if progress < f {
                break;
            }
            decays.fired_at.push(step);
        }
    }
}

/// A run's progress in [0, 1]: the larger of `step / total_steps` and `elapsed_s / time_limit_s`.
pub fn run_progress(
    step: usize,
    total_steps: usize,
    elapsed_s: f64,
    time_limit_s: Option<f64>,
) -> f64 {
    let by_steps = step as f64 / total_steps.max(1) as f64;
    let by_time = time_limit_s.map_or(0.0, |t| elapsed_s / t);
    by_steps.max(by_time).min(1.0)
}

/// A resumed run's decays and start instant, from its checkpoint's extras: the clock continues
/// where it stopped, so the time limit and the progress cover the whole run. A run that has
/// used its whole time limit is refused with what to change.
pub fn resume_clock(
    extra: &serde_json::Value,
    time_limit_minutes: f64,
) -> Result<(ProgressDecays, std::time::Instant)> {
    let (decays, elapsed) = ProgressDecays::from_extra(extra)?;
    if time_limit_minutes > 0.0 && elapsed >= time_limit_minutes * 60.0 {
        bail!(
            "the run has used its time limit ({:.1} of {time_limit_minutes} min): raise train.time_limit_minutes to continue it",
            elapsed / 60.0
        );
    }
    let now = std::time::Instant::now();
    let t0 = now
        .checked_sub(std::time::Duration::from_secs_f64(elapsed))
        .unwrap_or(now);
    Ok((decays, t0))
}

/// The steps at which a run's progress boundaries took effect. Kept in the checkpoint: where a
/// time-dependent boundary fired cannot be recomputed, and a resumed run must keep it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgressDecays {
    /// One step per boundary passed, in order.
    pub fired_at: Vec<usize>,
}

impl ProgressDecays {
    /// The checkpoint extras that carry a run's clock and decays across a resume.
    pub fn to_extra(&self, elapsed_s: f64) -> serde_json::Value {
        serde_json::json!({ "elapsed_s": elapsed_s, "progress_decays": self.fired_at })
    }

    /// Reads [`Self::to_extra`]'s fields back (a checkpoint without them: none fired, no time
    /// used); returns the decays and the seconds the run had used.
    pub fn from_extra(extra: &serde_json::Value) -> Result<(Self, f64)> {
        let elapsed = match extra.get("elapsed_s") {
            None => 0.0,
            Some(v) => match v.as_f64() {
                Some(t) if t >= 0.0 => t,
                _ => bail!("checkpoint extra `elapsed_s` = {v} is not a non-negative number"),
            },
        };
        let fired_at = match extra.get("progress_decays") {
            None => Vec::new(),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| anyhow::anyhow!("checkpoint extra `progress_decays` = {v}: {e}"))?,
        };
        Ok((Self { fired_at }, elapsed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_and_warmup() {
        let s = LrSchedule {
            lr: 0.1,
            boundaries: vec![150, 300],
            progress_boundaries: vec![],
            decay: 0.1,
            warmup_steps: 10,
            warmup_factor: 0.1,
        };
        s.validate().unwrap();
        assert!((s.at(0) - 0.01).abs() < 1e-12);
        assert!((s.at(5) - 0.055).abs() < 1e-12);
        assert_eq!(s.at(10), 0.1);
        assert_eq!(s.at(149), 0.1);
        assert!((s.at(150) - 0.01).abs() < 1e-12);
        assert!((s.at(300) - 0.001).abs() < 1e-12);
        let bad = LrSchedule {
            boundaries: vec![5, 5],
            ..s
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("boundaries")
        );
    }

    #[test]
    fn progress_boundaries_fire_once_at_the_step_reached() {
        let s = LrSchedule {
            lr: 0.1,
            boundaries: vec![100],
            progress_boundaries: vec![0.5, 0.8],
            decay: 0.1,
            warmup_steps: 0,
            warmup_factor: 1.0,
        };
        s.validate().unwrap();
        // 1,000 steps or 60 s: time runs out first here.
        assert_eq!(run_progress(10, 1000, 30.0, Some(60.0)), 0.5);
        assert_eq!(run_progress(600, 1000, 3.0, Some(60.0)), 0.6);
        assert_eq!(run_progress(600, 1000, 3.0, None), 0.6);
        assert_eq!(run_progress(5, 10, 100.0, Some(60.0)), 1.0);
        let mut d = ProgressDecays::default();
        s.advance(&mut d, 40, 0.49);
        assert!(d.fired_at.is_empty());
        assert_eq!(s.at_progress(40, &d), 0.1);
        s.advance(&mut d, 41, 0.5);
        assert_eq!(d.fired_at, vec![41]);
        assert!((s.at_progress(41, &d) - 0.01).abs() < 1e-12);
        s.advance(&mut d, 42, 0.6);
        assert_eq!(d.fired_at, vec![41]);
        // Past the step boundary and the second progress boundary: x0.1 three times.
        s.advance(&mut d, 120, 0.95);
        assert_eq!(d.fired_at, vec![41, 120]);
        assert!((s.at_progress(120, &d) - 1e-4).abs() < 1e-15);
        for bad in [vec![0.0], vec![1.0], vec![0.7, 0.6], vec![f64::NAN]] {
            let e = LrSchedule {
                progress_boundaries: bad,
                ..s.clone()
            };
            let msg = e.validate().unwrap_err().to_string();
            assert!(msg.contains("progress_boundaries"), "{msg}");
        }
    }

    #[test]
    fn the_clock_and_decays_survive_a_resume() {
        let d = ProgressDecays { fired_at: vec![7] };
        let extra = d.to_extra(90.0);
        let (back, t0) = resume_clock(&extra, 2.0).unwrap();
        assert_eq!(back, d);
        let e = t0.elapsed().as_secs_f64();
        assert!((90.0..91.0).contains(&e), "{e}");
        // Older checkpoints have neither field.
        let (none, t0) = resume_clock(&serde_json::json!({}), 2.0).unwrap();
        assert!(none.fired_at.is_empty() && t0.elapsed().as_secs_f64() < 1.0);
        let msg = resume_clock(&extra, 1.5).unwrap_err().to_string();
        assert!(msg.contains("time_limit_minutes"), "{msg}");
        let bad = serde_json::json!({"elapsed_s": "soon"});
        assert!(
            resume_clock(&bad, 0.0)
                .unwrap_err()
                .to_string()
                .contains("elapsed_s")
        );
    }
}
