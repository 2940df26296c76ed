//! Where a global row index lies (file, row group, row within the file): what a data error
//! met mid-stream names.

use std::path::PathBuf;

use ssl_data::ParquetSource;

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
    /// The row groups of `source`'s files (from the footers it read on opening; local files
    /// and objects in object storage alike).
    pub fn new(source: &ParquetSource) -> Result<Self> {
        let mut files = Vec::new();
        let mut first = 0;
        for (i, path) in source.files().into_iter().enumerate() {
            let groups = source.row_group_rows(i).to_vec();
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
