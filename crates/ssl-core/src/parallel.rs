//! Data-parallel runs, as every pipeline sees them. A process started by `mpirun -np N` (in a
//! build with the `mpi` feature) trains on N ranks with no other change: `train.batch_size` is
//! per rank (the global batch is N times it, as in PyTorch DDP), parameters start from rank 0's,
//! gradients are summed over ranks every step, and rank 0 alone writes the run directory.
//! Otherwise the run is a single process.
//!
//! What needs the whole data set is decided on global row indices (held-out split, caps) or on
//! values the ranks exchange through [`Parallel`] ([`Parallel::sum_f64`],
//! [`Parallel::gather_f32`], [`Parallel::gather_indices`], [`Parallel::broadcast_bytes`]).
//! Each rank reads only its own Parquet row groups (`ssl_data::ReadOptions::for_rank`). Health
//! batches and previews are rank 0's first examples.
//!
//! A build with the `nccl` feature whose device is a GPU reduces over NCCL instead, one process
//! per GPU: rank `r` uses the GPU of its node-local rank.

use std::sync::Arc;

use candle_core::Device;

use crate::{Collective, CoreError, ParamStore, Result, SharedCollective, SingleProcess};

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
    pub fn init(device: Device) -> Result<(Self, Device)> {
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
    pub fn shard<T>(&self, items: Vec<T>, what: &str) -> Result<Vec<T>> {
        if self.world == 1 {
            return Ok(items);
        }
        let n = items.len();
        if n < self.world {
            return Err(CoreError::Config(format!(
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

    /// Every rank's `local` values summed in `f64` (exactly as a single process would add
    /// the same numbers in rank order, up to `f64` rounding): values travel as pairs of
    /// `f32` (high part and remainder), so counts and sums keep about 48 bits.
    pub fn sum_f64(&self, local: &[f64]) -> Result<Vec<f64>> {
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
    pub fn gather_f32(&self, local: &[f32]) -> Result<Vec<f32>> {
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
    pub fn gather_indices(&self, local: &[usize]) -> Result<Vec<usize>> {
        if self.world == 1 {
            return Ok(local.to_vec());
        }
        let parts: Vec<f32> = local.iter().flat_map(|&i| split_u48(i)).collect();
        Ok(self.gather_f32(&parts)?.chunks(2).map(join_u48).collect())
    }

    /// Rank 0's `bytes` on every rank (other ranks' arguments are ignored).
    pub fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>> {
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
    pub fn broadcast_params(&self, store: &ParamStore) -> Result<()> {
        crate::broadcast_params(self.collective.as_ref(), store)
    }

    /// The collective for the trainer.
    pub fn take(&self) -> Box<dyn crate::Collective> {
        Box::new(self.collective.clone())
    }

    /// A single process (rank 0 of 1).
    pub fn single() -> Self {
        Self::from_collective(Arc::new(SingleProcess))
    }

    /// The ranks of an existing collective (e.g. a [`crate::ThreadGroup`] member, or MPI set
    /// up by the application).
    pub fn from_collective(collective: SharedCollective) -> Self {
        let (rank, world) = (collective.rank(), collective.world_size());
        Parallel {
            collective,
            rank,
            world,
        }
    }

    /// Runs `f` on `n` ranks (threads sharing a [`crate::ThreadGroup`]) and returns their
    /// results in rank order: data-parallel code tested in one process.
    pub fn on_threads<R: Send>(n: usize, f: impl Fn(Parallel) -> R + Sync) -> Vec<R> {
        let f = &f;
        std::thread::scope(|s| {
            let hs: Vec<_> = crate::ThreadGroup::new(n)
                .into_iter()
                .map(|c| s.spawn(move || f(Parallel::from_collective(Arc::new(c)))))
                .collect();
            hs.into_iter()
                .map(|h| match h.join() {
                    Ok(r) => r,
                    Err(p) => std::panic::resume_unwind(p),
                })
                .collect()
        })
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
fn backend(device: Device) -> Result<(SharedCollective, Device)> {
    if !crate::MpiCollective::launched_by_mpirun() {
        return Ok((Arc::new(SingleProcess), device));
    }
    let mpi = crate::MpiCollective::init()?;
    #[cfg(feature = "nccl")]
    if device.is_cuda() {
        let local = crate::NcclCollective::local_rank();
        let gpu = Device::new_cuda(local)?;
        return Ok((Arc::new(crate::NcclCollective::init(mpi, local)?), gpu));
    }
    Ok((Arc::new(mpi), device))
}

#[cfg(not(feature = "mpi"))]
fn backend(device: Device) -> Result<(SharedCollective, Device)> {
    if ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .any(|v| std::env::var(v).is_ok_and(|s| s != "1"))
    {
        return Err(CoreError::Config(
            "started by mpirun with several ranks, but this ssl binary was built without MPI: build it with `cargo build --release -p ssl-cli --features mpi`".into(),
        ));
    }
    Ok((Arc::new(SingleProcess), device))
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
        let out = Parallel::on_threads(3, |p| {
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
        let out = Parallel::on_threads(3, |p| {
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
    fn bytes_and_params_come_from_rank_0() {
        let out = Parallel::on_threads(3, |p| {
            let mine = if p.is_main() {
                (0..=255u8).chain(0..50).collect()
            } else {
                vec![7; 3]
            };
            let bytes = p.broadcast_bytes(mine).unwrap();
            let store = ParamStore::new(&Device::Cpu);
            let w = store
                .builder(p.rank as u64)
                .get("w", (2, 3), crate::Init::Normal(1.0))
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
