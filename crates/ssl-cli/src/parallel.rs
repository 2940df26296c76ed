//! Data-parallel runs. A binary built with `--features mpi` and started by `mpirun -np N`
//! trains on N ranks with no other change: each rank keeps every N-th training example (its
//! shard), `train.batch_size` is per rank (the global batch is N times it, as in PyTorch DDP),
//! parameters start from rank 0's, gradients are summed over ranks every step, and rank 0
//! alone writes the run directory. Otherwise the run is a single process.
//!
//! A binary built with `--features cuda,nccl` whose `train.device` is a GPU reduces over NCCL
//! instead, one process per GPU: rank `r` uses the GPU of its node-local rank.

use std::sync::Arc;

use candle_core::Device;

use ssl_core::{SharedCollective, SingleProcess};

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

    /// This rank's shard: every `world`-th item from `rank`. Errors when a rank would get
    /// nothing.
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

    /// The collective for the trainer.
    pub fn take(&mut self) -> Box<dyn ssl_core::Collective> {
        Box::new(self.collective.clone())
    }

    /// The same collective, for a task that exchanges data of its own.
    pub fn shared(&self) -> SharedCollective {
        self.collective.clone()
    }
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
}
