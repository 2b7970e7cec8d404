//! Stochastic sampling of a trained flow (the blog's "jitter"): Euler–Maruyama on
//! `dx = [v + ½g(t)²·∇log p_t(x)] dt + g(t) dW`, which has the flow's marginals for any noise
//! scale `g` (Song et al. 2021; Albergo & Vanden-Eijnden's stochastic interpolants).
//!
//! The score comes from the velocity. On the linear path from a Gaussian source `N(0, σ₀²I)`,
//! `x_t = (1 − t)x₀ + t x₁`, the flow's velocity is `v = E[x₁ − x₀ | x_t]` and
//! `x_t = (1 − t)E[x₀|x_t] + t E[x₁|x_t]`, so `E[x₀|x_t] = x_t − t v`, and Tweedie's formula
//! for the Gaussian part gives `∇log p_t(x) = −E[x₀|x_t = x] / ((1 − t)σ₀²)
//! = −(x − t v(x, t)) / ((1 − t)σ₀²)`.

use crate::{SolverError, VelocityField};
use candle_core::Tensor;
use flowmatch_data::Rng;
use rand_distr::{Distribution, StandardNormal};

/// The noise scale `g(t)` (config `eval.sde`: `γ` for `constant`, `γ(1 − t)` for `decaying`).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "g", rename_all = "kebab-case", deny_unknown_fields)]
pub enum NoiseSchedule {
    /// `g(t) = γ`.
    Constant { gamma: f64 },
    /// `g(t) = γ·(1 − t)`: no noise where the score's `1/(1 − t)` grows.
    Decaying { gamma: f64 },
}

impl NoiseSchedule {
    /// `g(t)`.
    pub fn at(&self, t: f64) -> f64 {
        match *self {
            Self::Constant { gamma } => gamma,
            Self::Decaying { gamma } => gamma * (1.0 - t),
        }
    }

    /// A label such as `em-g0.5` or `em-decay-g0.5`.
    pub fn label(&self) -> String {
        match *self {
            Self::Constant { gamma } => format!("em-g{gamma}"),
            Self::Decaying { gamma } => format!("em-decay-g{gamma}"),
        }
    }

    /// Checks `γ ≥ 0`, finite.
    pub fn validate(&self) -> Result<(), SolverError> {
        let (Self::Constant { gamma } | Self::Decaying { gamma }) = *self;
        if gamma >= 0.0 && gamma.is_finite() {
            Ok(())
        } else {
            Err(SolverError::Invalid(format!(
                "the noise scale γ must be ≥ 0 and finite, got {gamma}"
            )))
        }
    }
}

/// The score `−(x − t·v)/((1 − t)σ₀²)` of the linear path from `N(0, σ₀²I)`, for `t < 1`.
pub fn score_from_velocity(
    x: &Tensor,
    v: &Tensor,
    t: f64,
    source_std: f64,
) -> candle_core::Result<Tensor> {
    (x - v.affine(t, 0.0)?)?.affine(-1.0 / ((1.0 - t) * source_std * source_std), 0.0)
}

/// Where the SDE's score `∇log p_t` comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SdeScore {
    /// [`score_from_velocity`]: the linear path from `N(0, source_std²I)`.
    FromVelocity { source_std: f64 },
    /// The model's score head, trained on a Schrödinger bridge of noise `sigma` (SF²M): it
    /// outputs `σ²/2·∇log p_t`.
    Head { sigma: f64 },
}

/// Euler–Maruyama from `x0` at `t = 0` to `t = 1` in `steps` uniform steps, with the noise
/// drawn from `rng` and the score from `score`. With `g = 0` it is the Euler ODE sampler (of
/// the flow's instantaneous velocity). Returns the end state.
pub fn sample_sde(
    field: &dyn VelocityField,
    x0: &Tensor,
    steps: usize,
    g: NoiseSchedule,
    score: SdeScore,
    rng: &mut Rng,
) -> Result<Tensor, SolverError> {
    g.validate()?;
    if steps == 0 {
        return Err(SolverError::Invalid(
            "the SDE sampler needs at least one step".into(),
        ));
    }
    let dt = 1.0 / steps as f64;
    let mut x = x0.clone();
    for k in 0..steps {
        let t = k as f64 * dt;
        let gt = g.at(t);
        let (v, score) = match score {
            SdeScore::Head { sigma } if gt != 0.0 => {
                let tt = Tensor::full(t as f32, x.dim(0)?, x.device())?.to_dtype(x.dtype())?;
                let (v, s) = field.velocity_and_score(&x, &tt)?;
                let s = s.ok_or_else(|| {
                    SolverError::Invalid("the model has no score head to sample with".into())
                })?;
                (v, s.affine(2.0 / (sigma * sigma), 0.0)?)
            }
            SdeScore::FromVelocity { source_std } if gt != 0.0 => {
                let v = field.velocity_at(&x, t)?;
                let s = score_from_velocity(&x, &v, t, source_std)?;
                (v, s)
            }
            _ => {
                x = (&x + field.velocity_at(&x, t)?.affine(dt, 0.0)?)?;
                continue;
            }
        };
        let drift = (v + score.affine(0.5 * gt * gt, 0.0)?)?;
        let noise: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                let z: f64 = StandardNormal.sample(rng);
                z as f32
            })
            .collect();
        let noise = Tensor::from_vec(noise, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x = ((x + drift.affine(dt, 0.0)?)? + noise.affine(gt * dt.sqrt(), 0.0)?)?;
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use flowmatch_data::rng_from_seed;
    use flowmatch_models::FnField;

    /// The exact marginal velocity from `N(0, 1)` to `N(μ, s²)` under the independent
    /// coupling: `x_t ~ N(tμ, σ_t²)`, `σ_t² = (1 − t)² + t²s²`, and
    /// `v(x, t) = μ + (t s² − (1 − t))/σ_t²·(x − tμ)`.
    fn gaussian_flow(mu: f64, s: f64) -> impl VelocityField {
        FnField(move |x: &Tensor, t: &Tensor| {
            let t = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0];
            let var = (1.0 - t).powi(2) + t * t * s * s;
            let c = (t * s * s - (1.0 - t)) / var;
            x.affine(c, mu - c * t * mu)
        })
    }

    fn moments(x: &Tensor) -> (f64, f64) {
        let v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let n = v.len() as f64;
        let m = v.iter().map(|&a| a as f64).sum::<f64>() / n;
        let var = v.iter().map(|&a| (a as f64 - m).powi(2)).sum::<f64>() / n;
        (m, var.sqrt())
    }

    #[test]
    fn euler_maruyama_samples_the_flows_gaussian_marginal_for_any_noise() {
        let (mu, s) = (2.0, 0.5);
        let field = gaussian_flow(mu, s);
        let mut rng = rng_from_seed(3);
        let x0 = Tensor::randn(0f32, 1.0, (40_000, 1), &Device::Cpu).unwrap();
        for g in [
            NoiseSchedule::Constant { gamma: 0.0 },
            NoiseSchedule::Constant { gamma: 0.5 },
            NoiseSchedule::Constant { gamma: 1.0 },
            NoiseSchedule::Decaying { gamma: 1.5 },
        ] {
            let score = SdeScore::FromVelocity { source_std: 1.0 };
            let x1 = sample_sde(&field, &x0, 400, g, score, &mut rng).unwrap();
            let (m, sd) = moments(&x1);
            // Monte-Carlo error ≈ s/√n = 0.0025 on the mean; the Euler–Maruyama bias is O(dt).
            assert!((m - mu).abs() < 0.02, "{g:?}: mean {m}, expected {mu}");
            assert!((sd - s).abs() < 0.02, "{g:?}: std {sd}, expected {s}");
        }
        // The score is the Gaussian's own: −(x − tμ)/σ_t² at t = 0.3.
        let x = Tensor::new(&[[0.7f64]], &Device::Cpu).unwrap();
        let t = 0.3;
        let v = field.velocity_at(&x, t).unwrap();
        let got = score_from_velocity(&x, &v, t, 1.0)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap()[0][0];
        let var = (1.0 - t).powi(2) + t * t * s * s;
        // (the field reads t through f32, hence 1e-6)
        assert!((got - (-(0.7 - t * mu) / var)).abs() < 1e-6);
        assert!(NoiseSchedule::Constant { gamma: -1.0 }.validate().is_err());
    }

    /// A score head is read as `σ²/2·∇log p`: a field that stands still (`v = 0`) on
    /// `N(0, 1)` with the head `σ²/2·(−x)` keeps the samples at unit variance under any noise.
    #[test]
    fn a_score_head_drives_the_drift() {
        struct Still(f64);
        impl VelocityField for Still {
            fn velocity(&self, x: &Tensor, _t: &Tensor) -> candle_core::Result<Tensor> {
                x.zeros_like()
            }
            fn velocity_and_score(
                &self,
                x: &Tensor,
                t: &Tensor,
            ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
                Ok((
                    self.velocity(x, t)?,
                    Some(x.affine(-self.0 * self.0 / 2.0, 0.0)?),
                ))
            }
            fn has_score(&self) -> bool {
                true
            }
        }
        let sigma = 0.6;
        let mut rng = rng_from_seed(3);
        let n = 20_000;
        let z: Vec<f32> = (0..n)
            .map(|_| {
                <StandardNormal as Distribution<f64>>::sample(&StandardNormal, &mut rng) as f32
            })
            .collect();
        let x0 = Tensor::from_vec(z, (n, 1), &Device::Cpu).unwrap();
        let g = NoiseSchedule::Constant { gamma: 1.5 };
        let x1 = sample_sde(
            &Still(sigma),
            &x0,
            200,
            g,
            SdeScore::Head { sigma },
            &mut rng,
        )
        .unwrap();
        let var = x1
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((var - 1.0).abs() < 0.05, "{var}");
        // Without the head's scale the variance would drift: σ²/2 ≠ 1 here.
        assert!((sigma * sigma / 2.0 - 1.0f64).abs() > 0.5);
    }
}
