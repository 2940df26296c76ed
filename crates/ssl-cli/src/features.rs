//! The `features` modality: numeric feature sequences `(batch, seq, features)` from a Parquet
//! column of `list<f32|f64>` (one feature) or `list<list<f32|f64>>` (features x length), trained
//! with ssl-core's masked, contrastive or denoising task on a transformer encoder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::json;
use ssl_core::checkpoint::MODEL_FILE;
use ssl_core::nn::TransformerConfig;
use ssl_core::seq::*;
use ssl_core::{parse_device, Ctx, ParamStore, PretextTask, TrainConfig};

use crate::parallel::Parallel;
use crate::series_common as common;
use crate::{config, CliError};

/// The embedded default data: the BasicMotions training split of the UEA archive
/// (6 accelerometer/gyroscope channels x 100 steps, 40 recordings of 4 activities).
const EMBEDDED_TRAIN: &[u8] = include_bytes!("../data/basic_motions_train.parquet");

/// Which pretext task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Column of `list<f32|f64>` or `list<list<f32|f64>>` (features x length).
    pub column: String,
    /// Label column for `ssl eval` (ignored by pretraining).
    pub label_column: String,
    /// Id column carried into embeddings ("" = `file:row`).
    pub id_column: String,
    /// Skip (and report) rows that cannot be decoded instead of stopping.
    pub skip_bad_rows: bool,
    /// Truncate sequences to this many steps (0 = no limit).
    pub max_len: usize,
    /// Z-normalise each feature of each sequence (per-instance normalisation).
    pub normalize: bool,
    /// Examples held out from the start of the data for embedding-health figures.
    pub health_examples: usize,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            column: "x".into(),
            label_column: "label".into(),
            id_column: String::new(),
            skip_bad_rows: false,
            max_len: 0,
            normalize: true,
            health_examples: 64,
        }
    }
}

/// `[task]`: which pretext task and its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// The whole configuration of `ssl pretrain features`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeaturesConfig {
    /// Training loop.
    pub train: TrainConfig,
    /// Data.
    pub data: DataConfig,
    /// The transformer encoder (its input width comes from the data).
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
            model: TransformerConfig {
                dim: 64,
                depth: 2,
                heads: 4,
                mlp_dim: 128,
                dropout: 0.1,
                ..TransformerConfig::default()
            },
            task: TaskConfig::default(),
            features: 0,
        }
    }
}

/// Sequences read from Parquet.
struct Loaded {
    examples: Vec<SeqExample>,
    ids: Vec<String>,
    labels: Option<Vec<String>>,
}

/// Reads a data set; with `par`, this rank's share of the rows.
fn load(
    paths: &[String],
    cfg: &DataConfig,
    label_column: Option<&str>,
    par: Option<&Parallel>,
) -> Result<Loaded, CliError> {
    let options = match par {
        Some(p) => p.read_options(cfg.skip_bad_rows),
        None => ssl_data::ReadOptions {
            skip_bad_rows: cfg.skip_bad_rows,
            ..Default::default()
        },
    };
    let table = ssl_timeseries::read_series_with(
        paths,
        &cfg.column,
        label_column,
        Some(&cfg.id_column),
        &options,
    )?;
    if let Some(p) = par {
        p.report_share(&table.share, table.row_index.len(), "sequences");
    }
    let mut examples = Vec::with_capacity(table.series.len());
    for mut e in table.series {
        if cfg.max_len > 0 && e.steps > cfg.max_len {
            e = SeqExample::new(
                e.values[..cfg.max_len * e.features].to_vec(),
                cfg.max_len,
                e.features,
            )?;
        }
        if cfg.normalize {
            e.normalize_instance();
        }
        examples.push(e);
    }
    Ok(Loaded {
        examples,
        ids: table.ids,
        labels: table.labels,
    })
}

/// Encoder plus task, behind one type so the trainer sees a single `PretextTask`.
enum AnyTask {
    Masked(MaskedFeatureTask<SeqTransformerEncoder>),
    Contrastive(ContrastiveTask<SeqTransformerEncoder>),
    Denoising(DenoisingTask<SeqTransformerEncoder>),
}

impl AnyTask {
    fn build(cfg: &FeaturesConfig, device: &Device) -> Result<(ParamStore, AnyTask), CliError> {
        let store = ParamStore::new(device);
        let pb = store.builder(cfg.train.seed);
        let enc_cfg = SeqEncoderConfig {
            features: cfg.features,
            transformer: cfg.model.clone(),
        };
        let encoder = SeqTransformerEncoder::new(&enc_cfg, &pb)?;
        let task = match cfg.task.kind {
            TaskKind::Masked => AnyTask::Masked(MaskedFeatureTask::new(
                encoder,
                cfg.features,
                cfg.task.masked,
                &pb,
            )?),
            TaskKind::Contrastive => {
                AnyTask::Contrastive(ContrastiveTask::new(encoder, cfg.task.contrastive, &pb)?)
            }
            TaskKind::Denoising => AnyTask::Denoising(DenoisingTask::new(
                encoder,
                cfg.features,
                cfg.task.denoising,
                &pb,
            )?),
        };
        Ok((store, task))
    }
}

impl PretextTask for AnyTask {
    type Batch = SeqBatch;
    fn params(&self) -> &ParamStore {
        match self {
            AnyTask::Masked(t) => t.params(),
            AnyTask::Contrastive(t) => t.params(),
            AnyTask::Denoising(t) => t.params(),
        }
    }
    fn forward(&self, batch: &SeqBatch, ctx: &mut Ctx) -> ssl_core::Result<ssl_core::TaskOutput> {
        match self {
            AnyTask::Masked(t) => t.forward(batch, ctx),
            AnyTask::Contrastive(t) => t.forward(batch, ctx),
            AnyTask::Denoising(t) => t.forward(batch, ctx),
        }
    }
    fn forward_backward(
        &self,
        batch: &SeqBatch,
        ctx: &mut Ctx,
    ) -> ssl_core::Result<(ssl_core::TaskOutput, candle_core::backprop::GradStore)> {
        match self {
            AnyTask::Masked(t) => t.forward_backward(batch, ctx),
            AnyTask::Contrastive(t) => t.forward_backward(batch, ctx),
            AnyTask::Denoising(t) => t.forward_backward(batch, ctx),
        }
    }
    fn embed(&self, batch: &SeqBatch, ctx: &mut Ctx) -> ssl_core::Result<Tensor> {
        match self {
            AnyTask::Masked(t) => t.embed(batch, ctx),
            AnyTask::Contrastive(t) => t.embed(batch, ctx),
            AnyTask::Denoising(t) => t.embed(batch, ctx),
        }
    }
    fn batch_len(&self, batch: &SeqBatch) -> usize {
        batch.len()
    }
}

/// `ssl pretrain features`.
pub fn pretrain(
    config_file: Option<&Path>,
    data: &[String],
    out: &Path,
    set: &[String],
    resume: bool,
) -> Result<(), CliError> {
    let base = config::base_file(config_file, out, resume);
    let mut cfg: FeaturesConfig =
        config::resolve(&FeaturesConfig::default(), base.as_deref(), set)?;
    cfg.train.validate()?;
    let device = parse_device(&cfg.train.device)?;
    let paths = common::data_paths(
        data,
        EMBEDDED_TRAIN,
        "basic_motions_train.parquet",
        "UEA BasicMotions, 40 recordings x 6 channels x 100 steps",
    )?;
    let (par, device) = Parallel::init(device)?;
    let loaded = load(&paths.paths, &cfg.data, None, Some(&par))?;
    let features = loaded.examples.first().map_or(0, |e| e.features);
    if cfg.features != 0 && cfg.features != features {
        return Err(CliError::Config(format!(
            "the configuration says features = {} but the data has {features} per step",
            cfg.features
        )));
    }
    cfg.features = features;
    if par.is_main() {
        config::write_run_config(out, &config::to_toml(&cfg)?)?;
    }
    let (store, mut task) = AnyTask::build(&cfg, &device)?;
    if let (AnyTask::Contrastive(t), true) = (&mut task, par.world > 1) {
        // NT-Xent's negatives span every rank: each step gathers all ranks' views.
        t.gather_across(par.shared());
    }
    eprintln!(
        "{} sequences x {} steps (max) x {features} features; {:?} task; encoder {} parameters",
        loaded.examples.len(),
        loaded.examples.iter().map(|e| e.steps).max().unwrap_or(0),
        cfg.task.kind,
        store.num_elements()
    );
    let run_config = serde_json::to_value(&cfg).map_err(|e| CliError::Config(e.to_string()))?;
    common::fit(
        &task,
        loaded.examples,
        &cfg.train,
        cfg.data.health_examples,
        common::RunDir {
            path: out,
            resume,
            config: run_config,
            par,
            sharded: true,
        },
        &device,
    )
}

/// Loads the model of a checkpoint with its stored configuration (`set` overrides data keys).
fn load_model(
    checkpoint: &Path,
    set: &[String],
) -> Result<(PathBuf, FeaturesConfig, AnyTask, Device), CliError> {
    let (ckpt, cfg): (PathBuf, FeaturesConfig) =
        config::from_checkpoint(checkpoint, "features", set)?;
    let device = parse_device(&cfg.train.device)?;
    let (store, task) = AnyTask::build(&cfg, &device)?;
    store.load_safetensors(&ckpt.join(MODEL_FILE))?;
    Ok((ckpt, cfg, task, device))
}

/// `ssl embed features`.
pub fn embed(
    checkpoint: &Path,
    data: &[String],
    out: &Path,
    set: &[String],
) -> Result<(), CliError> {
    let (ckpt, cfg, task, device) = load_model(checkpoint, set)?;
    let loaded = load(data, &cfg.data, None, None)?;
    let (emb, dim) = common::embed_all(&task, &loaded.examples, cfg.train.batch_size, &device)?;
    let mut meta = BTreeMap::new();
    meta.insert(
        "model".to_string(),
        "ssl-core SeqTransformerEncoder".to_string(),
    );
    meta.insert("checkpoint".to_string(), ckpt.display().to_string());
    meta.insert("pooling".to_string(), "mean".to_string());
    meta.insert(
        "task".to_string(),
        format!("{:?}", cfg.task.kind).to_lowercase(),
    );
    crate::embeddings::write_embeddings(out, &loaded.ids, &emb, dim, meta)?;
    eprintln!(
        "wrote {} embeddings of dimension {dim} to {}",
        loaded.ids.len(),
        out.display()
    );
    Ok(())
}

/// `ssl eval features`: prints one JSON object.
pub fn eval(
    checkpoint: &Path,
    data: &[String],
    test: &[String],
    label_column: Option<&str>,
    set: &[String],
) -> Result<(), CliError> {
    let (ckpt, cfg, task, device) = load_model(checkpoint, set)?;
    let label = label_column.unwrap_or(&cfg.data.label_column).to_string();
    let train = load(data, &cfg.data, Some(&label), None)?;
    let test = if test.is_empty() {
        None
    } else {
        Some(load(test, &cfg.data, Some(&label), None)?)
    };
    let mut sets: Vec<&[SeqExample]> = vec![&train.examples];
    sets.extend(test.iter().map(|t| t.examples.as_slice()));
    let loss = common::pretext_loss(&task, &sets, cfg.train.batch_size, &device)?;
    let (emb, dim) = common::embed_all(&task, &train.examples, cfg.train.batch_size, &device)?;
    let train_labels = train
        .labels
        .ok_or_else(|| CliError::Config(format!("no labels read from column `{label}`")))?;
    let test_emb = match &test {
        Some(t) => Some(common::embed_all(&task, &t.examples, cfg.train.batch_size, &device)?.0),
        None => None,
    };
    let test_labels = test
        .as_ref()
        .and_then(|t| t.labels.clone())
        .unwrap_or_default();
    let scores = common::probe(
        (&emb, &train_labels),
        test_emb.as_deref().map(|e| (e, test_labels.as_slice())),
        dim,
        cfg.train.seed,
    )?;
    let report = json!({
        "checkpoint": ckpt.display().to_string(),
        "pretext_loss": loss,
        "linear_probe_accuracy": scores.linear,
        "linear_probe_l2": scores.l2,
        "knn_accuracy": scores.knn,
        "n_train": scores.n_train,
        "n_test": scores.n_test,
        "n_classes": scores.n_classes,
        "embedding_dim": dim,
    });
    println!("{report}");
    Ok(())
}
