use candle_core::{DType, Result, Tensor};

/// A time-dependent velocity field `v(x, t)`.
///
/// `x` has shape `(B, ...)` and `t` shape `(B,)`; the result has the shape of `x`.
///
/// Beside the instantaneous velocity, a field answers for the *average* velocity over a step
/// `[t, t + h]`, `u(x, t, h) = (φ_{t+h}(x) − x) / h`, which carries `x` at `t` to where the
/// flow is at `t + h`. A flow knows only its limit `h → 0` (the defaults below); models built
/// with a span input (MeanFlow, shortcut models) answer for any `h`, so Euler steps of size `h`
/// are their few-step samplers.
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

    /// The average velocity `u(x, t, h)` over `[t, t + h]`, `t` and `h` of shape `(B,)`.
    /// The default is the instantaneous velocity (a flow's `h → 0` limit).
    fn mean_velocity(&self, x: &Tensor, t: &Tensor, h: &Tensor) -> Result<Tensor> {
        let _ = h;
        self.velocity(x, t)
    }

    /// [`mean_velocity`](Self::mean_velocity) with one `t` and one `h` for the batch
    /// (evaluation, like [`velocity_at`](Self::velocity_at)).
    fn mean_velocity_at(&self, x: &Tensor, t: f64, h: f64) -> Result<Tensor> {
        let _ = h;
        self.velocity_at(x, t)
    }

    /// The average velocity and its directional derivative (Jacobian-vector product) at
    /// `(x, t, h)` along `(dx, dt, dh)`: `(u, ∂_x u·dx + ∂_t u·dt + ∂_h u·dh)`, both detached
    /// (MeanFlow's target is under stop-gradient). The default is [`finite_difference_jvp`];
    /// the MLPs propagate the tangent exactly.
    fn mean_velocity_jvp(
        &self,
        x: &Tensor,
        t: &Tensor,
        h: &Tensor,
        tangent: (&Tensor, f64, f64),
    ) -> Result<(Tensor, Tensor)> {
        finite_difference_jvp(&|x, t, h| self.mean_velocity(x, t, h), x, t, h, tangent)
    }

    /// The velocity and, for a model with a score head ([`has_score`](Self::has_score)), its
    /// second output: SF²M's scaled score `σ²/2·∇log p_t` of the Schrödinger bridge it was
    /// trained on. One forward pass for both.
    fn velocity_and_score(&self, x: &Tensor, t: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        Ok((self.velocity(x, t)?, None))
    }

    /// Whether the model has a score head.
    fn has_score(&self) -> bool {
        false
    }

    /// The class labels a conditional model reads (0: it reads none). Label `classes()`
    /// means "no label" (classifier-free guidance's unconditional velocity).
    fn classes(&self) -> usize {
        0
    }

    /// The velocity (with `h`, the average velocity) of a conditional model for labels `y`, a
    /// `(B,)` u32 tensor in `0..=classes()`. Solvers see it through
    /// [`crate::Labeled`] or [`crate::Guided`].
    fn labeled_velocity(
        &self,
        x: &Tensor,
        t: &Tensor,
        h: Option<&Tensor>,
        y: &Tensor,
    ) -> Result<Tensor> {
        let _ = (x, t, h, y);
        candle_core::bail!("this model reads no class labels (model.classes = 0)")
    }
}

/// The JVP of `u` by central differences, `(u(p + εd) − u(p − εd)) / 2ε` at `p = (x, t, h)`
/// along `d = (dx, dt, dh)`, with `ε = 4·10⁻³` in f32 (`10⁻⁵` in f64): a truncation error of
/// `ε²/6·|∂³u|` and a rounding error of about `2⁻²³·|u|/ε` (~3·10⁻⁵·|u|), the balance of the
/// two in f32. Three evaluations of `u` (the value is computed separately); the U-Nets use it
/// (candle has no forward-mode autodiff), and a test bounds its error against the MLPs' exact
/// JVP.
pub fn finite_difference_jvp(
    u: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
    x: &Tensor,
    t: &Tensor,
    h: &Tensor,
    (dx, dt, dh): (&Tensor, f64, f64),
) -> Result<(Tensor, Tensor)> {
    let eps = if x.dtype() == DType::F64 { 1e-5 } else { 4e-3 };
    let shifted = |s: f64| -> Result<Tensor> {
        u(
            &(x + dx.affine(s * eps, 0.0)?)?,
            &t.affine(1.0, s * eps * dt)?,
            &h.affine(1.0, s * eps * dh)?,
        )
    };
    let value = u(x, t, h)?.detach();
    let jvp = ((shifted(1.0)? - shifted(-1.0)?)? / (2.0 * eps))?.detach();
    Ok((value, jvp))
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

macro_rules! forward_field {
    ($($ty:ty),*) => {$(
        impl<T: VelocityField + ?Sized> VelocityField for $ty {
            fn velocity(&self, x: &Tensor, t: &Tensor) -> Result<Tensor> {
                (**self).velocity(x, t)
            }
            fn velocity_at(&self, x: &Tensor, t: f64) -> Result<Tensor> {
                (**self).velocity_at(x, t)
            }
            fn mean_velocity(&self, x: &Tensor, t: &Tensor, h: &Tensor) -> Result<Tensor> {
                (**self).mean_velocity(x, t, h)
            }
            fn mean_velocity_at(&self, x: &Tensor, t: f64, h: f64) -> Result<Tensor> {
                (**self).mean_velocity_at(x, t, h)
            }
            fn mean_velocity_jvp(
                &self,
                x: &Tensor,
                t: &Tensor,
                h: &Tensor,
                tangent: (&Tensor, f64, f64),
            ) -> Result<(Tensor, Tensor)> {
                (**self).mean_velocity_jvp(x, t, h, tangent)
            }
            fn velocity_and_score(
                &self,
                x: &Tensor,
                t: &Tensor,
            ) -> Result<(Tensor, Option<Tensor>)> {
                (**self).velocity_and_score(x, t)
            }
            fn has_score(&self) -> bool {
                (**self).has_score()
            }
            fn classes(&self) -> usize {
                (**self).classes()
            }
            fn labeled_velocity(
                &self,
                x: &Tensor,
                t: &Tensor,
                h: Option<&Tensor>,
                y: &Tensor,
            ) -> Result<Tensor> {
                (**self).labeled_velocity(x, t, h, y)
            }
        }
    )*};
}
forward_field!(Box<T>, &T);
