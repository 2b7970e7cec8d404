//! Forward-mode differentiation of the MLPs: every layer maps a value and a tangent,
//! `(a, da) ↦ (f(a), f'(a)·da)`, in the input's dtype (f64 in the tests). candle has no
//! forward mode; these are the few layers the MLPs are made of.

use crate::ops::activation::{Activation, FastGrad};
use crate::Linear;
use candle_core::{DType, Device, Module, Result, Tensor, D};
use std::f64::consts::{FRAC_1_SQRT_2, PI};

/// Whether `x` takes the fused CPU kernels (f32 on the CPU), as in training.
fn fused(x: &Tensor) -> bool {
    matches!(x.device(), Device::Cpu) && x.dtype() == DType::F32 && x.rank() == 2
}

/// `(x Wᵀ + b, dx Wᵀ)`; on the CPU in f32 the value is the fused Linear op of training.
pub(crate) fn linear(l: &Linear, x: &Tensor, dx: &Tensor) -> Result<(Tensor, Tensor)> {
    if fused(x) {
        return Ok((l.forward(x)?, dx.matmul(&l.weight().t()?)?));
    }
    let w = l.weight().to_dtype(x.dtype())?.t()?;
    let mut a = x.matmul(&w)?;
    if let Some(b) = l.bias() {
        a = a.broadcast_add(&b.to_dtype(x.dtype())?)?;
    }
    Ok((a, dx.matmul(&w)?))
}

/// `act'(a)`, in closed form: GELU (erf) `Φ(a) + a·φ(a)`, SiLU `σ(a)·(1 + a·(1 − σ(a)))`,
/// ReLU `[a > 0]`.
pub(crate) fn activation_derivative(act: Activation, a: &Tensor) -> Result<Tensor> {
    match act {
        Activation::Relu => a.gt(0.0)?.to_dtype(a.dtype()),
        Activation::Silu => {
            let s = (a.neg()?.exp()? + 1.0)?.recip()?;
            let one_minus = s.affine(-1.0, 1.0)?;
            s.mul(&(a.mul(&one_minus)? + 1.0)?)
        }
        Activation::Gelu => {
            let cdf = (a.affine(FRAC_1_SQRT_2, 0.0)?.erf()? + 1.0)?.affine(0.5, 0.0)?;
            let pdf = (a.sqr()?.affine(-0.5, 0.0)?.exp()? / (2.0 * PI).sqrt())?;
            cdf + a.mul(&pdf)?
        }
    }
}

/// `(act(a), act'(a)·da)`; on the CPU in f32, GELU and SiLU take the fused kernels of
/// training: the tangent is their backward applied to `da` (one pass, no temporaries).
pub(crate) fn activation(act: Activation, a: &Tensor, da: &Tensor) -> Result<(Tensor, Tensor)> {
    let y = act.apply(a)?;
    if let (Some(kind), true) = (act.kind(), fused(a)) {
        let a = a.contiguous()?;
        let dy = a.apply_op3_no_bwd(&y.contiguous()?, &da.contiguous()?, &FastGrad(kind))?;
        return Ok((y, dy));
    }
    Ok((y, activation_derivative(act, a)?.mul(da)?))
}

/// `act(x W₁ᵀ + b₁)` through `hidden` (each followed by `act`), then the linear `head`.
pub(crate) fn chain(
    x: &Tensor,
    dx: &Tensor,
    hidden: &[&Linear],
    head: &Linear,
    act: Activation,
) -> Result<(Tensor, Tensor)> {
    let (mut h, mut dh) = (x.clone(), dx.clone());
    for l in hidden {
        let (a, da) = linear(l, &h, &dh)?;
        (h, dh) = activation(act, &a, &da)?;
    }
    linear(head, &h, &dh)
}

/// The lesson's sinusoidal embedding of `t` `(B,)` and its tangent for `dt` per sample:
/// `d/dt [sin(t·f), cos(t·f)] = [f·cos(t·f), −f·sin(t·f)]`.
pub(crate) fn sinusoidal_embedding(t: &Tensor, dt: f64, dims: usize) -> Result<(Tensor, Tensor)> {
    let half = dims / 2;
    let freqs: Vec<f64> = (0..half)
        .map(|k| (-(10000f64.ln()) * k as f64 / half as f64).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?.to_dtype(t.dtype())?;
    let arg = t.unsqueeze(D::Minus1)?.broadcast_mul(&freqs)?;
    let (sin, cos) = (arg.sin()?, arg.cos()?);
    let f = (freqs * dt)?;
    let tangent = Tensor::cat(
        &[cos.broadcast_mul(&f)?, sin.broadcast_mul(&f)?.neg()?],
        D::Minus1,
    )?;
    Ok((Tensor::cat(&[sin, cos], D::Minus1)?, tangent))
}

#[cfg(test)]
mod tests {
    use crate::ops::activation::Activation;
    use crate::{finite_difference_jvp, ModelSpec, VelocityField};
    use candle_core::{DType, Device, Tensor};

    fn specs() -> Vec<ModelSpec> {
        let mut out = vec![];
        for span in [false, true] {
            for act in [Activation::Gelu, Activation::Silu, Activation::Relu] {
                out.push(ModelSpec::VelocityNet {
                    hidden: 16,
                    activation: act,
                    span,
                    score: false,
                    classes: 0,
                });
                out.push(ModelSpec::VelocityMlp {
                    hidden: 16,
                    layers: 2,
                    activation: act,
                    span,
                    score: false,
                    classes: 0,
                });
            }
        }
        out
    }

    /// `n` fixed points (candle's CPU RNG cannot be seeded: a random point would now and then
    /// land within the differences' step of a ReLU kink and fail the central-difference test).
    fn point(n: usize, dtype: DType) -> (Tensor, Tensor, Tensor, Tensor) {
        let dev = &Device::Cpu;
        let spread = |len: usize, phase: f32, scale: f32| -> Vec<f32> {
            (0..len)
                .map(|i| scale * (0.37 + 1.618 * i as f32 + phase).sin())
                .collect()
        };
        let x = Tensor::from_vec(spread(2 * n, 0.0, 1.3), (n, 2), dev).unwrap();
        let unit = |v: Vec<f32>| v.into_iter().map(|u| 0.5 + 0.45 * u).collect::<Vec<_>>();
        let t = Tensor::from_vec(unit(spread(n, 1.0, 1.0)), n, dev).unwrap();
        let h = Tensor::from_vec(unit(spread(n, 2.0, 1.0)), n, dev).unwrap();
        let dx = Tensor::from_vec(spread(2 * n, 3.0, 1.0), (n, 2), dev).unwrap();
        let cast = |v: Tensor| v.to_dtype(dtype).unwrap();
        (cast(x), cast(t), cast(h), cast(dx))
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.to_dtype(DType::F64).unwrap();
        let b = b.to_dtype(DType::F64).unwrap();
        let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
        let s = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        d.to_scalar::<f64>().unwrap() / s.max(1e-12)
    }

    #[test]
    fn exact_jvp_of_the_mlps_matches_central_differences_in_f64() {
        for spec in specs() {
            let m = spec.build(2, 7, &Device::Cpu).unwrap();
            let (x, t, h, dx) = point(9, DType::F64);
            let (dt, dh) = (1.0, -1.0);
            let (u, du) = m.mean_velocity_jvp(&x, &t, &h, (&dx, dt, dh)).unwrap();
            // The f64 value through the same layers, differenced at ±ε along the tangent.
            let value = |x: &Tensor, t: &Tensor, h: &Tensor| {
                Ok(m.mean_velocity_jvp(x, t, h, (&dx, 0.0, 0.0))?.0)
            };
            let (u2, fd) = finite_difference_jvp(&value, &x, &t, &h, (&dx, dt, dh)).unwrap();
            assert_eq!(u.dtype(), DType::F64);
            assert!(max_rel(&u, &u2) < 1e-15, "{spec:?}");
            // ReLU's kink is met with probability 0; ε² truncation and f64 rounding ≈ 1e-9.
            let err = max_rel(&du, &fd);
            assert!(err < 1e-7, "{spec:?}: JVP off central differences by {err}");
            // The f64 value is the model's own (f32) value.
            let f32_u = m
                .mean_velocity(
                    &x.to_dtype(DType::F32).unwrap(),
                    &t.to_dtype(DType::F32).unwrap(),
                    &h.to_dtype(DType::F32).unwrap(),
                )
                .unwrap();
            assert!(max_rel(&f32_u, &u) < 1e-5, "{spec:?}");
            // Without a span input, h is no input: its tangent changes nothing.
            if !spec.span() {
                let (_, du0) = m.mean_velocity_jvp(&x, &t, &h, (&dx, dt, 0.0)).unwrap();
                assert!(max_rel(&du0, &du) < 1e-15, "{spec:?}");
            }
        }
    }

    #[test]
    fn finite_difference_jvp_in_f32_is_within_its_documented_error() {
        // The U-Nets' JVP: in f32, central differences against the MLPs' exact tangent, for the
        // smooth activations (the U-Nets use SiLU; across a ReLU kink differences are O(1) off).
        let smooth = |s: &ModelSpec| {
            !matches!(
                s,
                ModelSpec::VelocityNet {
                    activation: Activation::Relu,
                    ..
                } | ModelSpec::VelocityMlp {
                    activation: Activation::Relu,
                    ..
                }
            )
        };
        for spec in specs().into_iter().filter(smooth) {
            let m = spec.build(2, 3, &Device::Cpu).unwrap();
            let (x, t, h, dx) = point(64, DType::F32);
            let (_, exact) = m.mean_velocity_jvp(&x, &t, &h, (&dx, 1.0, -1.0)).unwrap();
            let u = |x: &Tensor, t: &Tensor, h: &Tensor| m.mean_velocity(x, t, h);
            let (_, fd) = finite_difference_jvp(&u, &x, &t, &h, (&dx, 1.0, -1.0)).unwrap();
            let err = max_rel(&fd, &exact);
            assert!(err < 1e-3, "{spec:?}: finite-difference JVP off by {err}");
        }
    }

    #[test]
    fn a_span_model_at_zero_span_is_its_velocity_and_evaluation_paths_agree() {
        for spec in specs() {
            let m = spec.build(2, 5, &Device::Cpu).unwrap();
            let (x, t, h, _) = point(6, DType::F32);
            let zero = t.zeros_like().unwrap();
            let v = m.velocity(&x, &t).unwrap();
            let u0 = m.mean_velocity(&x, &t, &zero).unwrap();
            assert!(max_rel(&u0, &v) < 1e-6, "{spec:?}");
            let u = m.mean_velocity(&x, &t, &h).unwrap();
            if spec.span() {
                assert!(max_rel(&u, &v) > 1e-4, "{spec:?}: the span input is read");
            } else {
                assert!(max_rel(&u, &v) < 1e-7, "{spec:?}: a flow ignores the span");
            }
            // One time and span for the batch (the fused evaluation path).
            for (tv, hv) in [(0.3, 0.25), (0.0, 1.0)] {
                let full = |v: f64| Tensor::full(v as f32, 6, &Device::Cpu).unwrap();
                let a = m.mean_velocity(&x, &full(tv), &full(hv)).unwrap();
                let b = m.mean_velocity_at(&x, tv, hv).unwrap();
                assert!(max_rel(&b, &a) < 1e-5, "{spec:?}");
            }
        }
    }
}
