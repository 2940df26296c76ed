//! The transformer encoder and pretext task a [`FeaturesConfig`] names, behind one type so
//! the trainer sees a single `PretextTask`.

use candle_core::{Device, Tensor};
use ssl_core::seq::{
    ContrastiveTask, DenoisingTask, MaskedFeatureTask, SeqBatch, SeqEncoderConfig,
    SeqTransformerEncoder,
};
use ssl_core::{Ctx, ParamStore, PretextTask};

use super::{FeaturesConfig, TaskKind};
use crate::Result;

/// One of ssl-core's sequence pretext tasks on a transformer encoder.
pub enum FeaturesTask {
    /// Masked timestep prediction.
    Masked(MaskedFeatureTask<SeqTransformerEncoder>),
    /// Two augmented views, NT-Xent.
    Contrastive(ContrastiveTask<SeqTransformerEncoder>),
    /// Corrupt and reconstruct.
    Denoising(DenoisingTask<SeqTransformerEncoder>),
}

impl FeaturesTask {
    /// A fresh task of `cfg` (its `features` set) with parameters initialised from
    /// `cfg.train.seed`, and the store holding them.
    pub fn build(cfg: &FeaturesConfig, device: &Device) -> Result<(ParamStore, FeaturesTask)> {
        let store = ParamStore::new(device);
        let pb = store.builder(cfg.train.seed);
        let enc_cfg = SeqEncoderConfig {
            features: cfg.features,
            transformer: cfg.model.clone(),
        };
        let encoder = SeqTransformerEncoder::new(&enc_cfg, &pb)?;
        let task = match cfg.task.kind {
            TaskKind::Masked => FeaturesTask::Masked(MaskedFeatureTask::new(
                encoder,
                cfg.features,
                cfg.task.masked,
                &pb,
            )?),
            TaskKind::Contrastive => {
                FeaturesTask::Contrastive(ContrastiveTask::new(encoder, cfg.task.contrastive, &pb)?)
            }
            TaskKind::Denoising => FeaturesTask::Denoising(DenoisingTask::new(
                encoder,
                cfg.features,
                cfg.task.denoising,
                &pb,
            )?),
        };
        Ok((store, task))
    }
}

impl PretextTask for FeaturesTask {
    type Batch = SeqBatch;
    fn params(&self) -> &ParamStore {
        match self {
            FeaturesTask::Masked(t) => t.params(),
            FeaturesTask::Contrastive(t) => t.params(),
            FeaturesTask::Denoising(t) => t.params(),
        }
    }
    fn forward(&self, batch: &SeqBatch, ctx: &mut Ctx) -> ssl_core::Result<ssl_core::TaskOutput> {
        match self {
            FeaturesTask::Masked(t) => t.forward(batch, ctx),
            FeaturesTask::Contrastive(t) => t.forward(batch, ctx),
            FeaturesTask::Denoising(t) => t.forward(batch, ctx),
        }
    }
    fn forward_backward(
        &self,
        batch: &SeqBatch,
        ctx: &mut Ctx,
    ) -> ssl_core::Result<(ssl_core::TaskOutput, candle_core::backprop::GradStore)> {
        match self {
            FeaturesTask::Masked(t) => t.forward_backward(batch, ctx),
            FeaturesTask::Contrastive(t) => t.forward_backward(batch, ctx),
            FeaturesTask::Denoising(t) => t.forward_backward(batch, ctx),
        }
    }
    fn embed(&self, batch: &SeqBatch, ctx: &mut Ctx) -> ssl_core::Result<Tensor> {
        match self {
            FeaturesTask::Masked(t) => t.embed(batch, ctx),
            FeaturesTask::Contrastive(t) => t.embed(batch, ctx),
            FeaturesTask::Denoising(t) => t.embed(batch, ctx),
        }
    }
    fn batch_len(&self, batch: &SeqBatch) -> usize {
        batch.len()
    }
}
