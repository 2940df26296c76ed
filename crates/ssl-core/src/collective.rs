//! Collective communication for data-parallel training.
//!
//! [`SingleProcess`] (the default), [`ThreadGroup`] (ranks as threads of one process: tests and
//! a reference for the semantics) and, with the `mpi` feature, `MpiCollective` (one process per
//! rank under `mpirun`).

use std::sync::{Arc, Barrier, Mutex};

use crate::{CoreError, Result};

/// The operations data-parallel training needs from a communication backend.
///
/// Every rank must call the same collectives in the same order with equal lengths. Sums are
/// taken in rank order, so every rank receives bit-identical results.
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

/// A collective shared by the trainer and a task that exchanges data of its own (contrastive
/// losses gather embeddings across ranks). Calls must not overlap: the trainer and the task
/// take turns on one thread.
pub type SharedCollective = Arc<dyn Collective + Sync>;

impl Collective for SharedCollective {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        (**self).all_reduce_sum(buf)
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        (**self).all_gather(local)
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        (**self).broadcast(buf, root)
    }
    fn barrier(&self) -> Result<()> {
        (**self).barrier()
    }
}

/// Copies rank 0's parameters into every rank's `store` (variables in name order, each sent
/// as f32 and cast back to its dtype). Does nothing with one rank.
pub fn broadcast_params(ranks: &dyn Collective, store: &crate::ParamStore) -> Result<()> {
    if ranks.world_size() == 1 {
        return Ok(());
    }
    for (_, var) in store.vars() {
        let t = var.as_tensor();
        let mut buf = t
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        ranks.broadcast(&mut buf, 0)?;
        var.set(&candle_core::Tensor::from_vec(buf, t.shape(), t.device())?.to_dtype(t.dtype())?)?;
    }
    Ok(())
}

/// Every rank's `local` tensor (same shape on all ranks) concatenated along dimension 0 in
/// rank order, for contrastive losses whose negatives span all ranks. This rank's part keeps
/// its graph, so gradients flow to the local embeddings only; the other ranks' parts are
/// constants. With one rank it returns `local` itself. Errors, naming the shapes, when ranks
/// disagree on the shape.
pub fn gather_rows(
    ranks: &dyn Collective,
    local: &candle_core::Tensor,
) -> Result<candle_core::Tensor> {
    let (rank, world) = (ranks.rank(), ranks.world_size());
    if world <= 1 {
        return Ok(local.clone());
    }
    let dims = local.dims().to_vec();
    if dims.len() > 8 {
        return Err(CoreError::Collective(format!(
            "gathering across ranks takes tensors of rank 8 at most, got shape {dims:?}"
        )));
    }
    let mut key = vec![dims.len() as f32];
    key.extend(dims.iter().map(|&d| d as f32));
    key.resize(9, -1.0);
    let keys = ranks.all_gather(&key)?;
    if keys.chunks(9).any(|k| k != key.as_slice()) {
        let shapes: Vec<Vec<usize>> = keys
            .chunks(9)
            .map(|k| {
                k[1..1 + k[0] as usize]
                    .iter()
                    .map(|&d| d as usize)
                    .collect()
            })
            .collect();
        return Err(CoreError::Collective(format!(
            "gathering across ranks needs the same shape on every rank, got {shapes:?} (give every rank the same batch size)"
        )));
    }
    let values = local
        .detach()
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let n = values.len();
    let all = ranks.all_gather(&values)?;
    let parts = (0..world)
        .map(|r| {
            if r == rank {
                Ok(local.clone())
            } else {
                Ok(candle_core::Tensor::from_slice(
                    &all[r * n..(r + 1) * n],
                    dims.as_slice(),
                    local.device(),
                )?
                .to_dtype(local.dtype())?)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(candle_core::Tensor::cat(&parts, 0)?)
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

/// Ranks as threads of one process, exchanging through shared memory: the semantics of the
/// MPI backend without MPI, for tests and for data-parallel experiments on one machine.
///
/// ```
/// use ssl_core::{Collective, ThreadGroup};
/// let ranks = ThreadGroup::new(2);
/// let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
///     let hs: Vec<_> = ranks
///         .into_iter()
///         .map(|c| s.spawn(move || {
///             let mut v = vec![c.rank() as f32 + 1.0; 3];
///             c.all_reduce_sum(&mut v).unwrap();
///             v
///         }))
///         .collect();
///     hs.into_iter().map(|h| h.join().unwrap()).collect()
/// });
/// assert_eq!(sums, vec![vec![3.0; 3], vec![3.0; 3]]);
/// ```
#[derive(Clone)]
pub struct ThreadGroup {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    size: usize,
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f32>>>,
}

impl std::fmt::Debug for ThreadGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadGroup")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size())
            .finish()
    }
}

impl ThreadGroup {
    /// One handle per rank, `0..n`; move each into its own thread.
    pub fn new(n: usize) -> Vec<ThreadGroup> {
        let shared = Arc::new(Shared {
            size: n.max(1),
            barrier: Barrier::new(n.max(1)),
            slots: Mutex::new(vec![Vec::new(); n.max(1)]),
        });
        (0..n.max(1))
            .map(|rank| ThreadGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Publishes `data` in this rank's slot, waits for all ranks, runs `read` on every slot,
    /// and waits again so no rank overwrites a slot another is still reading.
    fn exchange<R>(&self, data: Vec<f32>, read: impl FnOnce(&[Vec<f32>]) -> R) -> Result<R> {
        let lock_err = |_| CoreError::Collective("a rank panicked during a collective".into());
        self.shared.slots.lock().map_err(lock_err)?[self.rank] = data;
        self.shared.barrier.wait();
        let out = read(&self.shared.slots.lock().map_err(lock_err)?);
        self.shared.barrier.wait();
        Ok(out)
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.size
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let n = buf.len();
        let sum = self.exchange(buf.to_vec(), |slots| {
            if slots.iter().any(|s| s.len() != n) {
                return Err(CoreError::Collective(format!(
                    "all_reduce_sum: lengths differ across ranks ({:?})",
                    slots.iter().map(Vec::len).collect::<Vec<_>>()
                )));
            }
            let mut acc = slots[0].clone();
            for s in &slots[1..] {
                acc.iter_mut().zip(s).for_each(|(a, v)| *a += v);
            }
            Ok(acc)
        })??;
        buf.copy_from_slice(&sum);
        Ok(())
    }
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>> {
        let n = local.len();
        self.exchange(local.to_vec(), |slots| {
            if slots.iter().any(|s| s.len() != n) {
                return Err(CoreError::Collective(
                    "all_gather: lengths differ across ranks".into(),
                ));
            }
            Ok(slots.concat())
        })?
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<()> {
        let root_data = self.exchange(buf.to_vec(), |slots| slots.get(root).cloned())?;
        match root_data {
            Some(d) if d.len() == buf.len() => {
                buf.copy_from_slice(&d);
                Ok(())
            }
            _ => Err(CoreError::Collective(format!(
                "broadcast from rank {root}: no such rank or lengths differ"
            ))),
        }
    }
    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
}
