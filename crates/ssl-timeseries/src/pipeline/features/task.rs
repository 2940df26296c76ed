//! The transformer encoder and pretext task a [`FeaturesConfig`] names, boxed so the trainer
//! sees one `PretextTask` whatever the kind.

use candle_core::Device;
use ssl_core::seq::{
    ContrastiveTask, DenoisingTask, MaskedFeatureTask, SeqBatch, SeqEncoderConfig,
    SeqTransformerEncoder,
};
use ssl_core::{ParamStore, PretextTask, SharedCollective};

use super::{FeaturesConfig, TaskKind};
use crate::Result;

/// A fresh task of `cfg` (its `features` set) with parameters initialised from
/// `cfg.train.seed`, and the store holding them. With `ranks`, the contrastive task gathers
/// every rank's views at each step (NT-Xent's negatives span the ranks); the other tasks
/// ignore it.
pub fn build_task(
    cfg: &FeaturesConfig,
    device: &Device,
    ranks: Option<SharedCollective>,
) -> Result<(ParamStore, Box<dyn PretextTask<Batch = SeqBatch>>)> {
    let store = ParamStore::new(device);
    let pb = store.builder(cfg.train.seed);
    let enc_cfg = SeqEncoderConfig {
        features: cfg.features,
        transformer: cfg.model.clone(),
    };
    let encoder = SeqTransformerEncoder::new(&enc_cfg, &pb)?;
    let task: Box<dyn PretextTask<Batch = SeqBatch>> = match cfg.task.kind {
        TaskKind::Masked => Box::new(MaskedFeatureTask::new(
            encoder,
            cfg.features,
            cfg.task.masked,
            &pb,
        )?),
        TaskKind::Contrastive => {
            let mut task = ContrastiveTask::new(encoder, cfg.task.contrastive, &pb)?;
            if let Some(ranks) = ranks {
                task.gather_across(ranks);
            }
            Box::new(task)
        }
        TaskKind::Denoising => Box::new(DenoisingTask::new(
            encoder,
            cfg.features,
            cfg.task.denoising,
            &pb,
        )?),
    };
    Ok((store, task))
}
