//! The learning rate over a training: a linear warm-up, then constant or decaying to zero.

use crate::LossError;

/// How the learning rate moves after the warm-up (config `train.lr_decay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LrDecay {
    /// The base rate to the end (the seeds' Adam).
    Constant,
    /// Half a cosine from the base rate to zero at the last step.
    Cosine,
    /// A straight line from the base rate to zero at the last step.
    Linear,
}

/// A learning-rate schedule over `total` steps: `warmup` steps rising linearly to the base
/// rate, then [`LrDecay`] to the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LrSchedule {
    pub decay: LrDecay,
    pub warmup: usize,
    pub total: usize,
}

impl LrSchedule {
    /// The base rate throughout (factor 1 at every step).
    pub const CONSTANT: Self = Self {
        decay: LrDecay::Constant,
        warmup: 0,
        total: 0,
    };

    /// Whether the rate stays the base rate throughout (no warm-up, no decay).
    pub fn is_constant(&self) -> bool {
        self.decay == LrDecay::Constant && self.warmup == 0
    }

    /// Checks that the warm-up fits in the training.
    pub fn validate(&self) -> Result<(), LossError> {
        if self.decay != LrDecay::Constant && self.total == 0 {
            return Err(LossError::setting(
                "total",
                "a decaying learning rate needs the total step count",
            ));
        }
        if self.warmup > 0 && self.total > 0 && self.warmup >= self.total {
            return Err(LossError::setting(
                "warmup",
                format!(
                    "the warm-up ({} steps) must be shorter than the training ({} steps)",
                    self.warmup, self.total
                ),
            ));
        }
        Ok(())
    }

    /// The factor on the base rate for the step after `done` steps (step `done + 1`).
    pub fn factor(&self, done: usize) -> f64 {
        if done < self.warmup {
            return (done + 1) as f64 / self.warmup as f64;
        }
        // Progress through the decay: 0 at the first step after the warm-up, 1 at the last.
        let span = self.total.saturating_sub(self.warmup).max(1) as f64;
        let p = ((done - self.warmup) as f64 / span).min(1.0);
        match self.decay {
            LrDecay::Constant => 1.0,
            LrDecay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
            LrDecay::Linear => 1.0 - p,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warms_up_linearly_then_decays_to_zero() {
        let s = |decay| LrSchedule {
            decay,
            warmup: 10,
            total: 110,
        };
        for d in [LrDecay::Constant, LrDecay::Cosine, LrDecay::Linear] {
            assert_eq!(s(d).factor(0), 0.1);
            assert_eq!(s(d).factor(4), 0.5);
            assert_eq!(
                s(d).factor(10),
                1.0,
                "{d:?}: the first step after the warm-up"
            );
        }
        // Halfway through the decay: cos(π/2) and the line's midpoint.
        assert!((s(LrDecay::Cosine).factor(60) - 0.5).abs() < 1e-12);
        assert!((s(LrDecay::Linear).factor(60) - 0.5).abs() < 1e-12);
        // The last step (done = 109) is within one step of zero.
        assert!(s(LrDecay::Cosine).factor(109) < 1e-3);
        assert!((s(LrDecay::Linear).factor(109) - 0.01).abs() < 1e-12);
        assert_eq!(s(LrDecay::Constant).factor(109), 1.0);
        assert_eq!(LrSchedule::CONSTANT.factor(12345), 1.0);
    }

    #[test]
    fn a_warmup_as_long_as_the_training_is_refused() {
        let bad = LrSchedule {
            decay: LrDecay::Cosine,
            warmup: 100,
            total: 100,
        };
        assert!(bad.validate().is_err());
        assert!(LrSchedule::CONSTANT.validate().is_ok());
    }
}
