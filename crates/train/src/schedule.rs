//! Learning rate by step: linear warm-up, then the tutorial's step schedule (`lr * decay^k`
//! after the `k`-th boundary).

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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_and_warmup() {
        let s = LrSchedule {
            lr: 0.1,
            boundaries: vec![150, 300],
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
}
