//! Data-parallel runs. A binary built with `--features mpi` and started by `mpirun -np N`
//! trains on N ranks with no other change: `train.batch_size` is per rank (the global batch is
//! N times it, as in PyTorch DDP), parameters start from rank 0's, gradients are summed over
//! ranks every step, and rank 0 alone writes the run directory. Otherwise the run is a single
//! process.
//!
//! Data: each rank reads only its own Parquet row groups (`ssl_data::read_all` with
//! [`Parallel::read_options`]: global row groups `g % N == rank`), and decisions that need the
//! whole data set use global row indices or values exchanged between ranks:
//!
//! * text: the held-out split is `is_heldout(global row index)`, so the ranks together hold out
//!   exactly the documents one process would; `data.max_docs` keeps global rows below it; rank
//!   0 trains the tokenizer on its share of the training documents (when none is given) and
//!   sends it to the others; held-out perplexity adds every rank's sums (cross-entropy over
//!   masked tokens, masked tokens, hits) for the same held-out documents as one process, each
//!   rank evaluating at most `heldout_max_seqs / N` of its sequences;
//! * vision: `data.max_images` keeps global rows below it; the normalisation statistics add
//!   every rank's moments;
//! * multimodal: the global row indices of every rank's good rows are gathered, so
//!   `data.max_pairs`, the hold-out split and the pair filter's quantile are exactly one
//!   process's; normalisation statistics add every rank's moments; the tokenizer is rank 0's;
//! * time series, features: one series per row, read by row group; a long series stored one
//!   value per row is read whole on every rank and its windows dealt round robin
//!   ([`Parallel::shard`]).
//!
//! Health batches and previews are rank 0's first examples: rank 0 reads row group 0, so they
//! are the source's first examples as in one process as long as they fit in that row group.
//! Sources with fewer row groups than ranks (the embedded samples are one row group each) are
//! read whole by every rank, which keeps the rows whose global index is `rank` modulo N (rank
//! 0 says so once).
//!
//! A binary built with `--features cuda,nccl` whose `train.device` is a GPU reduces over NCCL
//! instead, one process per GPU: rank `r` uses the GPU of its node-local rank.

use std::sync::Arc;

use candle_core::Device;

use ssl_core::{Collective, ParamStore, SharedCollective, SingleProcess};
use ssl_data::{ReadOptions, Share};

use crate::error::CliError;

/// This process's place in the run.
pub struct Parallel {
    collective: SharedCollective,
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks.
    pub world: usize,
}

impl Parallel {
    /// MPI when launched by `mpirun` in an `mpi` build (NCCL on a GPU `device` in an `nccl`
    /// build, which also moves the run to this rank's GPU); a single process otherwise.
    /// Returns the device to train on.
    pub fn init(device: Device) -> Result<(Self, Device), CliError> {
        let (collective, device) = backend(device)?;
        let (rank, world) = (collective.rank(), collective.world_size());
        if world > 1 && rank == 0 {
            eprintln!(
                "data parallel over {world} MPI ranks: train.batch_size is per rank (global batch = {world} x it)"
            );
        }
        Ok((
            Parallel {
                collective,
                rank,
                world,
            },
            device,
        ))
    }

    /// True on the rank that writes files and prints reports.
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    /// This rank's shard of items every rank holds: every `world`-th item from `rank` (for
    /// data read whole on every rank, the windows of one long series). Errors when a rank would
    /// get nothing.
    pub fn shard<T>(&self, items: Vec<T>, what: &str) -> Result<Vec<T>, CliError> {
        if self.world == 1 {
            return Ok(items);
        }
        let n = items.len();
        if n < self.world {
            return Err(CliError::Config(format!(
                "{n} {what} cannot be shared by {} ranks: give more data or fewer ranks",
                self.world
            )));
        }
        Ok(items
            .into_iter()
            .enumerate()
            .filter(|(i, _)| i % self.world == self.rank)
            .map(|(_, x)| x)
            .collect())
    }

    /// Options for `ssl_data::read_all` that read this rank's share of a source (everything
    /// in a single process).
    pub fn read_options(&self, skip_bad_rows: bool) -> ReadOptions {
        ReadOptions {
            skip_bad_rows,
            rank: self.rank,
            world_size: self.world,
            ..ReadOptions::default()
        }
    }

    /// Says which part of the source this rank read (every rank, in a run of several ranks),
    /// and on rank 0 when the source had too few row groups to be split by row group.
    pub fn report_share(&self, share: &Share, n: usize, what: &str) {
        if self.world == 1 {
            return;
        }
        match share {
            Share::RowGroups(groups) => {
                eprintln!(
                    "rank {} reads row groups {groups:?} ({n} {what})",
                    self.rank
                );
            }
            Share::Rows | Share::All => {
                if self.is_main() {
                    eprintln!(
                        "note: the data has fewer row groups than the {} ranks, so every rank reads all of it and keeps the rows whose index is its rank modulo {}; write the files with smaller row groups for each rank to read only its share",
                        self.world, self.world
                    );
                }
                eprintln!(
                    "rank {} reads every row group and keeps rows i % {} == {} ({n} {what})",
                    self.rank, self.world, self.rank
                );
            }
        }
    }

    /// Every rank's `local` values summed in `f64` (exactly as a single process would add
    /// the same numbers in rank order, up to `f64` rounding): values travel as pairs of
    /// `f32` (high part and remainder), so counts and sums keep about 48 bits.
    pub fn sum_f64(&self, local: &[f64]) -> Result<Vec<f64>, CliError> {
        if self.world == 1 {
            return Ok(local.to_vec());
        }
        let parts: Vec<f32> = local
            .iter()
            .flat_map(|&x| {
                let hi = x as f32;
                [hi, (x - f64::from(hi)) as f32]
            })
            .collect();
        let all = self.collective.all_gather(&parts)?;
        let mut out = vec![0.0f64; local.len()];
        for rank in all.chunks(parts.len().max(1)) {
            for (o, pair) in out.iter_mut().zip(rank.chunks(2)) {
                *o += f64::from(pair[0]) + f64::from(pair[1]);
            }
        }
        Ok(out)
    }

    /// Every rank's `local` values (lengths may differ), concatenated in rank order, on every
    /// rank.
    pub fn gather_f32(&self, local: &[f32]) -> Result<Vec<f32>, CliError> {
        if self.world == 1 {
            return Ok(local.to_vec());
        }
        let lens: Vec<usize> = self
            .collective
            .all_gather(&split_u48(local.len()))?
            .chunks(2)
            .map(join_u48)
            .collect();
        let max = lens.iter().copied().max().unwrap_or(0);
        let mut padded = local.to_vec();
        padded.resize(max, 0.0);
        let all = self.collective.all_gather(&padded)?;
        Ok(all
            .chunks(max.max(1))
            .zip(&lens)
            .flat_map(|(c, &n)| c[..n].iter().copied())
            .collect())
    }

    /// Every rank's `local` indices (below 2^48; lengths may differ), concatenated in rank
    /// order, on every rank.
    pub fn gather_indices(&self, local: &[usize]) -> Result<Vec<usize>, CliError> {
        if self.world == 1 {
            return Ok(local.to_vec());
        }
        let parts: Vec<f32> = local.iter().flat_map(|&i| split_u48(i)).collect();
        Ok(self.gather_f32(&parts)?.chunks(2).map(join_u48).collect())
    }

    /// Per-channel mean and standard deviation of images `(N, C, H*W)` (row-major `data`)
    /// over every rank's images: `ssl_vision::augment::channel_stats` in one process, the same formula
    /// on moments summed over ranks otherwise.
    pub fn channel_stats(
        &self,
        data: &[f32],
        channels: usize,
        hw: usize,
    ) -> Result<(Vec<f32>, Vec<f32>), CliError> {
        if self.world == 1 {
            return Ok(ssl_vision::augment::channel_stats(data, channels, hw));
        }
        let n = data.len() / (channels * hw).max(1);
        // Per channel: sum, sum of squares; then the pixel count.
        let mut local = vec![0f64; 2 * channels + 1];
        for i in 0..n {
            for c in 0..channels {
                let start = (i * channels + c) * hw;
                for &v in &data[start..start + hw] {
                    local[c] += f64::from(v);
                    local[channels + c] += f64::from(v) * f64::from(v);
                }
            }
        }
        local[2 * channels] = (n * hw) as f64;
        let sums = self.sum_f64(&local)?;
        let count = sums[2 * channels].max(1.0);
        let mean: Vec<f32> = (0..channels).map(|c| (sums[c] / count) as f32).collect();
        let std: Vec<f32> = (0..channels)
            .map(|c| {
                let m = sums[c] / count;
                ((sums[channels + c] / count - m.powi(2)).max(1e-12).sqrt() as f32).max(1e-3)
            })
            .collect();
        Ok((mean, std))
    }

    /// Rank 0's `bytes` on every rank (other ranks' arguments are ignored).
    pub fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>, CliError> {
        if self.world == 1 {
            return Ok(bytes);
        }
        let n = bytes.len() as f64;
        let hi = n as f32;
        let mut len = vec![hi, (n - f64::from(hi)) as f32];
        self.collective.broadcast(&mut len, 0)?;
        let n = (f64::from(len[0]) + f64::from(len[1])) as usize;
        let mut buf: Vec<f32> = if self.is_main() {
            bytes.iter().map(|&b| f32::from(b)).collect()
        } else {
            vec![0.0; n]
        };
        self.collective.broadcast(&mut buf, 0)?;
        Ok(buf.into_iter().map(|x| x as u8).collect())
    }

    /// Overwrites every parameter of `store` with rank 0's values.
    pub fn broadcast_params(&self, store: &ParamStore) -> Result<(), CliError> {
        Ok(ssl_core::broadcast_params(self.collective.as_ref(), store)?)
    }

    /// The collective for the trainer.
    pub fn take(&mut self) -> Box<dyn ssl_core::Collective> {
        Box::new(self.collective.clone())
    }

    /// The same collective, for a task that exchanges data of its own.
    pub fn shared(&self) -> SharedCollective {
        self.collective.clone()
    }
}

/// An integer below 2^48 as two `f32` holding its high and low 24 bits exactly.
fn split_u48(i: usize) -> [f32; 2] {
    [(i >> 24) as f32, (i & 0xFF_FFFF) as f32]
}

fn join_u48(pair: &[f32]) -> usize {
    ((pair[0] as usize) << 24) | pair[1] as usize
}

#[cfg(feature = "mpi")]
fn backend(device: Device) -> Result<(SharedCollective, Device), CliError> {
    if !ssl_core::MpiCollective::launched_by_mpirun() {
        return Ok((Arc::new(SingleProcess), device));
    }
    let mpi = ssl_core::MpiCollective::init()?;
    #[cfg(feature = "nccl")]
    if device.is_cuda() {
        let local = ssl_core::NcclCollective::local_rank();
        let gpu = Device::new_cuda(local)?;
        return Ok((Arc::new(ssl_core::NcclCollective::init(mpi, local)?), gpu));
    }
    Ok((Arc::new(mpi), device))
}

#[cfg(not(feature = "mpi"))]
fn backend(device: Device) -> Result<(SharedCollective, Device), CliError> {
    if ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| s != "1"))
    {
        return Err(CliError::Config(
            "started by mpirun with several ranks, but this ssl binary was built without MPI: build it with `cargo build --release -p ssl-cli --features mpi`".into(),
        ));
    }
    Ok((Arc::new(SingleProcess), device))
}

#[cfg(test)]
/// Writes the Parquet file `bytes` to `path` again with row groups of `rows_per_group` rows.
pub(crate) fn regroup(bytes: &[u8], rows_per_group: usize, path: &std::path::Path) {
    let src = path.with_extension("src");
    std::fs::write(&src, bytes).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(&src).unwrap(),
    )
    .unwrap()
    .build()
    .unwrap();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(rows_per_group))
        .build();
    let mut w = None;
    for batch in reader {
        let batch = batch.unwrap();
        let w = w.get_or_insert_with(|| {
            parquet::arrow::ArrowWriter::try_new(
                std::fs::File::create(path).unwrap(),
                batch.schema(),
                Some(props.clone()),
            )
            .unwrap()
        });
        w.write(&batch).unwrap();
    }
    w.unwrap().close().unwrap();
}

#[cfg(test)]
/// Runs `f` on `n` ranks (threads sharing a `ThreadGroup`) and returns their results.
pub(crate) fn on_ranks<R: Send>(n: usize, f: impl Fn(Parallel) -> R + Sync) -> Vec<R> {
    let f = &f;
    std::thread::scope(|s| {
        let hs: Vec<_> = ssl_core::ThreadGroup::new(n)
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    f(Parallel {
                        rank: c.rank(),
                        world: c.world_size(),
                        collective: Arc::new(c),
                    })
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_items() {
        let mut seen = Vec::new();
        for rank in 0..3 {
            let p = Parallel {
                collective: Arc::new(SingleProcess),
                rank,
                world: 3,
            };
            seen.extend(p.shard((0..10).collect::<Vec<_>>(), "rows").unwrap());
        }
        seen.sort();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        let p = Parallel {
            collective: Arc::new(SingleProcess),
            rank: 0,
            world: 4,
        };
        assert!(p.shard(vec![1, 2, 3], "rows").is_err());
    }

    #[test]
    fn sums_keep_f64_precision_across_ranks() {
        // 2^30 + 1 and 0.1 are not exact in f32; the sums must still be exact in f64.
        let out = on_ranks(3, |p| {
            let r = p.rank as f64;
            p.sum_f64(&[1_073_741_825.0 + r, 0.1 * (r + 1.0)]).unwrap()
        });
        for v in out {
            assert_eq!(v[0], 3.0 * 1_073_741_825.0 + 3.0);
            assert!((v[1] - 0.6).abs() < 1e-12, "{}", v[1]);
        }
    }

    #[test]
    fn gathers_keep_rank_order_and_uneven_lengths() {
        let out = on_ranks(3, |p| {
            let local: Vec<usize> = (0..p.rank + 1)
                .map(|k| (1 << 40) + 10 * p.rank + k)
                .collect();
            let f: Vec<f32> = local.iter().map(|&i| (i % 1000) as f32 + 0.5).collect();
            (p.gather_indices(&local).unwrap(), p.gather_f32(&f).unwrap())
        });
        let want: Vec<usize> = [0, 10, 11, 20, 21, 22]
            .iter()
            .map(|k| (1 << 40) + k)
            .collect();
        for (idx, f) in out {
            assert_eq!(idx, want);
            let wf: Vec<f32> = want.iter().map(|&i| (i % 1000) as f32 + 0.5).collect();
            assert_eq!(f, wf);
        }
    }

    #[test]
    fn channel_stats_over_ranks_match_one_process() {
        // 4 images of 2 channels x 3 pixels, split 3 + 1 over two ranks.
        let data: Vec<f32> = (0..24).map(|v| (v as f32 * 0.37).sin().abs()).collect();
        let one = ssl_vision::augment::channel_stats(&data, 2, 3);
        let out = on_ranks(2, |p| {
            let part = if p.rank == 0 {
                &data[..18]
            } else {
                &data[18..]
            };
            p.channel_stats(part, 2, 3).unwrap()
        });
        for (m, s) in out {
            for c in 0..2 {
                assert!((m[c] - one.0[c]).abs() < 1e-6, "{m:?} {:?}", one.0);
                assert!((s[c] - one.1[c]).abs() < 1e-6, "{s:?} {:?}", one.1);
            }
        }
    }

    #[test]
    fn bytes_and_params_come_from_rank_0() {
        let out = on_ranks(3, |p| {
            let mine = if p.is_main() {
                (0..=255u8).chain(0..50).collect()
            } else {
                vec![7; 3]
            };
            let bytes = p.broadcast_bytes(mine).unwrap();
            let store = ParamStore::new(&Device::Cpu);
            let w = store
                .builder(p.rank as u64)
                .get("w", (2, 3), ssl_core::Init::Normal(1.0))
                .unwrap();
            let before = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            p.broadcast_params(&store).unwrap();
            let v = store.get("w").unwrap().as_tensor().flatten_all().unwrap();
            (bytes, before, v.to_vec1::<f32>().unwrap())
        });
        let rank0 = out[0].1.clone();
        assert_ne!(out[1].1, rank0, "ranks must start from different values");
        for (bytes, _, w) in out {
            assert_eq!(bytes, (0..=255u8).chain(0..50).collect::<Vec<_>>());
            assert_eq!(w, rank0);
        }
    }
}
