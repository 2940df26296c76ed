//! Reading a whole (small) source into one in-memory batch.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bad_rows::BadRowReport;
use crate::batch::Batch;
use crate::column::ColumnSpec;
use crate::error::DataError;
use crate::loader::{DataLoader, LoaderConfig};
use crate::source::ParquetSource;

/// Options of [`read_all`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReadOptions {
    /// Skip rows that cannot be decoded (reported in [`Table::bad_rows`]) instead of failing.
    pub skip_bad_rows: bool,
    /// Decoding threads; 0 picks the number of cores, at most 4.
    pub workers: usize,
}

/// A whole source in memory: every row in file order, plus the rows that were skipped.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// All rows, in file order (files in source order, rows in file order).
    pub batch: Batch,
    /// Rows skipped under `skip_bad_rows`.
    pub bad_rows: BadRowReport,
    /// Class names of each label column, by column name (indexed by class id).
    pub class_names: Vec<(String, Option<Vec<String>>)>,
}

/// Reads every row of the files, directories or globs in `paths` into one [`Table`], in file
/// order, with the same column specs and checks as [`DataLoader`]. Meant for small data
/// (evaluation sets); stream large data with a [`DataLoader`].
pub fn read_all<P: AsRef<Path>>(
    paths: &[P],
    columns: &[ColumnSpec],
    options: &ReadOptions,
) -> Result<Table, DataError> {
    let source = ParquetSource::open(paths)?;
    let config = LoaderConfig {
        columns: columns.to_vec(),
        batch_size: source.num_rows(),
        shuffle: false,
        epochs: Some(1),
        skip_bad_rows: options.skip_bad_rows,
        workers: options.workers,
        prefetch: 1,
        ..LoaderConfig::default()
    };
    let mut loader = DataLoader::new(&source, config)?;
    let batch = loader
        .next_batch()?
        .ok_or_else(|| DataError::EmptyDataset {
            what: format!(
                "every row of {} was bad and skipped",
                source.describe_files()
            ),
        })?;
    let class_names = columns
        .iter()
        .filter(|c| matches!(c.kind, crate::column::ColumnKind::Label { .. }))
        .map(|c| {
            (
                c.name.clone(),
                loader.class_names(&c.name).map(|v| v.to_vec()),
            )
        })
        .collect();
    Ok(Table {
        batch,
        bad_rows: loader.bad_rows(),
        class_names,
    })
}
