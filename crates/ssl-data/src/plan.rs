//! The deterministic reading plan: which row groups a rank reads in an epoch, how they are
//! grouped into shuffle windows and in which order their rows come out.
//!
//! Everything here is a pure function of (seed, epoch, rank, world size, row-group sizes), which
//! is what makes a [`crate::Position`] enough to resume exactly.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// SplitMix64 finaliser: mixes a seed with stream identifiers into a new seed.
pub(crate) fn mix(seed: u64, a: u64, b: u64) -> u64 {
    let mut z = seed
        ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ b.wrapping_mul(0xC2B2_AE3D_27D4_EB4F).rotate_left(17);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Indices (into the source's global row-group list of length `n`) that `rank` reads in
/// `epoch`: the list is shuffled with (seed, epoch) when `shuffle` is on, then dealt
/// round-robin, so the ranks' sets are disjoint and together cover every row group.
pub(crate) fn rank_row_groups(
    n: usize,
    epoch: u64,
    seed: u64,
    shuffle: bool,
    rank: usize,
    world_size: usize,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, epoch, 0x5247_4F52));
        order.shuffle(&mut rng);
    }
    order
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % world_size == rank)
        .map(|(_, rg)| rg)
        .collect()
}

/// Splits a rank's row groups (given by their row counts, in reading order) into windows
/// `[start, end)`. Without shuffling each row group is its own window; with shuffling a window
/// is the shortest run of row groups holding at least `shuffle_buffer` rows (the last one may
/// hold fewer).
pub(crate) fn windows(rows: &[usize], shuffle: bool, shuffle_buffer: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut acc = 0;
    for (i, &r) in rows.iter().enumerate() {
        acc += r;
        if !shuffle || acc >= shuffle_buffer.max(1) {
            out.push((start, i + 1));
            start = i + 1;
            acc = 0;
        }
    }
    if start < rows.len() {
        out.push((start, rows.len()));
    }
    out
}

/// The order in which the rows of a window come out, as (row group within the window, row
/// within that row group): row-group order without shuffling, a seeded permutation with it.
pub(crate) fn window_order(
    rows: &[usize],
    shuffle: bool,
    seed: u64,
    epoch: u64,
    rank: usize,
    start: usize,
) -> Vec<(u32, u32)> {
    let total: usize = rows.iter().sum();
    let mut order = Vec::with_capacity(total);
    for (k, &n) in rows.iter().enumerate() {
        for r in 0..n {
            order.push((k as u32, r as u32));
        }
    }
    if shuffle {
        let stream = ((rank as u64) << 40) ^ start as u64;
        let mut rng = ChaCha8Rng::seed_from_u64(mix(seed, epoch, stream ^ 0x57494E44));
        order.shuffle(&mut rng);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_partition_row_groups() {
        for world in 1..5 {
            let mut all: Vec<usize> = (0..world)
                .flat_map(|r| rank_row_groups(11, 2, 7, true, r, world))
                .collect();
            all.sort();
            assert_eq!(all, (0..11).collect::<Vec<_>>());
        }
    }

    #[test]
    fn epochs_reshuffle_deterministically() {
        let a = rank_row_groups(20, 0, 1, true, 0, 1);
        let b = rank_row_groups(20, 1, 1, true, 0, 1);
        assert_ne!(a, b);
        assert_eq!(a, rank_row_groups(20, 0, 1, true, 0, 1));
        assert_eq!(rank_row_groups(5, 3, 1, false, 0, 1), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn windows_reach_buffer_size() {
        assert_eq!(
            windows(&[5, 5, 5, 5, 2], true, 8),
            vec![(0, 2), (2, 4), (4, 5)]
        );
        assert_eq!(windows(&[5, 5], false, 100), vec![(0, 1), (1, 2)]);
        assert_eq!(windows(&[5, 5], true, 0), vec![(0, 1), (1, 2)]);
        assert_eq!(windows(&[3, 3], true, 100), vec![(0, 2)]);
    }

    #[test]
    fn window_order_is_a_permutation() {
        let mut o = window_order(&[3, 2], true, 9, 0, 0, 0);
        assert_ne!(o, window_order(&[3, 2], false, 9, 0, 0, 0));
        o.sort();
        assert_eq!(o, vec![(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]);
    }
}
