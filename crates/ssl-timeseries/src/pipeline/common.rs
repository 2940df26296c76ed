//! What the sequence pipelines ([`super::timeseries`], [`super::features`]) share: the start
//! of a run (device, ranks, stored configuration), streaming one sequence per row (the pass
//! before training that reads a sample, the health and held-out examples; the trainer's
//! [`SeriesRowSource`]), the training run, embedding written as computed, the pretext loss and
//! probes of a checkpoint read in one pass.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use serde::Serialize;
use serde_json::Value;
use ssl_core::checkpoint::MODEL_FILE;
use ssl_core::probe::{probe_labelled, svm_labelled, warn_unseen_labels, ProbeScores};
use ssl_core::run_dir::{self, RunOptions, RunSummary};
use ssl_core::seq::{SeqBatch, SeqExample};
use ssl_core::{
    heldout_task_loss, parse_device, BatchSource, Ctx, EvalFigures, HeldoutEval, HookCtx, Parallel,
    ParamStore, PretextTask, SslRng, TrainConfig, TrainHook,
};
use ssl_data::{
    ColumnSpec, EmbedSummary, EmbeddingWriter, LoaderConfig, ParquetSource, StreamPosition,
};

use crate::{
    row_stream, shuffle_rows, Normalization, Result, RowExample, RowLocator, RowTransform,
    SeriesRowSource, Split, TsError,
};

/// Checks `data.heldout_fraction`: in [0, 1).
pub(crate) fn check_heldout_fraction(fraction: f64) -> Result<()> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(TsError::Config(format!(
            "data.heldout_fraction = {fraction}: must be in [0, 1)"
        )));
    }
    Ok(())
}

/// Figures computed on the held-out examples beyond the task's loss (the forecast errors):
/// given the data-parallel context, the live task and this rank's held-out examples; every
/// rank calls it and it returns the same figures everywhere (sums over ranks).
pub type ExtraEval<'a, T> =
    Box<dyn FnMut(&Parallel, &T, &[SeqExample]) -> ssl_core::Result<EvalFigures> + 'a>;

/// What a run evaluates while it trains, every `train.eval_every_steps` and at the end (see
/// [`fit`]): `eval_loss`, the task's loss on held-out examples, and any further figures.
pub struct Heldout<'a, T> {
    /// The held-out examples (`data.heldout_fraction`): this rank's share when the run's
    /// examples are sharded, else every rank's, of which [`fit`] keeps its share. None: no
    /// evaluation.
    pub examples: Vec<SeqExample>,
    /// Whether the task's loss is evaluated: false for a task that gathers every rank's views
    /// in its forward pass when there are several ranks (ranks hold different numbers of
    /// held-out batches, so the collective would not line up).
    pub loss: bool,
    /// Further figures (logged as `eval_<name>`).
    pub extra: Option<ExtraEval<'a, T>>,
}

impl<T> Heldout<'_, T> {
    /// No held-out evaluation.
    pub fn none() -> Self {
        Heldout {
            examples: Vec::new(),
            loss: false,
            extra: None,
        }
    }
}

/// The start of a pretraining run on `data` (not empty) with `train` into `out`: the settings
/// checked, the ranks, this rank's device and the run directory, checked and locked before
/// anything is written.
pub(crate) fn start(
    train: &TrainConfig,
    data: &[String],
    out: &Path,
    opts: &RunOptions,
) -> Result<(Parallel, Device, run_dir::RunDir)> {
    train.validate()?;
    if data.is_empty() {
        return Err(TsError::InvalidInput(
            "no data given: pass Parquet files, directories or globs".into(),
        ));
    }
    let device = parse_device(&train.device)?;
    let (par, device) = opts.parallel(device)?;
    let guard = opts.run_dir(out, &par)?;
    Ok((par, device, guard))
}

/// Refuses, before the model and batches are allocated, a run whose longest series would
/// need more memory than the machine has available (or `train.max_memory_gb`): a batch of
/// `train.batch_size` series of `steps` steps (the longest of the sample read before
/// training, see [`prepare_rows`]), each taking `per_series(steps)` bytes. `keys` names the
/// model settings the estimate grows with.
pub(crate) fn check_memory(
    train: &TrainConfig,
    steps: usize,
    per_series: impl Fn(u64) -> u64,
    keys: &str,
) -> Result<()> {
    let steps = steps as u64;
    let batch = train.batch_size as u64;
    let estimate = ssl_core::memory::product_bytes(&[batch, per_series(steps)]);
    Ok(ssl_core::memory::check_fits(
        estimate,
        &format!("a training batch of {batch} series of {steps} steps"),
        &format!("train.batch_size x the longest series (data.max_len truncates) x {keys}"),
        train.memory_limit(),
    )?)
}

/// The width of the data (`found`, e.g. channels) where the configuration's `key` says
/// `configured` (0: whatever the data has): an error when they disagree.
pub(crate) fn data_width(key: &str, configured: usize, found: usize, unit: &str) -> Result<usize> {
    if configured != 0 && configured != found {
        return Err(TsError::Pipeline(format!(
            "the configuration says {key} = {configured} but the data has {found}{unit}"
        )));
    }
    Ok(found)
}

/// Rank 0 writes `cfg` to the run directory `out`, once the model in `store` is known to match
/// the checkpoint a resumed run continues from; every rank returns it as JSON (stored with
/// every checkpoint).
pub(crate) fn store_config<T: Serialize>(
    out: &Path,
    cfg: &T,
    par: &Parallel,
    guard: &run_dir::RunDir,
    store: &ParamStore,
) -> Result<Value> {
    guard.check_params(store)?;
    if par.is_main() {
        run_dir::write_config(out, cfg)?;
    }
    serde_json::to_value(cfg).map_err(|e| TsError::Pipeline(e.to_string()))
}

/// At most this many held-out examples are evaluated while training (over every rank): the
/// held-out rows met first in file order (a long series: windows spread evenly over its
/// held-out end), so the held-out set is read in constant memory.
pub const MAX_HELDOUT_EXAMPLES: usize = 4096;

/// Series of the sample read before training (the longest sets the memory check, the first
/// sets the width and the shuffle window's bytes per row).
const SAMPLE_EXAMPLES: usize = 256;

/// How a pipeline reads one series per row.
#[derive(Debug, Clone)]
pub(crate) struct RowsSpec {
    /// The series column.
    pub column: String,
    /// The label column, when labels are read.
    pub label_column: Option<String>,
    /// Truncate series to this many steps (0: no limit).
    pub max_len: usize,
    /// How each series is scaled (`data.normalize` resolved with the run's statistics).
    pub normalization: Normalization,
    /// Forecasting on rows: every window `(len, stride)` of each row.
    pub windows: Option<(usize, usize)>,
    /// Skip (and count) bad rows.
    pub skip_bad_rows: bool,
    /// `data.heldout_fraction`.
    pub heldout_fraction: f64,
    /// The held-out split's seed (`train.seed`).
    pub seed: u64,
    /// `data.shuffle_buffer_mb`.
    pub shuffle_buffer_mb: f64,
}

impl RowsSpec {
    /// The transform of `source`'s batches keeping `split`.
    pub fn transform(&self, source: &ParquetSource, split: Split) -> Result<RowTransform> {
        Ok(RowTransform {
            column: self.column.clone(),
            label_column: self.label_column.clone(),
            max_len: self.max_len,
            normalization: self.normalization.clone(),
            windows: self.windows,
            heldout: (self.seed, self.heldout_fraction),
            split,
            skip_bad_rows: self.skip_bad_rows,
            locator: Arc::new(RowLocator::new(source)?),
            skipped: Arc::new(AtomicUsize::new(0)),
        })
    }
}

/// A loader in file order, one pass, over this rank's share (`rank`, `world`) of `columns`.
pub(crate) fn ordered_loader(
    columns: Vec<ColumnSpec>,
    batch: usize,
    rank: usize,
    world: usize,
    skip_bad_rows: bool,
) -> LoaderConfig {
    LoaderConfig {
        batch_size: batch.max(1),
        shuffle: false,
        // Without shuffling, one row group at a time.
        shuffle_buffer: 1,
        epochs: Some(1),
        rank,
        world_size: world,
        skip_bad_rows,
        ..LoaderConfig::new(columns)
    }
}

/// Calls `f` with the examples of `paths` (one series per row, read by `transform` in file
/// order), `batch` at a time, while it returns true; with a progress line every couple of
/// seconds when the pass takes longer (`what` names it).
pub(crate) fn rows_pass(
    paths: &[String],
    transform: impl FnOnce(&ParquetSource) -> Result<RowTransform>,
    id_column: &str,
    batch: usize,
    what: &str,
    mut f: impl FnMut(Vec<RowExample>) -> Result<bool>,
) -> Result<()> {
    let source = ParquetSource::open(paths)?;
    let transform = transform(&source)?;
    let loader = ordered_loader(
        transform.columns(id_column),
        batch,
        0,
        1,
        transform.skip_bad_rows,
    );
    let mut stream = row_stream(&source, loader, StreamPosition::default(), transform)?;
    let bar = ssl_core::monitor::Progress::task(what, source.num_rows() as u64, "rows");
    loop {
        let examples = stream.take(batch.max(1))?;
        if examples.is_empty() {
            break;
        }
        if let Some(last) = examples.last() {
            bar.set_position(last.row as u64 + 1);
        }
        if !f(examples)? {
            break;
        }
    }
    bar.finish();
    Ok(())
}

/// What a streaming pretraining run knows before its first step.
pub(crate) struct Prepared {
    /// The trainer's batches.
    pub source: Box<dyn BatchSource<SeqBatch>>,
    /// The first training examples (for embedding health).
    pub health: Vec<SeqExample>,
    /// Held-out examples (at most [`MAX_HELDOUT_EXAMPLES`] over the ranks).
    pub heldout: Vec<SeqExample>,
    /// `heldout` is this rank's share already (else every rank holds them all).
    pub heldout_sharded: bool,
    /// The online k-NN's bank (training examples and their labels) and the held-out labels,
    /// when labels were read.
    pub knn: Option<(Vec<SeqExample>, Vec<String>, Vec<String>)>,
    /// Channels (features) per step, from the first example.
    pub width: usize,
    /// The longest example of the sample (steps).
    pub longest: usize,
    /// Examples (training) per epoch over every rank: from the footers' row counts.
    pub examples_per_epoch: u64,
    /// The training data's size in values as TS2Vec counts it (series x steps x channels of
    /// the series windows are cut from, not of the overlapping windows): the input of
    /// [`super::timeseries::auto_max_steps`].
    pub values: u64,
    /// What the examples are, for the printed summary ("N series").
    pub what: String,
}

/// Prepares a streaming run on one-series-per-row data: one ordered pass over this rank's
/// share reads a sample (the width, the longest series, the bytes of a row), the first
/// `health` training examples, the held-out examples (up to this rank's part of
/// [`MAX_HELDOUT_EXAMPLES`]) and, with labels in one process, the online k-NN's bank (the first
/// [`ssl_core::probe::KNN_BANK_MAX`] training examples); it stops as soon as it has them. Then
/// the training source: an endless shuffled stream of this rank's row groups.
pub(crate) fn prepare_rows(
    paths: &[String],
    spec: &RowsSpec,
    train: &TrainConfig,
    health: usize,
    par: &Parallel,
    device: &Device,
) -> Result<Prepared> {
    check_heldout_fraction(spec.heldout_fraction)?;
    let source = ParquetSource::open(paths)?;
    let transform = spec.transform(&source, Split::All)?;
    let loader = ordered_loader(
        transform.columns(""),
        train.batch_size,
        par.rank,
        par.world,
        spec.skip_bad_rows,
    );
    let knn = spec.label_column.is_some() && par.world == 1;
    let held_cap = if spec.heldout_fraction > 0.0 {
        MAX_HELDOUT_EXAMPLES.div_ceil(par.world)
    } else {
        0
    };
    let want_train = health.max(SAMPLE_EXAMPLES).max(if knn {
        ssl_core::probe::KNN_BANK_MAX
    } else {
        0
    });
    let mut stream = row_stream(&source, loader, StreamPosition::default(), transform)?;
    let (mut trained, mut held) = (Vec::new(), Vec::new());
    let (mut longest, mut rows_seen, mut examples_seen) = (0usize, 0usize, 0usize);
    let mut last_row = 0usize;
    let started = Instant::now();
    let mut said = started;
    while trained.len() < want_train || held.len() < held_cap {
        let batch = stream.take(train.batch_size.max(1))?;
        if batch.is_empty() {
            break;
        }
        for e in batch {
            if e.row != last_row || examples_seen == 0 {
                rows_seen += 1;
                last_row = e.row;
            }
            examples_seen += 1;
            longest = longest.max(e.example.steps);
            if e.heldout {
                if held.len() < held_cap {
                    held.push(e);
                }
            } else if trained.len() < want_train {
                trained.push(e);
            }
        }
        if said.elapsed().as_secs_f64() >= 2.0 && par.is_main() {
            eprintln!(
                "reading the sample and held-out series: row {last_row} of {}, {} held out so far ({:.0} s)",
                source.num_rows(),
                held.len(),
                started.elapsed().as_secs_f64()
            );
            said = Instant::now();
        }
    }
    drop(stream);
    let first = trained.first().or(held.first()).ok_or_else(|| {
        TsError::InvalidInput(format!(
            "no series read from column `{}` of {}",
            spec.column,
            paths.join(", ")
        ))
    })?;
    let width = first.example.features;
    let row_bytes = longest.max(1) * width * 5;
    // Examples per epoch from the footers: the rows not held out, times a row's windows
    // (forecasting on rows: their mean over the sample).
    let per_row = (examples_seen as f64 / rows_seen.max(1) as f64).max(1.0);
    let training_rows = source.num_rows() as f64 * (1.0 - spec.heldout_fraction);
    let examples_per_epoch = (training_rows * per_row).round() as u64;
    // TS2Vec's size: rows x the longest row x channels; a row cut into windows counts its
    // own steps (the mean row the sample's windows per row imply), not every window's.
    let row_steps = match spec.windows {
        Some((len, stride)) => (per_row - 1.0) * stride as f64 + len as f64,
        None => longest as f64,
    };
    let values = (training_rows * row_steps * width as f64).round() as u64;
    let training = RowTransform {
        split: Split::Train,
        ..spec.transform(&source, Split::Train)?
    };
    let loader = LoaderConfig {
        batch_size: train.batch_size.max(1),
        seed: train.seed,
        shuffle: true,
        shuffle_buffer: shuffle_rows(spec.shuffle_buffer_mb, row_bytes, train.batch_size),
        epochs: None,
        rank: par.rank,
        world_size: par.world,
        skip_bad_rows: spec.skip_bad_rows,
        ..LoaderConfig::new(training.columns(""))
    };
    let rows_source = SeriesRowSource::new(&source, loader, training, train.batch_size, device)?;
    let knn = if knn {
        let bank: Vec<&RowExample> = trained.iter().take(ssl_core::probe::KNN_BANK_MAX).collect();
        let labels = |v: &[&RowExample]| -> Option<Vec<String>> {
            v.iter().map(|e| e.label.clone()).collect()
        };
        let held_refs: Vec<&RowExample> = held.iter().collect();
        match (labels(&bank), labels(&held_refs)) {
            (Some(bl), Some(hl)) => {
                Some((bank.iter().map(|e| e.example.clone()).collect(), bl, hl))
            }
            _ => None,
        }
    } else {
        None
    };
    let health = trained
        .iter()
        .take(health)
        .map(|e| e.example.clone())
        .collect();
    let what = if spec.windows.is_some() {
        format!("{examples_per_epoch} windows of {} rows", source.num_rows())
    } else {
        format!("{examples_per_epoch} series")
    };
    Ok(Prepared {
        source: Box::new(rows_source),
        health,
        heldout: held.into_iter().map(|e| e.example).collect(),
        heldout_sharded: true,
        knn,
        width,
        longest,
        examples_per_epoch,
        values,
        what,
    })
}

/// Sets `train.max_steps` from `train.max_epochs` (when set) and the examples per epoch, and
/// says so on rank 0.
pub(crate) fn apply_epochs(train: &mut TrainConfig, examples_per_epoch: u64, par: &Parallel) {
    let epochs = train.max_epochs;
    if let Some(steps) = train.apply_epochs(examples_per_epoch, par.world) {
        if par.is_main() {
            eprintln!(
                "train.max_epochs = {epochs}: {steps} steps ({examples_per_epoch} examples per epoch from the Parquet footers, {} per step)",
                train.batch_size * train.accum_steps.max(1) * par.world
            );
        }
    }
}

/// Resolves `train.max_steps = 0` (a time-series run's default) by TS2Vec's rule
/// ([`super::timeseries::auto_max_steps`]) on `values` ([`Prepared::values`]) and says so on
/// rank 0; any other value is kept. Each rank measured its own share's sample, so the rule
/// takes the largest over the ranks: every rank trains the same number of steps.
pub(crate) fn apply_auto_steps(train: &mut TrainConfig, values: u64, par: &Parallel) -> Result<()> {
    if train.max_steps != 0 {
        return Ok(());
    }
    // gather_indices carries values below 2^48; the rule only looks near 100,000.
    const CAP: u64 = (1 << 48) - 1;
    let values = par
        .gather_indices(&[values.min(CAP) as usize])?
        .into_iter()
        .max()
        .map_or(values, |v| v as u64);
    train.max_steps = super::timeseries::auto_max_steps(values);
    if par.is_main() {
        eprintln!(
            "train.max_steps = 0 (TS2Vec's rule): {} steps for {values} training values (series x steps x channels; {} {})",
            train.max_steps,
            if train.max_steps == 200 { "at most" } else { "over" },
            super::timeseries::AUTO_STEPS_VALUES,
        );
    }
    Ok(())
}

/// The task `build` makes on the device named `device` (`train.device`), with the weights of
/// checkpoint directory `ckpt`.
pub(crate) fn load_checkpoint<T>(
    ckpt: &Path,
    device: &str,
    build: impl FnOnce(&Device) -> Result<(ParamStore, T)>,
) -> Result<(T, Device)> {
    let device = parse_device(device)?;
    let (store, task) = build(&device)?;
    store.load_safetensors(&ckpt.join(MODEL_FILE))?;
    Ok((task, device))
}

/// Where a run writes and how its examples are spread over the ranks.
pub struct RunDir<'a> {
    /// The run directory.
    pub path: &'a Path,
    /// The run's configuration, stored with each checkpoint.
    pub config: Value,
    /// Data-parallel context (gives the trainer its collective).
    pub par: Parallel,
    /// The held-out examples are this rank's share already; when false every rank holds them
    /// all and [`fit`] keeps every `world`-th.
    pub sharded: bool,
    /// The run directory's guard, released when the run ends.
    pub guard: run_dir::RunDir,
}

/// Trains `task` on the batches of `data` (a streaming source: this rank's share, resumable)
/// with the shared loop (checkpoints, resume, stop flag, metrics, plot, as `opts` says);
/// `health` (the first training examples, at least 2 to count) forms the held-out batch for
/// embedding health. `heldout` is evaluated
/// every `train.eval_every_steps` and at the end (`eval_loss` and its further figures in
/// `metrics.jsonl`; see [`ssl_core::HeldoutEval`]). Rank 0 prints the summary (the `done:`
/// line).
#[allow(clippy::too_many_arguments)]
pub fn fit<T: PretextTask<Batch = SeqBatch>>(
    task: &T,
    data: &mut dyn BatchSource<SeqBatch>,
    health: &[SeqExample],
    heldout: Heldout<'_, T>,
    train: &TrainConfig,
    run: RunDir<'_>,
    opts: &RunOptions,
    device: &Device,
) -> Result<RunSummary> {
    let RunDir {
        path: out,
        config: run_config,
        par,
        sharded,
        guard,
    } = run;
    if train.max_steps == 0 {
        // The pipelines resolve the default 0 from the data (`apply_auto_steps`); a caller of
        // `fit` has to say how long to train.
        return Err(TsError::InvalidInput(
            "train.max_steps = 0: set a number of steps or train.max_epochs (the time-series \
             pipeline's pretrain resolves 0 by TS2Vec's rule)"
                .into(),
        ));
    }
    let Heldout {
        examples: held,
        loss,
        mut extra,
    } = heldout;
    let held: Vec<SeqExample> = if sharded {
        held
    } else {
        let (rank, world) = (par.rank, par.world);
        held.into_iter()
            .enumerate()
            .filter(|(i, _)| i % world == rank)
            .map(|(_, e)| e)
            .collect()
    };
    // Held-out batches of the task's loss: a lone example forms no batch (a contrastive
    // loss needs two), as in `pretext_loss`.
    let held_batches = if loss {
        heldout_batches(&held, train.batch_size, device)?
    } else {
        Vec::new()
    };
    let totals = par.sum_f64(&[held.len() as f64, held_batches.len() as f64])?;
    let loss = loss && totals[1] > 0.0;
    let seed = train.seed;
    let mut eval = (totals[0] > 0.0 && (loss || extra.is_some())).then(|| {
        HeldoutEval::new(train, |ctx: &HookCtx<'_, T>| {
            let mut figures = if loss {
                heldout_task_loss(&par, ctx.task, &held_batches, seed, ctx.precision)?
            } else {
                EvalFigures::new()
            };
            if let Some(f) = extra.as_mut() {
                figures.extend(f(&par, ctx.task, &held)?);
            }
            Ok(figures)
        })
    });
    if par.is_main() && totals[0] > 0.0 {
        let what = match (loss, eval.is_some()) {
            (true, _) => "eval_loss",
            (false, true) => "forecast errors (no eval_loss: the task gathers every rank's views)",
            (false, false) => "nothing (the task gathers every rank's views)",
        };
        eprintln!(
            "{} held-out examples: {what} every {} steps and at the end",
            totals[0],
            train.eval_interval()
        );
    }
    let heldout = (health.len() >= 2)
        .then(|| SeqBatch::from_examples(&health.iter().collect::<Vec<_>>(), device))
        .transpose()?;
    let mut trainer = opts.trainer(train, out, run_config, &par)?;
    let mut hooks: Vec<&mut dyn TrainHook<T>> = Vec::new();
    if let Some(e) = &mut eval {
        hooks.push(e);
    }
    let report = trainer.fit_with_hooks(task, data, heldout.as_ref(), &mut hooks)?;
    guard.finish();
    Ok(RunSummary::new(out, &report, par.rank))
}

/// `examples` in batches of `batch` (at least 2) for [`heldout_task_loss`]; a last lone
/// example joins the batch before it, or is left out when it is the only one.
fn heldout_batches(
    examples: &[SeqExample],
    batch: usize,
    device: &Device,
) -> Result<Vec<SeqBatch>> {
    let bs = batch.max(2);
    let mut starts: Vec<usize> = (0..examples.len()).step_by(bs).collect();
    if examples.len() % bs == 1 {
        starts.pop();
    }
    starts
        .iter()
        .enumerate()
        .map(|(k, &s)| {
            let end = starts.get(k + 1).copied().unwrap_or(examples.len());
            let refs: Vec<&SeqExample> = examples[s..end].iter().collect();
            Ok(SeqBatch::from_examples(&refs, device)?)
        })
        .collect()
}

/// Pooled embeddings of `examples`, batch by batch, in evaluation mode: (values, dim).
pub fn embed_all<T: PretextTask<Batch = SeqBatch>>(
    task: &T,
    examples: &[SeqExample],
    batch: usize,
    device: &Device,
) -> Result<(Vec<f32>, usize)> {
    embed_examples(task, examples, batch, device, true)
}

/// [`embed_all`], with a progress bar only when `progress` is set (not while a training
/// progress line is showing).
pub(crate) fn embed_examples<T: PretextTask<Batch = SeqBatch>>(
    task: &T,
    examples: &[SeqExample],
    batch: usize,
    device: &Device,
    progress: bool,
) -> Result<(Vec<f32>, usize)> {
    let mut out = Vec::new();
    let mut dim = 0;
    let mut rng = SslRng::new(0);
    let bar = progress
        .then(|| ssl_core::monitor::Progress::task("embed", examples.len() as u64, "series"));
    for chunk in examples.chunks(batch.max(1)) {
        let b = SeqBatch::from_examples(&chunk.iter().collect::<Vec<_>>(), device)?;
        let e = task.embed(&b, &mut Ctx::inference(&mut rng))?;
        dim = e.dim(1)?;
        out.extend(e.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        if let Some(p) = &bar {
            p.inc(chunk.len() as u64);
        }
    }
    if let Some(p) = bar {
        p.finish();
    }
    Ok((out, dim))
}

/// Mean pretext loss over the examples of every set (evaluation mode, fixed seed).
pub fn pretext_loss<T: PretextTask<Batch = SeqBatch>>(
    task: &T,
    sets: &[&[SeqExample]],
    batch: usize,
    device: &Device,
) -> Result<f64> {
    let mut rng = SslRng::new(12345);
    let (mut sum, mut weight) = (0.0, 0.0);
    for chunk in sets.iter().flat_map(|set| set.chunks(batch.max(2))) {
        if chunk.len() < 2 {
            continue;
        }
        let b = SeqBatch::from_examples(&chunk.iter().collect::<Vec<_>>(), device)?;
        let mut ctx = Ctx::inference(&mut rng);
        let out = task.forward(&b, &mut ctx)?;
        sum += out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * out.weight;
        weight += out.weight;
    }
    Ok(if weight > 0.0 { sum / weight } else { f64::NAN })
}

/// Embeddings written to a Parquet file as they are computed (row groups of
/// [`ssl_data::EmbeddingWriterOptions::rows_per_group`]); the file is created at the first
/// batch, when the width is known, and appears at `out` only once finished.
pub(crate) struct EmbedOut {
    out: PathBuf,
    meta: BTreeMap<String, String>,
    writer: Option<EmbeddingWriter>,
    dim: usize,
}

impl EmbedOut {
    /// A writer of `out` with the checkpoint `ckpt` and `meta` in its metadata.
    pub fn new(out: &Path, ckpt: &Path, meta: &[(&str, String)]) -> Self {
        let mut meta: BTreeMap<String, String> = meta
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        meta.insert("checkpoint".to_string(), ckpt.display().to_string());
        EmbedOut {
            out: out.to_path_buf(),
            meta,
            writer: None,
            dim: 0,
        }
    }

    /// Embeds `examples` (one batch) with `task` and writes them with their `ids`.
    pub fn write<T: PretextTask<Batch = SeqBatch>>(
        &mut self,
        task: &T,
        examples: &[&SeqExample],
        ids: &[String],
        device: &Device,
    ) -> Result<()> {
        if examples.is_empty() {
            return Ok(());
        }
        let mut rng = SslRng::new(0);
        let b = SeqBatch::from_examples(examples, device)?;
        let e = task.embed(&b, &mut Ctx::inference(&mut rng))?;
        let dim = e.dim(1)?;
        let values = e.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if self.writer.is_none() {
            self.writer = Some(EmbeddingWriter::create(
                &self.out,
                dim,
                std::mem::take(&mut self.meta),
            )?);
            self.dim = dim;
        }
        if let Some(w) = &mut self.writer {
            w.write(ids, &values)?;
        }
        Ok(())
    }

    /// Finishes the file: an error when nothing was written.
    pub fn finish(self) -> Result<EmbedSummary> {
        let Some(w) = self.writer else {
            return Err(TsError::InvalidInput(
                "no series to embed: the data has no rows with an observed value".into(),
            ));
        };
        let rows = w.finish()?;
        Ok(EmbedSummary {
            out: self.out,
            rows,
            dim: self.dim,
        })
    }
}

/// Embeds every series of `paths` (one per row, read in file order by the transform `make`
/// builds; ids from `id_column`) with `task` (checkpoint directory `ckpt`), `batch` series at
/// a time, writing each batch's `(id, embedding)` rows to the Parquet file `out` as it is
/// computed (constant memory for any row count), with the checkpoint and `meta` in its
/// metadata.
#[allow(clippy::too_many_arguments)]
pub(crate) fn embed_rows<T: PretextTask<Batch = SeqBatch>>(
    task: &T,
    paths: &[String],
    make: impl FnOnce(&ParquetSource) -> Result<RowTransform>,
    id_column: &str,
    ckpt: &Path,
    meta: &[(&str, String)],
    batch: usize,
    device: &Device,
    out: &Path,
) -> Result<EmbedSummary> {
    let mut writer = EmbedOut::new(out, ckpt, meta);
    rows_pass(paths, make, id_column, batch, "embed", |examples| {
        let refs: Vec<&SeqExample> = examples.iter().map(|e| &e.example).collect();
        let ids: Vec<String> = examples.iter().map(|e| e.id.clone()).collect();
        writer.write(task, &refs, &ids, device)?;
        Ok(true)
    })?;
    writer.finish()
}

/// The embeddings of one labelled data set read in one pass, for the probes: the trained and
/// the randomly initialised encoder's, and the labels (only these are held, never the
/// series).
#[derive(Default)]
struct Embedded {
    trained: Vec<f32>,
    random: Vec<f32>,
    dim: usize,
    labels: Vec<String>,
}

/// The pretext loss's running sums (evaluation mode, one seeded stream over every set).
struct LossSums {
    rng: SslRng,
    sum: f64,
    weight: f64,
}

impl LossSums {
    fn new() -> Self {
        LossSums {
            rng: SslRng::new(12345),
            sum: 0.0,
            weight: 0.0,
        }
    }

    /// Adds the loss of one batch (skipped below 2 examples: a contrastive loss needs two).
    fn add<T: PretextTask<Batch = SeqBatch>>(
        &mut self,
        task: &T,
        chunk: &[&SeqExample],
        device: &Device,
    ) -> Result<()> {
        if chunk.len() < 2 {
            return Ok(());
        }
        let b = SeqBatch::from_examples(chunk, device)?;
        let mut ctx = Ctx::inference(&mut self.rng);
        let out = task.forward(&b, &mut ctx)?;
        self.sum += out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * out.weight;
        self.weight += out.weight;
        Ok(())
    }

    fn mean(&self) -> f64 {
        if self.weight > 0.0 {
            self.sum / self.weight
        } else {
            f64::NAN
        }
    }
}

/// Reads the labelled series of `paths` in one streaming pass: the pretext loss of `task`
/// (into `loss`), and the embeddings of `task` and `random`, `batch` at a time.
#[allow(clippy::too_many_arguments)]
fn embed_labelled<T: PretextTask<Batch = SeqBatch>>(
    task: &T,
    random: &T,
    paths: &[String],
    make: impl FnOnce(&ParquetSource) -> Result<RowTransform>,
    batch: usize,
    device: &Device,
    loss: &mut LossSums,
    what: &str,
) -> Result<Embedded> {
    let mut out = Embedded::default();
    // Batches of `max(batch, 2)` for the loss (as `pretext_loss` cuts a set), each embedded
    // `batch` at a time (as `embed_all` does).
    rows_pass(paths, make, "", batch.max(2), what, |examples| {
        let refs: Vec<&SeqExample> = examples.iter().map(|e| &e.example).collect();
        loss.add(task, &refs, device)?;
        for chunk in refs.chunks(batch.max(1)) {
            let owned: Vec<SeqExample> = chunk.iter().map(|e| (*e).clone()).collect();
            let (e, dim) = embed_examples(task, &owned, batch, device, false)?;
            let (r, _) = embed_examples(random, &owned, batch, device, false)?;
            out.trained.extend(e);
            out.random.extend(r);
            out.dim = dim;
        }
        for e in &examples {
            out.labels.push(
                e.label.clone().ok_or_else(|| {
                    TsError::Pipeline("no labels read from the label column".into())
                })?,
            );
        }
        Ok(true)
    })?;
    Ok(out)
}

/// What a probe `eval` measured ([`super::features::eval`], and [`super::timeseries::eval`]
/// outside forecasting on a long series): the pretext loss and the probes of the trained
/// encoder, beside a randomly initialised one's and the majority-class rate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProbeEvalReport {
    /// The checkpoint directory evaluated.
    pub checkpoint: String,
    /// The encoder kind (`tcn`, `patchtst`...); time-series runs only (absent otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encoder: Option<String>,
    /// The task kind (`ts2vec`, `masked`, `forecast`); time-series runs only (absent
    /// otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    /// Mean pretext loss over the training and test sequences (NaN, written `null`, when none).
    pub pretext_loss: f64,
    /// Linear probe test accuracy of the trained encoder.
    pub linear_probe_accuracy: f64,
    /// The probe's chosen L2 strength.
    pub linear_probe_l2: f64,
    /// k-NN test accuracy of the trained encoder.
    pub knn_accuracy: f64,
    /// Linear probe test accuracy of a randomly initialised encoder of the same shape (seeded
    /// from `train.seed`).
    pub random_init_linear_probe_accuracy: f64,
    /// k-NN test accuracy of that randomly initialised encoder.
    pub random_init_knn_accuracy: f64,
    /// The accuracy of always predicting the most frequent training class: the floor of
    /// every probe above.
    pub majority_class_rate: f64,
    /// Probe training rows.
    pub n_train: usize,
    /// Probe test rows.
    pub n_test: usize,
    /// Classes.
    pub n_classes: usize,
    /// Embedding dimension.
    pub embedding_dim: usize,
    /// TS2Vec's evaluation protocol on the same rows: an RBF SVM with C chosen by 5-fold
    /// cross-validation ([`ssl_core::probe::svm_probe`]); absent above
    /// [`SVM_EVAL_MAX_ROWS`] probe training rows (its cost grows with their square).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub svm_accuracy: Option<f64>,
    /// The SVM's C (`null` for a hard margin, TS2Vec's choice on sets too small to split).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub svm_c: Option<SvmC>,
    /// The SVM probe of the randomly initialised encoder.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub random_init_svm_accuracy: Option<f64>,
}

/// The SVM probe runs when the probe has at most this many training rows.
pub const SVM_EVAL_MAX_ROWS: usize = 10_000;

/// An SVM's C: a number, or `null` in JSON for infinity (a hard margin).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SvmC(pub f64);

impl Serialize for SvmC {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if self.0.is_finite() {
            s.serialize_f64(self.0)
        } else {
            s.serialize_none()
        }
    }
}

/// The probe evaluation of checkpoint directory `ckpt`: the task `trained` makes (on
/// `train.device`) with the checkpoint's weights, its pretext loss over the series of `data`
/// and `test` (read in one streaming pass each by the transform `make` builds for a source and
/// the label column `label_column`; only the embeddings and labels are held), and its probes
/// (tested on `test` or, when it is empty, on a split seeded by `train.seed`) beside those of
/// the task `random` makes, left as initialised. `encoder` and `task` are left `None`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn probe_eval<T: PretextTask<Batch = SeqBatch>>(
    ckpt: &Path,
    train: &TrainConfig,
    trained: impl FnOnce(&Device) -> Result<(ParamStore, T)>,
    random: impl FnOnce(&Device) -> Result<(ParamStore, T)>,
    data: &[String],
    test: &[String],
    label_column: &str,
    make: impl Fn(&ParquetSource, &str) -> Result<RowTransform>,
) -> Result<ProbeEvalReport> {
    let (task, device) = load_checkpoint(ckpt, &train.device, trained)?;
    // The same architecture with fresh weights: what pretraining adds.
    let (_, random_task) = random(&device)?;
    let (bs, seed) = (train.batch_size, train.seed);
    let mut loss = LossSums::new();
    let label_error = |e: TsError| match e {
        TsError::Pipeline(_) => {
            TsError::Pipeline(format!("no labels read from column `{label_column}`"))
        }
        other => other,
    };
    let train_set = embed_labelled(
        &task,
        &random_task,
        data,
        |s| make(s, label_column),
        bs,
        &device,
        &mut loss,
        "eval",
    )
    .map_err(label_error)?;
    let test_set = if test.is_empty() {
        None
    } else {
        Some(
            embed_labelled(
                &task,
                &random_task,
                test,
                |s| make(s, label_column),
                bs,
                &device,
                &mut loss,
                "eval (test)",
            )
            .map_err(label_error)?,
        )
    };
    if let Some(t) = &test_set {
        warn_unseen_labels(&train_set.labels, &t.labels);
    }
    let probe = |pick: fn(&Embedded) -> &[f32]| {
        probe_labelled(
            (pick(&train_set), &train_set.labels),
            test_set.as_ref().map(|t| (pick(t), t.labels.as_slice())),
            train_set.dim,
            seed,
        )
    };
    let scores: ProbeScores = probe(|e| &e.trained)?;
    let random = probe(|e| &e.random)?;
    let svm = |pick: fn(&Embedded) -> &[f32]| {
        svm_labelled(
            (pick(&train_set), &train_set.labels),
            test_set.as_ref().map(|t| (pick(t), t.labels.as_slice())),
            train_set.dim,
            seed,
        )
    };
    let (svm_trained, svm_random) = if scores.n_train <= SVM_EVAL_MAX_ROWS {
        eprintln!(
            "eval: SVM probes (TS2Vec's protocol) on {} training rows",
            scores.n_train
        );
        (Some(svm(|e| &e.trained)?), Some(svm(|e| &e.random)?))
    } else {
        eprintln!(
            "eval: no SVM probe: {} probe training rows, above {SVM_EVAL_MAX_ROWS}",
            scores.n_train
        );
        (None, None)
    };
    Ok(ProbeEvalReport {
        checkpoint: ckpt.display().to_string(),
        encoder: None,
        task: None,
        pretext_loss: loss.mean(),
        linear_probe_accuracy: scores.linear,
        linear_probe_l2: scores.l2,
        knn_accuracy: scores.knn,
        random_init_linear_probe_accuracy: random.linear,
        random_init_knn_accuracy: random.knn,
        majority_class_rate: scores.majority_class_rate,
        n_train: scores.n_train,
        n_test: scores.n_test,
        n_classes: scores.n_classes,
        embedding_dim: train_set.dim,
        svm_accuracy: svm_trained.map(|s| s.accuracy),
        svm_c: svm_trained.map(|s| SvmC(s.c)),
        random_init_svm_accuracy: svm_random.map(|s| s.accuracy),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_steps_agree_over_ranks() {
        // Rank 0's sample gives 90,000 values, rank 1's 110,000: both take the largest, so
        // both train 600 steps.
        let steps = Parallel::on_threads(2, |par| {
            let mut t = TrainConfig {
                max_steps: 0,
                ..TrainConfig::default()
            };
            apply_auto_steps(&mut t, [90_000, 110_000][par.rank], &par).unwrap();
            t.max_steps
        });
        assert_eq!(steps, vec![600, 600]);
        // One process: its own sample decides; an explicit length is kept; huge sizes pass.
        let par = Parallel::single();
        let mut t = TrainConfig {
            max_steps: 0,
            ..TrainConfig::default()
        };
        apply_auto_steps(&mut t, 90_000, &par).unwrap();
        assert_eq!(t.max_steps, 200);
        t.max_steps = 7;
        apply_auto_steps(&mut t, 110_000, &par).unwrap();
        assert_eq!(t.max_steps, 7);
        t.max_steps = 0;
        apply_auto_steps(&mut t, u64::MAX, &par).unwrap();
        assert_eq!(t.max_steps, 600);
    }
}
