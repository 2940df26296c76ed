//! The resumable cursor of a loader.

use serde::{Deserialize, Serialize};

/// Where a loader stands in its stream; store it in checkpoints (it is serde-serialisable) and
/// pass it to [`crate::DataLoader::resume`] to continue with exactly the batches that would have
/// followed.
///
/// Rows are consumed in *windows*: runs of consecutive row groups (of this rank's row-group order
/// for the epoch) holding at least `shuffle_buffer` rows, whose rows are shuffled together.
/// `row_group` is the index, in this rank's order for `epoch`, of the first row group of the
/// current window and `offset` the number of the window's rows already consumed (bad rows that
/// were skipped count as consumed). A position is only meaningful with the same source, seed,
/// shuffle settings, rank and world size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
pub struct Position {
    /// Epoch, from 0.
    pub epoch: u64,
    /// Index of the current window's first row group in this rank's order for the epoch.
    pub row_group: usize,
    /// Rows of the current window already consumed.
    pub offset: usize,
}

impl Position {
    /// The start of an epoch.
    pub fn start_of_epoch(epoch: u64) -> Self {
        Self {
            epoch,
            row_group: 0,
            offset: 0,
        }
    }

    /// This position as a JSON string (what a trainer puts in its checkpoint).
    pub fn to_json(&self) -> String {
        format!(
            r#"{{"epoch":{},"row_group":{},"offset":{}}}"#,
            self.epoch, self.row_group, self.offset
        )
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_json())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip() {
        let p = Position {
            epoch: 3,
            row_group: 7,
            offset: 11,
        };
        let back: Position = serde_json::from_str(&p.to_json()).unwrap();
        assert_eq!(p, back);
        assert_eq!(serde_json::to_string(&p).unwrap(), p.to_json());
    }
}
