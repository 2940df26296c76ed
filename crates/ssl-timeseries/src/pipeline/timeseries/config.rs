//! The configuration of the time-series pipeline: the TOML keys of `ssl pretrain timeseries`.

use serde::{Deserialize, Serialize};
use ssl_core::seq::MaskedFeatureConfig;
use ssl_core::TrainConfig;

use crate::normalize::DEFAULT_STATS_SERIES;
use crate::{EncoderConfig, ForecastConfig, MaskedPatchConfig, NormalizeMode, Ts2VecConfig};

/// Which pretext task.
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// TS2Vec: overlapping crops, timestamp masking, hierarchical contrastive loss.
    Ts2vec,
    /// Masked reconstruction: masked patches for PatchTST, masked timesteps (random or spans)
    /// for the other encoders.
    Masked,
    /// Direct multi-step forecasting of the next `horizon` steps.
    Forecast,
}

/// `[data]`: where the series are.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Column of `list<f32|f64>` or `list<list<f32|f64>>` (channels x length), one series per row.
    pub column: String,
    /// Instead: a numeric column holding one long series, one observation per row (in file
    /// and row order), cut into windows. Empty = one series per row.
    pub long_column: String,
    /// Label column for `eval` (ignored by pretraining).
    pub label_column: String,
    /// Id column carried into embeddings ("" = `file:row`).
    pub id_column: String,
    /// Skip (and report) rows that cannot be decoded instead of stopping.
    pub skip_bad_rows: bool,
    /// Truncate series to this many steps (0 = no limit).
    pub max_len: usize,
    /// How series are scaled before the model sees them (forecasting uses RevIN instead):
    /// "channel" standardises each channel with the training data's mean and standard
    /// deviation (TS2Vec's reference; measured at pretraining on at most `stats_series`
    /// training series and stored below as `channel_mean` / `channel_std`, so embed and eval
    /// scale new data alike), "series" z-normalises each channel of each series on its own
    /// (removes the amplitude), "none" leaves the values as read. Older configurations'
    /// booleans still read: true = "series", false = "none".
    pub normalize: NormalizeMode,
    /// Training series read (a seeded sample over the row groups, summed over ranks) to
    /// measure the channel statistics of `normalize = "channel"`.
    pub stats_series: usize,
    /// Per-channel mean for `normalize = "channel"`: measured at pretraining when empty and
    /// stored with the run; set it (with `channel_std`) to fix the statistics yourself.
    pub channel_mean: Vec<f32>,
    /// Per-channel standard deviation for `normalize = "channel"` (see `channel_mean`).
    pub channel_std: Vec<f32>,
    /// Window length for long series with the non-forecast tasks (forecasting windows are
    /// context + horizon).
    pub window: usize,
    /// Steps between window starts.
    pub stride: usize,
    /// Chronological training fraction of a long series (`eval` scores the rest).
    pub train_fraction: f64,
    /// The first training series (in file order) form the embedding-health batch.
    pub health_examples: usize,
    /// Fraction of the series held out of pretraining for the held-out evaluation
    /// (`eval_loss`, the task's loss, and with `task.kind = "forecast"` `eval_mse` /
    /// `eval_mae` against the naive forecast's `eval_naive_mse` / `eval_naive_mae`, in
    /// metrics.jsonl every `train.eval_every_steps` and at the end): rows chosen by a seeded
    /// hash of their global row index (`ssl_data::is_heldout`); with `long_column`, the last
    /// part of the training steps (windows overlap, so the split is chronological). At most
    /// `ssl_timeseries::pipeline::common::MAX_HELDOUT_EXAMPLES` are evaluated (the first
    /// held-out rows in file order; a long series' held-out windows spread evenly). 0 (the
    /// default): train on everything, as before, with no held-out evaluation.
    pub heldout_fraction: f64,
    /// Decoded rows a training shuffle window may hold, in MiB (default 256): the loader
    /// decodes a window of whole row groups before emitting, shuffled together, so this
    /// bounds memory; windows hold at most 10,000 rows (`ssl_timeseries::MAX_SHUFFLE_ROWS`).
    /// A long series (`long_column`) is shuffled in blocks of
    /// `ssl_timeseries::LONG_BLOCK_ROWS` rows instead.
    pub shuffle_buffer_mb: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            column: "x".into(),
            long_column: String::new(),
            label_column: "label".into(),
            id_column: String::new(),
            skip_bad_rows: false,
            max_len: 0,
            normalize: NormalizeMode::Channel,
            stats_series: DEFAULT_STATS_SERIES,
            channel_mean: Vec::new(),
            channel_std: Vec::new(),
            window: 128,
            stride: 1,
            train_fraction: 0.8,
            health_examples: 64,
            heldout_fraction: 0.0,
            shuffle_buffer_mb: crate::DEFAULT_SHUFFLE_BUFFER_MB,
        }
    }
}

/// `[task]`: which pretext task and the settings of each.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskConfig {
    /// The task.
    pub kind: TaskKind,
    /// TS2Vec settings.
    pub ts2vec: Ts2VecConfig,
    /// Masked timesteps (per-timestep encoders): span 1 for bursty data, longer for smooth.
    pub masked: MaskedFeatureConfig,
    /// Masked patches (PatchTST).
    pub masked_patch: MaskedPatchConfig,
    /// Forecasting settings.
    pub forecast: ForecastConfig,
}

impl Default for TaskConfig {
    fn default() -> Self {
        TaskConfig {
            kind: TaskKind::Ts2vec,
            ts2vec: Ts2VecConfig::default(),
            masked: MaskedFeatureConfig {
                mask_prob: 0.3,
                span: 5,
            },
            masked_patch: MaskedPatchConfig::default(),
            forecast: ForecastConfig::default(),
        }
    }
}

/// `[eval]`: forecast evaluation settings.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Lead times scored (each at most the task's horizon).
    pub horizons: Vec<usize>,
    /// Season length of the seasonal-naive baseline, in steps (52 for weekly data).
    pub season: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            horizons: vec![1, 4, 12],
            season: 52,
        }
    }
}

/// The whole configuration of the time-series pipeline (`ssl pretrain timeseries`).
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeseriesConfig {
    /// Training loop.
    pub train: TrainConfig,
    /// Data.
    pub data: DataConfig,
    /// The encoder.
    pub model: EncoderConfig,
    /// The pretext task.
    pub task: TaskConfig,
    /// Forecast evaluation.
    pub eval: EvalConfig,
    /// Channels per step, filled in from the data at pretraining.
    pub channels: usize,
}

impl Default for TimeseriesConfig {
    fn default() -> Self {
        TimeseriesConfig {
            train: TrainConfig {
                max_steps: 200,
                batch_size: 8,
                lr: 1e-3,
                warmup_steps: 10,
                checkpoint_every_steps: 100,
                checkpoint_every_minutes: 30.0,
                health_every: 50,
                ..TrainConfig::default()
            },
            data: DataConfig::default(),
            model: EncoderConfig::default(),
            task: TaskConfig::default(),
            eval: EvalConfig::default(),
            channels: 0,
        }
    }
}

impl TimeseriesConfig {
    /// Steps per window cut from a long series: context + horizon for forecasting, else
    /// `data.window`.
    pub fn window_len(&self) -> usize {
        match self.task.kind {
            TaskKind::Forecast => self.task.forecast.context + self.task.forecast.horizon,
            _ => self.data.window,
        }
    }
}
