//! What the sequence pipelines ([`super::timeseries`], [`super::features`]) share: the start
//! of a run (device, ranks, stored configuration), reading one sequence per row, the training
//! run, batched embedding and the embeddings file, the pretext loss and probes of a
//! checkpoint.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};
use serde::Serialize;
use serde_json::Value;
use ssl_core::checkpoint::MODEL_FILE;
use ssl_core::probe::{probe_labelled, warn_unseen_labels, ProbeScores};
use ssl_core::run_dir::{self, RunOptions, RunSummary};
use ssl_core::seq::{InMemorySeqSource, SeqBatch, SeqExample};
use ssl_core::{
    heldout_task_loss, parse_device, Ctx, EvalFigures, HeldoutEval, HookCtx, Parallel, ParamStore,
    PretextTask, SslRng, TrainConfig, TrainHook,
};
use ssl_data::{write_embeddings, EmbedSummary, ReadOptions};

use crate::{read_series_with, Result, SeriesSet, TsError};

/// Sequences read from Parquet, as a task consumes them.
pub(crate) struct Loaded {
    pub examples: Vec<SeqExample>,
    pub ids: Vec<String>,
    pub labels: Option<Vec<String>>,
    /// Each example's global row index in the source (a long series' windows: their index).
    pub rows: Vec<usize>,
    /// The examples are this rank's share already (read by row group); otherwise every rank
    /// holds them all.
    pub sharded: bool,
    /// Examples held out of training by `data.heldout_fraction` (pretraining reads only;
    /// empty otherwise), shared between the ranks as `examples` are.
    pub heldout: Vec<SeqExample>,
    /// The labels of `heldout`, when `labels` were read (for the online k-NN accuracy).
    pub heldout_labels: Option<Vec<String>>,
}

impl Loaded {
    /// Moves the examples of the rows held out by `fraction` (0: none; see [`row_heldout`])
    /// into `heldout`, their labels into `heldout_labels`; an error for a fraction outside
    /// [0, 1).
    pub fn hold_out(&mut self, fraction: f64, seed: u64) -> Result<()> {
        check_heldout_fraction(fraction)?;
        if fraction == 0.0 {
            return Ok(());
        }
        let keep: Vec<bool> = self
            .rows
            .iter()
            .map(|&r| !row_heldout(r, seed, fraction))
            .collect();
        let mut kept = Vec::with_capacity(self.examples.len());
        for (e, &k) in std::mem::take(&mut self.examples).into_iter().zip(&keep) {
            if k {
                kept.push(e);
            } else {
                self.heldout.push(e);
            }
        }
        self.examples = kept;
        keep_where(&mut self.rows, &keep);
        keep_where(&mut self.ids, &keep);
        if let Some(l) = &mut self.labels {
            let held = l.iter().zip(&keep).filter(|(_, &k)| !k).map(|(x, _)| x);
            self.heldout_labels = Some(held.cloned().collect());
            keep_where(l, &keep);
        }
        Ok(())
    }
}

/// Keeps the items of `v` whose flag in `keep` is set.
fn keep_where<X>(v: &mut Vec<X>, keep: &[bool]) {
    let mut it = keep.iter();
    v.retain(|_| *it.next().unwrap_or(&true));
}

/// Checks `data.heldout_fraction`: in [0, 1).
pub(crate) fn check_heldout_fraction(fraction: f64) -> Result<()> {
    if !(0.0..1.0).contains(&fraction) {
        return Err(TsError::Config(format!(
            "data.heldout_fraction = {fraction}: must be in [0, 1)"
        )));
    }
    Ok(())
}

/// Whether the row of global index `row` is held out of training by `data.heldout_fraction`
/// (0: none), a seeded hash of the index ([`ssl_data::is_heldout`]).
pub(crate) fn row_heldout(row: usize, seed: u64, fraction: f64) -> bool {
    fraction > 0.0 && ssl_data::is_heldout(row, seed, fraction)
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
/// `train.batch_size` (capped by the examples) series of the longest length, each taking
/// `per_series(steps)` bytes. `keys` names the model settings the estimate grows with.
pub(crate) fn check_memory(
    train: &TrainConfig,
    examples: &[SeqExample],
    per_series: impl Fn(u64) -> u64,
    keys: &str,
) -> Result<()> {
    let steps = examples.iter().map(|e| e.steps).max().unwrap_or(0) as u64;
    let batch = train.batch_size.min(examples.len()) as u64;
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

/// Reads one sequence per row: `column`, and the `label_column` and `id_column` when given,
/// of `paths`; with `par`, this rank's share of the rows (reported on stderr as `what`).
pub(crate) fn read_rows(
    paths: &[String],
    column: &str,
    label_column: Option<&str>,
    id_column: &str,
    skip_bad_rows: bool,
    par: Option<&Parallel>,
    what: &str,
) -> Result<SeriesSet> {
    let options = match par {
        Some(p) => ReadOptions::for_rank(p.rank, p.world, skip_bad_rows),
        None => ReadOptions {
            skip_bad_rows,
            ..Default::default()
        },
    };
    let set = read_series_with(paths, column, label_column, Some(id_column), &options)?;
    if let Some(p) = par {
        set.share.report(p.rank, p.world, set.row_index.len(), what);
    }
    Ok(set)
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
    /// The examples are this rank's share already (read by row group); when false every rank
    /// holds them all and [`fit`] keeps every `world`-th.
    pub sharded: bool,
    /// The run directory's guard, released when the run ends.
    pub guard: run_dir::RunDir,
}

/// Trains `task` on `examples` with the shared loop (checkpoints, resume, stop flag, metrics,
/// plot, as `opts` says); the first `health_examples` form the held-out batch for embedding
/// health (on rank 0, which reads row group 0 first, so with several ranks they are the
/// source's first examples when they fit in its first row group). `heldout` is evaluated
/// every `train.eval_every_steps` and at the end (`eval_loss` and its further figures in
/// `metrics.jsonl`; see [`ssl_core::HeldoutEval`]). Rank 0 prints the summary (the `done:`
/// line).
#[allow(clippy::too_many_arguments)]
pub fn fit<T: PretextTask<Batch = SeqBatch>>(
    task: &T,
    examples: Vec<SeqExample>,
    heldout: Heldout<'_, T>,
    train: &TrainConfig,
    health_examples: usize,
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
    let n_health = health_examples.min(examples.len());
    let heldout = (n_health >= 2)
        .then(|| {
            SeqBatch::from_examples(&examples.iter().take(n_health).collect::<Vec<_>>(), device)
        })
        .transpose()?;
    let examples = if sharded {
        examples
    } else {
        par.shard(examples, "training series")?
    };
    let mut source = InMemorySeqSource::new(examples, train.batch_size, train.seed, true, device)?;
    let mut trainer = opts.trainer(train, out, run_config, &par)?;
    let mut hooks: Vec<&mut dyn TrainHook<T>> = Vec::new();
    if let Some(e) = &mut eval {
        hooks.push(e);
    }
    let report = trainer.fit_with_hooks(task, &mut source, heldout.as_ref(), &mut hooks)?;
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

/// Truncates `e` to `max_len` steps (0 = no limit).
pub(crate) fn truncate(e: SeqExample, max_len: usize) -> Result<SeqExample> {
    if max_len > 0 && e.steps > max_len {
        return Ok(SeqExample::new(
            e.values[..max_len * e.features].to_vec(),
            max_len,
            e.features,
        )?);
    }
    Ok(e)
}

/// Embeds `loaded` with `task` (checkpoint directory `ckpt`), `batch` sequences at a time, and
/// writes `(id, embedding)` rows to the Parquet file `out`, with the checkpoint and `meta` in
/// its metadata.
pub(crate) fn write_embedded<T: PretextTask<Batch = SeqBatch>>(
    task: &T,
    loaded: &Loaded,
    ckpt: &Path,
    meta: &[(&str, String)],
    batch: usize,
    device: &Device,
    out: &Path,
) -> Result<EmbedSummary> {
    let (emb, dim) = embed_all(task, &loaded.examples, batch, device)?;
    let mut meta: BTreeMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect();
    meta.insert("checkpoint".to_string(), ckpt.display().to_string());
    Ok(write_embeddings(out, &loaded.ids, &emb, dim, meta)?)
}

/// What `eval` probes: labelled training sequences and, when given, labelled test sequences
/// (otherwise the probes split the training ones).
pub(crate) struct Labelled {
    train: Vec<SeqExample>,
    train_labels: Vec<String>,
    test: Option<(Vec<SeqExample>, Vec<String>)>,
}

impl Labelled {
    /// Reads `data` and, when not empty, `test` with `load`; an error when `data` had no
    /// labels in `label_column`.
    pub fn read(
        data: &[String],
        test: &[String],
        label_column: &str,
        load: impl Fn(&[String]) -> Result<Loaded>,
    ) -> Result<Self> {
        let train = load(data)?;
        let test = if test.is_empty() {
            None
        } else {
            let t = load(test)?;
            Some((t.examples, t.labels.unwrap_or_default()))
        };
        let train_labels = train.labels.ok_or_else(|| {
            TsError::Pipeline(format!("no labels read from column `{label_column}`"))
        })?;
        if let Some((_, test_labels)) = &test {
            warn_unseen_labels(&train_labels, test_labels);
        }
        Ok(Labelled {
            train: train.examples,
            train_labels,
            test,
        })
    }

    /// [`pretext_loss`] of `task` over the training and test sequences.
    pub fn pretext_loss<T: PretextTask<Batch = SeqBatch>>(
        &self,
        task: &T,
        batch: usize,
        device: &Device,
    ) -> Result<f64> {
        let mut sets: Vec<&[SeqExample]> = vec![&self.train];
        sets.extend(self.test.iter().map(|(t, _)| t.as_slice()));
        pretext_loss(task, &sets, batch, device)
    }

    /// Linear-probe and k-NN scores of `task`'s embeddings (`seed` splits the training
    /// sequences when there is no test set), and the embedding width.
    pub fn probe<T: PretextTask<Batch = SeqBatch>>(
        &self,
        task: &T,
        batch: usize,
        device: &Device,
        seed: u64,
    ) -> Result<(ProbeScores, usize)> {
        let (emb, dim) = embed_all(task, &self.train, batch, device)?;
        let test = match &self.test {
            Some((t, labels)) => Some((embed_all(task, t, batch, device)?.0, labels.as_slice())),
            None => None,
        };
        let scores = probe_labelled(
            (&emb, &self.train_labels),
            test.as_ref().map(|(e, l)| (e.as_slice(), *l)),
            dim,
            seed,
        )?;
        Ok((scores, dim))
    }
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
}

/// The probe evaluation of checkpoint directory `ckpt`: the task `trained` makes (on
/// `train.device`) with the checkpoint's weights, its pretext loss over the sequences `load`
/// reads from `data` and `test` (labels from `label_column`), and its probes (tested on `test`
/// or, when it is empty, on a split seeded by `train.seed`) beside those of the task `random`
/// makes, left as initialised. `encoder` and `task` are left `None`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn probe_eval<T: PretextTask<Batch = SeqBatch>>(
    ckpt: &Path,
    train: &TrainConfig,
    trained: impl FnOnce(&Device) -> Result<(ParamStore, T)>,
    random: impl FnOnce(&Device) -> Result<(ParamStore, T)>,
    data: &[String],
    test: &[String],
    label_column: &str,
    load: impl Fn(&[String]) -> Result<Loaded>,
) -> Result<ProbeEvalReport> {
    let (task, device) = load_checkpoint(ckpt, &train.device, trained)?;
    let sets = Labelled::read(data, test, label_column, load)?;
    let (bs, seed) = (train.batch_size, train.seed);
    let loss = sets.pretext_loss(&task, bs, &device)?;
    let (scores, dim) = sets.probe(&task, bs, &device, seed)?;
    // The same architecture with fresh weights: what pretraining adds.
    let (_, random_task) = random(&device)?;
    let (random, _) = sets.probe(&random_task, bs, &device, seed)?;
    Ok(ProbeEvalReport {
        checkpoint: ckpt.display().to_string(),
        encoder: None,
        task: None,
        pretext_loss: loss,
        linear_probe_accuracy: scores.linear,
        linear_probe_l2: scores.l2,
        knn_accuracy: scores.knn,
        random_init_linear_probe_accuracy: random.linear,
        random_init_knn_accuracy: random.knn,
        majority_class_rate: scores.majority_class_rate,
        n_train: scores.n_train,
        n_test: scores.n_test,
        n_classes: scores.n_classes,
        embedding_dim: dim,
    })
}
