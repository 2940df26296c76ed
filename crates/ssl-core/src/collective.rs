//! Collective communication for data-parallel training.

use crate::Result;

/// The operations data-parallel training needs from a communication backend.
///
/// Implementations: [`SingleProcess`] here; MPI and NCCL behind features (see DESIGN.md).
pub trait Collective: Send {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn world_size(&self) -> usize;
    /// Element-wise sum of `buf` over all ranks, in place.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Concatenation of every rank's `local` (equal lengths), in rank order.
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>>;
    /// Overwrites `buf` on every rank with rank `root`'s contents.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()>;
    /// Waits until every rank arrives.
    fn barrier(&self) -> Result<()>;
    /// True on the rank that writes checkpoints and logs.
    fn is_main(&self) -> bool {
        self.rank() == 0
    }
}

/// One process: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        Ok(local.to_vec())
    }
    fn broadcast(&self, _buf: &mut [f32], _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
}
