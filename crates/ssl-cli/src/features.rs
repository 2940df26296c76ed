//! The `features` modality: numeric feature sequences `(batch, seq, features)` from a Parquet
//! column of `list<f32|f64>` (one feature) or `list<list<f32|f64>>` (features x length), trained
//! with ssl-core's masked, contrastive or denoising task on a transformer encoder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::json;
use ssl_core::checkpoint::{read_state, resolve_checkpoint, MODEL_FILE};
use ssl_core::nn::TransformerConfig;
use ssl_core::probe::{
    fit_linear_probe, knn_accuracy, stratified_split, KnnConfig, LinearProbeConfig,
};
use ssl_core::seq::*;
use ssl_core::{
    parse_device, Ctx, LoopTrainer, ParamStore, PretextTask, SslRng, StopFlag, TrainConfig, Trainer,
};

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

fn load(
    paths: &[String],
    cfg: &DataConfig,
    label_column: Option<&str>,
) -> Result<Loaded, CliError> {
    let table = crate::features_data::read_series(paths, cfg, label_column)?;
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
    // Resuming without --config continues with the run's own resolved configuration.
    let stored = out.join("config.toml");
    let base = match config_file {
        None if resume && stored.is_file() => Some(stored.as_path()),
        other => other,
    };
    let mut cfg: FeaturesConfig = config::resolve(&FeaturesConfig::default(), base, set)?;
    cfg.train.validate()?;
    let device = parse_device(&cfg.train.device)?;
    let _embedded_dir;
    let paths: Vec<String> = if data.is_empty() {
        let dir = tempfile::tempdir().map_err(|e| CliError::Io {
            path: std::env::temp_dir(),
            source: e,
        })?;
        let p = dir.path().join("basic_motions_train.parquet");
        std::fs::write(&p, EMBEDDED_TRAIN).map_err(|e| CliError::Io {
            path: p.clone(),
            source: e,
        })?;
        eprintln!("no --data given: training on the embedded sample (UEA BasicMotions, 40 recordings x 6 channels x 100 steps)");
        _embedded_dir = dir;
        vec![p.to_string_lossy().into_owned()]
    } else {
        data.to_vec()
    };
    let loaded = load(&paths, &cfg.data, None)?;
    let features = loaded.examples.first().map_or(0, |e| e.features);
    if cfg.features != 0 && cfg.features != features {
        return Err(CliError::Config(format!(
            "the configuration says features = {} but the data has {features} per step",
            cfg.features
        )));
    }
    cfg.features = features;
    std::fs::create_dir_all(out).map_err(|e| CliError::Io {
        path: out.to_path_buf(),
        source: e,
    })?;
    std::fs::write(&stored, config::to_toml(&cfg)?).map_err(|e| CliError::Io {
        path: stored.clone(),
        source: e,
    })?;

    let (store, task) = AnyTask::build(&cfg, &device)?;
    eprintln!(
        "{} sequences x {} steps (max) x {features} features; {:?} task; encoder {} parameters",
        loaded.examples.len(),
        loaded.examples.iter().map(|e| e.steps).max().unwrap_or(0),
        cfg.task.kind,
        store.num_elements()
    );
    let n_health = cfg.data.health_examples.min(loaded.examples.len());
    let heldout = (n_health >= 2)
        .then(|| {
            SeqBatch::from_examples(
                &loaded.examples.iter().take(n_health).collect::<Vec<_>>(),
                &device,
            )
        })
        .transpose()?;
    let mut source = InMemorySeqSource::new(
        loaded.examples,
        cfg.train.batch_size,
        cfg.train.seed,
        true,
        &device,
    )?;
    let run_config = serde_json::to_value(&cfg).map_err(|e| CliError::Config(e.to_string()))?;
    let mut trainer = LoopTrainer::new(cfg.train.clone(), Some(out.to_path_buf()))?
        .resume(resume)
        .run_config(run_config)
        .stop_flag(StopFlag::from_signals()?)
        .progress(true);
    let report = trainer.fit(&task, &mut source, heldout.as_ref())?;
    let last = report.losses.last().map(|(_, l)| *l).unwrap_or(f64::NAN);
    let first = report.losses.first().map(|(_, l)| *l).unwrap_or(f64::NAN);
    if report.interrupted {
        eprintln!(
            "interrupted at step {}: checkpoint written, continue with --resume",
            report.step
        );
    }
    eprintln!(
        "done: step {} (loss {first:.4} -> {last:.4}); checkpoint {}; metrics {}; plot {}",
        report.step,
        report
            .last_checkpoint
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        out.join("metrics.jsonl").display(),
        out.join("loss.png").display()
    );
    Ok(())
}

/// Loads the model of a checkpoint with its stored configuration (`set` overrides data keys).
fn load_model(
    checkpoint: &Path,
    set: &[String],
) -> Result<(PathBuf, FeaturesConfig, AnyTask, Device), CliError> {
    let ckpt = resolve_checkpoint(checkpoint)?;
    let state = read_state(&ckpt)?;
    let stored: FeaturesConfig = serde_json::from_value(state.config.clone()).map_err(|e| {
        CliError::Config(format!(
            "{}: the stored configuration is not a features configuration: {e}",
            ckpt.display()
        ))
    })?;
    let cfg: FeaturesConfig = config::resolve(&stored, None, set)?;
    let device = parse_device(&cfg.train.device)?;
    let (store, task) = AnyTask::build(&cfg, &device)?;
    store.load_safetensors(&ckpt.join(MODEL_FILE))?;
    Ok((ckpt, cfg, task, device))
}

/// Pooled embeddings of `examples`, batch by batch, in evaluation mode.
fn embed_all(
    task: &AnyTask,
    examples: &[SeqExample],
    batch: usize,
    device: &Device,
) -> Result<(Vec<f32>, usize), CliError> {
    let mut out = Vec::new();
    let mut dim = 0;
    let mut rng = SslRng::new(0);
    for chunk in examples.chunks(batch.max(1)) {
        let b = SeqBatch::from_examples(&chunk.iter().collect::<Vec<_>>(), device)?;
        let e = task.embed(&b, &mut Ctx::eval(&mut rng))?;
        dim = e.dim(1)?;
        out.extend(e.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok((out, dim))
}

/// Mean pretext loss over the examples of every set (evaluation mode, fixed seed).
fn pretext_loss(
    task: &AnyTask,
    sets: &[&[SeqExample]],
    batch: usize,
    device: &Device,
) -> Result<f64, CliError> {
    let mut rng = SslRng::new(12345);
    let (mut sum, mut weight) = (0.0, 0.0);
    for chunk in sets.iter().flat_map(|set| set.chunks(batch.max(2))) {
        if chunk.len() < 2 {
            continue;
        }
        let b = SeqBatch::from_examples(&chunk.iter().collect::<Vec<_>>(), device)?;
        let mut ctx = Ctx::eval(&mut rng);
        let out = task.forward(&b, &mut ctx)?;
        sum += out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * out.weight;
        weight += out.weight;
    }
    Ok(if weight > 0.0 { sum / weight } else { f64::NAN })
}

/// `ssl embed features`.
pub fn embed(
    checkpoint: &Path,
    data: &[String],
    out: &Path,
    set: &[String],
) -> Result<(), CliError> {
    let (ckpt, cfg, task, device) = load_model(checkpoint, set)?;
    let loaded = load(data, &cfg.data, None)?;
    let (emb, dim) = embed_all(&task, &loaded.examples, cfg.train.batch_size, &device)?;
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
    crate::features_data::write_embeddings(out, &loaded.ids, &emb, dim, meta)?;
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
    let train = load(data, &cfg.data, Some(&label))?;
    let test = if test.is_empty() {
        None
    } else {
        Some(load(test, &cfg.data, Some(&label))?)
    };
    let mut sets: Vec<&[SeqExample]> = vec![&train.examples];
    sets.extend(test.iter().map(|t| t.examples.as_slice()));
    let loss = pretext_loss(&task, &sets, cfg.train.batch_size, &device)?;
    let (emb, dim) = embed_all(&task, &train.examples, cfg.train.batch_size, &device)?;

    // Class ids from the sorted union of label strings, so train and test agree.
    let train_labels = train
        .labels
        .ok_or_else(|| CliError::Config(format!("no labels read from column `{label}`")))?;
    let mut classes: Vec<String> = train_labels.clone();
    if let Some(t) = &test {
        classes.extend(t.labels.clone().unwrap_or_default());
    }
    classes.sort();
    classes.dedup();
    let id_of = |s: &String| classes.binary_search(s).unwrap_or(0);
    let train_y: Vec<usize> = train_labels.iter().map(id_of).collect();

    let (tr_x, tr_y, te_x, te_y) = match &test {
        Some(t) => {
            let (te_emb, _) = embed_all(&task, &t.examples, cfg.train.batch_size, &device)?;
            let te_y: Vec<usize> = t
                .labels
                .as_ref()
                .map(|l| l.iter().map(id_of).collect())
                .unwrap_or_default();
            (emb, train_y, te_emb, te_y)
        }
        None => {
            let (tr_idx, te_idx) = stratified_split(&train_y, 0.2, cfg.train.seed)?;
            let pick = |idx: &[usize]| -> (Vec<f32>, Vec<usize>) {
                (
                    idx.iter()
                        .flat_map(|&i| emb[i * dim..(i + 1) * dim].iter().copied())
                        .collect(),
                    idx.iter().map(|&i| train_y[i]).collect(),
                )
            };
            let (a, b) = pick(&tr_idx);
            let (c, d) = pick(&te_idx);
            (a, b, c, d)
        }
    };
    let n_classes = classes.len();
    let probe = fit_linear_probe(
        &tr_x,
        &tr_y,
        dim,
        n_classes,
        &LinearProbeConfig {
            seed: cfg.train.seed,
            ..Default::default()
        },
    )?;
    let linear = probe.accuracy(&te_x, &te_y)?;
    let knn = knn_accuracy(
        &tr_x,
        &tr_y,
        &te_x,
        &te_y,
        dim,
        n_classes,
        &KnnConfig::default(),
    )?;
    let report = json!({
        "checkpoint": ckpt.display().to_string(),
        "pretext_loss": loss,
        "linear_probe_accuracy": linear,
        "linear_probe_l2": probe.chosen_l2,
        "knn_accuracy": knn,
        "n_train": tr_y.len(),
        "n_test": te_y.len(),
        "n_classes": n_classes,
        "embedding_dim": dim,
    });
    println!("{report}");
    Ok(())
}
