use thiserror::Error;

/// Errors from building, saving or loading a model.
#[derive(Debug, Error)]
pub enum ModelError {
    /// A hyperparameter is out of range.
    #[error("invalid model setting: {0}")]
    Invalid(String),
    /// One field of a spec is out of range (the field's name, and what is wrong): a config
    /// check maps the field to its key without restating the rule.
    #[error("invalid model setting: {msg}")]
    Setting { field: &'static str, msg: String },
    /// A checkpoint could not be read or does not fit the model.
    #[error("checkpoint {path}: {msg}")]
    Checkpoint { path: String, msg: String },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
