//! The pipeline's model: the encoder with its pretext task (MAE or SimCLR) behind one type,
//! built from a [`VisionConfig`] or loaded from a checkpoint.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ssl_core::checkpoint::MODEL_FILE;
use ssl_core::nn::MatmulPrecision;
use ssl_core::{parse_device, Ctx, ParamStore, PretextTask, SslRng};

use super::config::{VisionConfig, VisionTaskKind};
use crate::{Images, MaeTask, Pooling, Result, SimClrTask};

/// Encoder plus task behind one type.
pub enum AnyVisionTask {
    /// MAE.
    Mae(MaeTask),
    /// SimCLR.
    Simclr(SimClrTask),
}

impl AnyVisionTask {
    /// Builds the task of `cfg` with fresh parameters (seeded by `train.seed`).
    pub fn build(cfg: &VisionConfig, device: &Device) -> Result<(ParamStore, Self)> {
        let store = ParamStore::new(device);
        let pb = store.builder(cfg.train.seed);
        let task = match cfg.task.kind {
            VisionTaskKind::Mae => AnyVisionTask::Mae(MaeTask::new(
                &cfg.model,
                &cfg.task.mae,
                &cfg.task.augment,
                &pb,
            )?),
            VisionTaskKind::Simclr => AnyVisionTask::Simclr(SimClrTask::new(
                &cfg.model,
                &cfg.task.simclr,
                &cfg.task.augment,
                &pb,
            )?),
        };
        Ok((store, task))
    }

    /// Pooled embeddings with an explicit pooling (evaluation mode).
    pub fn embed_with(
        &self,
        batch: &Images,
        pooling: Pooling,
        precision: MatmulPrecision,
    ) -> Result<Tensor> {
        let (vit, augment) = match self {
            AnyVisionTask::Mae(t) => (t.encoder(), t.augment()),
            AnyVisionTask::Simclr(t) => (t.encoder(), t.augment()),
        };
        let pixels = crate::augment::normalize_batch(&batch.pixels, augment)?;
        let mut rng = SslRng::new(0);
        let x = vit.embed_patches(&pixels)?;
        let (out, _) =
            vit.forward_tokens(&x, &mut Ctx::inference(&mut rng).with_precision(precision))?;
        vit.pool_with(&out, pooling)
    }
}

impl PretextTask for AnyVisionTask {
    type Batch = Images;
    fn params(&self) -> &ParamStore {
        match self {
            AnyVisionTask::Mae(t) => t.params(),
            AnyVisionTask::Simclr(t) => t.params(),
        }
    }
    fn forward(&self, batch: &Images, ctx: &mut Ctx) -> ssl_core::Result<ssl_core::TaskOutput> {
        match self {
            AnyVisionTask::Mae(t) => t.forward(batch, ctx),
            AnyVisionTask::Simclr(t) => t.forward(batch, ctx),
        }
    }
    fn forward_backward(
        &self,
        batch: &Images,
        ctx: &mut Ctx,
    ) -> ssl_core::Result<(ssl_core::TaskOutput, candle_core::backprop::GradStore)> {
        match self {
            AnyVisionTask::Mae(t) => t.forward_backward(batch, ctx),
            AnyVisionTask::Simclr(t) => t.forward_backward(batch, ctx),
        }
    }
    fn embed(&self, batch: &Images, ctx: &mut Ctx) -> ssl_core::Result<Tensor> {
        match self {
            AnyVisionTask::Mae(t) => t.embed(batch, ctx),
            AnyVisionTask::Simclr(t) => t.embed(batch, ctx),
        }
    }
    fn batch_len(&self, batch: &Images) -> usize {
        batch.len()
    }
}

/// Resolves `checkpoint` (a run directory or one checkpoint directory) and reads the vision
/// configuration stored with it.
pub fn stored_config(checkpoint: &Path) -> Result<(PathBuf, VisionConfig)> {
    Ok(ssl_core::run_dir::stored_config(checkpoint, "vision")?)
}

/// The model of `cfg` with the weights of checkpoint directory `ckpt` (as returned by
/// [`stored_config`]), on `cfg.train.device`.
pub fn load_model(ckpt: &Path, cfg: &VisionConfig) -> Result<(AnyVisionTask, Device)> {
    let device = parse_device(&cfg.train.device)?;
    let (store, task) = AnyVisionTask::build(cfg, &device)?;
    store.load_safetensors(&ckpt.join(MODEL_FILE))?;
    Ok((task, device))
}
