//! The time-series pipeline: series from Parquet (one per row, or one long series per column
//! cut into windows), a selectable encoder (PatchTST, TS2Vec's dilated convolutions, GRU,
//! LSTM, transformer) and a pretext task (TS2Vec contrastive, masked reconstruction,
//! forecasting), with classification probes and forecast evaluation.

mod config;
mod finetune;
mod heldout;
mod load;
mod task;

use std::path::{Path, PathBuf};

use serde::Serialize;
use ssl_core::run_dir::{self, RunOptions, RunSummary};
use ssl_data::EmbedSummary;

pub use config::{
    auto_max_steps, DataConfig, EvalConfig, SeriesPreset, TaskConfig, TaskKind, TimeseriesConfig,
    AUTO_STEPS_VALUES,
};
pub use finetune::{
    finetune, finetune_config, finetune_encoder, finetune_run_dir, SeriesFinetuneEncoder,
};
pub use task::{build_forecast, build_task};

use candle_core::Device;
use ssl_core::seq::{SeqBatch, SeqExample};
use ssl_core::{Parallel, ParamStore, PretextTask};

pub use super::common::ProbeEvalReport;
use super::common::{self, Heldout, RunDir};
use super::online_knn::online_knn;
use crate::{ForecastScorer, HorizonReport, Result, Split};
use heldout::forecast_errors;
pub use load::normalization;
use load::{long_windows, measure_normalization, prepare_long, rows_spec, Part};

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
    let (par, device, guard) = common::start(&cfg.train, data, out, opts)?;
    // With held-out rows and `data.label_column` in one-series-per-row data, the labels too
    // (for the online k-NN accuracy).
    let label = if cfg.data.long_column.is_empty() && cfg.task.kind != TaskKind::Forecast {
        ssl_data::heldout_label_column(data, &cfg.data.label_column, cfg.data.heldout_fraction)?
    } else {
        None
    };
    // `data.normalize = "channel"`: the training data's statistics, stored with the run.
    measure_normalization(data, &mut cfg, &par)?;
    let mut prep = if cfg.data.long_column.is_empty() {
        common::prepare_rows(
            data,
            &rows_spec(&cfg, label.as_deref())?,
            &cfg.train,
            cfg.data.health_examples,
            &par,
            &device,
        )?
    } else {
        prepare_long(data, &cfg, &cfg.train, &par, &device)?
    };
    let channels = common::data_width("channels", cfg.channels, prep.width, "")?;
    cfg.channels = channels;
    common::check_memory(
        &cfg.train,
        prep.longest,
        |steps| {
            // TS2Vec contrasts every timestep with every other one at each scale.
            let temporal = match cfg.task.kind {
                TaskKind::Ts2vec => ssl_core::memory::product_bytes(&[steps, steps, 16]),
                _ => 0,
            };
            cfg.model
                .activation_bytes(steps, channels as u64)
                .saturating_add(temporal)
        },
        "the encoder's size (model.kind and its section) and, for TS2Vec, its square",
    )?;
    common::apply_epochs(&mut cfg.train, prep.examples_per_epoch, &par);
    common::apply_auto_steps(&mut cfg.train, prep.values, &par)?;
    // The online k-NN accuracy (`eval_knn_accuracy`) when the rows have labels.
    let knn = online_knn(
        prep.knn.take(),
        label.is_some(),
        &par,
        cfg.train.batch_size,
        &device,
    );
    let examples = std::mem::take(&mut prep.heldout);
    if cfg.task.kind == TaskKind::Forecast && cfg.data.heldout_fraction > 0.0 {
        // The forecaster typed (the same parameters as `build_task` makes), for the held-out
        // forecast errors against the naive forecast.
        let (store, task) = build_forecast(&cfg, &device, cfg.train.seed)?;
        let (bs, dev) = (cfg.train.batch_size, device.clone());
        let heldout = Heldout {
            examples,
            loss: true,
            extra: Some(Box::new(move |par, task, held| {
                forecast_errors(par, task, held, bs, &dev)
            })),
        };
        return train(
            &task, &store, &cfg, prep, heldout, par, device, guard, out, opts,
        );
    }
    // The instance terms' negatives span every rank: each step gathers all ranks' views.
    let ranks = (par.world > 1).then(|| par.shared());
    let (store, task) = build_task(&cfg, &device, cfg.train.seed, ranks)?;
    let heldout = Heldout {
        examples,
        loss: par.world == 1 || cfg.task.kind != TaskKind::Ts2vec,
        extra: knn,
    };
    train(
        &task, &store, &cfg, prep, heldout, par, device, guard, out, opts,
    )
}

/// Stores the configuration and trains `task` (parameters in `store`) on `prep`'s stream,
/// evaluating `heldout` while it trains.
#[allow(clippy::too_many_arguments)]
fn train<T: PretextTask<Batch = SeqBatch>>(
    task: &T,
    store: &ParamStore,
    cfg: &TimeseriesConfig,
    mut prep: common::Prepared,
    heldout: Heldout<'_, T>,
    par: Parallel,
    device: Device,
    guard: run_dir::RunDir,
    out: &Path,
    opts: &RunOptions,
) -> Result<RunSummary> {
    let run_config = common::store_config(out, cfg, &par, &guard, store)?;
    eprintln!(
        "{} x {} steps (max) x {} channels; {:?} encoder, {:?} task; {} parameters",
        prep.what,
        prep.longest,
        cfg.channels,
        cfg.model.kind,
        cfg.task.kind,
        store.num_elements()
    );
    common::fit(
        task,
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
pub fn stored_config(checkpoint: &Path) -> Result<(PathBuf, TimeseriesConfig)> {
    Ok(run_dir::stored_config(checkpoint, MODALITY)?)
}

/// The normalisation stored with the run of `checkpoint` (a run directory or one checkpoint
/// directory): what [`embed`] and [`eval`] apply to each series before the encoder sees it
/// (`data.normalize` with the channel statistics measured at pretraining), for any other
/// reader of data for that run (e.g. fine-tuning) to apply alike with
/// [`Normalization::apply`](crate::Normalization::apply).
pub fn stored_normalization(checkpoint: &Path) -> Result<crate::Normalization> {
    let (_, cfg) = stored_config(checkpoint)?;
    normalization(&cfg)
}

/// Embeds every series (or window of a long series) of `data` with the encoder of checkpoint
/// directory `ckpt` (configuration `cfg`, e.g. from [`stored_config`]) and writes
/// `(id, embedding)` rows to the Parquet file `out`, streaming: series are read in file order
/// (a long series' windows cut block by block) and written in row groups as they are embedded,
/// in constant memory for any row count.
pub fn embed(
    ckpt: &Path,
    cfg: &TimeseriesConfig,
    data: &[String],
    out: &Path,
) -> Result<EmbedSummary> {
    let seed = cfg.train.seed;
    let (task, device) =
        common::load_checkpoint(ckpt, &cfg.train.device, |d| build_task(cfg, d, seed, None))?;
    let meta = [
        (
            "model",
            format!("ssl-timeseries {:?}", cfg.model.kind).to_lowercase(),
        ),
        ("task", format!("{:?}", cfg.task.kind).to_lowercase()),
    ];
    let bs = cfg.train.batch_size;
    if cfg.data.long_column.is_empty() {
        let spec = rows_spec(cfg, None)?;
        return common::embed_rows(
            &task,
            data,
            |s| spec.transform(s, Split::All),
            &cfg.data.id_column,
            ckpt,
            &meta,
            bs,
            &device,
            out,
        );
    }
    // A long series: every window, in order (ids `window:i`, i counting the windows kept).
    let windows = long_windows(data, cfg, Part::All)?;
    let mut writer = common::EmbedOut::new(out, ckpt, &meta);
    let bar = ssl_core::monitor::Progress::task("embed", windows.count() as u64, "windows");
    let mut n = 0usize;
    windows.for_each_chunk(
        bs,
        |_| true,
        |chunk| {
            let refs: Vec<&SeqExample> = chunk.iter().map(|(_, e)| e).collect();
            let ids: Vec<String> = (n..n + chunk.len())
                .map(|i| format!("window:{i}"))
                .collect();
            writer.write(&task, &refs, &ids, &device)?;
            n += chunk.len();
            if let Some((k, _)) = chunk.last() {
                bar.set_position(*k as u64 + 1);
            }
            Ok(true)
        },
    )?;
    bar.finish();
    writer.finish()
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

/// Evaluates checkpoint directory `ckpt` (configuration `cfg`). Forecasting runs on a long
/// series are scored on its held-out end against naive baselines; otherwise the pretext loss
/// and linear-probe / k-NN accuracy of the trained encoder and of a randomly initialised one
/// (the data read in one streaming pass; only the embeddings and labels are held),
/// with labels from `label_column` (default `data.label_column`), probed on `test` or, when
/// it is empty, on a seeded stratified split of `data`.
pub fn eval(
    ckpt: &Path,
    cfg: &TimeseriesConfig,
    data: &[String],
    test: &[String],
    label_column: Option<&str>,
) -> Result<TimeseriesEvalReport> {
    let checkpoint = ckpt.display().to_string();
    let seed = cfg.train.seed;
    let bs = cfg.train.batch_size;
    if cfg.task.kind == TaskKind::Forecast && !cfg.data.long_column.is_empty() {
        let (task, _) =
            common::load_checkpoint(ckpt, &cfg.train.device, |d| build_forecast(cfg, d, seed))?;
        // The test end's windows, streamed block by block into the running errors.
        let windows = long_windows(data, cfg, Part::Test)?;
        let mut scorer = ForecastScorer::new(&task, &cfg.eval.horizons, cfg.eval.season)?;
        let bar = ssl_core::monitor::Progress::task("eval", windows.count() as u64, "windows");
        let mut test_windows = 0usize;
        windows.for_each_chunk(
            bs,
            |_| true,
            |chunk| {
                let examples: Vec<SeqExample> = chunk.into_iter().map(|(_, e)| e).collect();
                scorer.add(&task, &examples)?;
                test_windows += examples.len();
                bar.set_position(test_windows as u64);
                Ok(true)
            },
        )?;
        bar.finish();
        let horizons = scorer.finish();
        return Ok(TimeseriesEvalReport::Forecast(ForecastEvalReport {
            checkpoint,
            test_windows,
            horizons,
        }));
    }
    let label = label_column.unwrap_or(&cfg.data.label_column);
    let report = common::probe_eval(
        ckpt,
        &cfg.train,
        |d| build_task(cfg, d, seed, None),
        // Fresh weights from another seed than the run started with.
        |d| build_task(cfg, d, seed.wrapping_add(1), None),
        data,
        test,
        label,
        |s, label| rows_spec(cfg, Some(label))?.transform(s, Split::All),
    )?;
    Ok(TimeseriesEvalReport::Probe(ProbeEvalReport {
        encoder: Some(format!("{:?}", cfg.model.kind).to_lowercase()),
        task: Some(format!("{:?}", cfg.task.kind).to_lowercase()),
        ..report
    }))
}
