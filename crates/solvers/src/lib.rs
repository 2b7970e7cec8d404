//! ODE solvers for `dx/dt = v(x, t)`.
//!
//! - [`TimeGrid`]: uniform or warped by the blog's `warp_time` (with its derivative).
//! - [`Stepper`]: one fixed step — [`Euler`], [`Midpoint`], [`Heun`], [`Rk4`].
//! - [`dopri5`]: adaptive Dormand–Prince 5(4) with rtol/atol.
//! - [`SolverSpec`] + [`solve`]: method × grid, forward or reverse, optional trajectory,
//!   always reporting the number of function evaluations (NFE).
//!
//! - [`sde`]: Euler–Maruyama with the score derived from the velocity (same marginals).
//! - [`likelihood`]: `log p₁(x₁)` by the instantaneous change of variables, integrated
//!   backwards with any of the solvers (exact divergence or Hutchinson's estimate).
//!
//! Solvers know nothing of training: they take any [`VelocityField`].

mod dopri5;
mod error;
mod grid;
pub mod likelihood;
pub mod sde;
mod solve;
mod stepper;

pub use dopri5::{dopri5, Tolerances};
pub use error::SolverError;
pub use grid::{check_warp as grid_check_warp, warp_time, warp_time_deriv, TimeGrid};
pub use likelihood::{log_likelihood, Divergence};
pub use sde::{sample_sde, NoiseSchedule, SdeScore};
pub use solve::{integrate, solve, Method, Solution, SolverSpec};
pub use stepper::{Euler, Heun, Midpoint, Rk4, Stepper};

pub use flowmatch_models::VelocityField;
