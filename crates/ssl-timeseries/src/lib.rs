//! Self-supervised pretraining for time series (sensor readings, financial data, activity
//! logs), on ssl-core's training machinery and ssl-data's Parquet input.
//!
//! - **Data** ([`data`]): one series per row (`list<f32|f64>` or channels x length, ragged
//!   allowed) or one long series per column cut into [`data::windows`]; gaps (NaN, null) are
//!   masked, never fed to a model as numbers. Streamed for training: [`SeriesRowSource`]
//!   (rows through `ssl_data::ExampleStream`) and [`LongWindowSource`] (a long column's
//!   windows cut lazily by row range, [`LongColumn`]), both resumable.
//! - **Encoders** ([`SeriesEncoder`], all `ssl_core::Encoder`): [`PatchTstEncoder`] (patches,
//!   channel independence, shared transformer), [`TcnEncoder`] (TS2Vec's dilated
//!   convolutions, optionally causal), [`RnnEncoder`] (GRU / LSTM) and ssl-core's
//!   per-timestep transformer.
//! - **Pretext tasks** (all `ssl_core::PretextTask`): [`ForecastTask`] (direct multi-step
//!   head, [`Revin`] normalisation), [`MaskedPatchTask`] (PatchTST masked patches) and
//!   ssl-core's `MaskedFeatureTask` (random or span timestep masking) for reconstruction,
//!   [`Ts2VecTask`] (overlapping crops, timestamp masking, hierarchical contrastive loss).
//! - **Evaluation**: linear probe / k-NN on frozen embeddings via ssl-core's probes, and
//!   [`evaluate_forecast`] against naive and seasonal-naive forecasts.
//!
//! - **Pipelines** ([`pipeline`]): what the `ssl` binary runs as its `timeseries` and
//!   `features` modalities, as library calls: typed configurations ([`TimeseriesConfig`],
//!   [`FeaturesConfig`]), [`pretrain_timeseries`] / [`pretrain_features`] (a run directory
//!   with checkpoints, metrics and plot), [`embed_timeseries`] / [`embed_features`] and
//!   [`eval_timeseries`] / [`eval_features`] (reports that serialise to `ssl eval`'s JSON).
//!
//! ```no_run
//! use ssl_core::run_dir::RunOptions;
//! use ssl_timeseries::pipeline::timeseries::stored_config;
//! use ssl_timeseries::{embed_timeseries, eval_timeseries, pretrain_timeseries, TimeseriesConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let data = vec!["GunPoint_TRAIN.parquet".to_string()];
//! let mut cfg = TimeseriesConfig::default();
//! cfg.train.max_steps = 200;
//! let summary = pretrain_timeseries(cfg, &data, "runs/ts".as_ref(), &RunOptions::default())?;
//! let (ckpt, cfg) = stored_config(&summary.dir)?;
//! embed_timeseries(&ckpt, &cfg, &data, "emb.parquet".as_ref())?;
//! let report = eval_timeseries(&ckpt, &cfg, &data, &[], None)?;
//! println!("{}", serde_json::to_string(&report)?);
//! # Ok(()) }
//! ```
//!
//! Or compose encoder, task and trainer by hand:
//!
//! ```no_run
//! use ssl_core::{LoopTrainer, ParamStore, TrainConfig, Trainer};
//! use ssl_core::seq::InMemorySeqSource;
//! use ssl_timeseries::{read_series, EncoderConfig, SeriesEncoder, Ts2VecConfig, Ts2VecTask};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let set = read_series(&["GunPoint_TRAIN.parquet"], "x", None, None, false)?;
//! let device = candle_core::Device::Cpu;
//! let store = ParamStore::new(&device);
//! let encoder = SeriesEncoder::new(&EncoderConfig::default(), 1, &store.builder(0))?;
//! let task = Ts2VecTask::new(encoder, Ts2VecConfig::default(), &store)?;
//! let mut data = InMemorySeqSource::new(set.series, 8, 0, true, &device)?;
//! let cfg = TrainConfig { max_steps: 200, ..TrainConfig::default() };
//! LoopTrainer::new(cfg, None)?.fit(&task, &mut data, None)?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]
#![forbid(unsafe_code)]

pub mod data;
mod encoder;
mod error;
mod forecast;
mod locate;
mod long_column;
mod masked_patch;
pub mod normalize;
mod patchtst;
pub mod pipeline;
mod revin;
mod rnn;
mod row_source;
mod tcn;
mod ts2vec;
mod window_source;

pub use data::{
    chronological_split, read_long_series, read_series, read_series_with, windows, SeriesSet,
};
pub use encoder::{EncoderConfig, EncoderKind, SeriesEncoder};
pub use error::{Result, TsError};
pub use forecast::{
    evaluate_forecast, naive_forecast, seasonal_naive_forecast, Errors, ForecastConfig,
    ForecastHead, ForecastScorer, ForecastTask, HorizonReport,
};
pub use locate::RowLocator;
pub use long_column::{LongColumn, LongSplit, WindowPlan};
pub use masked_patch::{patch_mask, MaskedPatchConfig, MaskedPatchTask};
pub use normalize::{ChannelMoments, ChannelStats, Normalization, NormalizeMode};
pub use patchtst::{num_patches, patchify, PatchTstConfig, PatchTstEncoder, Patches};
pub use pipeline::features::{
    build_task as build_features_task, embed as embed_features, eval as eval_features,
    pretrain as pretrain_features, FeaturesConfig, FeaturesEvalReport,
};
pub use pipeline::timeseries::{
    build_forecast, build_task as build_timeseries_task, embed as embed_timeseries,
    eval as eval_timeseries, finetune as finetune_timeseries,
    finetune_config as finetune_timeseries_config, pretrain as pretrain_timeseries,
    SeriesFinetuneEncoder, TimeseriesConfig, TimeseriesEvalReport,
};
pub use revin::{Revin, RevinStats};
pub use rnn::{RnnCell, RnnConfig, RnnEncoder};
pub use row_source::{
    row_stream, shuffle_rows, RowExample, RowTransform, SeriesRowSource, Split,
    DEFAULT_SHUFFLE_BUFFER_MB, MAX_SHUFFLE_ROWS,
};
pub use tcn::{masked_max, TcnConfig, TcnEncoder};
pub use ts2vec::{
    hierarchical_contrastive_loss, hierarchical_contrastive_loss_across, instance_contrastive_loss,
    overlapping_crops, temporal_contrastive_loss, Ts2VecConfig, Ts2VecTask,
};
pub use window_source::{LongWindowPosition, LongWindowSource, LongWindows, LONG_BLOCK_ROWS};
