//! A batch source that writes MAE reconstruction grids while training runs.

use std::path::PathBuf;

use serde_json::Value;
use ssl_core::BatchSource;

use crate::preview::save_reconstruction_grid;
use crate::{Images, InMemoryImageSource, MaeTask};

/// Wraps the training source and writes a reconstruction grid of `images` to
/// `dir/step-NNNNNNNN.png` every `every` optimizer steps (MAE only; `accum` batches make one
/// step).
pub(super) struct PreviewSource<'a> {
    /// The training batches.
    pub inner: InMemoryImageSource,
    /// The MAE being trained (none: no previews).
    pub mae: Option<&'a MaeTask>,
    /// The images of each grid (none: no previews).
    pub images: Option<Images>,
    /// Steps between grids (0: none).
    pub every: u64,
    /// Batches per optimizer step.
    pub accum: u64,
    /// Batches pulled so far (counting those before a resume).
    pub pulled: u64,
    /// Where the grids go.
    pub dir: PathBuf,
    /// Seed of the grids' masks.
    pub seed: u64,
}

impl BatchSource<Images> for PreviewSource<'_> {
    fn next_batch(&mut self) -> ssl_core::Result<Images> {
        if let (Some(t), Some(imgs)) = (self.mae, &self.images) {
            let step = self.pulled / self.accum;
            if self.every > 0
                && self.pulled.is_multiple_of(self.accum)
                && step > 0
                && step.is_multiple_of(self.every)
            {
                let p = self.dir.join(format!("step-{step:08}.png"));
                save_reconstruction_grid(t, imgs, self.seed, &p)?;
            }
        }
        self.pulled += 1;
        self.inner.next_batch()
    }
    fn epoch(&self) -> u64 {
        self.inner.epoch()
    }
    fn position(&self) -> Value {
        self.inner.position()
    }
    fn restore(&mut self, position: &Value) -> ssl_core::Result<()> {
        self.inner.restore(position)
    }
}
