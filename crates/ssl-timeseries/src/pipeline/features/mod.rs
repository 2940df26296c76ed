//! The feature-sequence pipeline: numeric feature sequences `(batch, seq, features)` from a
//! Parquet column of `list<f32|f64>` (one feature) or `list<list<f32|f64>>` (features x
//! length), trained with ssl-core's masked, contrastive or denoising task on a transformer
//! encoder.

mod config;
mod task;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::Serialize;
use ssl_core::checkpoint::MODEL_FILE;
use ssl_core::parse_device;
use ssl_core::probe::probe_labelled;
use ssl_core::run_dir::{self, RunOptions, RunSummary};
use ssl_core::seq::SeqExample;
use ssl_core::Parallel;
use ssl_data::ReadOptions;

pub use config::{DataConfig, FeaturesConfig, TaskConfig, TaskKind};
pub use task::FeaturesTask;

use super::common::{self, truncate, RunDir};
use crate::{read_series_with, Result, TsError};
use ssl_data::{write_embeddings, EmbedSummary};

/// The modality's name: in stored configurations and error messages.
pub const MODALITY: &str = "features";

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
) -> Result<Loaded> {
    let options = match par {
        Some(p) => ReadOptions::for_rank(p.rank, p.world, cfg.skip_bad_rows),
        None => ReadOptions {
            skip_bad_rows: cfg.skip_bad_rows,
            ..Default::default()
        },
    };
    let table = read_series_with(
        paths,
        &cfg.column,
        label_column,
        Some(&cfg.id_column),
        &options,
    )?;
    if let Some(p) = par {
        table
            .share
            .report(p.rank, p.world, table.row_index.len(), "sequences");
    }
    let mut examples = Vec::with_capacity(table.series.len());
    for e in table.series {
        let mut e = truncate(e, cfg.max_len)?;
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

/// Pretrains the encoder and task of `cfg` on the sequences in `data` (Parquet files,
/// directories or globs; not empty), writing the run directory `out` (`config.toml`,
/// checkpoints, metrics, plot). `cfg.features` is filled in from the data (an error when it
/// was set and disagrees). Prints the data's shape and, on rank 0, the `done:` line.
pub fn pretrain(
    mut cfg: FeaturesConfig,
    data: &[String],
    out: &Path,
    opts: &RunOptions,
) -> Result<RunSummary> {
    cfg.train.validate()?;
    common::require_data(data)?;
    let device = parse_device(&cfg.train.device)?;
    let (par, device) = opts.parallel(device)?;
    let loaded = load(data, &cfg.data, None, Some(&par))?;
    let features = loaded.examples.first().map_or(0, |e| e.features);
    if cfg.features != 0 && cfg.features != features {
        return Err(TsError::Pipeline(format!(
            "the configuration says features = {} but the data has {features} per step",
            cfg.features
        )));
    }
    cfg.features = features;
    if par.is_main() {
        run_dir::write_config(out, &cfg)?;
    }
    let (store, mut task) = FeaturesTask::build(&cfg, &device)?;
    if let (FeaturesTask::Contrastive(t), true) = (&mut task, par.world > 1) {
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
    let run_config = common::config_json(&cfg)?;
    common::fit(
        &task,
        loaded.examples,
        &cfg.train,
        cfg.data.health_examples,
        RunDir {
            path: out,
            config: run_config,
            par,
            sharded: true,
        },
        opts,
        &device,
    )
}

/// Resolves `checkpoint` (a run directory or one checkpoint directory) and reads the
/// configuration stored with it.
pub fn stored_config(checkpoint: &Path) -> Result<(PathBuf, FeaturesConfig)> {
    Ok(run_dir::stored_config(checkpoint, MODALITY)?)
}

/// The task of `cfg` with the weights of checkpoint directory `ckpt`.
fn load_model(ckpt: &Path, cfg: &FeaturesConfig) -> Result<(FeaturesTask, Device)> {
    let device = parse_device(&cfg.train.device)?;
    let (store, task) = FeaturesTask::build(cfg, &device)?;
    store.load_safetensors(&ckpt.join(MODEL_FILE))?;
    Ok((task, device))
}

/// Embeds every sequence of `data` (mean-pooled) with the encoder of checkpoint directory
/// `ckpt` (configuration `cfg`, e.g. from [`stored_config`]) and writes `(id, embedding)`
/// rows to the Parquet file `out`.
pub fn embed(
    ckpt: &Path,
    cfg: &FeaturesConfig,
    data: &[String],
    out: &Path,
) -> Result<EmbedSummary> {
    let (task, device) = load_model(ckpt, cfg)?;
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
    Ok(write_embeddings(out, &loaded.ids, &emb, dim, meta)?)
}

/// What [`eval`] measured: the pretext loss and the probes of the trained encoder.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeaturesEvalReport {
    /// The checkpoint directory evaluated.
    pub checkpoint: String,
    /// Mean pretext loss over the training and test sequences (NaN, written `null`, when none).
    pub pretext_loss: f64,
    /// Linear probe test accuracy.
    pub linear_probe_accuracy: f64,
    /// The probe's chosen L2 strength.
    pub linear_probe_l2: f64,
    /// k-NN test accuracy.
    pub knn_accuracy: f64,
    /// Probe training rows.
    pub n_train: usize,
    /// Probe test rows.
    pub n_test: usize,
    /// Classes.
    pub n_classes: usize,
    /// Embedding dimension.
    pub embedding_dim: usize,
}

/// Evaluates checkpoint directory `ckpt` (configuration `cfg`): the pretext loss, and the
/// linear-probe / k-NN accuracy of its embeddings with labels from `label_column` (default
/// `data.label_column`), probed on `test` or, when it is empty, on a seeded stratified split
/// of `data`.
pub fn eval(
    ckpt: &Path,
    cfg: &FeaturesConfig,
    data: &[String],
    test: &[String],
    label_column: Option<&str>,
) -> Result<FeaturesEvalReport> {
    let (task, device) = load_model(ckpt, cfg)?;
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
        .ok_or_else(|| TsError::Pipeline(format!("no labels read from column `{label}`")))?;
    let test_emb = match &test {
        Some(t) => Some(common::embed_all(&task, &t.examples, cfg.train.batch_size, &device)?.0),
        None => None,
    };
    let test_labels = test
        .as_ref()
        .and_then(|t| t.labels.clone())
        .unwrap_or_default();
    let scores = probe_labelled(
        (&emb, &train_labels),
        test_emb.as_deref().map(|e| (e, test_labels.as_slice())),
        dim,
        cfg.train.seed,
    )?;
    Ok(FeaturesEvalReport {
        checkpoint: ckpt.display().to_string(),
        pretext_loss: loss,
        linear_probe_accuracy: scores.linear,
        linear_probe_l2: scores.l2,
        knn_accuracy: scores.knn,
        n_train: scores.n_train,
        n_test: scores.n_test,
        n_classes: scores.n_classes,
        embedding_dim: dim,
    })
}
