//! Velocity fields `v(x, t)` for flow matching.
//!
//! - [`VelocityField`]: the one trait every model implements (and every solver consumes).
//! - [`ops`]: the CPU kernels (GELU / SiLU, Linear, the MLP chain, convolutions, GroupNorm),
//!   candle custom ops with their own gradients, kept apart so each model is one small file.
//! - [`Params`]: a candle `VarMap` filled from a seeded ChaCha RNG; saves/loads safetensors.
//! - [`VelocityNet`] (blog) and [`VelocityMlp`] (lesson); [`ModelSpec`] builds either by name.

mod classes;
mod classifier;
mod error;
mod field;
mod guidance;
mod jvp;
mod mlp;
pub mod ops;
mod params;
mod spec;
mod unet;

pub use ops::{activation, conv, conv_transpose, norm};

pub use classifier::Classifier;
pub use error::ModelError;
pub use field::{finite_difference_jvp, FnField, VelocityField};
pub use guidance::{balanced_labels, label_tensor, validate_guidance, Guided, Labeled};
pub use mlp::{sinusoidal_embedding, VelocityMlp, VelocityNet};
pub use ops::linear::Linear;
pub use params::Params;
pub use spec::{Model, ModelKind, ModelOptions, ModelSpec, UNET_MULTS};
pub use unet::{image_shape, VelocityUNet, VelocityUNetLesson};

/// Largest absolute value of an f32 tensor (tests).
#[cfg(test)]
pub(crate) fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Largest absolute difference between two f32 tensors of the same shape (tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap())
}

/// Largest absolute difference between the gradients two backward passes gave `v` (tests).
#[cfg(test)]
pub(crate) fn grad_diff(
    g1: &candle_core::backprop::GradStore,
    g2: &candle_core::backprop::GradStore,
    v: &candle_core::Var,
) -> f32 {
    max_abs_diff(
        g1.get(v.as_tensor()).unwrap(),
        g2.get(v.as_tensor()).unwrap(),
    )
}

/// Asserts that two backward passes gave every one of `vars` gradients within `tol` (tests).
#[cfg(test)]
pub(crate) fn assert_grads_close(
    g1: &candle_core::backprop::GradStore,
    g2: &candle_core::backprop::GradStore,
    vars: &[&candle_core::Var],
    tol: f32,
    what: &str,
) {
    for (i, v) in vars.iter().enumerate() {
        let d = grad_diff(g1, g2, v);
        assert!(d < tol, "{what}, variable {i}: gradients differ by {d}");
    }
}

/// The gradients of `vars` after `loss().backward()` run on a pool of `threads` threads, as
/// flat vectors (tests: the CPU ops must give the same bits for any thread count).
#[cfg(test)]
pub(crate) fn grads_on_threads(
    threads: usize,
    vars: &[&candle_core::Var],
    loss: impl Fn() -> candle_core::Tensor + Send + Sync,
) -> Vec<Vec<f32>> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    pool.install(|| {
        let g = loss().backward().unwrap();
        vars.iter()
            .map(|v| g.get(v).unwrap().flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    })
}

/// Says on the terminal that a test could not run on this machine, and why, in the manner of
/// candle's `test_device!`: libtest hides what a passing test prints, but not a direct write
/// to stderr, so a skip never passes silently.
#[cfg(test)]
pub(crate) fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "test {test} ... skipped: {why}");
}
