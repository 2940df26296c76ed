//! The report of rows skipped because they could not be decoded.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// How many example rows a [`BadRowReport`] keeps.
pub const MAX_BAD_ROW_EXAMPLES: usize = 10;

/// One skipped row: where it is and why it was skipped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadRow {
    /// The file.
    pub path: PathBuf,
    /// Row index within the file (0-based).
    pub row: usize,
    /// The column that could not be decoded.
    pub column: String,
    /// What was expected and what was found.
    pub reason: String,
}

impl std::fmt::Display for BadRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} row {} column '{}': {}",
            self.path.display(),
            self.row,
            self.column,
            self.reason
        )
    }
}

/// Rows skipped under `skip_bad_rows`: the count and the first few examples.
///
/// A loader counts rows as its background threads consume them, so while batches are being
/// prefetched the report may run a little ahead of the batches returned; once the stream has
/// ended it is exact.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadRowReport {
    /// Number of rows skipped.
    pub count: usize,
    /// The first [`MAX_BAD_ROW_EXAMPLES`] skipped rows.
    pub examples: Vec<BadRow>,
}

impl BadRowReport {
    /// Records one skipped row.
    pub fn record(&mut self, row: BadRow) {
        self.count += 1;
        if self.examples.len() < MAX_BAD_ROW_EXAMPLES {
            self.examples.push(row);
        }
    }

    /// True when no row was skipped.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

impl std::fmt::Display for BadRowReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bad row(s) skipped", self.count)?;
        for ex in &self.examples {
            write!(f, "\n  {ex}")?;
        }
        if self.count > self.examples.len() {
            write!(f, "\n  ... and {} more", self.count - self.examples.len())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_first_examples_and_counts_all() {
        let mut r = BadRowReport::default();
        for i in 0..15 {
            r.record(BadRow {
                path: "f.parquet".into(),
                row: i,
                column: "x".into(),
                reason: "null".into(),
            });
        }
        assert_eq!(r.count, 15);
        assert_eq!(r.examples.len(), MAX_BAD_ROW_EXAMPLES);
        assert!(r.to_string().contains("and 5 more"));
    }
}
