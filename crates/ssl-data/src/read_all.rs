//! Reading a whole (small) source, or one rank's share of it, into one in-memory batch.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::bad_rows::BadRowReport;
use crate::batch::Batch;
use crate::column::ColumnSpec;
use crate::error::DataError;
use crate::loader::{DataLoader, LoaderConfig};
use crate::plan::rank_row_groups;
use crate::source::ParquetSource;

/// Options of [`read_all`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReadOptions {
    /// Skip rows that cannot be decoded (reported in [`Table::bad_rows`]) instead of failing.
    pub skip_bad_rows: bool,
    /// Decoding threads; 0 picks the number of cores, at most 4.
    pub workers: usize,
    /// This process's rank, `0..world_size` (default 0).
    pub rank: usize,
    /// Number of ranks sharing the source (default 1: read everything). See [`read_all`] for
    /// which rows a rank gets.
    pub world_size: usize,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            skip_bad_rows: false,
            workers: 0,
            rank: 0,
            world_size: 1,
        }
    }
}

impl ReadOptions {
    /// Options that read the share of rank `rank` of `world_size` (see [`read_all`]).
    pub fn for_rank(rank: usize, world_size: usize, skip_bad_rows: bool) -> Self {
        ReadOptions {
            skip_bad_rows,
            rank,
            world_size,
            ..ReadOptions::default()
        }
    }
}

/// Which part of the source a [`Table`] holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Share {
    /// Every row (`world_size` 1).
    All,
    /// The row groups at these global indices (files in order, row groups in file order):
    /// those `g` with `g % world_size == rank`.
    RowGroups(Vec<usize>),
    /// The source has fewer row groups than ranks: every row was read and the rows whose
    /// global index `i` has `i % world_size == rank` were kept.
    Rows,
}

impl Share {
    /// Says on stderr which part of the source rank `rank` of `world_size` read (`n` `what`),
    /// and on rank 0 when the source had too few row groups to be split by row group. Silent
    /// in a single process.
    pub fn report(&self, rank: usize, world_size: usize, n: usize, what: &str) {
        if world_size <= 1 {
            return;
        }
        match self {
            Share::RowGroups(groups) => {
                eprintln!("rank {rank} reads row groups {groups:?} ({n} {what})");
            }
            Share::Rows | Share::All => {
                if rank == 0 {
                    eprintln!(
                        "note: the data has fewer row groups than the {world_size} ranks, so every rank reads all of it and keeps the rows whose index is its rank modulo {world_size}; write the files with smaller row groups for each rank to read only its share"
                    );
                }
                eprintln!(
                    "rank {rank} reads every row group and keeps rows i % {world_size} == {rank} ({n} {what})"
                );
            }
        }
    }
}

/// A whole source (or one rank's share) in memory, plus the rows that were skipped.
#[derive(Debug, Clone, PartialEq)]
pub struct Table {
    /// The rows, in file order (files in source order, rows in file order).
    pub batch: Batch,
    /// Each row's global index in the source: its position when every row of every file is
    /// counted, files in order and rows in file order, bad rows included (so skipping a bad
    /// row does not shift the indices of the rows after it). `0..n` for a whole source
    /// without bad rows.
    pub row_index: Vec<usize>,
    /// Which part of the source was read.
    pub share: Share,
    /// Rows skipped under `skip_bad_rows` (only among the rows this rank read).
    pub bad_rows: BadRowReport,
    /// Class names of each label column, by column name (indexed by class id).
    pub class_names: Vec<(String, Option<Vec<String>>)>,
}

/// Reads every row of the files, directories or globs in `paths` into one [`Table`], in file
/// order, with the same column specs and checks as [`DataLoader`]. Meant for data that fits in
/// memory; stream larger data with a [`DataLoader`].
///
/// With `world_size > 1` each rank reads only its share, and the ranks' shares are disjoint
/// and together cover the source:
///
/// * with at least `world_size` row groups (over all files), the rank reads only the row
///   groups `g` with `g % world_size == rank` (global row-group index, no shuffling: the
///   round-robin deal of [`DataLoader`] without its shuffle), in order;
/// * with fewer row groups than ranks (a small file written as a single row group), it falls
///   back to reading every row and keeping those whose global row index `i` has
///   `i % world_size == rank` ([`Share::Rows`]): correct, but every rank decodes everything.
///
/// Label class lists are fixed from the whole source either way, so class ids agree between
/// ranks. Image sizes (without `resize`) and series channel counts are checked against the
/// first row this rank reads, so under `skip_bad_rows` which rows count as bad can depend on
/// the share. Errors when this rank ends up with no row.
pub fn read_all<P: AsRef<Path>>(
    paths: &[P],
    columns: &[ColumnSpec],
    options: &ReadOptions,
) -> Result<Table, DataError> {
    let (rank, world) = (options.rank, options.world_size);
    if world == 0 || rank >= world {
        return Err(DataError::InvalidConfig {
            reason: format!("rank {rank} is outside world_size {world} (ranks are 0..world_size)"),
        });
    }
    let source = ParquetSource::open(paths)?;
    let n_groups = source.num_row_groups();
    let by_groups = world > 1 && n_groups >= world;
    let config = LoaderConfig {
        columns: columns.to_vec(),
        batch_size: source.num_rows(),
        shuffle: false,
        epochs: Some(1),
        skip_bad_rows: options.skip_bad_rows,
        workers: options.workers,
        prefetch: 1,
        rank: if by_groups { rank } else { 0 },
        world_size: if by_groups { world } else { 1 },
        ..LoaderConfig::default()
    };
    let mut loader = DataLoader::new(&source, config)?;
    let batch = loader
        .next_batch()?
        .ok_or_else(|| DataError::EmptyDataset {
            what: format!(
                "every row{} of {} was bad and skipped",
                if by_groups {
                    format!(" that rank {rank} read")
                } else {
                    String::new()
                },
                source.describe_files()
            ),
        })?;
    let global: Vec<usize> = batch.rows().to_vec();
    let (batch, row_index, share) = if world == 1 {
        (batch, global, Share::All)
    } else if by_groups {
        let groups = rank_row_groups(n_groups, 0, 0, false, rank, world);
        (batch, global, Share::RowGroups(groups))
    } else {
        let keep: Vec<usize> = (0..global.len())
            .filter(|&k| global[k] % world == rank)
            .collect();
        if keep.is_empty() {
            return Err(DataError::EmptyDataset {
                what: format!(
                    "rank {rank} of {world} gets none of the {} good row(s) of {}: give more data or fewer ranks",
                    global.len(),
                    source.describe_files()
                ),
            });
        }
        let row_index = keep.iter().map(|&k| global[k]).collect();
        (batch.select(&keep), row_index, Share::Rows)
    };
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
        row_index,
        share,
        bad_rows: loader.bad_rows(),
        class_names,
    })
}
