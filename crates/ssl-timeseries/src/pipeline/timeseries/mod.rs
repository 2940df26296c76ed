//! The time-series pipeline: series from Parquet (one per row, or one long series per column
//! cut into windows), a selectable encoder (PatchTST, TS2Vec's dilated convolutions, GRU,
//! LSTM, transformer) and a pretext task (TS2Vec contrastive, masked reconstruction,
//! forecasting), with classification probes and forecast evaluation.

mod config;
mod load;
mod task;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::Serialize;
use ssl_core::checkpoint::MODEL_FILE;
use ssl_core::parse_device;
use ssl_core::probe::{probe_labelled, ProbeScores};
use ssl_core::run_dir::{self, RunOptions, RunSummary};
use ssl_core::seq::SeqExample;

pub use config::{DataConfig, EvalConfig, TaskConfig, TaskKind, TimeseriesConfig};
pub use task::TimeseriesTask;

use super::common::{self, RunDir};
use crate::{evaluate_forecast, HorizonReport, Result, TsError};
use load::{load, Part};
use ssl_data::{write_embeddings, EmbedSummary};

/// The modality's name: in stored configurations and error messages.
pub const MODALITY: &str = "timeseries";

/// Pretrains the encoder and task of `cfg` on the series in `data` (Parquet files,
/// directories or globs; not empty), writing the run directory `out` (`config.toml`,
/// checkpoints, metrics, plot). `cfg.channels` is filled in from the data (an error when it
/// was set and disagrees). Prints the data's shape and, on rank 0, the `done:` line.
pub fn pretrain(
    mut cfg: TimeseriesConfig,
    data: &[String],
    out: &Path,
    opts: &RunOptions,
) -> Result<RunSummary> {
    cfg.train.validate()?;
    common::require_data(data)?;
    let device = parse_device(&cfg.train.device)?;
    let (par, device) = opts.parallel(device)?;
    let loaded = load(data, &cfg, None, Part::Train, Some(&par))?;
    let channels = loaded.examples.first().map_or(0, |e| e.features);
    if cfg.channels != 0 && cfg.channels != channels {
        return Err(TsError::Pipeline(format!(
            "the configuration says channels = {} but the data has {channels}",
            cfg.channels
        )));
    }
    cfg.channels = channels;
    if par.is_main() {
        run_dir::write_config(out, &cfg)?;
    }
    let (store, mut task) = TimeseriesTask::build(&cfg, &device, cfg.train.seed)?;
    if let (TimeseriesTask::Ts2vec(t), true) = (&mut task, par.world > 1) {
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
            sharded: loaded.sharded,
        },
        opts,
        &device,
    )
}

/// Resolves `checkpoint` (a run directory or one checkpoint directory) and reads the
/// configuration stored with it.
pub fn stored_config(checkpoint: &Path) -> Result<(PathBuf, TimeseriesConfig)> {
    Ok(run_dir::stored_config(checkpoint, MODALITY)?)
}

/// The task of `cfg` with the weights of checkpoint directory `ckpt`.
fn load_model(ckpt: &Path, cfg: &TimeseriesConfig) -> Result<(TimeseriesTask, Device)> {
    let device = parse_device(&cfg.train.device)?;
    let (store, task) = TimeseriesTask::build(cfg, &device, cfg.train.seed)?;
    store.load_safetensors(&ckpt.join(MODEL_FILE))?;
    Ok((task, device))
}

/// Embeds every series (or window of a long series) of `data` with the encoder of checkpoint
/// directory `ckpt` (configuration `cfg`, e.g. from [`stored_config`]) and writes
/// `(id, embedding)` rows to the Parquet file `out`.
pub fn embed(
    ckpt: &Path,
    cfg: &TimeseriesConfig,
    data: &[String],
    out: &Path,
) -> Result<EmbedSummary> {
    let (task, device) = load_model(ckpt, cfg)?;
    let loaded = load(data, cfg, None, Part::All, None)?;
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
    Ok(write_embeddings(out, &loaded.ids, &emb, dim, meta)?)
}

/// What [`eval`] measured: a forecast report or a probe report.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum TimeseriesEvalReport {
    /// A forecasting run on a long series, scored on its held-out end.
    Forecast(ForecastEvalReport),
    /// Pretext loss and probes of the trained and of a randomly initialised encoder.
    Probe(ProbeEvalReport),
}

/// Forecast errors on the held-out end of a long series, against naive baselines.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ForecastEvalReport {
    /// The checkpoint directory evaluated.
    pub checkpoint: String,
    /// Test windows scored.
    pub test_windows: usize,
    /// Errors per lead time.
    pub horizons: Vec<HorizonReport>,
}

/// Pretext loss and linear-probe / k-NN accuracy of the trained encoder and of the same
/// architecture with fresh weights (what pretraining adds).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeEvalReport {
    /// The checkpoint directory evaluated.
    pub checkpoint: String,
    /// The encoder kind (`tcn`, `patchtst`...).
    pub encoder: String,
    /// The task kind (`ts2vec`, `masked`, `forecast`).
    pub task: String,
    /// Mean pretext loss over the training and test series (NaN, written `null`, when none).
    pub pretext_loss: f64,
    /// Linear probe test accuracy of the trained encoder.
    pub linear_probe_accuracy: f64,
    /// The probe's chosen L2 strength.
    pub linear_probe_l2: f64,
    /// k-NN test accuracy of the trained encoder.
    pub knn_accuracy: f64,
    /// Linear probe test accuracy of a randomly initialised encoder.
    pub random_init_linear_probe_accuracy: f64,
    /// k-NN test accuracy of a randomly initialised encoder.
    pub random_init_knn_accuracy: f64,
    /// Probe training rows.
    pub n_train: usize,
    /// Probe test rows.
    pub n_test: usize,
    /// Classes.
    pub n_classes: usize,
    /// Embedding dimension.
    pub embedding_dim: usize,
}

/// Evaluates checkpoint directory `ckpt` (configuration `cfg`). Forecasting runs on a long
/// series are scored on its held-out end against naive baselines; otherwise the pretext loss
/// and linear-probe / k-NN accuracy of the trained encoder and of a randomly initialised one,
/// with labels from `label_column` (default `data.label_column`), probed on `test` or, when
/// it is empty, on a seeded stratified split of `data`.
pub fn eval(
    ckpt: &Path,
    cfg: &TimeseriesConfig,
    data: &[String],
    test: &[String],
    label_column: Option<&str>,
) -> Result<TimeseriesEvalReport> {
    let (task, device) = load_model(ckpt, cfg)?;
    let checkpoint = ckpt.display().to_string();
    if let (TimeseriesTask::Forecast(f), false) = (&task, cfg.data.long_column.is_empty()) {
        let test_windows = load(data, cfg, None, Part::Test, None)?.examples;
        let horizons = evaluate_forecast(
            f,
            &test_windows,
            &cfg.eval.horizons,
            cfg.eval.season,
            cfg.train.batch_size,
        )?;
        return Ok(TimeseriesEvalReport::Forecast(ForecastEvalReport {
            checkpoint,
            test_windows: test_windows.len(),
            horizons,
        }));
    }
    let label = label_column.unwrap_or(&cfg.data.label_column).to_string();
    let train = load(data, cfg, Some(&label), Part::All, None)?;
    let test = if test.is_empty() {
        None
    } else {
        Some(load(test, cfg, Some(&label), Part::All, None)?)
    };
    let mut sets: Vec<&[SeqExample]> = vec![&train.examples];
    sets.extend(test.iter().map(|t| t.examples.as_slice()));
    let loss = common::pretext_loss(&task, &sets, cfg.train.batch_size, &device)?;
    let train_labels = train
        .labels
        .clone()
        .ok_or_else(|| TsError::Pipeline(format!("no labels read from column `{label}`")))?;
    let test_labels = test
        .as_ref()
        .and_then(|t| t.labels.clone())
        .unwrap_or_default();
    let score = |task: &TimeseriesTask| -> Result<(ProbeScores, usize)> {
        let (emb, dim) = common::embed_all(task, &train.examples, cfg.train.batch_size, &device)?;
        let test_emb = match &test {
            Some(t) => Some(common::embed_all(task, &t.examples, cfg.train.batch_size, &device)?.0),
            None => None,
        };
        let s = probe_labelled(
            (&emb, &train_labels),
            test_emb.as_deref().map(|e| (e, test_labels.as_slice())),
            dim,
            cfg.train.seed,
        )?;
        Ok((s, dim))
    };
    let (trained, dim) = score(&task)?;
    // The same architecture with fresh weights: what pretraining adds.
    let (_, random_task) = TimeseriesTask::build(cfg, &device, cfg.train.seed.wrapping_add(1))?;
    let (random, _) = score(&random_task)?;
    Ok(TimeseriesEvalReport::Probe(ProbeEvalReport {
        checkpoint,
        encoder: format!("{:?}", cfg.model.kind).to_lowercase(),
        task: format!("{:?}", cfg.task.kind).to_lowercase(),
        pretext_loss: loss,
        linear_probe_accuracy: trained.linear,
        linear_probe_l2: trained.l2,
        knn_accuracy: trained.knn,
        random_init_linear_probe_accuracy: random.linear,
        random_init_knn_accuracy: random.knn,
        n_train: trained.n_train,
        n_test: trained.n_test,
        n_classes: trained.n_classes,
        embedding_dim: dim,
    }))
}
