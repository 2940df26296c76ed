//! MAE reconstruction grids written while training runs, as a trainer hook.

use std::path::PathBuf;

use serde_json::{Map, Value};
use ssl_core::tensorboard::EventWriter;
use ssl_core::{HookCtx, PretextTask, TrainHook, TrainReport};

use crate::preview::save_reconstruction_grid;
use crate::{Images, MaeTask};

/// Writes a reconstruction grid of `images` to `dir/step-NNNNNNNN.png` after every `every`-th
/// optimizer step (the numbering goes on across resumes), and `dir/final.png` at the end of
/// the run, on rank 0, each also as the TensorBoard image `mae_preview` at its step (in the
/// run directory's `tensorboard/`, the folder above `dir`). The masks are drawn from `seed`, not from the run's random stream, so
/// training is the same with or without previews.
pub(super) struct Previews<'a> {
    /// The MAE being trained.
    pub mae: &'a MaeTask,
    /// The images of each grid.
    pub images: Images,
    /// Steps between grids (0: only `final.png`).
    pub every: u64,
    /// Where the grids go.
    pub dir: PathBuf,
    /// Seed of the grids' masks.
    pub seed: u64,
    /// The TensorBoard event file of the grids (opened at the first grid).
    pub tensorboard: Option<EventWriter>,
}

/// The TensorBoard tag of the grids.
const TAG: &str = "mae_preview";

impl Previews<'_> {
    /// Writes the grid to `path` and into TensorBoard at `step`.
    fn write(&mut self, path: &std::path::Path, step: u64) -> ssl_core::Result<()> {
        save_reconstruction_grid(self.mae, &self.images, self.seed, path)?;
        if self.tensorboard.is_none() {
            let run_dir = self.dir.parent().unwrap_or(&self.dir);
            self.tensorboard = Some(EventWriter::for_run(run_dir)?);
        }
        match &mut self.tensorboard {
            Some(tb) => tb.image_file(TAG, step, path),
            None => Ok(()),
        }
    }
}

impl<T: PretextTask> TrainHook<T> for Previews<'_> {
    fn after_step(
        &mut self,
        ctx: &HookCtx<'_, T>,
        _metrics: &mut Map<String, Value>,
    ) -> ssl_core::Result<()> {
        let step = ctx.step;
        if ctx.is_main() && self.every > 0 && step.is_multiple_of(self.every) {
            let p = self.dir.join(format!("step-{step:08}.png"));
            self.write(&p, step)?;
        }
        Ok(())
    }

    fn at_end(&mut self, ctx: &HookCtx<'_, T>, _report: &TrainReport) -> ssl_core::Result<()> {
        if ctx.is_main() {
            let p = self.dir.join("final.png");
            self.write(&p, ctx.step)?;
        }
        Ok(())
    }
}
