//! [`Collective`] over NCCL (feature `nccl`, which implies `mpi`): one process per GPU,
//! started by `mpirun`; MPI gives rank and world size and carries NCCL's unique id from rank 0
//! to the others, NCCL does the reductions on the GPUs.
//!
//! The trainer hands the collective host `f32` buffers; this backend copies each buffer to the
//! rank's GPU, runs the NCCL collective on the stream and copies the result back. CUDA and
//! NCCL are loaded at run time (`libcuda`, `libnccl`), so the feature builds on a machine
//! without them; it was compiled but not run here (no GPU on the development machine).

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{Comm, Id, ReduceOp};

use crate::{Collective, CoreError, MpiCollective, Result};

/// NCCL communicator of this rank's GPU, with the MPI world that set it up.
pub struct NcclCollective {
    comm: Comm,
    stream: Arc<CudaStream>,
    mpi: MpiCollective,
}

// SAFETY: the trainer and its task call the collective in turn on the training thread, never
// concurrently (as for `MpiCollective`).
#[allow(unsafe_code)]
unsafe impl Send for NcclCollective {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl Sync for NcclCollective {}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank())
            .field("world_size", &self.world_size())
            .finish()
    }
}

fn err(what: &str, e: impl std::fmt::Debug) -> CoreError {
    CoreError::Collective(format!("NCCL {what}: {e:?}"))
}

impl NcclCollective {
    /// Joins the NCCL communicator of the MPI world on GPU `device` (usually the rank's
    /// local rank on its node, `OMPI_COMM_WORLD_LOCAL_RANK`).
    pub fn init(mpi: MpiCollective, device: usize) -> Result<Self> {
        let ctx = CudaContext::new(device).map_err(|e| err("opening the GPU", e))?;
        let stream = ctx.default_stream();
        let mut id_bytes = [0u8; 128];
        if mpi.rank() == 0 {
            let id = Id::new().map_err(|e| err("creating the unique id", e))?;
            for (b, c) in id_bytes.iter_mut().zip(id.internal()) {
                *b = *c as u8;
            }
        }
        mpi.broadcast_bytes(&mut id_bytes, 0)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (c, b) in internal.iter_mut().zip(id_bytes) {
            *c = b as std::ffi::c_char;
        }
        let comm = Comm::from_rank(
            stream.clone(),
            mpi.rank(),
            mpi.world_size(),
            Id::uninit(internal),
        )
        .map_err(|e| err("joining the communicator", e))?;
        Ok(NcclCollective { comm, stream, mpi })
    }

    /// The GPU of this rank on its node: `OMPI_COMM_WORLD_LOCAL_RANK` (or Slurm's
    /// `SLURM_LOCALID`), 0 when neither is set.
    pub fn local_rank() -> usize {
        ["OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID"]
            .iter()
            .find_map(|v| std::env::var(v).ok()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let mut d = self.stream.clone_htod(buf).map_err(|e| err("copy", e))?;
        self.comm
            .all_reduce_in_place(&mut d, &ReduceOp::Sum)
            .map_err(|e| err("all_reduce", e))?;
        self.stream
            .memcpy_dtoh(&d, buf)
            .map_err(|e| err("copy back", e))?;
        self.stream.synchronize().map_err(|e| err("synchronize", e))
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        let send = self.stream.clone_htod(local).map_err(|e| err("copy", e))?;
        let mut recv = self
            .stream
            .alloc_zeros::<f32>(local.len() * self.world_size())
            .map_err(|e| err("alloc", e))?;
        self.comm
            .all_gather(&send, &mut recv)
            .map_err(|e| err("all_gather", e))?;
        self.stream
            .clone_dtoh(&recv)
            .map_err(|e| err("copy back", e))
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let mut d = self.stream.clone_htod(buf).map_err(|e| err("copy", e))?;
        self.comm
            .broadcast_in_place(&mut d, root as i32)
            .map_err(|e| err("broadcast", e))?;
        self.stream
            .memcpy_dtoh(&d, buf)
            .map_err(|e| err("copy back", e))?;
        self.stream.synchronize().map_err(|e| err("synchronize", e))
    }
    fn barrier(&self) -> Result<()> {
        self.mpi.barrier()
    }
}
