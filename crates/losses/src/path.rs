//! Probability paths (Lipman et al. 2023; Meta `flow_matching`'s affine path + scheduler).

use crate::LossError;
use candle_core::Tensor;
use flowmatch_data::Rng;
use rand_distr::{Distribution, StandardNormal};
use std::f64::consts::FRAC_PI_2;

/// Coefficients of an affine path at one time: `x_t = σ x_0 + α x_1`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Coefficients {
    /// Weight of the target, `α_t`.
    pub alpha: f64,
    /// Weight of the source, `σ_t`.
    pub sigma: f64,
    /// `dα/dt`.
    pub d_alpha: f64,
    /// `dσ/dt`.
    pub d_sigma: f64,
}

/// The schedule `(α_t, σ_t)` of an affine path (config `loss.path`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// `α = t, σ = 1 - t`: straight lines at constant speed (rectified flow, I-CFM).
    Linear,
    /// `α = sin(πt/2), σ = cos(πt/2)`: the blog's variance-preserving cosine interpolation.
    Cosine,
    /// Variance preserving (Song et al. 2021) with β ∈ [0.1, 20], as Meta's `VPScheduler`.
    Vp,
}

impl Schedule {
    /// The config name of the schedule.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::Cosine => "cosine",
            Self::Vp => "vp",
        }
    }

    /// The coefficients at time `t ∈ [0, 1]`.
    pub fn at(&self, t: f64) -> Coefficients {
        match self {
            Self::Linear => Coefficients {
                alpha: t,
                sigma: 1.0 - t,
                d_alpha: 1.0,
                d_sigma: -1.0,
            },
            Self::Cosine => Coefficients {
                alpha: (FRAC_PI_2 * t).sin(),
                sigma: (FRAC_PI_2 * t).cos(),
                d_alpha: FRAC_PI_2 * (FRAC_PI_2 * t).cos(),
                d_sigma: -FRAC_PI_2 * (FRAC_PI_2 * t).sin(),
            },
            Self::Vp => {
                let (b0, b1) = (0.1, 20.0);
                // σ̇ diverges at t = 1; stay a hair inside.
                let t = t.min(1.0 - 1e-5);
                let s = 1.0 - t;
                let big_t = 0.5 * s * s * (b1 - b0) + s * b0;
                let d_big_t = -s * (b1 - b0) - b0;
                let alpha = (-0.5 * big_t).exp();
                let d_alpha = -0.5 * d_big_t * alpha;
                let sigma = (1.0 - alpha * alpha).sqrt();
                Coefficients {
                    alpha,
                    sigma,
                    d_alpha,
                    d_sigma: -alpha * d_alpha / sigma,
                }
            }
        }
    }
}

/// A sampled point on the path and the conditional velocity to regress on.
#[derive(Debug, Clone)]
pub struct PathSample {
    /// `x_t`.
    pub x_t: Tensor,
    /// Target velocity `dx_t/dt`.
    pub dx_t: Tensor,
    /// What a score head regresses on (the Brownian bridge's noise), where the path has one.
    pub score: Option<ScoreTarget>,
}

/// The Brownian bridge's score target in SF²M's form: a score head `s` (which stands for
/// `σ²/2·∇log p_t`) is trained on `mean |λ_t·s + ε|²`, `λ_t = 2σ_t/σ²`.
#[derive(Debug, Clone)]
pub struct ScoreTarget {
    /// `λ_t` per pair, a `(B, 1, …)` column.
    pub lambda: Tensor,
    /// The standard normal noise `ε` of `x_t`.
    pub noise: Tensor,
}

/// A conditional probability path between paired source and target points.
pub trait ProbabilityPath: Send + Sync {
    /// Samples `x_t` and `dx_t` for pairs `(x_0[i], x_1[i])` at times `t[i]`.
    fn sample(
        &self,
        x0: &Tensor,
        x1: &Tensor,
        t: &[f32],
        rng: &mut Rng,
    ) -> Result<PathSample, LossError>;
}

/// `x_t = σ_t x_0 + α_t x_1 + σ_min ε`, `dx_t = σ̇_t x_0 + α̇_t x_1` (TorchCFM's and the
/// lesson's `sigma_min`: Gaussian noise of std `σ_min` around the path, target unchanged).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AffinePath {
    /// The schedule.
    pub schedule: Schedule,
    /// Std of the noise around the path (0 = exact interpolation).
    pub sigma_min: f64,
}

impl AffinePath {
    /// A path, checking `σ_min ≥ 0` and finite.
    pub fn new(schedule: Schedule, sigma_min: f64) -> Result<Self, LossError> {
        if !(sigma_min >= 0.0 && sigma_min.is_finite()) {
            return Err(LossError::setting(
                "sigma_min",
                format!("sigma_min must be ≥ 0, got {sigma_min}"),
            ));
        }
        Ok(Self {
            schedule,
            sigma_min,
        })
    }
}

/// A `(B, 1, 1, …)` column broadcastable against `like`.
fn column(v: Vec<f32>, like: &Tensor) -> Result<Tensor, LossError> {
    let mut shape = vec![v.len()];
    shape.extend(std::iter::repeat_n(1, like.rank() - 1));
    Ok(Tensor::from_vec(v, shape, like.device())?.to_dtype(like.dtype())?)
}

impl ProbabilityPath for AffinePath {
    fn sample(
        &self,
        x0: &Tensor,
        x1: &Tensor,
        t: &[f32],
        rng: &mut Rng,
    ) -> Result<PathSample, LossError> {
        check_fit(x0, x1, t)?;
        let c: Vec<Coefficients> = t.iter().map(|&ti| self.schedule.at(ti as f64)).collect();
        let col = |f: fn(&Coefficients) -> f64| column(c.iter().map(|k| f(k) as f32).collect(), x0);
        let (a, s, da, ds) = (
            col(|k| k.alpha)?,
            col(|k| k.sigma)?,
            col(|k| k.d_alpha)?,
            col(|k| k.d_sigma)?,
        );
        let mut x_t = (x0.broadcast_mul(&s)? + x1.broadcast_mul(&a)?)?;
        if self.sigma_min > 0.0 {
            let noise: Vec<f32> = (0..x0.elem_count())
                .map(|_| {
                    (self.sigma_min
                        * <StandardNormal as Distribution<f64>>::sample(&StandardNormal, rng))
                        as f32
                })
                .collect();
            let noise = Tensor::from_vec(noise, x0.shape(), x0.device())?.to_dtype(x0.dtype())?;
            x_t = (x_t + noise)?;
        }
        let dx_t = match self.schedule {
            // Exactly x1 - x0, as in the seeds, with no rounding from the coefficients.
            Schedule::Linear => (x1 - x0)?,
            _ => (x0.broadcast_mul(&ds)? + x1.broadcast_mul(&da)?)?,
        };
        Ok(PathSample {
            x_t,
            dx_t,
            score: None,
        })
    }
}

/// The Brownian bridge of std `σ` between paired points (SB-CFM, TorchCFM's
/// `SchrodingerBridgeConditionalFlowMatcher`): `x_t = (1 − t)x_0 + t·x_1 + σ_t ε` with
/// `σ_t = σ√(t(1 − t))`, and the flow target `x_1 − x_0 + σ̇_t/σ_t·(x_t − μ_t)`,
/// `σ̇_t/σ_t = (1 − 2t)/(2t(1 − t))` (with TorchCFM's 1e-8 in the denominator).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BrownianBridge {
    pub sigma: f64,
}

impl ProbabilityPath for BrownianBridge {
    fn sample(
        &self,
        x0: &Tensor,
        x1: &Tensor,
        t: &[f32],
        rng: &mut Rng,
    ) -> Result<PathSample, LossError> {
        check_fit(x0, x1, t)?;
        let sd: Vec<f64> = t
            .iter()
            .map(|&ti| {
                let ti = ti as f64;
                self.sigma * (ti * (1.0 - ti)).max(0.0).sqrt()
            })
            .collect();
        let col = |f: &dyn Fn(usize, f64) -> f64| {
            column(
                t.iter()
                    .enumerate()
                    .map(|(i, &ti)| f(i, ti as f64) as f32)
                    .collect(),
                x0,
            )
        };
        let (a, s) = (col(&|_, t| t)?, col(&|_, t| 1.0 - t)?);
        let sd_col = col(&|i, _| sd[i])?;
        let rate = col(&|i, t| (1.0 - 2.0 * t) * sd[i] / (2.0 * t * (1.0 - t) + 1e-8))?;
        let lambda = col(&|i, _| 2.0 * sd[i] / (self.sigma * self.sigma))?;
        let noise: Vec<f32> = (0..x0.elem_count())
            .map(|_| <StandardNormal as Distribution<f64>>::sample(&StandardNormal, rng) as f32)
            .collect();
        let noise = Tensor::from_vec(noise, x0.shape(), x0.device())?.to_dtype(x0.dtype())?;
        let mu = (x0.broadcast_mul(&s)? + x1.broadcast_mul(&a)?)?;
        let x_t = (mu + noise.broadcast_mul(&sd_col)?)?;
        let dx_t = ((x1 - x0)? + noise.broadcast_mul(&rate)?)?;
        Ok(PathSample {
            x_t,
            dx_t,
            score: Some(ScoreTarget { lambda, noise }),
        })
    }
}

/// Checks that pairs and times fit one another.
fn check_fit(x0: &Tensor, x1: &Tensor, t: &[f32]) -> Result<(), LossError> {
    if x0.dims() != x1.dims() || x0.dim(0)? != t.len() {
        return Err(LossError::Invalid(format!(
            "path: x0 {:?}, x1 {:?} and {} times do not fit",
            x0.dims(),
            x1.dims(),
            t.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use flowmatch_data::rng_from_seed;

    fn pairs() -> (Tensor, Tensor, Vec<f32>) {
        let x0 = Tensor::new(&[[1.0f32, -2.0], [0.5, 0.0], [-1.0, 3.0]], &Device::Cpu).unwrap();
        let x1 = Tensor::new(&[[3.0f32, 1.0], [-0.5, 2.0], [2.0, 2.0]], &Device::Cpu).unwrap();
        (x0, x1, vec![0.0, 0.3, 1.0])
    }

    fn v2(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2().unwrap()
    }

    #[test]
    fn linear_path_matches_closed_form() {
        let (x0, x1, t) = pairs();
        let p = AffinePath::new(Schedule::Linear, 0.0)
            .unwrap()
            .sample(&x0, &x1, &t, &mut rng_from_seed(0))
            .unwrap();
        let (a, b, xt, dx) = (v2(&x0), v2(&x1), v2(&p.x_t), v2(&p.dx_t));
        for i in 0..3 {
            for d in 0..2 {
                let ti = t[i];
                assert!((xt[i][d] - ((1.0 - ti) * a[i][d] + ti * b[i][d])).abs() < 1e-6);
                assert_eq!(dx[i][d], b[i][d] - a[i][d]);
            }
        }
    }

    #[test]
    fn cosine_and_vp_paths_match_closed_form_and_their_derivatives() {
        let (x0, x1, t) = pairs();
        let p = AffinePath::new(Schedule::Cosine, 0.0)
            .unwrap()
            .sample(&x0, &x1, &t, &mut rng_from_seed(0))
            .unwrap();
        let (a, b, xt, dx) = (v2(&x0), v2(&x1), v2(&p.x_t), v2(&p.dx_t));
        let h = std::f32::consts::FRAC_PI_2;
        for i in 0..3 {
            for d in 0..2 {
                let ti = t[i];
                let want = (h * ti).cos() * a[i][d] + (h * ti).sin() * b[i][d];
                let dwant = -h * (h * ti).sin() * a[i][d] + h * (h * ti).cos() * b[i][d];
                assert!((xt[i][d] - want).abs() < 1e-5);
                assert!((dx[i][d] - dwant).abs() < 1e-5);
            }
        }
        for sched in [Schedule::Cosine, Schedule::Vp, Schedule::Linear] {
            for k in 1..99 {
                let t = k as f64 / 100.0;
                let (c, e) = (1e-6, sched.at(t));
                let (lo, hi) = (sched.at(t - c), sched.at(t + c));
                assert!(
                    ((hi.alpha - lo.alpha) / (2.0 * c) - e.d_alpha).abs()
                        < 1e-4 * (1.0 + e.d_alpha.abs())
                );
                assert!(
                    ((hi.sigma - lo.sigma) / (2.0 * c) - e.d_sigma).abs()
                        < 1e-4 * (1.0 + e.d_sigma.abs())
                );
            }
            // Endpoints: source at t=0 (up to VP's tiny α_0), target at t=1.
            assert!((sched.at(1.0).alpha - 1.0).abs() < 1e-4 && sched.at(1.0).sigma < 5e-3);
            assert!(sched.at(0.0).alpha < 1e-2 && (sched.at(0.0).sigma - 1.0).abs() < 1e-4);
        }
    }

    #[test]
    fn sigma_min_adds_noise_of_that_std_and_keeps_the_target() {
        let n = 20_000;
        let x0 = Tensor::zeros((n, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let x1 = Tensor::ones((n, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let t = vec![0.5f32; n];
        let p = AffinePath::new(Schedule::Linear, 0.1)
            .unwrap()
            .sample(&x0, &x1, &t, &mut rng_from_seed(1))
            .unwrap();
        let dev = (p.x_t - 0.5)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert!((dev - 0.1).abs() < 0.003, "{dev}");
        assert_eq!(p.dx_t.min_all().unwrap().to_scalar::<f32>().unwrap(), 1.0);
        assert!(AffinePath::new(Schedule::Linear, -0.1).is_err());
    }

    /// The bridge's marginal at t is N((1 − t)x_0 + t·x_1, σ²t(1 − t)) per coordinate, its flow
    /// target averages to x_1 − x_0 with the closed-form spread σ|1 − 2t|/(2√(t(1 − t))), and
    /// `λ_t·s + ε = 0` holds for the true scaled score `s = σ²/2·∇log p = −σ²(x_t − μ_t)/(2σ_t²)`.
    #[test]
    fn brownian_bridge_moments_match_the_closed_form() {
        let n = 40_000;
        let x0 = Tensor::full(-1.0f32, (n, 2), &Device::Cpu).unwrap();
        let x1 = Tensor::full(3.0f32, (n, 2), &Device::Cpu).unwrap();
        let sigma = 0.7;
        for t in [0.1f32, 0.5, 0.8] {
            let p = BrownianBridge { sigma }
                .sample(&x0, &x1, &vec![t; n], &mut rng_from_seed(4))
                .unwrap();
            let stats = |x: &Tensor| {
                let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
                let mean = v.iter().map(|&a| a as f64).sum::<f64>() / v.len() as f64;
                let var =
                    v.iter().map(|&a| (a as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
                (mean, var.sqrt())
            };
            let t = t as f64;
            let sd = sigma * (t * (1.0 - t)).sqrt();
            let (m, s) = stats(&p.x_t);
            assert!(
                (m - (4.0 * t - 1.0)).abs() < 4.0 * sd / (2.0 * n as f64).sqrt(),
                "t {t}: mean {m}"
            );
            assert!((s / sd - 1.0).abs() < 0.02, "t {t}: std {s} vs {sd}");
            let (m, s) = stats(&p.dx_t);
            let spread = sigma * (1.0 - 2.0 * t).abs() / (2.0 * (t * (1.0 - t)).sqrt());
            assert!(
                (m - 4.0).abs() < 4.0 * spread.max(1e-3) / (2.0 * n as f64).sqrt() + 1e-5,
                "t {t}: {m}"
            );
            assert!(
                (s - spread).abs() < 0.02 * spread + 1e-4,
                "t {t}: {s} vs {spread}"
            );
            let target = p.score.unwrap();
            let mu = (4.0 * t - 1.0) as f32;
            let true_score =
                ((p.x_t - mu as f64).unwrap() * (-sigma * sigma / (2.0 * sd * sd))).unwrap();
            let resid = (true_score.broadcast_mul(&target.lambda).unwrap() + target.noise)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(resid < 1e-4, "t {t}: {resid}");
        }
    }
}
