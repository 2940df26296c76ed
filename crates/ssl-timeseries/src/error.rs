//! The crate's error type.

/// Everything that can go wrong in ssl-timeseries.
#[derive(Debug, thiserror::Error)]
pub enum TsError {
    /// A model, task or training error from ssl-core.
    #[error(transparent)]
    Core(#[from] ssl_core::CoreError),
    /// Reading Parquet failed (the message names the file, column and row).
    #[error(transparent)]
    Data(#[from] ssl_data::DataError),
    /// A tensor operation failed inside candle.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The data cannot serve the request (too short for a window, no valid value...).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A probe of `eval` failed (too few rows or classes...).
    #[error(transparent)]
    Probe(#[from] ssl_core::probe::ProbeError),
    /// A pipeline cannot run as asked: the configuration disagrees with the data or the
    /// checkpoint, labels are missing... (the message says why and what to change).
    #[error("{0}")]
    Pipeline(String),
}

impl From<TsError> for ssl_core::CoreError {
    fn from(e: TsError) -> Self {
        match e {
            TsError::Core(c) => c,
            TsError::Candle(c) => ssl_core::CoreError::Candle(c),
            other => ssl_core::CoreError::InvalidInput(other.to_string()),
        }
    }
}

/// Result with [`TsError`].
pub type Result<T> = std::result::Result<T, TsError>;
