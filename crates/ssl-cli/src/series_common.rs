//! What the sequence modalities' shells (`features`, `timeseries`) share: the embedded
//! sample as a data path, and printing a report. Their pipelines live in ssl-timeseries.

use crate::{config, CliError};

/// The data paths of a run: the user's, or the embedded sample written to a temporary
/// directory that lives as long as this value.
pub struct DataPaths {
    _dir: Option<tempfile::TempDir>,
    /// Files, directories or globs.
    pub paths: Vec<String>,
}

/// `data` when given, else the embedded `bytes` written as `file_name` (announced with `what`).
pub fn data_paths(
    data: &[String],
    bytes: &[u8],
    file_name: &str,
    what: &str,
) -> Result<DataPaths, CliError> {
    if !data.is_empty() {
        return Ok(DataPaths {
            _dir: None,
            paths: data.to_vec(),
        });
    }
    let (dir, path) = config::write_embedded(file_name, bytes)?;
    eprintln!("no --data given: training on the embedded sample ({what})");
    Ok(DataPaths {
        paths: vec![path],
        _dir: Some(dir),
    })
}

/// A report as one line of JSON.
pub fn to_json<T: serde::Serialize>(report: &T) -> Result<String, CliError> {
    serde_json::to_string(report).map_err(|e| CliError::Config(e.to_string()))
}
