//! Where a global row index lies (file, row group, row within the file): what a data error
//! met mid-stream names.

use std::fs::File;
use std::path::PathBuf;

use parquet::file::reader::{FileReader, SerializedFileReader};
use ssl_data::{DataError, ParquetSource};

use crate::Result;

/// The row groups of a source's files, from their footers: maps a global row index (files in
/// order, rows in file order, as [`ssl_data::Batch::rows`] gives it) to its file, row group
/// and row.
#[derive(Debug, Clone, Default)]
pub struct RowLocator {
    /// Each file, its global first row and its row groups' sizes.
    files: Vec<(PathBuf, usize, Vec<usize>)>,
}

impl RowLocator {
    /// Reads the footers of `source`'s files. A file that is not local (an object-store URL)
    /// leaves the locator empty: rows are then named by their global index only.
    pub fn new(source: &ParquetSource) -> Result<Self> {
        let mut files = Vec::new();
        let mut first = 0;
        for path in source.files() {
            let Ok(file) = File::open(path) else {
                return Ok(RowLocator::default());
            };
            let reader = SerializedFileReader::new(file).map_err(|e| DataError::Parquet {
                path: PathBuf::from(path),
                source: e,
            })?;
            let groups: Vec<usize> = reader
                .metadata()
                .row_groups()
                .iter()
                .map(|g| g.num_rows().max(0) as usize)
                .collect();
            let n: usize = groups.iter().sum();
            files.push((PathBuf::from(path), first, groups));
            first += n;
        }
        Ok(RowLocator { files })
    }

    /// "file F, row group G, row R" for global row `row` (R counted within the file).
    pub fn locate(&self, row: usize) -> String {
        for (path, first, groups) in &self.files {
            let n: usize = groups.iter().sum();
            if row >= first + n {
                continue;
            }
            let local = row - first;
            let mut start = 0;
            for (g, &rows) in groups.iter().enumerate() {
                if local < start + rows {
                    return format!("file {}, row group {g}, row {local}", path.display());
                }
                start += rows;
            }
        }
        format!("row {row}")
    }
}
