//! The feature-sequence pipeline: numeric feature sequences `(batch, seq, features)` from a
//! Parquet column of `list<f32|f64>` (one feature) or `list<list<f32|f64>>` (features x
//! length), trained with ssl-core's masked, contrastive or denoising task on a transformer
//! encoder.

mod config;
mod task;

use std::path::{Path, PathBuf};

use ssl_core::run_dir::{self, RunOptions, RunSummary};
use ssl_core::Parallel;
use ssl_data::EmbedSummary;

pub use config::{DataConfig, FeaturesConfig, TaskConfig, TaskKind};
pub use task::build_task;

pub use super::common::ProbeEvalReport;
use super::common::{self, truncate, Heldout, Loaded, RunDir};
use super::online_knn::online_knn;
use crate::Result;

/// The modality's name: in stored configurations and error messages.
pub const MODALITY: &str = "features";

/// Reads a data set; with `par`, this rank's share of the rows.
fn load(
    paths: &[String],
    cfg: &DataConfig,
    label_column: Option<&str>,
    par: Option<&Parallel>,
) -> Result<Loaded> {
    let table = common::read_rows(
        paths,
        &cfg.column,
        label_column,
        &cfg.id_column,
        cfg.skip_bad_rows,
        par,
        "sequences",
    )?;
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
        rows: table.row_index,
        sharded: par.is_some(),
        heldout: Vec::new(),
        heldout_labels: None,
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
    let (par, device, guard) = common::start(&cfg.train, data, out, opts)?;
    // With held-out rows and `data.label_column` in the data, the labels too (for the online
    // k-NN accuracy).
    let d = &cfg.data;
    let label = ssl_data::heldout_label_column(data, &d.label_column, d.heldout_fraction)?;
    let mut loaded = load(data, d, label.as_deref(), Some(&par))?;
    loaded.hold_out(cfg.data.heldout_fraction, cfg.train.seed)?;
    let found = loaded.examples.first().map_or(0, |e| e.features);
    let features = common::data_width("features", cfg.features, found, " per step")?;
    cfg.features = features;
    common::check_memory(
        &cfg.train,
        &loaded.examples,
        |steps| ssl_core::memory::transformer_activation_bytes(&cfg.model, steps),
        "model.dim, model.depth, model.heads",
    )?;
    // NT-Xent's negatives span every rank: each step gathers all ranks' views.
    let ranks = (par.world > 1).then(|| par.shared());
    let (store, task) = build_task(&cfg, &device, ranks)?;
    let run_config = common::store_config(out, &cfg, &par, &guard, &store)?;
    eprintln!(
        "{} sequences x {} steps (max) x {features} features; {:?} task; encoder {} parameters",
        loaded.examples.len(),
        loaded.examples.iter().map(|e| e.steps).max().unwrap_or(0),
        cfg.task.kind,
        store.num_elements()
    );
    // The online k-NN accuracy (`eval_knn_accuracy`) when the rows have labels.
    let knn = online_knn(&loaded, &par, cfg.train.seed, cfg.train.batch_size, &device);
    // NT-Xent's forward gathers every rank's views: with several ranks only the other tasks'
    // held-out loss is evaluated.
    let heldout = Heldout {
        examples: loaded.heldout,
        loss: par.world == 1 || cfg.task.kind != TaskKind::Contrastive,
        extra: knn,
    };
    common::fit(
        &task,
        loaded.examples,
        heldout,
        &cfg.train,
        cfg.data.health_examples,
        RunDir {
            path: out,
            config: run_config,
            par,
            sharded: loaded.sharded,
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
/// rows to the Parquet file `out`.
pub fn embed(
    ckpt: &Path,
    cfg: &FeaturesConfig,
    data: &[String],
    out: &Path,
) -> Result<EmbedSummary> {
    let (task, device) =
        common::load_checkpoint(ckpt, &cfg.train.device, |d| build_task(cfg, d, None))?;
    let loaded = load(data, &cfg.data, None, None)?;
    let meta = [
        ("model", "ssl-core SeqTransformerEncoder".to_string()),
        ("pooling", "mean".to_string()),
        ("task", format!("{:?}", cfg.task.kind).to_lowercase()),
    ];
    let bs = cfg.train.batch_size;
    common::write_embedded(&task, &loaded, ckpt, &meta, bs, &device, out)
}

/// What [`eval`] measured: the pretext loss and the probes of the trained encoder, beside a
/// randomly initialised one's and the majority-class rate (`encoder` and `task` are `None`,
/// and absent from its JSON).
pub type FeaturesEvalReport = ProbeEvalReport;

/// Evaluates checkpoint directory `ckpt` (configuration `cfg`): the pretext loss, and the
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
        |p| load(p, &cfg.data, Some(label), None),
    )
}
