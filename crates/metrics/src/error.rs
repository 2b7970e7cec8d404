use thiserror::Error;

/// Errors from computing a metric.
#[derive(Debug, Error)]
pub enum MetricsError {
    /// The inputs do not fit the metric (sizes, dimensions, empty samples).
    #[error("{0}")]
    Shape(String),
    /// A cost or sample is NaN or infinite (the Hungarian solver would never terminate).
    #[error("non-finite value in {0}")]
    NonFinite(&'static str),
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
