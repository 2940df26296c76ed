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

/// The encoder sizes `model.preset` names, for every encoder kind at once (`model.kind`
/// is not part of a preset): the TCN's `hidden`, `output` and `depth`, PatchTST's and the
/// per-timestep transformer's `dim`, `depth`, `heads` and `mlp_dim`, the recurrent
/// encoders' `hidden` and `layers`.
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SeriesPreset {
    /// TCN 32 hidden, 128 output, 6 blocks; PatchTST 32/2 layers/4 heads/64; transformer
    /// 32/2/4/64; GRU/LSTM 64 x 1.
    Small,
    /// The default and TS2Vec's reference size: TCN 64 hidden, 320 output, 10 blocks; PatchTST
    /// 64/3 layers/4 heads/128; transformer 64/2/4/256; GRU/LSTM 128 x 1.
    Ts2vec,
    /// TCN 128 hidden, 640 output, 10 blocks; PatchTST 128/3 layers/16 heads/256 (the
    /// PatchTST paper's); transformer 128/4/8/512; GRU/LSTM 256 x 2.
    Large,
}

impl SeriesPreset {
    /// Every preset.
    pub const ALL: [SeriesPreset; 3] = [
        SeriesPreset::Small,
        SeriesPreset::Ts2vec,
        SeriesPreset::Large,
    ];

    /// `model` with this preset's sizes.
    pub fn apply(self, model: &EncoderConfig) -> EncoderConfig {
        // (tcn (hidden, output, depth), patchtst (dim, depth, heads, mlp), transformer
        // (dim, depth, heads, mlp), rnn (hidden, layers))
        let ((th, to, td), pt, tr, (rh, rl)) = match self {
            SeriesPreset::Small => ((32, 128, 6), (32, 2, 4, 64), (32, 2, 4, 64), (64, 1)),
            SeriesPreset::Ts2vec => ((64, 320, 10), (64, 3, 4, 128), (64, 2, 4, 256), (128, 1)),
            SeriesPreset::Large => (
                (128, 640, 10),
                (128, 3, 16, 256),
                (128, 4, 8, 512),
                (256, 2),
            ),
        };
        let mut m = model.clone();
        (m.tcn.hidden, m.tcn.output, m.tcn.depth) = (th, to, td);
        let p = &mut m.patchtst.transformer;
        (p.dim, p.depth, p.heads, p.mlp_dim) = pt;
        let t = &mut m.transformer;
        (t.dim, t.depth, t.heads, t.mlp_dim) = tr;
        (m.rnn.hidden, m.rnn.layers) = (rh, rl);
        m
    }
}

/// The time-series pipeline's `[model]`: a preset's sizes under the explicit keys
/// ([`ssl_core::preset`]); every other key at its default.
impl ssl_core::preset::Presets for EncoderConfig {
    type Table = EncoderConfig;
    type Name = SeriesPreset;
    const ALL: &'static [SeriesPreset] = &SeriesPreset::ALL;
    const DEFAULT: SeriesPreset = SeriesPreset::Ts2vec;
    const KEYS: &'static [&'static str] = &[
        "tcn.hidden",
        "tcn.output",
        "tcn.depth",
        "patchtst.transformer.dim",
        "patchtst.transformer.depth",
        "patchtst.transformer.heads",
        "patchtst.transformer.mlp_dim",
        "transformer.dim",
        "transformer.depth",
        "transformer.heads",
        "transformer.mlp_dim",
        "rnn.hidden",
        "rnn.layers",
    ];
    fn preset(name: SeriesPreset) -> EncoderConfig {
        name.apply(&EncoderConfig::default())
    }
}

/// The `[model]` table as `ssl config timeseries` documents it: `preset` beside the keys.
#[derive(schemars::JsonSchema)]
#[allow(dead_code)]
struct SeriesModelSchema {
    /// Size preset of every encoder kind: sets the sizes its values name; any of them given
    /// explicitly wins over it ("" = none: those keys as given).
    preset: SeriesPreset,
    #[serde(flatten)]
    encoder: EncoderConfig,
}

/// The whole configuration of the time-series pipeline (`ssl pretrain timeseries`).
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeseriesConfig {
    /// Training loop. `max_steps = 0` (the default) is TS2Vec's rule: 200 steps, or 600 when
    /// the training data holds over 100,000 values (series x longest series x channels;
    /// `auto_max_steps`); any other value is the step count.
    pub train: TrainConfig,
    /// Data.
    pub data: DataConfig,
    /// The encoder.
    #[serde(
        serialize_with = "ssl_core::preset::serialize::<EncoderConfig, _>",
        deserialize_with = "ssl_core::preset::deserialize::<EncoderConfig, _>"
    )]
    #[schemars(with = "SeriesModelSchema")]
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
                max_steps: 0,
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

/// Training values (series x longest series x channels) above which [`auto_max_steps`] gives
/// the longer schedule: TS2Vec's threshold.
pub const AUTO_STEPS_VALUES: u64 = 100_000;

/// TS2Vec's training length, the default (`train.max_steps = 0`) of a time-series run: 200
/// steps when the training data holds at most [`AUTO_STEPS_VALUES`] values, 600 above it (the
/// reference's `n_iters = 200 if train_data.size <= 100000 else 600`, the size of its padded
/// array of series x steps x channels). The pipeline measures `values` as the training rows
/// x the longest series of the sample read before training x the channels; a long series cut
/// into windows counts its own training steps, not every window's.
pub fn auto_max_steps(values: u64) -> u64 {
    if values <= AUTO_STEPS_VALUES {
        200
    } else {
        600
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The defaults with `model` keys set over them, as `--set` layers them.
    fn with_model(keys: serde_json::Value) -> std::result::Result<EncoderConfig, String> {
        let mut cfg = serde_json::to_value(TimeseriesConfig::default()).unwrap();
        for (k, v) in keys.as_object().unwrap() {
            cfg["model"][k] = v.clone();
        }
        serde_json::from_value::<TimeseriesConfig>(cfg)
            .map(|c| c.model)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn presets_size_every_encoder_and_explicit_keys_win() {
        assert_eq!(
            TimeseriesConfig::default().model,
            SeriesPreset::Ts2vec.apply(&EncoderConfig::default())
        );
        let m = with_model(serde_json::json!({ "preset": "large" })).unwrap();
        assert_eq!(
            (m.tcn.hidden, m.tcn.output, m.patchtst.transformer.heads),
            (128, 640, 16)
        );
        assert_eq!(m.kind, EncoderConfig::default().kind);
        let m =
            with_model(serde_json::json!({ "preset": "small", "tcn": { "depth": 3 } })).unwrap();
        assert_eq!((m.tcn.hidden, m.tcn.depth, m.rnn.hidden), (32, 3, 64));
        // No preset: what is not given is the default's.
        let m = with_model(serde_json::json!({ "preset": "", "tcn": { "hidden": 8 } })).unwrap();
        assert_eq!((m.tcn.hidden, m.patchtst.transformer.depth), (8, 3));
        let err = with_model(serde_json::json!({ "preset": "huge" })).unwrap_err();
        assert!(
            err.contains("huge") && err.contains("small, ts2vec, large"),
            "{err}"
        );
    }

    #[test]
    fn auto_steps_follow_ts2vecs_threshold() {
        assert_eq!(auto_max_steps(100_000), 200);
        assert_eq!(auto_max_steps(100_001), 600);
        // The dev sets as the reference sizes them (series x padded length x channels).
        assert_eq!(auto_max_steps(50 * 150), 200); // GunPoint
        assert_eq!(auto_max_steps(40 * 100 * 6), 200); // BasicMotions
        assert_eq!(auto_max_steps(270 * 29 * 12), 200); // JapaneseVowels
        assert_eq!(auto_max_steps(100 * 1460), 600); // ACSF1
        assert_eq!(TimeseriesConfig::default().train.max_steps, 0);
    }
}
