//! The pipeline's model: the ViT with its pretext task (MAE or SimCLR), boxed as a
//! [`VisionTask`], built from a [`VisionConfig`] or loaded from a checkpoint.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ssl_core::checkpoint::MODEL_FILE;
use ssl_core::finetune::HEAD_PREFIX;
use ssl_core::nn::MatmulPrecision;
use ssl_core::{
    parse_device, read_safetensors, CoreError, Ctx, ParamStore, PretextTask, SharedCollective,
    SslRng,
};

use super::config::{VisionConfig, VisionTaskKind};
use crate::{AugmentConfig, Images, MaeTask, Pooling, Result, SimClrTask, VisionTransformer};

/// A pretext task on images with a ViT encoder: what the pipeline trains, embeds with and
/// evaluates. `Box<dyn VisionTask>` is itself a [`PretextTask`] (ssl-core boxes forward).
pub trait VisionTask: PretextTask<Batch = Images> {
    /// The encoder.
    fn encoder(&self) -> &VisionTransformer;
    /// The augmentation and normalisation settings.
    fn augment(&self) -> &AugmentConfig;
    /// The MAE, when the task is one (reconstruction previews, defect detection).
    fn as_mae(&self) -> Option<&MaeTask> {
        None
    }

    /// Pooled embeddings with an explicit pooling (evaluation mode).
    fn embed_with(
        &self,
        batch: &Images,
        pooling: Pooling,
        precision: MatmulPrecision,
    ) -> Result<Tensor> {
        let vit = self.encoder();
        let pixels = crate::augment::normalize_batch(&batch.pixels, self.augment())?;
        let mut rng = SslRng::new(0);
        let x = vit.embed_patches(&pixels)?;
        let (out, _) =
            vit.forward_tokens(&x, &mut Ctx::inference(&mut rng).with_precision(precision))?;
        vit.pool_with(&out, pooling)
    }
}

impl VisionTask for MaeTask {
    fn encoder(&self) -> &VisionTransformer {
        MaeTask::encoder(self)
    }
    fn augment(&self) -> &AugmentConfig {
        MaeTask::augment(self)
    }
    fn as_mae(&self) -> Option<&MaeTask> {
        Some(self)
    }
}

impl VisionTask for SimClrTask {
    fn encoder(&self) -> &VisionTransformer {
        SimClrTask::encoder(self)
    }
    fn augment(&self) -> &AugmentConfig {
        SimClrTask::augment(self)
    }
}

/// The task of `cfg` with fresh parameters (seeded by `train.seed`), and the store holding
/// them. With `ranks`, SimCLR gathers every rank's views at each step (NT-Xent's negatives
/// span the ranks); MAE ignores it.
pub fn build_task(
    cfg: &VisionConfig,
    device: &Device,
    ranks: Option<SharedCollective>,
) -> Result<(ParamStore, Box<dyn VisionTask>)> {
    let store = ParamStore::new(device);
    let pb = store.builder(cfg.train.seed);
    let (model, augment) = (&cfg.model, &cfg.task.augment);
    let task: Box<dyn VisionTask> = match cfg.task.kind {
        VisionTaskKind::Mae => Box::new(MaeTask::new(model, &cfg.task.mae, augment, &pb)?),
        VisionTaskKind::Simclr => {
            let mut task = SimClrTask::new(model, &cfg.task.simclr, augment, &pb)?;
            if let Some(ranks) = ranks {
                task.gather_across(ranks);
            }
            Box::new(task)
        }
    };
    Ok((store, task))
}

/// Resolves `checkpoint` (a run directory or one checkpoint directory) and reads the vision
/// configuration stored with it.
pub fn stored_config(checkpoint: &Path) -> Result<(PathBuf, VisionConfig)> {
    Ok(ssl_core::run_dir::stored_config(checkpoint, "vision")?)
}

/// The model of `cfg` with the weights of the model file in directory `ckpt` (a checkpoint
/// directory, as returned by [`stored_config`], or a detector's), on `cfg.train.device`.
///
/// Every parameter must be in the file, except for a fine-tuned classifier's checkpoint
/// (one holding `classifier.weight`, written by [`crate::finetune`]): it holds the encoder
/// (`vit.*`) and the head only, so the pretext task's own parameters (MAE's decoder,
/// SimCLR's projection) keep their initialisation. Embedding and probing use the encoder
/// alone; MAE's reconstructions (previews, the reconstruction scorer) need a pretrained run.
pub fn load_model(ckpt: &Path, cfg: &VisionConfig) -> Result<(Box<dyn VisionTask>, Device)> {
    let device = parse_device(&cfg.train.device)?;
    let (store, task) = build_task(cfg, &device, None)?;
    let path = ckpt.join(MODEL_FILE);
    let values = read_safetensors(&path, &device)?;
    let report = store.load_from(&values, &path)?;
    let fine_tuned = values.contains_key(&format!("{HEAD_PREFIX}.weight"));
    let mut missing = report
        .missing
        .iter()
        .filter(|name| !fine_tuned || name.starts_with(ENCODER_PREFIX));
    if let Some(name) = missing.next() {
        return Err(CoreError::checkpoint(
            &path,
            format!(
                "parameter `{name}` is not in the file ({} of {} missing)",
                missing.count() + 1,
                store.len()
            ),
        )
        .into());
    }
    Ok((task, device))
}

/// The key prefix of the ViT encoder's parameters in every vision task's store.
pub(crate) const ENCODER_PREFIX: &str = "vit.";
