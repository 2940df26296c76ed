//! What the sequence pipelines ([`super::timeseries`], [`super::features`]) share: the
//! training run, batched embedding, the pretext loss of a checkpoint, and writing embeddings.

use std::path::Path;

use candle_core::{DType, Device};
use serde::Serialize;
use serde_json::Value;
use ssl_core::run_dir::{RunOptions, RunSummary};
use ssl_core::seq::{InMemorySeqSource, SeqBatch, SeqExample};
use ssl_core::{Ctx, Parallel, PretextTask, SslRng, TrainConfig, Trainer};

use crate::{Result, TsError};

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
        mut par,
        sharded,
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
    let mut trainer = opts.trainer(train, out, run_config, &mut par)?;
    let report = trainer.fit(task, &mut source, heldout.as_ref())?;
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
    for chunk in examples.chunks(batch.max(1)) {
        let b = SeqBatch::from_examples(&chunk.iter().collect::<Vec<_>>(), device)?;
        let e = task.embed(&b, &mut Ctx::inference(&mut rng))?;
        dim = e.dim(1)?;
        out.extend(e.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
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

/// The data paths a pipeline reads: an error when there are none.
pub(crate) fn require_data(data: &[String]) -> Result<()> {
    if data.is_empty() {
        return Err(TsError::InvalidInput(
            "no data given: pass Parquet files, directories or globs".into(),
        ));
    }
    Ok(())
}

/// The run's configuration as JSON (stored with every checkpoint).
pub(crate) fn config_json<T: Serialize>(cfg: &T) -> Result<Value> {
    serde_json::to_value(cfg).map_err(|e| TsError::Pipeline(e.to_string()))
}
