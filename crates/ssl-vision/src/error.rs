//! The error type of ssl-vision.

use std::path::PathBuf;

/// Everything that can go wrong in ssl-vision.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    /// Model, training or checkpoint error from ssl-core.
    #[error(transparent)]
    Core(#[from] ssl_core::CoreError),
    /// Reading images from Parquet or writing embeddings failed.
    #[error(transparent)]
    Data(#[from] ssl_data::DataError),
    /// A linear probe or k-NN evaluation failed.
    #[error(transparent)]
    Probe(#[from] ssl_core::probe::ProbeError),
    /// A tensor operation failed.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// A configuration value is unusable.
    #[error("{0}")]
    Config(String),
    /// Input data does not fit the model.
    #[error("{0}")]
    InvalidInput(String),
    /// Too few held-out normal images to calibrate a threshold.
    #[error("calibration needs at least {needed} held-out normal images, got {got}: {hint}")]
    CalibrationTooSmall {
        /// Images required.
        needed: usize,
        /// Images available.
        got: usize,
        /// What to change.
        hint: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {message}", path = path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl VisionError {
    /// An I/O error on `path`.
    pub fn io(path: &std::path::Path, e: impl std::fmt::Display) -> Self {
        VisionError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        }
    }
}

impl From<VisionError> for ssl_core::CoreError {
    fn from(e: VisionError) -> Self {
        match e {
            VisionError::Core(c) => c,
            VisionError::Candle(c) => ssl_core::CoreError::from(c),
            VisionError::Config(m) => ssl_core::CoreError::Config(m),
            other => ssl_core::CoreError::InvalidInput(other.to_string()),
        }
    }
}

/// Result with [`VisionError`].
pub type Result<T, E = VisionError> = std::result::Result<T, E>;
