use crate::VelocityField;
use candle_core::{Result, Tensor};

/// Evaluates `v(x, t)` with `t` broadcast to the batch, in `x`'s dtype.
pub(crate) fn eval(f: &dyn VelocityField, x: &Tensor, t: f64) -> Result<Tensor> {
    f.velocity_at(x, t)
}

/// `x + Σ c_i k_i` (skipping zero coefficients).
pub(crate) fn axpy(x: &Tensor, terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let mut acc = x.clone();
    for &(c, k) in terms {
        if c != 0.0 {
            acc = (acc + k.affine(c, 0.0)?)?;
        }
    }
    Ok(acc)
}

/// One step of a fixed-step explicit method from `(x, t)` to `t + dt`.
pub trait Stepper: Send + Sync {
    /// Advances `x` by one step of size `dt` (negative when integrating backwards).
    fn step(&self, f: &dyn VelocityField, x: &Tensor, t: f64, dt: f64) -> Result<Tensor>;
    /// Velocity evaluations per step.
    fn evals_per_step(&self) -> usize;
}

/// Forward Euler (order 1). It asks the field for its average velocity over the step
/// ([`VelocityField::mean_velocity_at`] with `h = dt`): a flow answers with its velocity at
/// `t` (plain Euler), a model with a span input (MeanFlow, shortcut) with its jump over the
/// step, so Euler with `k` steps is such a model's `k`-step sampler. Backward steps use the
/// instantaneous velocity (`h = 0`): the span is trained forwards only.
pub struct Euler;
/// Explicit midpoint (order 2).
pub struct Midpoint;
/// Heun's method, explicit trapezoid (order 2).
pub struct Heun;
/// Classic Runge–Kutta (order 4), the blog's `rk4_step`.
pub struct Rk4;

impl Stepper for Euler {
    fn step(&self, f: &dyn VelocityField, x: &Tensor, t: f64, dt: f64) -> Result<Tensor> {
        let k1 = f.mean_velocity_at(x, t, dt.max(0.0))?;
        axpy(x, &[(dt, &k1)])
    }
    fn evals_per_step(&self) -> usize {
        1
    }
}

impl Stepper for Midpoint {
    fn step(&self, f: &dyn VelocityField, x: &Tensor, t: f64, dt: f64) -> Result<Tensor> {
        let k1 = eval(f, x, t)?;
        let k2 = eval(f, &axpy(x, &[(dt / 2.0, &k1)])?, t + dt / 2.0)?;
        axpy(x, &[(dt, &k2)])
    }
    fn evals_per_step(&self) -> usize {
        2
    }
}

impl Stepper for Heun {
    fn step(&self, f: &dyn VelocityField, x: &Tensor, t: f64, dt: f64) -> Result<Tensor> {
        let k1 = eval(f, x, t)?;
        let k2 = eval(f, &axpy(x, &[(dt, &k1)])?, t + dt)?;
        axpy(x, &[(dt / 2.0, &k1), (dt / 2.0, &k2)])
    }
    fn evals_per_step(&self) -> usize {
        2
    }
}

impl Stepper for Rk4 {
    fn step(&self, f: &dyn VelocityField, x: &Tensor, t: f64, dt: f64) -> Result<Tensor> {
        let k1 = eval(f, x, t)?;
        let k2 = eval(f, &axpy(x, &[(dt / 2.0, &k1)])?, t + dt / 2.0)?;
        let k3 = eval(f, &axpy(x, &[(dt / 2.0, &k2)])?, t + dt / 2.0)?;
        let k4 = eval(f, &axpy(x, &[(dt, &k3)])?, t + dt)?;
        axpy(
            x,
            &[
                (dt / 6.0, &k1),
                (dt / 3.0, &k2),
                (dt / 3.0, &k3),
                (dt / 6.0, &k4),
            ],
        )
    }
    fn evals_per_step(&self) -> usize {
        4
    }
}
