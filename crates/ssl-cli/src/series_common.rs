//! What the sequence modalities (`features`, `timeseries`) share: the embedded sample, the
//! training run, batched embedding, the pretext loss of a checkpoint, and the probes.

use std::path::Path;

use candle_core::{DType, Device};
use serde_json::Value;
use ssl_core::probe::{
    fit_linear_probe, knn_accuracy, stratified_split, KnnConfig, LinearProbeConfig,
};
use ssl_core::seq::{InMemorySeqSource, SeqBatch, SeqExample};
use ssl_core::{Ctx, LoopTrainer, PretextTask, SslRng, StopFlag, TrainConfig, Trainer};

use crate::parallel::Parallel;
use crate::CliError;

/// The data paths of a run: the user's, or the embedded sample written to a temporary
/// directory that lives as long as this value.
pub struct DataPaths {
    _dir: Option<tempfile::TempDir>,
    /// Files, directories or globs.
    pub paths: Vec<String>,
}

/// `data` when given, else the embedded `bytes` written as `file_name` (announced with `what`).
pub fn data_paths(
    data: &[String],
    bytes: &[u8],
    file_name: &str,
    what: &str,
) -> Result<DataPaths, CliError> {
    if !data.is_empty() {
        return Ok(DataPaths {
            _dir: None,
            paths: data.to_vec(),
        });
    }
    let dir = tempfile::tempdir().map_err(|e| CliError::Io {
        path: std::env::temp_dir(),
        source: e,
    })?;
    let p = dir.path().join(file_name);
    std::fs::write(&p, bytes).map_err(|e| CliError::Io {
        path: p.clone(),
        source: e,
    })?;
    eprintln!("no --data given: training on the embedded sample ({what})");
    Ok(DataPaths {
        paths: vec![p.to_string_lossy().into_owned()],
        _dir: Some(dir),
    })
}

/// Where a run writes: its directory, whether to continue from the newest checkpoint there, and
/// the configuration stored with every checkpoint.
pub struct RunDir<'a> {
    /// The run directory.
    pub path: &'a Path,
    /// Continue from the newest checkpoint in `path`.
    pub resume: bool,
    /// The run's configuration, stored with each checkpoint.
    pub config: Value,
    /// Data-parallel context (gives the trainer its collective).
    pub par: Parallel,
    /// The examples are this rank's share already (read by row group); when false every rank
    /// holds them all and `fit` keeps every `world`-th.
    pub sharded: bool,
}

/// Trains `task` on `examples` with the shared loop (checkpoints, resume, signals, metrics,
/// plot); the first `health_examples` form the held-out batch for embedding health (on rank
/// 0, which reads row group 0 first, so with several ranks they are the source's first
/// examples when they fit in its first row group).
pub fn fit<T: PretextTask<Batch = SeqBatch>>(
    task: &T,
    examples: Vec<SeqExample>,
    train: &TrainConfig,
    health_examples: usize,
    run: RunDir<'_>,
    device: &Device,
) -> Result<(), CliError> {
    let RunDir {
        path: out,
        resume,
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
    let mut trainer = LoopTrainer::new(train.clone(), Some(out.to_path_buf()))?
        .resume(resume)
        .run_config(run_config)
        .stop_flag(StopFlag::from_signals()?)
        .progress(true)
        .collective(par.take());
    let report = trainer.fit(task, &mut source, heldout.as_ref())?;
    if !par.is_main() {
        return Ok(());
    }
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

/// Pooled embeddings of `examples`, batch by batch, in evaluation mode: (values, dim).
pub fn embed_all<T: PretextTask<Batch = SeqBatch>>(
    task: &T,
    examples: &[SeqExample],
    batch: usize,
    device: &Device,
) -> Result<(Vec<f32>, usize), CliError> {
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
) -> Result<f64, CliError> {
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

/// Linear-probe and k-NN accuracy of one embedding set.
#[derive(Debug, Clone, Copy)]
pub struct ProbeScores {
    /// Linear probe test accuracy.
    pub linear: f64,
    /// The probe's L2 strength chosen on a validation split.
    pub l2: f64,
    /// Weighted cosine k-NN test accuracy.
    pub knn: f64,
    /// Training examples.
    pub n_train: usize,
    /// Test examples.
    pub n_test: usize,
    /// Classes (over train and test).
    pub n_classes: usize,
}

/// Probes embeddings of a training set (`train`, with labels) on a test set (`test`), or on
/// a seeded stratified 20% split of the training set when there is none.
pub fn probe(
    train: (&[f32], &[String]),
    test: Option<(&[f32], &[String])>,
    dim: usize,
    seed: u64,
) -> Result<ProbeScores, CliError> {
    // Class ids from the sorted union of label strings, so train and test agree.
    let mut classes: Vec<String> = train.1.to_vec();
    if let Some((_, l)) = test {
        classes.extend(l.iter().cloned());
    }
    classes.sort();
    classes.dedup();
    let id_of = |s: &String| classes.binary_search(s).unwrap_or(0);
    let train_y: Vec<usize> = train.1.iter().map(id_of).collect();
    let (tr_x, tr_y, te_x, te_y) = match test {
        Some((x, l)) => (
            train.0.to_vec(),
            train_y,
            x.to_vec(),
            l.iter().map(id_of).collect(),
        ),
        None => {
            let (tr_idx, te_idx) = stratified_split(&train_y, 0.2, seed)?;
            let pick = |idx: &[usize]| -> (Vec<f32>, Vec<usize>) {
                (
                    idx.iter()
                        .flat_map(|&i| train.0[i * dim..(i + 1) * dim].iter().copied())
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
    let fitted = fit_linear_probe(
        &tr_x,
        &tr_y,
        dim,
        n_classes,
        &LinearProbeConfig {
            seed,
            ..Default::default()
        },
    )?;
    let linear = fitted.accuracy(&te_x, &te_y)?;
    let knn = knn_accuracy(
        &tr_x,
        &tr_y,
        &te_x,
        &te_y,
        dim,
        n_classes,
        &KnnConfig::default(),
    )?;
    Ok(ProbeScores {
        linear,
        l2: fitted.chosen_l2,
        knn,
        n_train: tr_y.len(),
        n_test: te_y.len(),
        n_classes,
    })
}
