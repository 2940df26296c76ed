//! The feature-sequence pipeline: numeric feature sequences `(batch, seq, features)` from a
//! Parquet column of `list<f32|f64>` (one feature) or `list<list<f32|f64>>` (features x
//! length), trained with ssl-core's masked, contrastive or denoising task on a transformer
//! encoder.

mod config;
mod task;

use std::path::{Path, PathBuf};

use ssl_core::run_dir::{self, RunOptions, RunSummary};
use ssl_data::EmbedSummary;

pub use config::{DataConfig, FeaturesConfig, FeaturesModel, FeaturesPreset, TaskConfig, TaskKind};
pub use task::build_task;

pub use super::common::ProbeEvalReport;
use super::common::{self, Heldout, RowsSpec, RunDir};
use super::online_knn::online_knn;
use crate::{Normalization, Result, Split};

/// The modality's name: in stored configurations and error messages.
pub const MODALITY: &str = "features";

/// How the pipeline reads its sequences (labels from `label_column` when given), scaled by
/// `normalization`.
fn rows_spec_with(
    cfg: &FeaturesConfig,
    label_column: Option<&str>,
    normalization: Normalization,
) -> RowsSpec {
    let d = &cfg.data;
    RowsSpec {
        column: d.column.clone(),
        label_column: label_column.map(str::to_string),
        max_len: d.max_len,
        normalization,
        windows: None,
        skip_bad_rows: d.skip_bad_rows,
        heldout_fraction: d.heldout_fraction,
        seed: cfg.train.seed,
        shuffle_buffer_mb: d.shuffle_buffer_mb,
    }
}

/// How the pipeline reads its sequences, scaled as `data.normalize` says.
fn rows_spec(cfg: &FeaturesConfig, label_column: Option<&str>) -> Result<RowsSpec> {
    Ok(rows_spec_with(cfg, label_column, normalization(cfg)?))
}

/// What is done to each sequence that `cfg`'s model reads: `data.normalize` with the stored
/// per-feature statistics (an error for `"channel"` without them: a configuration never
/// pretrained).
pub fn normalization(cfg: &FeaturesConfig) -> Result<Normalization> {
    let d = &cfg.data;
    Normalization::resolve(d.normalize, &d.channel_mean, &d.channel_std, "data")
}

/// The normalisation stored with the run of `checkpoint` (a run directory or one checkpoint
/// directory), as [`embed`] and [`eval`] apply it.
pub fn stored_normalization(checkpoint: &Path) -> Result<Normalization> {
    let (_, cfg) = stored_config(checkpoint)?;
    normalization(&cfg)
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
    let (par, device, guard) = common::start(&cfg.train, data, out, opts)?;
    // With held-out rows and `data.label_column` in the data, the labels too (for the online
    // k-NN accuracy).
    let d = &cfg.data;
    let label = ssl_data::heldout_label_column(data, &d.label_column, d.heldout_fraction)?;
    // `data.normalize = "channel"`: the training data's statistics, stored with the run.
    if let Some(stats) = super::stats::channel_stats_for_run(
        d.normalize,
        (&d.channel_mean, &d.channel_std),
        "data",
        data,
        &rows_spec_with(&cfg, None, Normalization::None),
        d.stats_series,
        &par,
    )? {
        cfg.data.channel_mean = stats.mean;
        cfg.data.channel_std = stats.std;
    }
    let spec = rows_spec(&cfg, label.as_deref())?;
    let mut prep = common::prepare_rows(
        data,
        &spec,
        &cfg.train,
        cfg.data.health_examples,
        &par,
        &device,
    )?;
    let features = common::data_width("features", cfg.features, prep.width, " per step")?;
    cfg.features = features;
    common::check_memory(
        &cfg.train,
        prep.longest,
        |steps| ssl_core::memory::transformer_activation_bytes(&cfg.model, steps),
        "model.dim, model.depth, model.heads",
    )?;
    common::apply_epochs(&mut cfg.train, prep.examples_per_epoch, &par);
    // NT-Xent's negatives span every rank: each step gathers all ranks' views.
    let ranks = (par.world > 1).then(|| par.shared());
    let (store, task) = build_task(&cfg, &device, ranks)?;
    let run_config = common::store_config(out, &cfg, &par, &guard, &store)?;
    eprintln!(
        "{} x {} steps (max) x {features} features; {:?} task; encoder {} parameters",
        prep.what.replace("series", "sequences"),
        prep.longest,
        cfg.task.kind,
        store.num_elements()
    );
    // The online k-NN accuracy (`eval_knn_accuracy`) when the rows have labels.
    let knn = online_knn(
        prep.knn.take(),
        label.is_some(),
        &par,
        cfg.train.batch_size,
        &device,
    );
    // NT-Xent's forward gathers every rank's views: with several ranks only the other tasks'
    // held-out loss is evaluated.
    let heldout = Heldout {
        examples: std::mem::take(&mut prep.heldout),
        loss: par.world == 1 || cfg.task.kind != TaskKind::Contrastive,
        extra: knn,
    };
    common::fit(
        &task,
        prep.source.as_mut(),
        &prep.health,
        heldout,
        &cfg.train,
        RunDir {
            path: out,
            config: run_config,
            par,
            sharded: prep.heldout_sharded,
            guard,
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

/// Embeds every sequence of `data` (mean-pooled) with the encoder of checkpoint directory
/// `ckpt` (configuration `cfg`, e.g. from [`stored_config`]) and writes `(id, embedding)`
/// rows to the Parquet file `out`, streaming: rows are read in file order and written in row
/// groups as they are embedded (constant memory for any row count).
pub fn embed(
    ckpt: &Path,
    cfg: &FeaturesConfig,
    data: &[String],
    out: &Path,
) -> Result<EmbedSummary> {
    let (task, device) =
        common::load_checkpoint(ckpt, &cfg.train.device, |d| build_task(cfg, d, None))?;
    let meta = [
        ("model", "ssl-core SeqTransformerEncoder".to_string()),
        ("pooling", "mean".to_string()),
        ("task", format!("{:?}", cfg.task.kind).to_lowercase()),
    ];
    let spec = rows_spec(cfg, None)?;
    common::embed_rows(
        &task,
        data,
        |s| spec.transform(s, Split::All),
        &cfg.data.id_column,
        ckpt,
        &meta,
        cfg.train.batch_size,
        &device,
        out,
    )
}

/// What [`eval`] measured: the pretext loss and the probes of the trained encoder, beside a
/// randomly initialised one's and the majority-class rate (`encoder` and `task` are `None`,
/// and absent from its JSON).
pub type FeaturesEvalReport = ProbeEvalReport;

/// Evaluates checkpoint directory `ckpt` (configuration `cfg`), reading `data` and `test` in
/// one streaming pass each and holding only the embeddings (N x D) and labels: the pretext
/// loss, and the
/// linear-probe / k-NN accuracy of its embeddings with labels from `label_column` (default
/// `data.label_column`), probed on `test` or, when it is empty, on a seeded stratified split
/// of `data`; the same probes of a randomly initialised encoder (seeded by `train.seed`, as
/// the run started), and the majority-class rate.
pub fn eval(
    ckpt: &Path,
    cfg: &FeaturesConfig,
    data: &[String],
    test: &[String],
    label_column: Option<&str>,
) -> Result<FeaturesEvalReport> {
    let label = label_column.unwrap_or(&cfg.data.label_column);
    common::probe_eval(
        ckpt,
        &cfg.train,
        |d| build_task(cfg, d, None),
        |d| build_task(cfg, d, None),
        data,
        test,
        label,
        |s, label| rows_spec(cfg, Some(label))?.transform(s, Split::All),
    )
}
