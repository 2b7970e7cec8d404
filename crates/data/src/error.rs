use thiserror::Error;

/// Errors from building or drawing from a distribution.
#[derive(Debug, Error)]
pub enum DataError {
    /// The distribution name is not one flowmatch knows.
    #[error("unknown distribution '{name}' (known: {known})")]
    UnknownDistribution { name: String, known: String },
    /// A distribution parameter is out of range.
    #[error("invalid parameter for {dist}: {msg}")]
    InvalidParameter { dist: &'static str, msg: String },
    /// An MNIST file or folder is missing or malformed.
    #[error("MNIST {path}: {msg}")]
    Mnist { path: String, msg: String },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
