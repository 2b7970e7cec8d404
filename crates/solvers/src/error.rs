use thiserror::Error;

/// Errors from setting up or running a solve.
#[derive(Debug, Error)]
pub enum SolverError {
    /// A solver setting is out of range.
    #[error("invalid solver setting: {0}")]
    Invalid(String),
    /// One field of a spec is out of range (the field's name, and what is wrong): a config
    /// check maps the field to its key without restating the rule.
    #[error("invalid solver setting: {msg}")]
    Setting { field: &'static str, msg: String },
    /// The adaptive solver could not meet its tolerance.
    #[error("dopri5: {0}")]
    StepFailed(String),
    /// A tensor operation failed (often the velocity field itself).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
