//! The configuration of the feature-sequence pipeline: the TOML keys of
//! `ssl pretrain features`.

use serde::{Deserialize, Serialize};
use ssl_core::nn::TransformerConfig;
use ssl_core::seq::{ContrastiveConfig, DenoisingConfig, MaskedFeatureConfig};
use ssl_core::TrainConfig;

use crate::normalize::DEFAULT_STATS_SERIES;
use crate::NormalizeMode;

/// Which pretext task.
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Hide timesteps, predict their features.
    Masked,
    /// Two augmented views, NT-Xent.
    Contrastive,
    /// Corrupt, reconstruct.
    Denoising,
}

/// `[data]`: where the sequences are.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Column of `list<f32|f64>` or `list<list<f32|f64>>` (features x length).
    pub column: String,
    /// Label column for `eval` (ignored by pretraining).
    pub label_column: String,
    /// Id column carried into embeddings ("" = `file:row`).
    pub id_column: String,
    /// Skip (and report) rows that cannot be decoded instead of stopping.
    pub skip_bad_rows: bool,
    /// Truncate sequences to this many steps (0 = no limit).
    pub max_len: usize,
    /// How sequences are scaled before the model sees them: "channel" standardises each
    /// feature with the training data's mean and standard deviation (measured at pretraining
    /// on at most `stats_series` training sequences and stored below as `channel_mean` /
    /// `channel_std`, so embed and eval scale new data alike; features in different units
    /// keep their relative scale across rows), "series" z-normalises each feature of each
    /// sequence on its own, "none" leaves the values as read. Older configurations' booleans
    /// still read: true = "series", false = "none".
    pub normalize: NormalizeMode,
    /// Training sequences read (a seeded sample over the row groups, summed over ranks) to
    /// measure the statistics of `normalize = "channel"`.
    pub stats_series: usize,
    /// Per-feature mean for `normalize = "channel"`: measured at pretraining when empty and
    /// stored with the run; set it (with `channel_std`) to fix the statistics yourself.
    pub channel_mean: Vec<f32>,
    /// Per-feature standard deviation for `normalize = "channel"` (see `channel_mean`).
    pub channel_std: Vec<f32>,
    /// The first training sequences (in file order) form the embedding-health batch.
    pub health_examples: usize,
    /// Fraction of the sequences held out of pretraining for the held-out evaluation
    /// (`eval_loss`, the task's loss, in metrics.jsonl every `train.eval_every_steps` and at
    /// the end): rows chosen by a seeded hash of their global row index
    /// (`ssl_data::is_heldout`). At most
    /// `ssl_timeseries::pipeline::common::MAX_HELDOUT_EXAMPLES` are evaluated (the first
    /// held-out rows in file order). 0 (the default): train on everything, as before, with no
    /// held-out evaluation.
    pub heldout_fraction: f64,
    /// Decoded rows a training shuffle window may hold, in MiB (default 256): the loader
    /// decodes a window of whole row groups before emitting, shuffled together, so this
    /// bounds memory; windows hold at most 10,000 rows (`ssl_timeseries::MAX_SHUFFLE_ROWS`).
    pub shuffle_buffer_mb: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            column: "x".into(),
            label_column: "label".into(),
            id_column: String::new(),
            skip_bad_rows: false,
            max_len: 0,
            normalize: NormalizeMode::Channel,
            stats_series: DEFAULT_STATS_SERIES,
            channel_mean: Vec::new(),
            channel_std: Vec::new(),
            health_examples: 64,
            heldout_fraction: 0.0,
            shuffle_buffer_mb: crate::DEFAULT_SHUFFLE_BUFFER_MB,
        }
    }
}

/// `[task]`: which pretext task and its settings.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TaskConfig {
    /// The task.
    pub kind: TaskKind,
    /// Masked feature prediction settings.
    pub masked: MaskedFeatureConfig,
    /// Contrastive settings.
    pub contrastive: ContrastiveConfig,
    /// Denoising settings.
    pub denoising: DenoisingConfig,
}

impl Default for TaskConfig {
    fn default() -> Self {
        // Denoising is the default: on the embedded BasicMotions sample it is the task whose
        // embeddings probe best (README, "Measured"); masked prediction barely beats the mean there.
        TaskConfig {
            kind: TaskKind::Denoising,
            masked: MaskedFeatureConfig {
                mask_prob: 0.3,
                span: 5,
            },
            contrastive: ContrastiveConfig::default(),
            denoising: DenoisingConfig::default(),
        }
    }
}

/// The transformer sizes `model.preset` names: each sets `model.dim`, `depth`, `heads` and
/// `mlp_dim`.
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeaturesPreset {
    /// dim 32, depth 1, heads 2, mlp_dim 64.
    Tiny,
    /// dim 64, depth 2, heads 4, mlp_dim 128: the default, sized for the embedded sample.
    Small,
    /// dim 128, depth 4, heads 8, mlp_dim 512.
    Base,
}

impl FeaturesPreset {
    /// Every preset.
    pub const ALL: [FeaturesPreset; 3] = [
        FeaturesPreset::Tiny,
        FeaturesPreset::Small,
        FeaturesPreset::Base,
    ];

    /// `model` with this preset's sizes.
    pub fn apply(self, model: &TransformerConfig) -> TransformerConfig {
        let (dim, depth, heads, mlp_dim) = match self {
            FeaturesPreset::Tiny => (32, 1, 2, 64),
            FeaturesPreset::Small => (64, 2, 4, 128),
            FeaturesPreset::Base => (128, 4, 8, 512),
        };
        TransformerConfig {
            dim,
            depth,
            heads,
            mlp_dim,
            ..model.clone()
        }
    }
}

/// The features pipeline's `[model]` presets ([`ssl_core::preset`]; the table is ssl-core's
/// [`TransformerConfig`], so a marker type carries them): a preset's sizes under the explicit
/// keys, every other key at [`FeaturesConfig`]'s default.
pub struct FeaturesModel;

impl ssl_core::preset::Presets for FeaturesModel {
    type Table = TransformerConfig;
    type Name = FeaturesPreset;
    const ALL: &'static [FeaturesPreset] = &FeaturesPreset::ALL;
    const DEFAULT: FeaturesPreset = FeaturesPreset::Small;
    const KEYS: &'static [&'static str] = &["dim", "depth", "heads", "mlp_dim"];
    fn preset(name: FeaturesPreset) -> TransformerConfig {
        name.apply(&default_model())
    }
}

/// The `[model]` table as `ssl config features` documents it: `preset` beside the keys.
#[derive(schemars::JsonSchema)]
#[allow(dead_code)]
struct FeaturesModelSchema {
    /// Size preset: sets `dim`, `depth`, `heads` and `mlp_dim`; any of them given explicitly
    /// wins over it ("" = none: those keys as given).
    preset: FeaturesPreset,
    #[serde(flatten)]
    transformer: TransformerConfig,
}

fn default_model() -> TransformerConfig {
    FeaturesPreset::Small.apply(&TransformerConfig {
        dropout: 0.1,
        ..TransformerConfig::default()
    })
}

/// The whole configuration of the feature-sequence pipeline (`ssl pretrain features`).
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeaturesConfig {
    /// Training loop.
    pub train: TrainConfig,
    /// Data.
    pub data: DataConfig,
    /// The transformer encoder (its input width comes from the data).
    #[serde(
        serialize_with = "ssl_core::preset::serialize::<FeaturesModel, _>",
        deserialize_with = "ssl_core::preset::deserialize::<FeaturesModel, _>"
    )]
    #[schemars(with = "FeaturesModelSchema")]
    pub model: TransformerConfig,
    /// The pretext task.
    pub task: TaskConfig,
    /// Features per timestep, filled in from the data at pretraining.
    pub features: usize,
}

impl Default for FeaturesConfig {
    fn default() -> Self {
        FeaturesConfig {
            train: TrainConfig {
                max_steps: 300,
                batch_size: 16,
                lr: 1e-3,
                warmup_steps: 30,
                checkpoint_every_steps: 100,
                checkpoint_every_minutes: 30.0,
                health_every: 50,
                ..TrainConfig::default()
            },
            data: DataConfig::default(),
            model: default_model(),
            task: TaskConfig::default(),
            features: 0,
        }
    }
}

#[cfg(test)]
mod preset_tests {
    use super::*;

    /// The defaults with `model` keys set over them, as `--set` layers them.
    fn with_model(keys: serde_json::Value) -> std::result::Result<TransformerConfig, String> {
        let mut cfg = serde_json::to_value(FeaturesConfig::default()).unwrap();
        for (k, v) in keys.as_object().unwrap() {
            cfg["model"][k] = v.clone();
        }
        serde_json::from_value::<FeaturesConfig>(cfg)
            .map(|c| c.model)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn presets_set_the_sizes_and_explicit_keys_win() {
        assert_eq!(FeaturesConfig::default().model, default_model());
        let m = with_model(serde_json::json!({ "preset": "base" })).unwrap();
        assert_eq!((m.dim, m.depth, m.heads, m.mlp_dim), (128, 4, 8, 512));
        assert_eq!(m.dropout, default_model().dropout);
        let m = with_model(serde_json::json!({ "preset": "tiny", "heads": 4 })).unwrap();
        assert_eq!((m.dim, m.heads), (32, 4));
        let err = with_model(serde_json::json!({ "preset": "xl" })).unwrap_err();
        assert!(
            err.contains("xl") && err.contains("tiny, small, base"),
            "{err}"
        );
    }
}
