use thiserror::Error;

/// Errors from building, saving or loading a model.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A hyperparameter is out of range.
    #[error("invalid model setting: {0}")]
    Invalid(String),
    /// A checkpoint could not be read or does not fit the model.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
