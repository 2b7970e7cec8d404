//! Velocity fields `v(x, t)` for flow matching.
//!
//! - [`VelocityField`]: the one trait every model implements (and every solver consumes).
//! - [`activation`]: GELU / SiLU as vectorisable candle custom ops with their own gradients.
//! - [`Params`]: a candle `VarMap` filled from a seeded ChaCha RNG; saves/loads safetensors.
//! - [`VelocityNet`] (blog) and [`VelocityMlp`] (lesson); [`ModelSpec`] builds either by name.

pub mod activation;
mod classifier;
pub mod conv;
mod cpu;
mod dense;
mod error;
mod field;
mod linear;
mod mlp;
pub mod norm;
mod params;
mod spec;
mod unet;

pub use classifier::Classifier;
pub use error::ModelError;
pub use field::{FnField, VelocityField};
pub use linear::Linear;
pub use mlp::{sinusoidal_embedding, VelocityMlp, VelocityNet};
pub use params::Params;
pub use spec::{Model, ModelSpec};
pub use unet::{image_shape, VelocityUNet, VelocityUNetLesson};

/// Largest absolute difference between two f32 tensors of the same shape (tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
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
