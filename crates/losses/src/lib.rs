//! Conditional flow matching, built from three swappable parts and one training step.
//!
//! - [`path`]: a probability path `x_t = σ_t x_0 + α_t x_1 (+ σ_min ε)` and its velocity
//!   `dx_t = σ̇_t x_0 + α̇_t x_1`, with linear, cosine and variance-preserving schedules.
//! - [`coupling`]: how `(x_0, x_1)` pairs are drawn — independent, minibatch OT, or any other
//!   [`Coupling`] (the reflow crate adds teacher couplings).
//! - [`time`]: where `t` is drawn — uniform, the blog's warped, logit-normal.
//! - [`objective`]: what the model regresses on — the flow's velocity (CFM), MeanFlow's
//!   average velocity, or a shortcut model's self-consistent jump.
//! - [`lr`]: the learning rate over a training (warm-up, constant, cosine or linear decay).
//! - [`train`]: [`Trainer::step`], the one training step (AdamW) every experiment uses.

mod adamw;
pub mod coupling;
mod ema;
pub mod entropic;
mod error;
pub mod lr;
pub mod objective;
pub mod path;
mod prefetch;
pub mod time;
pub mod train;

pub use adamw::{AdamState, FusedAdamW};
pub use coupling::{
    validate_label_drop, within_groups, Coupling, CouplingKind, CouplingOptions, CouplingSpec,
    Draw, Independent, LabelDraw, MinibatchOt, Pairing, Pairs,
};
pub use entropic::{EntropicOt, Epsilon, OtDraw};
pub use error::LossError;
pub use flowmatch_metrics::ot::OtSolver;
pub use lr::{LrDecay, LrSchedule};
pub use objective::{Draws, Objective, ObjectiveKind, ObjectiveOptions};
pub use path::{AffinePath, BrownianBridge, PathSample, ProbabilityPath, Schedule, ScoreTarget};
pub use time::{TimeKind, TimeOptions, TimeSampler};
pub use train::{read_losses, validate_ema, OptimConfig, Trainer, TrainerState};
