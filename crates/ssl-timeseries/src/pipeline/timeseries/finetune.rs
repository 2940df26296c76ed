//! Fine-tuning a pretrained time-series encoder for classification (`ssl finetune
//! timeseries`): the run's encoder (TS2Vec's dilated convolutions by default; PatchTST, GRU,
//! LSTM or the transformer where the run used them) under a linear head on the embedding the
//! pipeline's `embed` writes (TS2Vec: the max over observed timesteps), trained with
//! ssl-core's shared fine-tuning machinery ([`ssl_core::finetune`]): layer-wise learning-rate
//! decay, label smoothing, a frozen-encoder mode, label fractions drawn per class, and the
//! same model trained from random initialisation on the same budget.
//!
//! Series are read exactly as [`super::embed`] reads them (the run's `data.normalize` with its
//! stored channel statistics, `data.max_len`); the labelled training series of a run are held
//! in memory as their raw (scaled) values and batched per step; the test split streams, only
//! its predictions kept.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use ssl_core::checkpoint::{CheckpointManager, MODEL_FILE};
use ssl_core::finetune::{
    final_loss, run_plan, ClassScores, Classifier, FinetuneConfig, FinetuneEncoder, FinetuneReport,
    Labelled, LabelledSource, LayerGroup, RunScores, RunSpec, Start,
};
use ssl_core::probe::{probe_split, ClassIds};
use ssl_core::run_dir::{self, RunOptions};
use ssl_core::seq::{SeqBatch, SeqExample};
use ssl_core::{parse_device, Ctx, Encoder, Init, ParamStore, SslRng, TrainConfig, Trainer};
use ssl_data::{ColumnSpec, DataLoader, ParquetSource};

use super::load::rows_spec;
use super::{build_task, TaskKind, TimeseriesConfig};
use crate::pipeline::common::{self, ordered_loader, rows_pass};
use crate::{EncoderConfig, EncoderKind, Result, SeriesEncoder, Split, TsError};

/// The time-series defaults of `[finetune]`, for the small labelled sets of the UCR / UEA
/// archives (tens to hundreds of series): AdamW at 1e-3 (the pretraining rate of TS2Vec),
/// batches of 8, 40 epochs of the drawn rows but at least 200 steps (a 10 % draw of 50 series
/// is 5 series: one step an epoch), a 20-step warm-up, layer-wise decay 0.9 over the encoder's
/// blocks (11 for TS2Vec's TCN: the input projection trains at 0.9^12 = 0.28 of the head's
/// rate), label smoothing 0.1, weight decay 0.05. Every other setting is
/// [`FinetuneConfig::default`]'s.
pub fn finetune_config() -> FinetuneConfig {
    let base = FinetuneConfig::default();
    FinetuneConfig {
        layer_decay: 0.9,
        min_steps: 200,
        train: TrainConfig {
            max_epochs: 40.0,
            batch_size: 8,
            lr: 1e-3,
            warmup_steps: 20,
            weight_decay: 0.05,
            ..base.train.clone()
        },
        ..base
    }
}

/// A series encoder of the time-series pipeline as ssl-core's [`FinetuneEncoder`]: features
/// are the encoder's pooled embedding (what `embed` writes), its parameters grouped for
/// layer-wise decay: the input projection (TCN `input_fc`, PatchTST `patch_embedding`, the
/// transformer's `embeddings`) is [`LayerGroup::Embedding`], residual block / layer `i` (TCN
/// `feature_extractor.net.i`, transformer `encoder.layer.i`, recurrent layer `i`) is
/// [`LayerGroup::Block`]`(i)`, anything else (final norm, the head) [`LayerGroup::Top`].
pub struct SeriesFinetuneEncoder {
    store: ParamStore,
    encoder: SeriesEncoder,
    layers: usize,
}

impl SeriesFinetuneEncoder {
    /// Wraps `encoder` (built from `cfg`, its parameters in `store`).
    pub fn new(encoder: SeriesEncoder, cfg: &EncoderConfig, store: &ParamStore) -> Self {
        let layers = match cfg.kind {
            EncoderKind::Tcn => cfg.tcn.depth + 1,
            EncoderKind::Gru | EncoderKind::Lstm => cfg.rnn.layers,
            EncoderKind::Patchtst => cfg.patchtst.transformer.depth,
            EncoderKind::Transformer => cfg.transformer.depth,
        };
        SeriesFinetuneEncoder {
            store: store.clone(),
            encoder,
            layers,
        }
    }

    /// The wrapped encoder.
    pub fn encoder(&self) -> &SeriesEncoder {
        &self.encoder
    }
}

/// The block index in `name` after `prefix` (`feature_extractor.net.3.conv1...` -> 3).
fn block_after(name: &str, prefix: &str) -> Option<usize> {
    let rest = name.strip_prefix(prefix)?;
    rest.split('.').next()?.parse().ok()
}

impl FinetuneEncoder for SeriesFinetuneEncoder {
    type Batch = SeqBatch;

    fn params(&self) -> &ParamStore {
        &self.store
    }

    fn features(&self, batch: &SeqBatch, ctx: &mut Ctx) -> ssl_core::Result<Tensor> {
        Ok(self.encoder.encode(batch, ctx)?.pooled)
    }

    fn feature_dim(&self) -> usize {
        self.encoder.dim()
    }

    fn batch_len(&self, batch: &SeqBatch) -> usize {
        batch.len()
    }

    fn num_layers(&self) -> usize {
        self.layers
    }

    fn layer_of(&self, name: &str) -> LayerGroup {
        let embedding = ["input_fc.", "patch_embedding.", "embeddings."];
        if embedding.iter().any(|p| name.starts_with(p)) {
            return LayerGroup::Embedding;
        }
        let block = block_after(name, "feature_extractor.net.")
            .or_else(|| block_after(name, "encoder.layer."))
            .or_else(|| {
                // `rnn.weight_ih_l{k}` and friends.
                let rest = name.strip_prefix("rnn.")?;
                rest.rsplit_once("_l")?.1.parse().ok()
            });
        match block {
            Some(i) => LayerGroup::Block(i.min(self.layers.saturating_sub(1))),
            None => LayerGroup::Top,
        }
    }
}

/// The encoder of the run `cfg` describes, for a fine-tuning run from `start`: parameters
/// drawn from `seed` exactly as [`build_task`] draws them, then, from the pretrained run, the
/// weights of checkpoint directory `ckpt` loaded as `embed` loads them. The pretext task's own
/// parameters (a masked task's reconstruction head) are kept in the store, untrained, so the
/// fine-tuned run's checkpoints embed and evaluate like the pretrained run's. Returns the
/// encoder and the builder, whose stream draws the classifier's head next.
pub fn finetune_encoder(
    cfg: &TimeseriesConfig,
    ckpt: &Path,
    start: Start,
    seed: u64,
    device: &Device,
) -> Result<(SeriesFinetuneEncoder, ssl_core::ParamBuilder)> {
    let (reference, _task) = build_task(cfg, device, seed, None)?;
    let store = ParamStore::new(device);
    let pb = store.builder(seed);
    let encoder = SeriesEncoder::new(&cfg.model, cfg.channels, &pb)?;
    let init = reference.tensors()?;
    for (name, var) in reference.vars() {
        if store.get(&name).is_none() {
            pb.get(&name, var.shape(), Init::Zeros)?;
        }
    }
    // The fresh draw of the whole task (the encoder's part is the same draw as above).
    store.load_from(&init, Path::new("the freshly initialised task"))?;
    if start == Start::Pretrained {
        store.load_safetensors(&ckpt.join(MODEL_FILE))?;
    }
    let enc = SeriesFinetuneEncoder::new(encoder, &cfg.model, &store);
    Ok((enc, pb))
}

/// The labels of `label_column` in `paths`, in file order (a label-only pass, by projection).
fn read_labels(paths: &[String], label_column: &str, skip_bad_rows: bool) -> Result<Vec<String>> {
    let source = ParquetSource::open(paths)?;
    let loader = ordered_loader(
        vec![ColumnSpec::label(label_column)],
        1024,
        0,
        1,
        skip_bad_rows,
    );
    let mut loader = DataLoader::new(&source, loader)?;
    let mut out = Vec::new();
    while let Some(batch) = loader.next_batch()? {
        out.extend(batch.label_column(label_column)?.strings());
    }
    Ok(out)
}

/// An error unless every file of `paths` has `label_column` with a type a label can have,
/// naming the file, the column and the key that chose it.
fn check_label_column(paths: &[String], label_column: &str, what: &str) -> Result<()> {
    ParquetSource::open(paths)?
        .check_columns(&[ColumnSpec::label(label_column)])
        .map_err(|e| TsError::Pipeline(format!("the {what} data (finetune.label_column): {e}")))
}

/// Series of one labelled pass: the examples as `embed` prepares them, and their labels.
fn read_labelled(
    cfg: &TimeseriesConfig,
    paths: &[String],
    label_column: &str,
    batch: usize,
    what: &str,
    mut each: impl FnMut(Vec<SeqExample>, Vec<String>) -> Result<()>,
) -> Result<()> {
    let spec = rows_spec(cfg, Some(label_column))?;
    rows_pass(
        paths,
        |s| spec.transform(s, Split::All),
        "",
        batch,
        what,
        |examples| {
            let mut labels = Vec::with_capacity(examples.len());
            let mut series = Vec::with_capacity(examples.len());
            for e in examples {
                labels.push(e.label.ok_or_else(|| {
                    TsError::Pipeline(format!(
                        "row {} ({}) has no label in column `{label_column}`",
                        e.row, e.id
                    ))
                })?);
                series.push(e.example);
            }
            each(series, labels)?;
            Ok(true)
        },
    )
}

/// Where the test examples come from.
enum TestSet {
    /// Held-out rows of the training data (in memory).
    Rows(Vec<usize>),
    /// Files, streamed at every scoring.
    Files(Vec<String>),
}

/// Fine-tunes the encoder of checkpoint directory `checkpoint` (configuration `cfg`, both
/// from [`super::stored_config`]) as a classifier of the labels in `ft.label_column`: for
/// every fraction of `ft.label_fractions` (drawn per class with `ft.seed`), a run from the
/// pretrained weights and, with `ft.compare_scratch`, one from random initialisation with the
/// same budget, each in its own run directory `out/fraction-F/{pretrained,scratch}`
/// (checkpoints with the classifier's `classifier.*` weights, `metrics.jsonl`, the plots, and
/// `config.toml`: the run's configuration, so a fine-tuned run embeds and evaluates like a
/// pretrained one), scored on `test` (streamed) or, when it is empty, on a seeded stratified
/// split of `data` (`ssl_core::probe::probe_split`). Writes `out/report.json` and returns it.
///
/// Series are prepared as `embed` prepares them (the run's `data.normalize` and stored channel
/// statistics, `data.max_len`); a run's labelled training series are held in memory (their
/// values), decoded into batches of `ft.train.batch_size`. With `opts.resume`, runs already
/// holding checkpoints continue from their newest one; the others start afresh. Ranks of a
/// data-parallel run each draw their own batches from the same rows (the combined batch is
/// `world x batch_size`) and rank 0 writes. Forecasting runs and long-column data are refused
/// (classification reads one labelled series per row).
#[allow(clippy::too_many_arguments)]
pub fn finetune(
    checkpoint: &Path,
    cfg: &TimeseriesConfig,
    ft: &FinetuneConfig,
    data: &[String],
    test: &[String],
    out: &Path,
    opts: &RunOptions,
) -> Result<FinetuneReport> {
    ft.validate()?;
    if data.is_empty() {
        return Err(TsError::InvalidInput(
            "no training data given: pass Parquet files, directories or globs".into(),
        ));
    }
    if !cfg.data.long_column.is_empty() {
        return Err(TsError::Pipeline(format!(
            "fine-tuning classifies one labelled series per row; this run read windows of the long column `{}` (data.long_column)",
            cfg.data.long_column
        )));
    }
    if cfg.task.kind == TaskKind::Forecast {
        return Err(TsError::Pipeline(
            "fine-tuning classifies whole series; a forecasting run's encoder reads RevIN-scaled windows (pretrain with task.kind = \"ts2vec\" or \"masked\")".into(),
        ));
    }
    let ckpt = checkpoint.to_path_buf();
    let label = ft.label_column.as_str();
    check_label_column(data, label, "training")?;
    if !test.is_empty() {
        check_label_column(test, label, "test")?;
    }
    let device = parse_device(&ft.train.device)?;
    let (par, device) = opts.parallel(device)?;
    let bs = ft.train.batch_size.max(1);

    // The labelled training series, held as values.
    let (mut series, mut names) = (Vec::new(), Vec::new());
    read_labelled(cfg, data, label, bs, "finetune (read)", |s, l| {
        series.extend(s);
        names.extend(l);
        Ok(())
    })?;
    let first = series.first().ok_or_else(|| {
        TsError::InvalidInput(format!(
            "no labelled series read from column `{}` of {}",
            cfg.data.column,
            data.join(", ")
        ))
    })?;
    common::data_width(
        "channels",
        cfg.channels,
        first.features,
        " channels per step",
    )?;
    let longest = series.iter().map(|e| e.steps).max().unwrap_or(1);
    common::check_memory(
        &ft.train,
        longest,
        |steps| cfg.model.activation_bytes(steps, cfg.channels as u64),
        "the encoder's size (model.kind and its section)",
    )?;
    let test_names = if test.is_empty() {
        None
    } else {
        Some(read_labels(test, label, cfg.data.skip_bad_rows)?)
    };
    let classes = ClassIds::new(&names, test_names.as_deref());
    let ids = classes.ids(&names);
    let (train_rows, test_set) = match &test_names {
        Some(_) => (
            (0..ids.len()).collect::<Vec<_>>(),
            TestSet::Files(test.to_vec()),
        ),
        None => {
            let (train, held) = probe_split(&ids, ft.seed)?;
            (train, TestSet::Rows(held))
        }
    };
    let train_labels: Vec<usize> = train_rows.iter().map(|&r| ids[r]).collect();
    let test_rows = match (&test_set, &test_names) {
        (TestSet::Rows(r), _) => r.len(),
        (TestSet::Files(_), Some(t)) => t.len(),
        (TestSet::Files(_), None) => 0,
    };
    std::fs::create_dir_all(out).map_err(|e| {
        TsError::Pipeline(format!(
            "creating the output directory {}: {e}",
            out.display()
        ))
    })?;
    if par.is_main() {
        eprintln!(
            "finetune: {} labelled training series ({} classes), {:?} encoder, {:?} fine-tuning",
            train_rows.len(),
            classes.classes.len(),
            cfg.model.kind,
            ft.mode
        );
    }
    let mut run_one = |spec: &RunSpec| -> ssl_core::Result<RunScores> {
        let started = Instant::now();
        let rows: Vec<usize> = spec.rows.iter().map(|&i| train_rows[i]).collect();
        let seed = spec.train.seed;
        let (enc, pb) = finetune_encoder(cfg, &ckpt, spec.start, seed, &device)?;
        let clf = Classifier::new(enc, classes.classes.len(), ft, spec.start, &pb)?;
        let resume = opts.resume
            && CheckpointManager::new(spec.dir.join("checkpoints"), usize::MAX)
                .latest()?
                .is_some();
        let run_opts = RunOptions {
            resume,
            ..opts.clone()
        };
        let guard = run_opts.run_dir(&spec.dir, &par)?;
        guard.check_params(clf.encoder().params())?;
        if par.is_main() {
            run_dir::write_config(&spec.dir, cfg)?;
        }
        let config = serde_json::to_value(cfg)
            .map_err(|e| ssl_core::CoreError::InvalidInput(e.to_string()))?;
        let mut trainer = run_opts.trainer(&spec.train, &spec.dir, config, &par)?;
        let (dev, train_series, row_ids) = (&device, &series, &ids);
        // The batch of the run's examples `idx` (indices into `rows`), for both passes.
        let batch_of = |idx: &[usize]| -> ssl_core::Result<SeqBatch> {
            let refs: Vec<&SeqExample> = idx.iter().map(|&i| &train_series[rows[i]]).collect();
            SeqBatch::from_examples(&refs, dev)
        };
        if !resume {
            // Frozen mode: the features' statistics over the run's series (a resumed run
            // has them in its checkpoint).
            clf.fit_standardizer(rows.len(), bs, batch_of, &mut SslRng::new(seed))?;
        }
        let mut source = LabelledSource::new(
            rows.len(),
            spec.train.batch_size.max(1),
            seed ^ (par.rank as u64),
            |idx: &[usize]| {
                let labels: Vec<usize> = idx.iter().map(|&i| row_ids[rows[i]]).collect();
                Labelled::new(batch_of(idx)?, &labels, dev)
            },
        )?;
        let report = trainer.fit(&clf, &mut source, None)?;
        guard.finish();
        let (pred, truth) = predict(
            &clf, cfg, &test_set, &series, &ids, label, &classes, bs, &device,
        )
        .map_err(ssl_core::CoreError::from)?;
        Ok(RunScores {
            test: ClassScores::new(&pred, &truth, classes.classes.len())?,
            steps: report.step,
            final_train_loss: final_loss(&report.losses),
            seconds: started.elapsed().as_secs_f64(),
            dir: spec.dir.clone(),
        })
    };
    let main = par.is_main();
    let report = run_plan(
        ft,
        &classes.classes,
        &train_labels,
        test_rows,
        out,
        &mut run_one,
        |line| {
            if main {
                eprintln!("finetune: {line}");
            }
        },
    )?;
    if main {
        let json = serde_json::to_vec_pretty(&report)
            .map_err(|e| TsError::Pipeline(format!("writing the report: {e}")))?;
        ssl_data::output::write_output(&out.join(ssl_core::finetune::REPORT_FILE), &json)?;
        let toml = run_dir::to_toml(ft)?;
        ssl_data::output::write_output(&out.join("finetune.toml"), toml.as_bytes())?;
    }
    Ok(report)
}

/// The predicted and true class ids of the test examples (`test`: held-out rows of `series`
/// or files streamed `batch` at a time, prepared as `embed` prepares them).
#[allow(clippy::too_many_arguments)]
fn predict(
    clf: &Classifier<SeriesFinetuneEncoder>,
    cfg: &TimeseriesConfig,
    test: &TestSet,
    series: &[SeqExample],
    ids: &[usize],
    label: &str,
    classes: &ClassIds,
    batch: usize,
    device: &Device,
) -> Result<(Vec<usize>, Vec<usize>)> {
    let mut rng = SslRng::new(0);
    let (mut pred, mut truth) = (Vec::new(), Vec::new());
    match test {
        TestSet::Rows(rows) => {
            for chunk in rows.chunks(batch.max(1)) {
                let refs: Vec<&SeqExample> = chunk.iter().map(|&r| &series[r]).collect();
                let b = SeqBatch::from_examples(&refs, device)?;
                pred.extend(clf.predict(&b, &mut rng)?);
                truth.extend(chunk.iter().map(|&r| ids[r]));
            }
        }
        TestSet::Files(paths) => {
            read_labelled(cfg, paths, label, batch, "finetune (test)", |s, l| {
                let refs: Vec<&SeqExample> = s.iter().collect();
                let b = SeqBatch::from_examples(&refs, device)?;
                pred.extend(clf.predict(&b, &mut rng)?);
                truth.extend(classes.ids(&l));
                Ok(())
            })?;
        }
    }
    Ok((pred, truth))
}

/// The directory of one run of a plan written by [`finetune`] into `out`.
pub fn finetune_run_dir(out: &Path, fraction: f64, start: Start) -> PathBuf {
    ssl_core::finetune::run_dir(out, fraction, start)
}
