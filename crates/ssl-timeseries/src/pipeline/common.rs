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
    parse_device, Ctx, Parallel, ParamStore, PretextTask, SslRng, TrainConfig, Trainer,
};
use ssl_data::{write_embeddings, EmbedSummary, ReadOptions};

use crate::{read_series_with, Result, SeriesSet, TsError};

/// Sequences read from Parquet, as a task consumes them.
pub(crate) struct Loaded {
    pub examples: Vec<SeqExample>,
    pub ids: Vec<String>,
    pub labels: Option<Vec<String>>,
    /// The examples are this rank's share already (read by row group); otherwise every rank
    /// holds them all.
    pub sharded: bool,
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
/// source's first examples when they fit in its first row group). Rank 0 prints the summary
/// (the `done:` line).
pub fn fit<T: PretextTask<Batch = SeqBatch>>(
    task: &T,
    examples: Vec<SeqExample>,
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
    let report = trainer.fit(task, &mut source, heldout.as_ref())?;
    guard.finish();
    Ok(RunSummary::new(out, &report, par.rank))
}

/// Pooled embeddings of `examples`, batch by batch, in evaluation mode: (values, dim).
pub fn embed_all<T: PretextTask<Batch = SeqBatch>>(
    task: &T,
    examples: &[SeqExample],
    batch: usize,
    device: &Device,
) -> Result<(Vec<f32>, usize)> {
    let mut out = Vec::new();
    let mut dim = 0;
    let mut rng = SslRng::new(0);
    let progress = ssl_core::monitor::Progress::task("embed", examples.len() as u64, "series");
    for chunk in examples.chunks(batch.max(1)) {
        let b = SeqBatch::from_examples(&chunk.iter().collect::<Vec<_>>(), device)?;
        let e = task.embed(&b, &mut Ctx::inference(&mut rng))?;
        dim = e.dim(1)?;
        out.extend(e.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        progress.inc(chunk.len() as u64);
    }
    progress.finish();
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
