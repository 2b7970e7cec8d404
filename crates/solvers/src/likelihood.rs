//! Exact log-likelihood of a flow through the instantaneous change of variables (Chen et al.
//! 2018; FFJORD): along `dx/dt = v(x, t)`, `d/dt log p_t(x_t) = −div v(x_t, t)`, so
//! `log p₁(x₁) = log p₀(x₀) − ∫₀¹ div v(x_t, t) dt` with `x₀` the flow's preimage of `x₁`.
//!
//! The state `[x, ℓ]` is integrated backwards, from `[x₁, 0]` at `t = 1` to `[x₀, ℓ₀]` at
//! `t = 0`, by any of the solvers, with `dℓ/dt = div v`; then `ℓ₀ = −∫₀¹ div v dt` and
//! `log p₁(x₁) = log p₀(x₀) + ℓ₀`. The divergence comes from candle's reverse mode: exactly,
//! one backward pass per dimension (2-D data), or by Hutchinson's estimator
//! `div v ≈ E[εᵀ(∂v/∂x)ε]` with Rademacher probes held fixed along the solve (images).

use crate::{solve, SolverError, SolverSpec, VelocityField};
use candle_core::{DType, Result, Tensor, Var, D};
use flowmatch_data::Rng;
use rand_distr::{Bernoulli, Distribution};
use std::f64::consts::PI;

/// How the divergence is computed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Divergence {
    /// `Σ_i ∂v_i/∂x_i`, one backward pass per dimension.
    Exact,
    /// Hutchinson's estimate with `probes` Rademacher vectors per point (one backward each).
    Hutchinson { probes: usize },
}

/// `div v(x, t)` per point `(B,)`, through candle's reverse mode; `probes` are the Hutchinson
/// vectors `(P, B, D)` (none: exact).
pub fn divergence(
    field: &dyn VelocityField,
    x: &Tensor,
    t: &Tensor,
    probes: Option<&Tensor>,
) -> Result<Tensor> {
    let xv = Var::from_tensor(&x.detach())?;
    let v = field.velocity(xv.as_tensor(), t)?;
    let grad_of = |scalar: Tensor| -> Result<Tensor> {
        let grads = scalar.backward()?;
        grads
            .get(xv.as_tensor())
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("the velocity does not depend on x".into()))
    };
    let mut div = Tensor::zeros(x.dim(0)?, x.dtype(), x.device())?;
    match probes {
        None => {
            for i in 0..x.dim(1)? {
                let g = grad_of(v.narrow(1, i, 1)?.sum_all()?)?;
                div = (div + g.narrow(1, i, 1)?.squeeze(1)?)?;
            }
        }
        Some(eps) => {
            let p = eps.dim(0)?;
            for k in 0..p {
                let e = eps.get(k)?;
                // εᵀJ by one backward pass of Σ v·ε, then (εᵀJ)·ε.
                let g = grad_of((&v * &e)?.sum_all()?)?;
                div = (div + (g * &e)?.sum(D::Minus1)?)?;
            }
            div = (div / p as f64)?;
        }
    }
    Ok(div.detach())
}

/// `log N(x; 0, σ²I)` per row.
pub fn gaussian_log_density(x: &Tensor, std: f64) -> Result<Tensor> {
    let d = x.dim(1)? as f64;
    let sq = x.to_dtype(DType::F64)?.sqr()?.sum(D::Minus1)?;
    sq.affine(-0.5 / (std * std), -0.5 * d * (2.0 * PI * std * std).ln())
}

/// `log p₁(x₁)` per row `(B,)` in nats (f64), for a Gaussian source `N(0, source_std²I)`,
/// integrating backwards with `solver`'s method and steps.
pub fn log_likelihood(
    field: &dyn VelocityField,
    x1: &Tensor,
    solver: &SolverSpec,
    div: Divergence,
    source_std: f64,
    rng: &mut Rng,
) -> std::result::Result<Tensor, SolverError> {
    let (b, d) = x1.dims2()?;
    let probes = match div {
        Divergence::Exact => None,
        Divergence::Hutchinson { probes } => {
            let coin = Bernoulli::new(0.5).map_err(|e| SolverError::Invalid(e.to_string()))?;
            let signs: Vec<f32> = (0..probes * b * d)
                .map(|_| if coin.sample(rng) { 1.0 } else { -1.0 })
                .collect();
            Some(Tensor::from_vec(signs, (probes, b, d), x1.device())?.to_dtype(x1.dtype())?)
        }
    };
    let augmented = Augmented {
        field,
        dim: d,
        probes,
    };
    let start = Tensor::cat(&[x1, &Tensor::zeros((b, 1), x1.dtype(), x1.device())?], 1)?;
    let mut spec = *solver;
    spec.reverse = true;
    let end = solve(&augmented, &start, &spec, false)?.x;
    let x0 = end.narrow(1, 0, d)?;
    let l0 = end.narrow(1, d, 1)?.squeeze(1)?.to_dtype(DType::F64)?;
    Ok((gaussian_log_density(&x0, source_std)? + l0)?)
}

/// The field of the state `[x, ℓ]`: `[v(x, t), div v(x, t)]`.
struct Augmented<'a> {
    field: &'a dyn VelocityField,
    dim: usize,
    probes: Option<Tensor>,
}

impl VelocityField for Augmented<'_> {
    fn velocity(&self, y: &Tensor, t: &Tensor) -> Result<Tensor> {
        let x = y.narrow(1, 0, self.dim)?;
        let v = self.field.velocity(&x, t)?.detach();
        let div = divergence(self.field, &x, t, self.probes.as_ref())?;
        Tensor::cat(&[v, div.unsqueeze(1)?], 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Method;
    use candle_core::Device;
    use flowmatch_data::rng_from_seed;
    use flowmatch_models::FnField;

    /// The exact flow from `N(0, I)` to `N(μ, diag(s²))`, coordinatewise:
    /// `v = μ + (t s² − (1 − t))/σ_t²·(x − tμ)`, `σ_t² = (1 − t)² + t² s²`; its density at
    /// `t = 1` is the target Gaussian, known in closed form.
    fn gaussian_flow(mu: [f64; 2], s: [f64; 2]) -> impl VelocityField {
        FnField(move |x: &Tensor, t: &Tensor| {
            let t = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0];
            let cols: Vec<Tensor> = (0..2)
                .map(|i| {
                    let var = (1.0 - t).powi(2) + t * t * s[i] * s[i];
                    let c = (t * s[i] * s[i] - (1.0 - t)) / var;
                    x.narrow(1, i, 1)?.affine(c, mu[i] - c * t * mu[i])
                })
                .collect::<Result<_>>()?;
            Tensor::cat(&cols, 1)
        })
    }

    fn closed_form(x: &[[f32; 2]], mu: [f64; 2], s: [f64; 2]) -> Vec<f64> {
        x.iter()
            .map(|p| {
                (0..2)
                    .map(|i| {
                        let z = (p[i] as f64 - mu[i]) / s[i];
                        -0.5 * z * z - s[i].ln() - 0.5 * (2.0 * PI).ln()
                    })
                    .sum()
            })
            .collect()
    }

    #[test]
    fn log_likelihood_of_a_gaussian_flow_matches_its_closed_form() {
        let (mu, s) = ([1.0, -0.5], [0.5, 2.0]);
        let field = gaussian_flow(mu, s);
        let pts = [[1.0f32, -0.5], [0.2, 1.5], [1.8, -3.0], [0.9, 0.4]];
        let x1 = Tensor::new(&pts, &Device::Cpu).unwrap();
        let want = closed_form(&pts, mu, s);
        let mut rng = rng_from_seed(0);
        let spec = SolverSpec::new(Method::Rk4, 50);
        let got: Vec<f64> = log_likelihood(&field, &x1, &spec, Divergence::Exact, 1.0, &mut rng)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "exact: {g} vs {w}");
        }
        // Hutchinson: unbiased, so many probes average to the exact value (its divergence is
        // the trace of a diagonal Jacobian, where Rademacher probes are exact: εᵢ² = 1).
        let got: Vec<f64> = log_likelihood(
            &field,
            &x1,
            &spec,
            Divergence::Hutchinson { probes: 2 },
            1.0,
            &mut rng,
        )
        .unwrap()
        .to_vec1()
        .unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-4, "Hutchinson: {g} vs {w}");
        }
        // With a non-diagonal Jacobian Hutchinson is noisy but unbiased.
        let rot = FnField(|x: &Tensor, _t: &Tensor| {
            let (a, b) = (x.narrow(1, 0, 1)?, x.narrow(1, 1, 1)?);
            Tensor::cat(
                &[
                    (a.affine(0.3, 0.0)? + b.affine(0.8, 0.0)?)?,
                    (a.affine(-0.8, 0.0)? + b.affine(-0.1, 0.0)?)?,
                ],
                1,
            )
        });
        let x = Tensor::zeros((2000, 2), DType::F32, &Device::Cpu).unwrap();
        let t = Tensor::zeros(2000, DType::F32, &Device::Cpu).unwrap();
        let exact: Vec<f32> = divergence(&rot, &x, &t, None).unwrap().to_vec1().unwrap();
        assert!((exact[0] - 0.2).abs() < 1e-6);
        let eps = Tensor::new(&[[[1f32, 1.0]], [[1.0, -1.0]]], &Device::Cpu).unwrap();
        let one = divergence(
            &rot,
            &x.narrow(0, 0, 1).unwrap(),
            &t.narrow(0, 0, 1).unwrap(),
            Some(&eps),
        )
        .unwrap();
        // (1,1)·J·(1,1) = 0.3+0.8−0.8−0.1 = 0.2 and (1,−1)·J·(1,−1) = 0.3−0.8+0.8−0.1 = 0.2.
        assert!((one.to_vec1::<f32>().unwrap()[0] - 0.2).abs() < 1e-6);
    }
}
