use candle_core::{Result, Tensor};

/// A time-dependent velocity field `v(x, t)`.
///
/// `x` has shape `(B, ...)` and `t` shape `(B,)`; the result has the shape of `x`.
pub trait VelocityField: Send + Sync {
    /// Evaluates the velocity at points `x` and times `t`.
    fn velocity(&self, x: &Tensor, t: &Tensor) -> Result<Tensor>;

    /// Evaluates the velocity with one time `t` for the whole batch, as ODE solvers do.
    ///
    /// The default broadcasts `t` and calls [`velocity`](Self::velocity); models whose time
    /// conditioning is costly (the lesson's embedding MLP) override it to compute it once.
    /// It is for evaluation: the MLPs' CPU version runs fused layers that carry no gradient
    /// (train through [`velocity`](Self::velocity)).
    fn velocity_at(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        let tt = Tensor::full(t as f32, x.dim(0)?, x.device())?.to_dtype(x.dtype())?;
        self.velocity(x, &tt)
    }
}

/// A velocity field given by a closure (analytic fields in tests, teachers, wrappers).
pub struct FnField<F>(pub F);

impl<F> VelocityField for FnField<F>
where
    F: Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync,
{
    fn velocity(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        (self.0)(x, t)
    }
}

impl<T: VelocityField + ?Sized> VelocityField for Box<T> {
    fn velocity(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        (**self).velocity(x, t)
    }
    fn velocity_at(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        (**self).velocity_at(x, t)
    }
}

impl<T: VelocityField + ?Sized> VelocityField for &T {
    fn velocity(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
        (**self).velocity(x, t)
    }
    fn velocity_at(&self, x: &Tensor, t: f64) -> Result<Tensor> {
        (**self).velocity_at(x, t)
    }
}
