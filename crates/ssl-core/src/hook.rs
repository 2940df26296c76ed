//! Extension points of the training loop: periodic work (held-out evaluation, previews, best
//! checkpoint, early stopping, extra loggers) plugs into [`crate::LoopTrainer::fit_with_hooks`]
//! instead of being wrapped around the loop.

use std::path::Path;

use serde_json::{Map, Value};

use crate::nn::MatmulPrecision;
use crate::{PretextTask, Result, StopFlag, TrainReport};

/// What a hook sees of the run.
pub struct HookCtx<'a, T: PretextTask> {
    /// The task being trained (for evaluation, previews, embeddings). Evaluate with
    /// [`crate::Ctx::inference`] and an RNG of the hook's own, so the run's random stream (and
    /// thus the training) is the same with or without the hook.
    pub task: &'a T,
    /// The optimizer steps completed (the step just finished, in `after_step`; the
    /// checkpoint's step, in `at_checkpoint`; the step reached, in `at_end`).
    pub step: u64,
    /// The run's last step (`train.max_steps`).
    pub max_steps: u64,
    /// The fixed held-out batch given to the trainer, if any.
    pub heldout: Option<&'a T::Batch>,
    /// The run's output directory (`None`: an in-memory run).
    pub out_dir: Option<&'a Path>,
    /// This process's rank and the number of ranks. Hooks run on every rank; work that
    /// only one process should do (writing files) checks [`HookCtx::is_main`].
    pub rank: usize,
    /// The number of ranks.
    pub world_size: usize,
    /// The precision the run's forward passes use.
    pub precision: MatmulPrecision,
    /// The run's stop flag: requesting a stop (early stopping) ends the run gracefully before
    /// the next step, with a checkpoint, as a signal would.
    pub stop: &'a StopFlag,
}

impl<T: PretextTask> HookCtx<'_, T> {
    /// True on the process that writes logs and checkpoints (rank 0).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }
}

/// Work the training loop calls at fixed points. Every method defaults to doing nothing; an
/// error from any of them stops the run with that error (no further steps, no final
/// checkpoint).
///
/// The loop calls, on every rank, in this order:
/// - [`TrainHook::after_step`] after each completed optimizer step (skipped non-finite steps
///   included, rolled-back steps not), before the step's record is written to
///   `metrics.jsonl` and the progress line is drawn;
/// - [`TrainHook::at_checkpoint`] after each checkpoint is written (never in runs without an
///   output directory);
/// - [`TrainHook::at_end`] once, when the run reaches `max_steps` or stops on request, after the
///   final checkpoint and the plot.
pub trait TrainHook<T: PretextTask> {
    /// After step `ctx.step`. `metrics` is the step's record (loss, lr, grad_norm, the task's
    /// metrics...); keys a hook inserts (e.g. a held-out loss) are logged with the step.
    fn after_step(&mut self, ctx: &HookCtx<'_, T>, metrics: &mut Map<String, Value>) -> Result<()> {
        let _ = (ctx, metrics);
        Ok(())
    }

    /// After the checkpoint of step `ctx.step` was written at `checkpoint` (on ranks other than
    /// the main one, the path where the main rank wrote it).
    fn at_checkpoint(&mut self, ctx: &HookCtx<'_, T>, checkpoint: &Path) -> Result<()> {
        let _ = (ctx, checkpoint);
        Ok(())
    }

    /// At the end of the run, with its report.
    fn at_end(&mut self, ctx: &HookCtx<'_, T>, report: &TrainReport) -> Result<()> {
        let _ = (ctx, report);
        Ok(())
    }
}
