//! Which rows of a source a run trains on and which it holds out, decided row by row from the
//! global row index alone, so every reader (each rank's stream, the tokenizer's caption pass,
//! the bounded held-out reader of `ssl eval`) agrees without seeing the others.

use ssl_data::is_heldout;

/// Salt of the `data.max_pairs` sample, so it is independent of the held-out split.
const CAP_SALT: u64 = 0x6d61_785f_7061_6972;

/// The row selection of a run: the seeded `data.max_pairs` sample of the source's rows, and
/// among them the seeded `data.heldout_fraction` held out (by [`ssl_data::is_heldout`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowSplit {
    /// `train.seed`.
    pub seed: u64,
    /// `data.heldout_fraction`, in `[0, 1)`.
    pub heldout_fraction: f64,
    /// `data.max_pairs` (0: every row).
    pub max_pairs: usize,
    /// Rows in the source (from the Parquet footers).
    pub num_rows: usize,
}

impl RowSplit {
    /// Whether global row `i` is in the `max_pairs` sample: a seeded hash of `i` under
    /// `max_pairs / num_rows` (every row when `max_pairs` is 0 or covers the source).
    pub fn in_sample(&self, i: usize) -> bool {
        if self.max_pairs == 0 || self.max_pairs >= self.num_rows {
            return true;
        }
        is_heldout(
            i,
            self.seed ^ CAP_SALT,
            self.max_pairs as f64 / self.num_rows as f64,
        )
    }

    /// Whether global row `i` is a held-out pair.
    pub fn is_heldout(&self, i: usize) -> bool {
        self.in_sample(i) && is_heldout(i, self.seed, self.heldout_fraction)
    }

    /// Whether global row `i` is a training pair (before any pair filter).
    pub fn is_training(&self, i: usize) -> bool {
        self.in_sample(i) && !is_heldout(i, self.seed, self.heldout_fraction)
    }

    /// (training, held-out) row counts over the whole source, without reading it (a hash
    /// per row: about a millisecond per million rows).
    pub fn counts(&self) -> (usize, usize) {
        let (mut train, mut held) = (0, 0);
        for i in 0..self.num_rows {
            if self.in_sample(i) {
                if is_heldout(i, self.seed, self.heldout_fraction) {
                    held += 1;
                } else {
                    train += 1;
                }
            }
        }
        (train, held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_is_a_seeded_sample_and_the_split_partitions_it() {
        let s = RowSplit {
            seed: 3,
            heldout_fraction: 0.2,
            max_pairs: 2_000,
            num_rows: 10_000,
        };
        let (train, held) = s.counts();
        assert!((1_850..2_150).contains(&(train + held)), "{train} {held}");
        assert!((300..500).contains(&held), "{held}");
        // Not the first rows: the sample spreads over the source.
        assert!((5_000..10_000).any(|i| s.in_sample(i)));
        assert!((0..10_000).all(|i| !(s.is_training(i) && s.is_heldout(i))));
        let all = RowSplit { max_pairs: 0, ..s };
        assert!((0..100).all(|i| all.in_sample(i)));
        let other = RowSplit { seed: 4, ..s };
        assert!((0..10_000).any(|i| other.in_sample(i) != s.in_sample(i)));
    }
}
