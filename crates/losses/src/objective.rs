//! What the model regresses on (config `loss.objective`): the flow's velocity (conditional flow
//! matching), MeanFlow's average velocity, or a shortcut model's self-consistent jump. All three
//! train through the one [`crate::Trainer`] step on the same couplings and paths; the last two
//! need a model with a span input (`ModelSpec::with_span`), an average velocity `u(x, t, h)`
//! over `[t, t + h]` that Euler steps of size `h` use at sampling time.

use crate::{LossError, PathSample, TimeSampler};
use candle_core::{Tensor, D};
use flowmatch_data::Rng;
use flowmatch_models::VelocityField;
use rand::Rng as _;

/// The name of an objective in a config (`loss.objective`; its settings are separate keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ObjectiveKind {
    /// [`Objective::Cfm`].
    Cfm,
    /// [`Objective::MeanFlow`].
    #[serde(rename = "meanflow")]
    MeanFlow,
    /// [`Objective::Shortcut`].
    Shortcut,
}

/// A training objective, checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Objective {
    /// `mean |v(x_t, t) − dx_t|²` (PyTorch `MSELoss`).
    Cfm,
    /// MeanFlow (Geng et al. 2025, arXiv 2505.13447), in our direction (t = 0 source, t = 1
    /// target): the average velocity over `[t, t + h]` from `z = x_t` obeys
    /// `u(z, t, h) = v(z, t) + h·(d/dt) u`, with `(d/dt) u = v·∂_z u + ∂_t u − ∂_h u` along the
    /// flow (the start moves, the end `t + h` stays). The paper's `u = v − (t − r)·du/dt`
    /// differentiates at the *end* of a step taken backwards in its time; ours sits at the
    /// start of a step taken forwards, hence the plus. The target uses the conditional velocity
    /// `dx_t` for `v`, and the JVP under stop-gradient.
    MeanFlow {
        /// Fraction of pairs with `h > 0` (two times drawn, sorted); the rest have `h = 0`
        /// (plain flow matching). The paper's best: 25%.
        span_fraction: f64,
        /// Adaptive weight `1 / (‖Δ‖² + 10⁻³)^p` per pair, detached (the paper's best: p = 1;
        /// p = 0 is the plain squared error).
        adaptive_p: f64,
    },
    /// Shortcut models (Frans et al. 2024): a `bootstrap_fraction` of each batch regresses
    /// `u(x_t, t, 2d)` on the self-consistency target `½·(u(x_t, t, d) + u(x′, t + d, d))`,
    /// `x′ = x_t + d·u(x_t, t, d)` (no gradient), with `2d ∈ {1, ½, …, 2/max_steps}` cycled
    /// over the batch and `t` on the grid of `2d`; the smallest half-step queries the flow
    /// (`h = 0`). The rest is flow matching at `h = 0`.
    Shortcut {
        bootstrap_fraction: f64,
        /// The finest step count `M` (a power of two ≥ 2).
        max_steps: usize,
    },
}

/// The settings of every objective, with the papers' defaults (MeanFlow: 25% spans, p = 1;
/// shortcut: a quarter of the batch bootstraps, 128 steps at the finest).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObjectiveOptions {
    pub span_fraction: f64,
    pub adaptive_p: f64,
    pub bootstrap_fraction: f64,
    pub max_steps: usize,
}

impl Default for ObjectiveOptions {
    fn default() -> Self {
        Self {
            span_fraction: 0.25,
            adaptive_p: 1.0,
            bootstrap_fraction: 0.25,
            max_steps: 128,
        }
    }
}

/// The times of one batch: where each pair sits on its path (`t`) and the span it jumps
/// (`h`, empty for [`Objective::Cfm`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Draws {
    pub t: Vec<f32>,
    pub h: Vec<f32>,
}

impl Objective {
    /// The objective of `kind` with its settings (those of the other kinds unused).
    pub fn of(kind: ObjectiveKind, o: ObjectiveOptions) -> Objective {
        let ObjectiveOptions {
            span_fraction,
            adaptive_p,
            bootstrap_fraction,
            max_steps,
        } = o;
        match kind {
            ObjectiveKind::Cfm => Self::Cfm,
            ObjectiveKind::MeanFlow => Self::MeanFlow {
                span_fraction,
                adaptive_p,
            },
            ObjectiveKind::Shortcut => Self::Shortcut {
                bootstrap_fraction,
                max_steps,
            },
        }
    }

    /// Whether the model needs a span input.
    pub fn needs_span(&self) -> bool {
        !matches!(self, Self::Cfm)
    }

    /// The config name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Cfm => "cfm",
            Self::MeanFlow { .. } => "meanflow",
            Self::Shortcut { .. } => "shortcut",
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), LossError> {
        let fraction = |field: &'static str, name: &str, f: f64| {
            if (0.0..=1.0).contains(&f) {
                Ok(())
            } else {
                Err(LossError::setting(
                    field,
                    format!("{name} must be in [0, 1], got {f}"),
                ))
            }
        };
        match *self {
            Self::Cfm => Ok(()),
            Self::MeanFlow {
                span_fraction,
                adaptive_p,
            } => {
                fraction("span_fraction", "the MeanFlow span fraction", span_fraction)?;
                if (0.0..=2.0).contains(&adaptive_p) {
                    Ok(())
                } else {
                    Err(LossError::setting(
                        "adaptive_p",
                        format!("the adaptive weight power must be in [0, 2], got {adaptive_p}"),
                    ))
                }
            }
            Self::Shortcut {
                bootstrap_fraction,
                max_steps,
            } => {
                fraction(
                    "bootstrap_fraction",
                    "the shortcut bootstrap fraction",
                    bootstrap_fraction,
                )?;
                if max_steps >= 2 && max_steps.is_power_of_two() && max_steps <= 1 << 20 {
                    Ok(())
                } else {
                    Err(LossError::setting(
                        "max_steps",
                        format!("the shortcut step count must be a power of two in 2..=2^20, got {max_steps}"),
                    ))
                }
            }
        }
    }

    /// Draws the batch's times: `time` for every pair, and for MeanFlow a second time and the
    /// choice of which pairs get a span, for shortcut models the bootstrap grid.
    pub fn draw(&self, n: usize, time: &TimeSampler, rng: &mut Rng) -> Draws {
        match *self {
            Self::Cfm => Draws {
                t: time.sample(n, rng),
                h: vec![],
            },
            Self::MeanFlow { span_fraction, .. } => {
                let a = time.sample(n, rng);
                let b = time.sample(n, rng);
                let (mut t, mut h) = (Vec::with_capacity(n), Vec::with_capacity(n));
                for (a, b) in a.into_iter().zip(b) {
                    if rng.random::<f64>() < span_fraction {
                        t.push(a.min(b));
                        h.push((a - b).abs());
                    } else {
                        t.push(a);
                        h.push(0.0);
                    }
                }
                Draws { t, h }
            }
            Self::Shortcut {
                bootstrap_fraction,
                max_steps,
            } => {
                let boot = bootstrap_count(n, bootstrap_fraction);
                let levels = max_steps.trailing_zeros() as usize;
                let mut draws = Draws {
                    t: Vec::with_capacity(n),
                    h: Vec::with_capacity(n),
                };
                for i in 0..boot {
                    // 2d = 2^-k, t uniform on {0, 2d, …, 1 − 2d}.
                    let sections = 1usize << (i % levels);
                    draws
                        .t
                        .push(rng.random_range(0..sections) as f32 / sections as f32);
                    draws.h.push(1.0 / sections as f32);
                }
                draws.t.extend(time.sample(n - boot, rng));
                draws.h.resize(n, 0.0);
                draws
            }
        }
    }

    /// The loss of `model` on a path sample drawn at `draws.t`.
    pub fn loss(
        &self,
        model: &dyn VelocityField,
        p: &PathSample,
        draws: &Draws,
    ) -> Result<Tensor, LossError> {
        let x = &p.x_t;
        let column = |v: &[f32]| -> Result<Tensor, LossError> {
            Ok(Tensor::from_slice(v, v.len(), x.device())?.to_dtype(x.dtype())?)
        };
        let t = column(&draws.t)?;
        match *self {
            Self::Cfm => match (&p.score, model.has_score()) {
                // SF²M: the flow's loss plus the score head's, `mean |λ_t·s + ε|²`.
                (Some(target), true) => {
                    let (v, score) = model.velocity_and_score(x, &t)?;
                    let score = score.ok_or_else(|| {
                        LossError::Invalid("the model's score head gave no output".into())
                    })?;
                    let flow = (v - &p.dx_t)?.sqr()?.mean_all()?;
                    let resid = (score.broadcast_mul(&target.lambda)? + &target.noise)?;
                    Ok((flow + resid.sqr()?.mean_all()?)?)
                }
                _ => {
                    let v = model.velocity(x, &t)?;
                    Ok((v - &p.dx_t)?.sqr()?.mean_all()?)
                }
            },
            Self::MeanFlow { adaptive_p, .. } => {
                let h = column(&draws.h)?;
                let u = model.mean_velocity(x, &t, &h)?;
                let target = meanflow_target(model, x, &t, &h, &p.dx_t)?;
                let sq = (u - target)?.sqr()?.flatten_from(1)?.sum(D::Minus1)?;
                let dim = x.elem_count() / x.dim(0)?;
                let loss = if adaptive_p == 0.0 {
                    sq
                } else {
                    let w = (sq.detach() + 1e-3)?.powf(-adaptive_p)?;
                    (sq * w)?
                };
                Ok((loss.mean_all()? / dim as f64)?)
            }
            Self::Shortcut {
                bootstrap_fraction,
                max_steps,
            } => {
                let n = x.dim(0)?;
                let boot = bootstrap_count(n, bootstrap_fraction);
                let h = column(&draws.h)?;
                let u = model.mean_velocity(x, &t, &h)?;
                let target = if boot == 0 {
                    p.dx_t.clone()
                } else {
                    let self_consistent = shortcut_target(
                        model,
                        &x.narrow(0, 0, boot)?,
                        &draws.t[..boot],
                        &draws.h[..boot],
                        max_steps,
                    )?;
                    Tensor::cat(&[&self_consistent, &p.dx_t.narrow(0, boot, n - boot)?], 0)?
                };
                Ok((u - target)?.sqr()?.mean_all()?)
            }
        }
    }
}

/// Pairs of a batch of `n` on the self-consistency target.
fn bootstrap_count(n: usize, fraction: f64) -> usize {
    ((n as f64 * fraction).round() as usize).min(n)
}

/// MeanFlow's target `v + h·(v·∂_z u + ∂_t u − ∂_h u)` at `(z, t, h)`, detached.
pub fn meanflow_target(
    model: &dyn VelocityField,
    z: &Tensor,
    t: &Tensor,
    h: &Tensor,
    v: &Tensor,
) -> Result<Tensor, LossError> {
    let (_, du) = model.mean_velocity_jvp(z, t, h, (v, 1.0, -1.0))?;
    let hc = h.reshape(shape_of_column(z)?)?;
    Ok((v + du.broadcast_mul(&hc)?)?.detach())
}

/// Shortcut models' target for span `2d = h`: two half steps of `d` under no gradient,
/// `½·(u(x, t, d) + u(x + d·u(x, t, d), t + d, d))`; the finest half step (`h = 2/M`) asks the
/// flow (`d = 0`) for its slopes but still steps by `d`.
pub fn shortcut_target(
    model: &dyn VelocityField,
    x: &Tensor,
    t: &[f32],
    h: &[f32],
    max_steps: usize,
) -> Result<Tensor, LossError> {
    let dev = x.device();
    let col = |v: Vec<f32>| -> Result<Tensor, LossError> {
        Ok(Tensor::from_vec(v, t.len(), dev)?.to_dtype(x.dtype())?)
    };
    let finest = 2.0 / max_steps as f32;
    let d: Vec<f32> = h.iter().map(|&h| h / 2.0).collect();
    let query: Vec<f32> = h
        .iter()
        .map(|&h| if h <= finest { 0.0 } else { h / 2.0 })
        .collect();
    let x = x.detach();
    let query = col(query)?;
    let s1 = model.mean_velocity(&x, &col(t.to_vec())?, &query)?.detach();
    let dcol = col(d.clone())?.reshape(shape_of_column(&x)?)?;
    let x2 = (&x + s1.broadcast_mul(&dcol)?)?;
    let t2: Vec<f32> = t.iter().zip(&d).map(|(t, d)| t + d).collect();
    let s2 = model.mean_velocity(&x2, &col(t2)?, &query)?.detach();
    Ok(((s1 + s2)? * 0.5)?)
}

/// `(B, 1, 1, …)` for a batch shaped like `x`.
fn shape_of_column(x: &Tensor) -> Result<Vec<usize>, LossError> {
    let mut shape = vec![x.dim(0)?];
    shape.extend(std::iter::repeat_n(1, x.rank() - 1));
    Ok(shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use flowmatch_data::rng_from_seed;

    /// The linear flow `v(x, t) = a·x`: `φ_{t+h}(x) = x·e^{ah}`, so its average velocity is
    /// `u(x, t, h) = x·(e^{ah} − 1)/h` (→ `a·x` as `h → 0`), known by hand.
    struct Exponential(f64);

    impl Exponential {
        fn factor(&self, h: f64) -> f64 {
            if h.abs() < 1e-12 {
                self.0
            } else {
                ((self.0 * h).exp() - 1.0) / h
            }
        }
    }

    impl VelocityField for Exponential {
        fn velocity(&self, x: &Tensor, _t: &Tensor) -> candle_core::Result<Tensor> {
            x.affine(self.0, 0.0)
        }
        fn mean_velocity(
            &self,
            x: &Tensor,
            _t: &Tensor,
            h: &Tensor,
        ) -> candle_core::Result<Tensor> {
            let f: Vec<f64> = h
                .to_dtype(DType::F64)?
                .to_vec1::<f64>()?
                .into_iter()
                .map(|h| self.factor(h))
                .collect();
            let f = Tensor::from_vec(f, (x.dim(0)?, 1), x.device())?.to_dtype(x.dtype())?;
            x.broadcast_mul(&f)
        }
    }

    fn points() -> Tensor {
        Tensor::new(&[[1.0f64, -2.0], [0.5, 0.25], [-1.5, 3.0]], &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    #[test]
    fn the_exact_average_velocity_is_a_fixed_point_of_the_meanflow_target() {
        // u = v + h·(v·∂_z u + ∂_t u − ∂_h u) holds for the true u; the target computed from
        // it (with its JVP by central differences in f64) gives u back.
        let field = Exponential(0.7);
        let z = points();
        let t = Tensor::new(&[0.1f64, 0.4, 0.0], &Device::Cpu).unwrap();
        let h = Tensor::new(&[0.9f64, 0.3, 0.0], &Device::Cpu).unwrap();
        let v = z.affine(0.7, 0.0).unwrap();
        let target = meanflow_target(&field, &z, &t, &h, &v).unwrap();
        let exact = field.mean_velocity(&z, &t, &h).unwrap();
        assert!(max_diff(&target, &exact) < 1e-8, "{target} vs {exact}");
        // With the opposite sign (the paper's, read in our direction) it would not be.
        let wrong = (&v - (&target - &v).unwrap()).unwrap();
        assert!(max_diff(&wrong, &exact) > 0.1);
    }

    #[test]
    fn the_shortcut_target_of_the_exact_average_velocity_is_the_double_step() {
        // ½·(u(x, t, d) + u(x e^{ad}, t + d, d)) = x·(e^{2ad} − 1)/(2d) = u(x, t, 2d).
        let field = Exponential(-0.8);
        let x = points();
        let (t, h) = ([0.0f32, 0.5, 0.25], [1.0f32, 0.5, 0.25]);
        let target = shortcut_target(&field, &x, &t, &h, 128).unwrap();
        let hh = Tensor::new(&[1.0f64, 0.5, 0.25], &Device::Cpu).unwrap();
        let exact = field.mean_velocity(&x, &hh, &hh).unwrap();
        assert!(max_diff(&target, &exact) < 1e-6, "{target} vs {exact}");
        // The finest level (2d = 2/M) takes its two half steps with the flow's slope:
        // ½·(a·x + a·x·(1 + a·d)).
        let (a, d) = (-0.8f64, 1.0 / 128.0);
        let fine = shortcut_target(&field, &x, &[0.0; 3], &[2.0 / 128.0; 3], 128).unwrap();
        let by_hand = x.affine(0.5 * a * (2.0 + a * d), 0.0).unwrap();
        assert!(max_diff(&fine, &by_hand) < 1e-6);
    }

    #[test]
    fn draws_follow_the_objectives() {
        let mut rng = rng_from_seed(1);
        let mf = Objective::MeanFlow {
            span_fraction: 0.25,
            adaptive_p: 1.0,
        };
        let d = mf.draw(4000, &TimeSampler::Uniform, &mut rng);
        let spans = d.h.iter().filter(|&&h| h > 0.0).count() as f64 / 4000.0;
        assert!((spans - 0.25).abs() < 0.03, "{spans}");
        assert!(d.t.iter().zip(&d.h).all(|(t, h)| *h >= 0.0 && t + h <= 1.0));
        let sc = Objective::Shortcut {
            bootstrap_fraction: 0.25,
            max_steps: 8,
        };
        let d = sc.draw(16, &TimeSampler::Uniform, &mut rng);
        // 4 bootstrap pairs cycling 2d = 1, 1/2, 1/4, then 1; t on the grid of 2d.
        assert_eq!(&d.h[..4], &[1.0, 0.5, 0.25, 1.0]);
        assert!(d.h[4..].iter().all(|&h| h == 0.0));
        for (t, h) in d.t[..4].iter().zip(&d.h[..4]) {
            assert!((t / h).fract() == 0.0 && t + h <= 1.0, "t {t} h {h}");
        }
        // CFM draws exactly what the time sampler draws (same RNG use as before objectives).
        let (mut r1, mut r2) = (rng_from_seed(2), rng_from_seed(2));
        let c = Objective::Cfm.draw(10, &TimeSampler::Uniform, &mut r1);
        assert_eq!(c.t, TimeSampler::Uniform.sample(10, &mut r2));
        assert!(Objective::Shortcut {
            bootstrap_fraction: 0.25,
            max_steps: 6
        }
        .validate()
        .is_err());
        assert!(Objective::MeanFlow {
            span_fraction: 1.5,
            adaptive_p: 1.0
        }
        .validate()
        .is_err());
    }
}
