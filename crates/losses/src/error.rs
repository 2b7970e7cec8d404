use thiserror::Error;

/// Errors from building or running the flow-matching objective.
#[derive(Debug, Error)]
pub enum LossError {
    /// A setting is out of range.
    #[error("invalid loss setting: {0}")]
    Invalid(String),
    /// One field of a spec is out of range (the field's name, and what is wrong): a config
    /// check maps the field to its key without restating the rule.
    #[error("invalid loss setting: {msg}")]
    Setting { field: &'static str, msg: String },
    /// The loss became NaN or infinite.
    #[error("loss is not finite ({0}) at step {1}")]
    NonFiniteLoss(f32, usize),
    /// Drawing data failed.
    #[error(transparent)]
    Data(#[from] flowmatch_data::DataError),
    /// The OT coupling failed (e.g. non-finite costs).
    #[error("OT coupling: {0}")]
    Ot(#[from] flowmatch_metrics::MetricsError),
    /// A solver (reflow teacher) failed.
    #[error(transparent)]
    Solver(#[from] flowmatch_solvers::SolverError),
    /// Building or copying a model failed.
    #[error(transparent)]
    Model(#[from] flowmatch_models::ModelError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl LossError {
    /// A field of a spec out of range.
    pub fn setting(field: &'static str, msg: impl Into<String>) -> Self {
        Self::Setting {
            field,
            msg: msg.into(),
        }
    }
}
