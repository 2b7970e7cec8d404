//! ODE solvers for `dx/dt = v(x, t)`.
//!
//! - [`TimeGrid`]: uniform or warped by the blog's `warp_time` (with its derivative).
//! - [`Stepper`]: one fixed step — [`Euler`], [`Midpoint`], [`Heun`], [`Rk4`].
//! - [`dopri5`]: adaptive Dormand–Prince 5(4) with rtol/atol.
//! - [`SolverSpec`] + [`solve`]: method × grid, forward or reverse, optional trajectory,
//!   always reporting the number of function evaluations (NFE).
//!
//! Solvers know nothing of training: they take any [`VelocityField`].

mod dopri5;
mod error;
mod grid;
mod solve;
mod stepper;

pub use dopri5::{dopri5, Tolerances};
pub use error::SolverError;
pub use grid::{check_warp as grid_check_warp, warp_time, warp_time_deriv, TimeGrid};
pub use solve::{integrate, solve, Method, Solution, SolverSpec};
pub use stepper::{Euler, Heun, Midpoint, Rk4, Stepper};

pub use flowmatch_models::VelocityField;
