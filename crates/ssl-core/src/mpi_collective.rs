//! [`Collective`] over MPI (feature `mpi`): one process per rank, launched by `mpirun`.
//!
//! Build with `--features mpi` (Debian: `libopenmpi-dev openmpi-bin libclang-dev`), then
//! `mpirun -np 2 target/release/ssl pretrain ...`. Rank and world size come from MPI.

use mpi::collective::SystemOperation;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::{CommunicatorCollectives, Root};
use mpi::Threading;

use crate::{Collective, CoreError, Result};

/// MPI's world communicator. MPI is initialised by [`MpiCollective::init`] and finalised when
/// the value is dropped; create at most one per process.
pub struct MpiCollective {
    world: SimpleCommunicator,
    // Dropped last: finalises MPI.
    _universe: mpi::environment::Universe,
}

// SAFETY: the trainer calls collectives from one thread at a time; MPI is initialised with
// `Threading::Serialized`, which allows exactly that from any thread.
#[allow(unsafe_code)]
unsafe impl Send for MpiCollective {}
// SAFETY: shared (as a `SharedCollective`) only between the trainer and its task, which call
// it in turn on the training thread, never concurrently.
#[allow(unsafe_code)]
unsafe impl Sync for MpiCollective {}

impl std::fmt::Debug for MpiCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiCollective")
            .field("rank", &self.rank())
            .field("world_size", &self.world_size())
            .finish()
    }
}

impl MpiCollective {
    /// Initialises MPI. Errors when MPI was already initialised or gives too little thread
    /// support.
    pub fn init() -> Result<Self> {
        let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| CoreError::Collective("MPI is already initialised".into()))?;
        if level < Threading::Serialized {
            return Err(CoreError::Collective(format!(
                "the MPI library gives thread support {level:?}; Serialized is needed"
            )));
        }
        Ok(MpiCollective {
            world: universe.world(),
            _universe: universe,
        })
    }

    /// True when this process was started by an MPI launcher (Open MPI, MPICH or Slurm's PMI
    /// set these variables), so a binary can choose MPI without a flag.
    pub fn launched_by_mpirun() -> bool {
        ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"]
            .iter()
            .any(|v| std::env::var_os(v).is_some())
    }
}

impl MpiCollective {
    /// Overwrites `buf` on every rank with rank `root`'s bytes.
    pub fn broadcast_bytes(&self, buf: &mut [u8], root: usize) -> Result<()> {
        if root >= self.world_size() {
            return Err(CoreError::Collective(format!(
                "broadcast from rank {root} of {}",
                self.world_size()
            )));
        }
        self.world.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn world_size(&self) -> usize {
        self.world.size() as usize
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; local.len() * self.world_size()];
        self.world.all_gather_into(local, &mut out[..]);
        Ok(out)
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.world_size() {
            return Err(CoreError::Collective(format!(
                "broadcast from rank {root} of {}",
                self.world_size()
            )));
        }
        self.world.process_at_rank(root as i32).broadcast_into(buf);
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        self.world.barrier();
        Ok(())
    }
}
