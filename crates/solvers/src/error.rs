use thiserror::Error;

/// Errors from setting up or running a solve.
#[derive(Debug, Error)]
pub enum SolverError {
    /// A solver setting is out of range.
    #[error("invalid solver setting: {0}")]
    Invalid(String),
    /// The adaptive solver could not meet its tolerance.
    #[error("dopri5: {0}")]
    StepFailed(String),
    /// A tensor operation failed (often the velocity field itself).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
