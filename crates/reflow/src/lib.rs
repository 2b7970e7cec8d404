//! Rectified flow (Liu et al. 2022, "Flow Straight and Fast"): reflow as a *coupling*.
//!
//! A trained model (the teacher) and a solver map fresh source samples `x_0` to `x_1'`; a
//! student trains on `(x_0, x_1')` with the ordinary training step. Its paths are straighter,
//! so 1–2 Euler steps suffice. Two modes:
//! - [`TeacherCoupling`] (online): new pairs every step (the blog's `train_reflow_model`);
//! - [`PairSet`] (offline): a fixed set generated once, in parallel (the lesson's `full_reflow`).
//!
//! k-step distillation is the same loop with [`flowmatch_losses::TimeSampler::Grid`].

mod coupling;
mod error;
mod spec;

pub use coupling::{PairSet, Teacher, TeacherCoupling, TeacherLabels};
pub use error::ReflowError;
pub use spec::{Flow, ReflowInit, ReflowMode, ReflowSpec, Stage};
