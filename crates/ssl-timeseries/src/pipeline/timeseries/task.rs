//! The encoder and pretext task a [`TimeseriesConfig`] names, behind one type so the trainer
//! sees a single `PretextTask`.

use candle_core::{Device, Tensor};
use ssl_core::seq::{MaskedFeatureTask, SeqBatch};
use ssl_core::{Ctx, ParamStore, PretextTask};

use super::{TaskKind, TimeseriesConfig};
use crate::{
    EncoderKind, ForecastTask, MaskedPatchTask, PatchTstEncoder, Result, SeriesEncoder, Ts2VecTask,
    TsError,
};

/// One of the time-series pretext tasks on its encoder.
pub enum TimeseriesTask {
    /// TS2Vec hierarchical contrastive learning.
    Ts2vec(Ts2VecTask<SeriesEncoder>),
    /// Masked timesteps (the per-timestep encoders).
    MaskedSteps(MaskedFeatureTask<SeriesEncoder>),
    /// Masked patches (PatchTST).
    MaskedPatches(MaskedPatchTask),
    /// Direct multi-step forecasting.
    Forecast(ForecastTask<SeriesEncoder>),
}

impl TimeseriesTask {
    /// A fresh task of `cfg` (its `channels` set) with parameters initialised from `seed`, and
    /// the store holding them.
    pub fn build(
        cfg: &TimeseriesConfig,
        device: &Device,
        seed: u64,
    ) -> Result<(ParamStore, TimeseriesTask)> {
        let store = ParamStore::new(device);
        let pb = store.builder(seed);
        let c = cfg.channels;
        let task = match cfg.task.kind {
            TaskKind::Masked if cfg.model.kind == EncoderKind::Patchtst => {
                let enc = PatchTstEncoder::new(&cfg.model.patchtst, c, &pb)?;
                TimeseriesTask::MaskedPatches(MaskedPatchTask::new(
                    enc,
                    cfg.task.masked_patch,
                    &pb,
                )?)
            }
            TaskKind::Masked => {
                let enc = SeriesEncoder::new(&cfg.model, c, &pb)?;
                TimeseriesTask::MaskedSteps(MaskedFeatureTask::new(enc, c, cfg.task.masked, &pb)?)
            }
            TaskKind::Ts2vec => {
                let enc = SeriesEncoder::new(&cfg.model, c, &pb)?;
                if !enc.per_timestep() {
                    return Err(TsError::Pipeline(
                        "task.kind = \"ts2vec\" needs one token per timestep: use model.kind = \"tcn\", \"gru\", \"lstm\" or \"transformer\" (PatchTST works with \"masked\" and \"forecast\")".into(),
                    ));
                }
                TimeseriesTask::Ts2vec(Ts2VecTask::new(enc, cfg.task.ts2vec, &store)?)
            }
            TaskKind::Forecast => {
                let enc = SeriesEncoder::new(&cfg.model, c, &pb)?;
                TimeseriesTask::Forecast(ForecastTask::new(enc, c, cfg.task.forecast, &pb)?)
            }
        };
        Ok((store, task))
    }
}

impl PretextTask for TimeseriesTask {
    type Batch = SeqBatch;
    fn params(&self) -> &ParamStore {
        match self {
            TimeseriesTask::Ts2vec(t) => t.params(),
            TimeseriesTask::MaskedSteps(t) => t.params(),
            TimeseriesTask::MaskedPatches(t) => t.params(),
            TimeseriesTask::Forecast(t) => t.params(),
        }
    }
    fn forward(&self, batch: &SeqBatch, ctx: &mut Ctx) -> ssl_core::Result<ssl_core::TaskOutput> {
        match self {
            TimeseriesTask::Ts2vec(t) => t.forward(batch, ctx),
            TimeseriesTask::MaskedSteps(t) => t.forward(batch, ctx),
            TimeseriesTask::MaskedPatches(t) => t.forward(batch, ctx),
            TimeseriesTask::Forecast(t) => t.forward(batch, ctx),
        }
    }
    fn forward_backward(
        &self,
        batch: &SeqBatch,
        ctx: &mut Ctx,
    ) -> ssl_core::Result<(ssl_core::TaskOutput, candle_core::backprop::GradStore)> {
        match self {
            TimeseriesTask::Ts2vec(t) => t.forward_backward(batch, ctx),
            TimeseriesTask::MaskedSteps(t) => t.forward_backward(batch, ctx),
            TimeseriesTask::MaskedPatches(t) => t.forward_backward(batch, ctx),
            TimeseriesTask::Forecast(t) => t.forward_backward(batch, ctx),
        }
    }
    fn embed(&self, batch: &SeqBatch, ctx: &mut Ctx) -> ssl_core::Result<Tensor> {
        match self {
            TimeseriesTask::Ts2vec(t) => t.embed(batch, ctx),
            TimeseriesTask::MaskedSteps(t) => t.embed(batch, ctx),
            TimeseriesTask::MaskedPatches(t) => t.embed(batch, ctx),
            TimeseriesTask::Forecast(t) => t.embed(batch, ctx),
        }
    }
    fn batch_len(&self, batch: &SeqBatch) -> usize {
        batch.len()
    }
}
