//! The encoder and pretext task a [`TimeseriesConfig`] names, boxed so the trainer sees one
//! `PretextTask` whatever the kind; the forecaster also typed, for forecast evaluation.

use candle_core::Device;
use ssl_core::seq::{MaskedFeatureTask, SeqBatch};
use ssl_core::{ParamBuilder, ParamStore, PretextTask, SharedCollective};

use super::{TaskKind, TimeseriesConfig};
use crate::{
    EncoderKind, ForecastTask, MaskedPatchTask, PatchTstEncoder, Result, SeriesEncoder, Ts2VecTask,
    TsError,
};

/// A fresh task of `cfg` (its `channels` set) with parameters initialised from `seed`, and
/// the store holding them. With `ranks`, TS2Vec gathers every rank's views at each step (the
/// instance terms' negatives span the ranks); the other tasks ignore it.
pub fn build_task(
    cfg: &TimeseriesConfig,
    device: &Device,
    seed: u64,
    ranks: Option<SharedCollective>,
) -> Result<(ParamStore, Box<dyn PretextTask<Batch = SeqBatch>>)> {
    let store = ParamStore::new(device);
    let pb = store.builder(seed);
    let c = cfg.channels;
    let task: Box<dyn PretextTask<Batch = SeqBatch>> = match cfg.task.kind {
        TaskKind::Masked if cfg.model.kind == EncoderKind::Patchtst => {
            let enc = PatchTstEncoder::new(&cfg.model.patchtst, c, &pb)?;
            Box::new(MaskedPatchTask::new(enc, cfg.task.masked_patch, &pb)?)
        }
        TaskKind::Masked => {
            let enc = SeriesEncoder::new(&cfg.model, c, &pb)?;
            Box::new(MaskedFeatureTask::new(enc, c, cfg.task.masked, &pb)?)
        }
        TaskKind::Ts2vec => {
            let enc = SeriesEncoder::new(&cfg.model, c, &pb)?;
            if !enc.per_timestep() {
                return Err(TsError::Pipeline(
                    "task.kind = \"ts2vec\" needs one token per timestep: use model.kind = \"tcn\", \"gru\", \"lstm\" or \"transformer\" (PatchTST works with \"masked\" and \"forecast\")".into(),
                ));
            }
            let mut task = Ts2VecTask::new(enc, cfg.task.ts2vec, &store)?;
            if let Some(ranks) = ranks {
                task.gather_across(ranks);
            }
            Box::new(task)
        }
        TaskKind::Forecast => Box::new(forecaster(cfg, &pb)?),
    };
    Ok((store, task))
}

/// The forecasting task of `cfg` (whatever `task.kind` says) with parameters initialised from
/// `seed`, as [`build_task`] builds it for `task.kind = "forecast"`, and the store holding
/// them.
pub fn build_forecast(
    cfg: &TimeseriesConfig,
    device: &Device,
    seed: u64,
) -> Result<(ParamStore, ForecastTask<SeriesEncoder>)> {
    let store = ParamStore::new(device);
    let task = forecaster(cfg, &store.builder(seed))?;
    Ok((store, task))
}

/// The encoder of `cfg` with a forecasting head, parameters from `pb`.
fn forecaster(cfg: &TimeseriesConfig, pb: &ParamBuilder) -> Result<ForecastTask<SeriesEncoder>> {
    let enc = SeriesEncoder::new(&cfg.model, cfg.channels, pb)?;
    Ok(ForecastTask::new(enc, cfg.channels, cfg.task.forecast, pb)?)
}
