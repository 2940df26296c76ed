//! The held-out split by global row index: a seeded hash of the row's index in the whole
//! source, so every reader (each rank of a data-parallel run, a streaming pass, a later
//! evaluation) agrees on which rows are held out without seeing the others.

use crate::{DataError, ParquetSource};

/// Whether global row `i` is held out: a seeded hash of the index below `fraction`.
pub fn is_heldout(i: usize, seed: u64, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    let mut z = (i as u64) ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z as f64 / u64::MAX as f64) < fraction
}

/// The label column to read beside the held-out rows (for an online k-NN accuracy of their
/// embeddings): `label_column` when rows are held out (`heldout_fraction > 0`) and the first
/// file of `paths` has that column; `None` otherwise (without opening the data when nothing
/// is held out).
pub fn heldout_label_column(
    paths: &[String],
    label_column: &str,
    heldout_fraction: f64,
) -> Result<Option<String>, DataError> {
    if heldout_fraction <= 0.0 || label_column.is_empty() {
        return Ok(None);
    }
    let present = ParquetSource::open(paths)?.has_column(label_column);
    Ok(present.then(|| label_column.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heldout_split_is_seeded_and_near_the_fraction() {
        let n = 20_000;
        let held = (0..n).filter(|&i| is_heldout(i, 3, 0.05)).count() as f64 / n as f64;
        assert!((held - 0.05).abs() < 0.01, "{held}");
        assert!((0..100).all(|i| is_heldout(i, 3, 0.05) == is_heldout(i, 3, 0.05)));
        assert!((0..100).all(|i| !is_heldout(i, 3, 0.0)));
        let other = (0..1000).filter(|&i| is_heldout(i, 4, 0.05) != is_heldout(i, 3, 0.05));
        assert!(other.count() > 0, "the seed must change the split");
    }
}
