//! The `timeseries` modality: series from Parquet (one per row, or one long series per
//! column cut into windows), a selectable encoder (PatchTST, TS2Vec's dilated convolutions,
//! GRU, LSTM, transformer) and a pretext task (TS2Vec contrastive, masked reconstruction,
//! forecasting), with classification probes and forecast evaluation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::json;
use ssl_core::checkpoint::MODEL_FILE;
use ssl_core::seq::{MaskedFeatureConfig, MaskedFeatureTask, SeqBatch, SeqExample};
use ssl_core::{parse_device, Ctx, ParamStore, PretextTask, TrainConfig};
use ssl_data::ReadOptions;
use ssl_timeseries::{
    chronological_split, evaluate_forecast, read_long_series, read_series_with, windows,
    EncoderConfig, EncoderKind, ForecastConfig, ForecastTask, MaskedPatchConfig, MaskedPatchTask,
    PatchTstEncoder, SeriesEncoder, Ts2VecConfig, Ts2VecTask,
};

use crate::parallel::Parallel;
use crate::series_common as common;
use crate::{config, CliError};

/// The embedded default data: the GunPoint training split of the UCR archive (50 hand
/// trajectories x 150 steps, 2 classes).
const EMBEDDED_TRAIN: &[u8] = include_bytes!("../data/gunpoint_train.parquet");

/// Which pretext task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Column of `list<f32|f64>` or `list<list<f32|f64>>` (channels x length), one series per row.
    pub column: String,
    /// Instead: a numeric column holding one long series, one observation per row (in file
    /// and row order), cut into windows. Empty = one series per row.
    pub long_column: String,
    /// Label column for `ssl eval` (ignored by pretraining).
    pub label_column: String,
    /// Id column carried into embeddings ("" = `file:row`).
    pub id_column: String,
    /// Skip (and report) rows that cannot be decoded instead of stopping.
    pub skip_bad_rows: bool,
    /// Truncate series to this many steps (0 = no limit).
    pub max_len: usize,
    /// Z-normalise each channel of each series (classification data; forecasting uses RevIN).
    pub normalize: bool,
    /// Window length for long series with the non-forecast tasks (forecasting windows are
    /// context + horizon).
    pub window: usize,
    /// Steps between window starts.
    pub stride: usize,
    /// Chronological training fraction of a long series (`ssl eval` scores the rest).
    pub train_fraction: f64,
    /// Examples held out from the start of the data for embedding-health figures.
    pub health_examples: usize,
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
            normalize: true,
            window: 128,
            stride: 1,
            train_fraction: 0.8,
            health_examples: 64,
        }
    }
}

/// `[task]`: which pretext task and the settings of each.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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

/// The whole configuration of `ssl pretrain timeseries`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    fn window_len(&self) -> usize {
        match self.task.kind {
            TaskKind::Forecast => self.task.forecast.context + self.task.forecast.horizon,
            _ => self.data.window,
        }
    }
}

/// Series, ids and labels of a data set, as the task consumes them.
struct Loaded {
    examples: Vec<SeqExample>,
    ids: Vec<String>,
    labels: Option<Vec<String>>,
    /// The examples are this rank's share already (read by row group); otherwise every rank
    /// holds them all.
    sharded: bool,
}

/// Which part of a long series.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Train,
    Test,
    All,
}

/// Reads a data set; with `par`, one-series-per-row data is read as this rank's share of the
/// rows (a long series is always read whole: its windows are cut from all of it).
fn load(
    paths: &[String],
    cfg: &TimeseriesConfig,
    label_column: Option<&str>,
    part: Part,
    par: Option<&Parallel>,
) -> Result<Loaded, CliError> {
    let d = &cfg.data;
    let forecast = cfg.task.kind == TaskKind::Forecast;
    if !d.long_column.is_empty() {
        let series = read_long_series(paths, &d.long_column)?;
        let len = cfg.window_len();
        let context = if forecast {
            cfg.task.forecast.context
        } else {
            0
        };
        let (train, test) = chronological_split(&series, d.train_fraction, context)?;
        let (s, stride) = match part {
            Part::Train => (train, d.stride),
            Part::Test => (test, 1),
            Part::All => (series, d.stride),
        };
        let examples = windows(&s, len, stride)?;
        let ids = (0..examples.len()).map(|i| format!("window:{i}")).collect();
        return Ok(Loaded {
            examples,
            ids,
            labels: None,
            sharded: false,
        });
    }
    let options = match par {
        Some(p) => p.read_options(d.skip_bad_rows),
        None => ReadOptions {
            skip_bad_rows: d.skip_bad_rows,
            ..Default::default()
        },
    };
    let set = read_series_with(paths, &d.column, label_column, Some(&d.id_column), &options)?;
    if let Some(p) = par {
        p.report_share(&set.share, set.row_index.len(), "series");
    }
    let mut examples = Vec::with_capacity(set.series.len());
    let mut ids = Vec::new();
    for (mut e, id) in set.series.into_iter().zip(set.ids) {
        if d.max_len > 0 && e.steps > d.max_len {
            e = SeqExample::new(
                e.values[..d.max_len * e.features].to_vec(),
                d.max_len,
                e.features,
            )?;
        }
        if forecast {
            // Forecasting on one-series-per-row data: every window of each row.
            for (k, w) in windows(&e, cfg.window_len(), d.stride)?
                .into_iter()
                .enumerate()
            {
                examples.push(w);
                ids.push(format!("{id}:{k}"));
            }
            continue;
        }
        if d.normalize {
            e.normalize_instance();
        }
        examples.push(e);
        ids.push(id);
    }
    let labels = if forecast { None } else { set.labels };
    Ok(Loaded {
        examples,
        ids,
        labels,
        sharded: par.is_some(),
    })
}

/// Encoder plus task, behind one type so the trainer sees a single `PretextTask`.
enum AnyTask {
    Ts2vec(Ts2VecTask<SeriesEncoder>),
    MaskedSteps(MaskedFeatureTask<SeriesEncoder>),
    MaskedPatches(MaskedPatchTask),
    Forecast(ForecastTask<SeriesEncoder>),
}

impl AnyTask {
    fn build(
        cfg: &TimeseriesConfig,
        device: &Device,
        seed: u64,
    ) -> Result<(ParamStore, AnyTask), CliError> {
        let store = ParamStore::new(device);
        let pb = store.builder(seed);
        let c = cfg.channels;
        let task = match cfg.task.kind {
            TaskKind::Masked if cfg.model.kind == EncoderKind::Patchtst => {
                let enc = PatchTstEncoder::new(&cfg.model.patchtst, c, &pb)?;
                AnyTask::MaskedPatches(MaskedPatchTask::new(enc, cfg.task.masked_patch, &pb)?)
            }
            TaskKind::Masked => {
                let enc = SeriesEncoder::new(&cfg.model, c, &pb)?;
                AnyTask::MaskedSteps(MaskedFeatureTask::new(enc, c, cfg.task.masked, &pb)?)
            }
            TaskKind::Ts2vec => {
                let enc = SeriesEncoder::new(&cfg.model, c, &pb)?;
                if !enc.per_timestep() {
                    return Err(CliError::Config(
                        "task.kind = \"ts2vec\" needs one token per timestep: use model.kind = \"tcn\", \"gru\", \"lstm\" or \"transformer\" (PatchTST works with \"masked\" and \"forecast\")".into(),
                    ));
                }
                AnyTask::Ts2vec(Ts2VecTask::new(enc, cfg.task.ts2vec, &store)?)
            }
            TaskKind::Forecast => {
                let enc = SeriesEncoder::new(&cfg.model, c, &pb)?;
                AnyTask::Forecast(ForecastTask::new(enc, c, cfg.task.forecast, &pb)?)
            }
        };
        Ok((store, task))
    }
}

impl PretextTask for AnyTask {
    type Batch = SeqBatch;
    fn params(&self) -> &ParamStore {
        match self {
            AnyTask::Ts2vec(t) => t.params(),
            AnyTask::MaskedSteps(t) => t.params(),
            AnyTask::MaskedPatches(t) => t.params(),
            AnyTask::Forecast(t) => t.params(),
        }
    }
    fn forward(&self, batch: &SeqBatch, ctx: &mut Ctx) -> ssl_core::Result<ssl_core::TaskOutput> {
        match self {
            AnyTask::Ts2vec(t) => t.forward(batch, ctx),
            AnyTask::MaskedSteps(t) => t.forward(batch, ctx),
            AnyTask::MaskedPatches(t) => t.forward(batch, ctx),
            AnyTask::Forecast(t) => t.forward(batch, ctx),
        }
    }
    fn forward_backward(
        &self,
        batch: &SeqBatch,
        ctx: &mut Ctx,
    ) -> ssl_core::Result<(ssl_core::TaskOutput, candle_core::backprop::GradStore)> {
        match self {
            AnyTask::Ts2vec(t) => t.forward_backward(batch, ctx),
            AnyTask::MaskedSteps(t) => t.forward_backward(batch, ctx),
            AnyTask::MaskedPatches(t) => t.forward_backward(batch, ctx),
            AnyTask::Forecast(t) => t.forward_backward(batch, ctx),
        }
    }
    fn embed(&self, batch: &SeqBatch, ctx: &mut Ctx) -> ssl_core::Result<Tensor> {
        match self {
            AnyTask::Ts2vec(t) => t.embed(batch, ctx),
            AnyTask::MaskedSteps(t) => t.embed(batch, ctx),
            AnyTask::MaskedPatches(t) => t.embed(batch, ctx),
            AnyTask::Forecast(t) => t.embed(batch, ctx),
        }
    }
    fn batch_len(&self, batch: &SeqBatch) -> usize {
        batch.len()
    }
}

/// `ssl pretrain timeseries`.
pub fn pretrain(
    config_file: Option<&Path>,
    data: &[String],
    out: &Path,
    set: &[String],
    resume: bool,
) -> Result<(), CliError> {
    let base = config::base_file(config_file, out, resume);
    let mut cfg: TimeseriesConfig =
        config::resolve(&TimeseriesConfig::default(), base.as_deref(), set)?;
    cfg.train.validate()?;
    let device = parse_device(&cfg.train.device)?;
    let paths = common::data_paths(
        data,
        EMBEDDED_TRAIN,
        "gunpoint_train.parquet",
        "UCR GunPoint, 50 series x 150 steps",
    )?;
    let (par, device) = Parallel::init(device)?;
    let loaded = load(&paths.paths, &cfg, None, Part::Train, Some(&par))?;
    let channels = loaded.examples.first().map_or(0, |e| e.features);
    if cfg.channels != 0 && cfg.channels != channels {
        return Err(CliError::Config(format!(
            "the configuration says channels = {} but the data has {channels}",
            cfg.channels
        )));
    }
    cfg.channels = channels;
    if par.is_main() {
        config::write_run_config(out, &config::to_toml(&cfg)?)?;
    }
    let (store, mut task) = AnyTask::build(&cfg, &device, cfg.train.seed)?;
    if let (AnyTask::Ts2vec(t), true) = (&mut task, par.world > 1) {
        // The instance terms' negatives span every rank: each step gathers all ranks' views.
        t.gather_across(par.shared());
    }
    eprintln!(
        "{} series x {} steps (max) x {channels} channels; {:?} encoder, {:?} task; {} parameters",
        loaded.examples.len(),
        loaded.examples.iter().map(|e| e.steps).max().unwrap_or(0),
        cfg.model.kind,
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
            sharded: loaded.sharded,
        },
        &device,
    )
}

/// Loads the model of a checkpoint with its stored configuration (`set` overrides data keys).
fn load_model(
    checkpoint: &Path,
    set: &[String],
) -> Result<(PathBuf, TimeseriesConfig, AnyTask, Device), CliError> {
    let (ckpt, cfg): (PathBuf, TimeseriesConfig) =
        config::from_checkpoint(checkpoint, "timeseries", set)?;
    let device = parse_device(&cfg.train.device)?;
    let (store, task) = AnyTask::build(&cfg, &device, cfg.train.seed)?;
    store.load_safetensors(&ckpt.join(MODEL_FILE))?;
    Ok((ckpt, cfg, task, device))
}

/// `ssl embed timeseries`.
pub fn embed(
    checkpoint: &Path,
    data: &[String],
    out: &Path,
    set: &[String],
) -> Result<(), CliError> {
    let (ckpt, cfg, task, device) = load_model(checkpoint, set)?;
    let loaded = load(data, &cfg, None, Part::All, None)?;
    let (emb, dim) = common::embed_all(&task, &loaded.examples, cfg.train.batch_size, &device)?;
    let mut meta = BTreeMap::new();
    meta.insert(
        "model".to_string(),
        format!("ssl-timeseries {:?}", cfg.model.kind).to_lowercase(),
    );
    meta.insert("checkpoint".to_string(), ckpt.display().to_string());
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

/// `ssl eval timeseries`: prints one JSON object. Forecasting runs on a long series are
/// scored on its held-out end against naive baselines; otherwise the pretext loss and
/// linear-probe / k-NN accuracy of the trained encoder and of a randomly initialised one.
pub fn eval(
    checkpoint: &Path,
    data: &[String],
    test: &[String],
    label_column: Option<&str>,
    set: &[String],
) -> Result<(), CliError> {
    let (ckpt, cfg, task, device) = load_model(checkpoint, set)?;
    if let (AnyTask::Forecast(f), false) = (&task, cfg.data.long_column.is_empty()) {
        let test_windows = load(data, &cfg, None, Part::Test, None)?.examples;
        let report = evaluate_forecast(
            f,
            &test_windows,
            &cfg.eval.horizons,
            cfg.eval.season,
            cfg.train.batch_size,
        )?;
        let report = json!({
            "checkpoint": ckpt.display().to_string(),
            "test_windows": test_windows.len(),
            "horizons": report,
        });
        println!("{report}");
        return Ok(());
    }
    let label = label_column.unwrap_or(&cfg.data.label_column).to_string();
    let train = load(data, &cfg, Some(&label), Part::All, None)?;
    let test = if test.is_empty() {
        None
    } else {
        Some(load(test, &cfg, Some(&label), Part::All, None)?)
    };
    let mut sets: Vec<&[SeqExample]> = vec![&train.examples];
    sets.extend(test.iter().map(|t| t.examples.as_slice()));
    let loss = common::pretext_loss(&task, &sets, cfg.train.batch_size, &device)?;
    let train_labels = train
        .labels
        .clone()
        .ok_or_else(|| CliError::Config(format!("no labels read from column `{label}`")))?;
    let test_labels = test
        .as_ref()
        .and_then(|t| t.labels.clone())
        .unwrap_or_default();
    let score = |task: &AnyTask| -> Result<(common::ProbeScores, usize), CliError> {
        let (emb, dim) = common::embed_all(task, &train.examples, cfg.train.batch_size, &device)?;
        let test_emb = match &test {
            Some(t) => Some(common::embed_all(task, &t.examples, cfg.train.batch_size, &device)?.0),
            None => None,
        };
        let s = common::probe(
            (&emb, &train_labels),
            test_emb.as_deref().map(|e| (e, test_labels.as_slice())),
            dim,
            cfg.train.seed,
        )?;
        Ok((s, dim))
    };
    let (trained, dim) = score(&task)?;
    // The same architecture with fresh weights: what pretraining adds.
    let (_, random_task) = AnyTask::build(&cfg, &device, cfg.train.seed.wrapping_add(1))?;
    let (random, _) = score(&random_task)?;
    let report = json!({
        "checkpoint": ckpt.display().to_string(),
        "encoder": format!("{:?}", cfg.model.kind).to_lowercase(),
        "task": format!("{:?}", cfg.task.kind).to_lowercase(),
        "pretext_loss": loss,
        "linear_probe_accuracy": trained.linear,
        "linear_probe_l2": trained.l2,
        "knn_accuracy": trained.knn,
        "random_init_linear_probe_accuracy": random.linear,
        "random_init_knn_accuracy": random.knn,
        "n_train": trained.n_train,
        "n_test": trained.n_test,
        "n_classes": trained.n_classes,
        "embedding_dim": dim,
    });
    println!("{report}");
    Ok(())
}

/// The default configuration (for `ssl config timeseries`).
pub fn default_config() -> TimeseriesConfig {
    TimeseriesConfig::default()
}
