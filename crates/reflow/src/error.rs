use thiserror::Error;

/// Errors from generating reflow pairs.
#[derive(Debug, Error)]
pub enum ReflowError {
    /// A setting is out of range.
    #[error("invalid reflow setting: {0}")]
    Invalid(String),
    /// The teacher's solve failed.
    #[error(transparent)]
    Solver(#[from] flowmatch_solvers::SolverError),
    /// Drawing source samples failed.
    #[error(transparent)]
    Data(#[from] flowmatch_data::DataError),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl From<ReflowError> for flowmatch_losses::LossError {
    fn from(e: ReflowError) -> Self {
        match e {
            ReflowError::Solver(s) => Self::Solver(s),
            ReflowError::Data(d) => Self::Data(d),
            ReflowError::Candle(c) => Self::Candle(c),
            ReflowError::Invalid(m) => Self::Invalid(m),
        }
    }
}
