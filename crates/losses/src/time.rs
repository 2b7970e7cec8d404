//! Where on [0, 1] the training times are drawn.

use crate::LossError;
use flowmatch_data::Rng;
use flowmatch_solvers::grid_check_warp as check_warp;
use flowmatch_solvers::warp_time;
use rand::Rng as _;
use rand_distr::{Distribution, StandardNormal};

/// The name of a time sampler in a config (`loss.time`; its settings are separate keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TimeKind {
    /// [`TimeSampler::Uniform`].
    Uniform,
    /// [`TimeSampler::Warped`].
    Warped,
    /// [`TimeSampler::LogitNormal`].
    LogitNormal,
}

/// The settings of every time sampler (each kind reads its own), with the papers' defaults:
/// the blog's warp `s = 0.5`, the standard logit-normal.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeOptions {
    /// The warp's slope `s` (warped).
    pub s: f64,
    /// The logit-normal's mean and std.
    pub mean: f64,
    pub std: f64,
}

impl Default for TimeOptions {
    fn default() -> Self {
        Self {
            s: 0.5,
            mean: 0.0,
            std: 1.0,
        }
    }
}

impl TimeSampler {
    /// The sampler of `kind` with its settings.
    pub fn of(kind: TimeKind, o: TimeOptions) -> TimeSampler {
        let TimeOptions { s, mean, std } = o;
        match kind {
            TimeKind::Uniform => Self::Uniform,
            TimeKind::Warped => Self::Warped { s },
            TimeKind::LogitNormal => Self::LogitNormal { mean, std },
        }
    }
}

/// A distribution of training times (config `loss.time`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum TimeSampler {
    /// `t ~ U(0, 1)`.
    Uniform,
    /// `t = warp_time(u, s)`, `u ~ U(0, 1)` (the blog's coverage trick).
    Warped { s: f64 },
    /// `t = sigmoid(m + s·z)`, `z ~ N(0, 1)` (Esser et al. 2024).
    LogitNormal { mean: f64, std: f64 },
    /// `t` uniform on the k-step Euler grid `{0, 1/k, …, (k-1)/k}` (k-step distillation,
    /// Liu et al. 2022).
    Grid { k: usize },
}

impl TimeSampler {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), LossError> {
        match *self {
            Self::Uniform => Ok(()),
            Self::Warped { s } => check_warp(s).map_err(|e| {
                let msg = e.to_string();
                let msg = msg.strip_prefix("invalid solver setting: ").unwrap_or(&msg);
                LossError::setting("s", msg)
            }),
            Self::LogitNormal { mean, std } if mean.is_finite() && std > 0.0 && std.is_finite() => {
                Ok(())
            }
            Self::LogitNormal { mean, .. } if !mean.is_finite() => Err(LossError::setting(
                "mean",
                format!("logit-normal mean must be finite, got {mean}"),
            )),
            Self::LogitNormal { std, .. } => Err(LossError::setting(
                "std",
                format!("logit-normal std must be a positive number, got {std}"),
            )),
            Self::Grid { k } if k >= 1 => Ok(()),
            Self::Grid { .. } => Err(LossError::setting("k", "distillation grid needs k ≥ 1")),
        }
    }

    /// Draws `n` times.
    pub fn sample(&self, n: usize, rng: &mut Rng) -> Vec<f32> {
        (0..n)
            .map(|_| match *self {
                Self::Uniform => rng.random::<f64>() as f32,
                Self::Warped { s } => warp_time(rng.random::<f64>(), s) as f32,
                Self::LogitNormal { mean, std } => {
                    let z: f64 = StandardNormal.sample(rng);
                    (1.0 / (1.0 + (-(mean + std * z)).exp())) as f32
                }
                Self::Grid { k } => rng.random_range(0..k) as f32 / k as f32,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowmatch_data::rng_from_seed;

    #[test]
    fn samplers_stay_in_unit_interval_with_expected_means() {
        let mut rng = rng_from_seed(0);
        for (s, mean) in [
            (TimeSampler::Uniform, 0.5),
            (TimeSampler::Warped { s: 0.5 }, 0.5),
            (
                TimeSampler::LogitNormal {
                    mean: 0.0,
                    std: 1.0,
                },
                0.5,
            ),
        ] {
            let v = s.sample(20_000, &mut rng);
            assert!(v.iter().all(|&t| (0.0..=1.0).contains(&t)));
            let m = v.iter().map(|&t| t as f64).sum::<f64>() / v.len() as f64;
            assert!((m - mean).abs() < 0.01, "{s:?} mean {m}");
        }
        // Warping with s < 1 concentrates samples in the middle.
        let mid = |s: TimeSampler, rng: &mut Rng| {
            s.sample(20_000, rng)
                .iter()
                .filter(|&&t| (0.4..0.6).contains(&t))
                .count()
        };
        assert!(
            mid(TimeSampler::Warped { s: 0.5 }, &mut rng)
                > mid(TimeSampler::Uniform, &mut rng) * 3 / 2
        );
        assert!(TimeSampler::Warped { s: 2.0 }.validate().is_err());
        let g = TimeSampler::Grid { k: 2 }.sample(1000, &mut rng);
        assert!(g.iter().all(|&t| t == 0.0 || t == 0.5) && g.contains(&0.0) && g.contains(&0.5));
        assert!(TimeSampler::Grid { k: 0 }.validate().is_err());
        assert!(TimeSampler::LogitNormal {
            mean: 0.0,
            std: 0.0
        }
        .validate()
        .is_err());
    }
}
