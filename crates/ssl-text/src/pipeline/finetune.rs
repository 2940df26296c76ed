//! `finetune`: a pretrained text model (a run of [`super::pretrain`] or a Hugging Face BERT
//! directory) fine-tuned for sequence classification on a label column, as transformers'
//! `BertForSequenceClassification` does it, beside the same model trained from random
//! initialisation with the same budget, at each label fraction (ssl-core's
//! [`ssl_core::finetune`] machinery).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use ssl_core::checkpoint::CheckpointManager;
use ssl_core::finetune::{
    final_loss, run_plan, ClassScores, Classifier, FinetuneConfig, FinetuneEncoder, FinetuneReport,
    Labelled, LabelledSource, LayerGroup, RunScores, RunSpec, Start,
};
use ssl_core::nn::ops::dropout;
use ssl_core::probe::{probe_split, ClassIds};
use ssl_core::run_dir::{self, RunOptions};
use ssl_core::{
    Ctx, Encoder, Parallel, ParamStore, PretextTask, SslRng, TaskOutput, TrainConfig, Trainer,
};
use ssl_data::{ColumnSpec, DataLoader, LoaderConfig, ParquetSource};
use tokenizers::Tokenizer;

use super::config::TextConfig;
use super::embed::{document_seq, TextModel};
use super::stream::{RowFilter, LOADER_BATCH_ROWS};
use crate::{
    export_hf_dir, save_tokenizer, BertForMaskedLM, BertInput, InputConfig, InputMode, Result,
    SpecialIds, TextBatch, TextError,
};

/// The peak learning rate of a fine-tuning run when `finetune.train.lr = 0` (the default of
/// [`finetune_config`]), by the model's width: BERT's 5e-5 at BERT-base's 768, scaled by
/// `(768 / hidden_size)^2`, at most 3e-3: 2e-4 for all-MiniLM-L6-v2 (384), 1.8e-3 for the tiny
/// preset (128). Measured on fortunes with the tiny preset (crate README): 2e-4 left it at the
/// majority class after 111 steps, 1e-3 and 3e-3 learned, from either start.
pub fn finetune_lr(hidden_size: usize) -> f64 {
    let ratio = 768.0 / hidden_size.max(1) as f64;
    (5e-5 * ratio * ratio).min(3e-3)
}

/// The fine-tuning defaults of text: BERT's recipe (Devlin et al. 2019, transformers'
/// `run_glue.py`): AdamW, 3 epochs over the labelled rows (at least `finetune.min_steps` =
/// 100 steps for small fractions), batch 32, the peak rate by the model's width
/// (`train.lr = 0`: [`finetune_lr`]; any other value is used as given), linear warm-up over
/// the first tenth of each run then cosine decay, weight decay 0.01, no label smoothing, no
/// layer-wise decay (BERT fine-tunes every layer at one rate), the head drawn as BERT's
/// weights are (normal, std 0.02). The warm-up of a run is `train.warmup_steps` but at most a
/// tenth of its steps: the default 10,000 makes it exactly a tenth of any run shorter than
/// 100,000 steps.
pub fn finetune_config() -> FinetuneConfig {
    let core = FinetuneConfig::default();
    FinetuneConfig {
        layer_decay: 1.0,
        label_smoothing: 0.0,
        head_init_std: 0.02,
        min_steps: 100,
        train: TrainConfig {
            max_epochs: 3.0,
            max_steps: 0,
            batch_size: 32,
            // By the model's width: `finetune_lr`.
            lr: 0.0,
            warmup_steps: 10_000,
            weight_decay: 0.01,
            checkpoint_every_steps: 0,
            health_every: 0,
            ..core.train.clone()
        },
        ..core
    }
}

/// BERT as the encoder of a [`Classifier`]: the document's pooled last hidden state (as
/// the run embeds it: `embed.pooling`, mean over the non-padding tokens by default, or the
/// `[CLS]` token; `embed.layer`), then dropout at the model's `hidden_dropout_prob` (0.1 for
/// BERT; transformers' `classifier_dropout` default). The models pretrained here have no
/// next-sentence pooler (`dense + tanh` on `[CLS]`), so the head sits on the embedding `ssl
/// embed text` writes, which is also what sentence-transformers checkpoints are trained to
/// produce.
///
/// Layers for layer-wise decay: `bert.embeddings.*` the embeddings, `bert.encoder.layer.i.*`
/// block `i`, everything else (the head) on top. The masked-LM head (`cls.predictions.*`) stays
/// in the store, untouched, so a fine-tuned checkpoint loads, embeds and evaluates as a
/// pretrained one.
pub struct BertFeatures {
    model: BertForMaskedLM,
    dropout: f32,
}

impl BertFeatures {
    /// The encoder of `model` (pooling as set on it), with dropout `hidden_dropout_prob` on
    /// the pooled features.
    pub fn new(model: BertForMaskedLM) -> Self {
        let dropout = model.bert().config().hidden_dropout_prob;
        BertFeatures { model, dropout }
    }

    /// The model.
    pub fn model(&self) -> &BertForMaskedLM {
        &self.model
    }
}

impl FinetuneEncoder for BertFeatures {
    type Batch = BertInput;

    fn params(&self) -> &ParamStore {
        PretextTask::params(&self.model)
    }

    fn features(&self, batch: &BertInput, ctx: &mut Ctx) -> ssl_core::Result<Tensor> {
        let pooled = self.model.bert().encode(batch, ctx)?.pooled;
        dropout(&pooled, self.dropout, ctx.train, ctx.rng)
    }

    fn feature_dim(&self) -> usize {
        self.model.bert().config().hidden_size
    }

    fn batch_len(&self, batch: &BertInput) -> usize {
        batch.input_ids.dims().first().copied().unwrap_or(0)
    }

    fn num_layers(&self) -> usize {
        self.model.bert().config().num_hidden_layers
    }

    fn layer_of(&self, name: &str) -> LayerGroup {
        if name.starts_with("bert.embeddings.") {
            return LayerGroup::Embedding;
        }
        if let Some(rest) = name.strip_prefix("bert.encoder.layer.") {
            if let Some(i) = rest.split('.').next().and_then(|i| i.parse().ok()) {
                return LayerGroup::Block(i);
            }
        }
        LayerGroup::Top
    }
}

/// The prefix of the masked-LM head's parameters, which fine-tuning leaves as they are.
const MLM_HEAD_PREFIX: &str = "cls.";

/// A text classifier as the trainer sees it: ssl-core's [`Classifier`] on [`BertFeatures`],
/// with the masked-LM head (which no classification loss reaches) frozen rather than
/// reported as a parameter without gradient.
pub struct TextClassifier {
    inner: Classifier<BertFeatures>,
}

impl TextClassifier {
    /// Wraps `inner`.
    pub fn new(inner: Classifier<BertFeatures>) -> Self {
        TextClassifier { inner }
    }

    /// The classifier.
    pub fn classifier(&self) -> &Classifier<BertFeatures> {
        &self.inner
    }
}

impl PretextTask for TextClassifier {
    type Batch = Labelled<BertInput>;

    fn params(&self) -> &ParamStore {
        self.inner.params()
    }

    fn forward(&self, batch: &Self::Batch, ctx: &mut Ctx) -> ssl_core::Result<TaskOutput> {
        self.inner.forward(batch, ctx)
    }

    fn embed(&self, batch: &Self::Batch, ctx: &mut Ctx) -> ssl_core::Result<Tensor> {
        self.inner.embed(batch, ctx)
    }

    fn batch_len(&self, batch: &Self::Batch) -> usize {
        self.inner.batch_len(batch)
    }

    fn lr_scale(&self, name: &str) -> f64 {
        if name.starts_with(MLM_HEAD_PREFIX) {
            0.0
        } else {
            self.inner.lr_scale(name)
        }
    }
}

/// Labelled documents held as token ids (each truncated to `input.max_seq_len`).
struct Examples {
    ids: Vec<Vec<u32>>,
    labels: Vec<String>,
}

/// Tokenizes one document as `embed` does: one sequence, truncated; `[CLS] [SEP]` for a
/// document without tokens.
fn doc_ids(tok: &Tokenizer, text: &str, input: &InputConfig, sp: &SpecialIds) -> Result<Vec<u32>> {
    Ok(document_seq(tok, text, input)?
        .map(|s| s.ids)
        .unwrap_or_else(|| vec![sp.cls, sp.sep]))
}

/// The document inputs of `cfg`: one sequence per document, `input.max_seq_len` tokens.
fn doc_input(cfg: &TextConfig) -> InputConfig {
    InputConfig {
        mode: InputMode::Document,
        max_seq_len: cfg.input.max_seq_len,
    }
}

/// A one-pass, file-order loader over `columns` of `source`.
fn loader(
    source: &ParquetSource,
    cfg: &TextConfig,
    columns: Vec<ColumnSpec>,
) -> Result<DataLoader> {
    Ok(DataLoader::new(
        source,
        LoaderConfig {
            columns,
            batch_size: LOADER_BATCH_ROWS,
            shuffle: false,
            epochs: Some(1),
            skip_bad_rows: cfg.data.skip_bad_rows,
            prefetch: 2,
            ..LoaderConfig::default()
        },
    )?)
}

/// Opens `paths` and checks that they have the label column `label`, naming the files.
fn open_labelled(paths: &[String], label: &str, what: &str) -> Result<ParquetSource> {
    let source = ParquetSource::open(paths)?;
    if !source.has_column(label) {
        return Err(TextError::Config(format!(
            "finetune.label_column = {label:?}: the {what} ({}) has no column {label:?}",
            source.files().join(", ")
        )));
    }
    Ok(source)
}

/// Reads the documents of `paths` (the `data.max_docs` sample) with their labels, tokenized:
/// the streamed pass that fills the training examples.
fn read_examples(
    paths: &[String],
    cfg: &TextConfig,
    tok: &Tokenizer,
    label: &str,
) -> Result<Examples> {
    let source = open_labelled(paths, label, "training data")?;
    let filter = RowFilter::new(&cfg.data, cfg.train.seed, source.num_rows());
    let mut loader = loader(
        &source,
        cfg,
        vec![ColumnSpec::text(&cfg.data.column), ColumnSpec::label(label)],
    )?;
    let sp = SpecialIds::of(tok)?;
    let input = doc_input(cfg);
    let mut ex = Examples {
        ids: Vec::new(),
        labels: Vec::new(),
    };
    while let Some(batch) = loader.next_batch()? {
        let texts = batch.text(&cfg.data.column)?;
        let labels = batch.label_column(label)?.strings();
        for (k, &row) in batch.rows().iter().enumerate() {
            if filter.sampled(row) {
                ex.ids.push(doc_ids(tok, &texts[k], &input, &sp)?);
                ex.labels.push(labels[k].clone());
            }
        }
    }
    Ok(ex)
}

/// The labels of `paths` (the label column alone, streamed).
fn read_labels(paths: &[String], cfg: &TextConfig, label: &str) -> Result<Vec<String>> {
    let source = open_labelled(paths, label, "test data")?;
    let mut loader = loader(&source, cfg, vec![ColumnSpec::label(label)])?;
    let mut out = Vec::new();
    while let Some(batch) = loader.next_batch()? {
        out.extend(batch.label_column(label)?.strings());
    }
    Ok(out)
}

/// Model inputs of sequences `ids`, padded to the longest with `pad`.
fn inputs(ids: &[&[u32]], pad: u32, device: &Device) -> Result<BertInput> {
    TextBatch {
        seqs: Vec::new(),
        pad_id: pad,
        device: device.clone(),
    }
    .tensors_for(ids)
}

/// Where a run is scored.
enum TestSplit {
    /// Test files, streamed at every scoring.
    Files(Vec<String>),
    /// A held-out part of the training data (token ids and class ids).
    Held { ids: Vec<Vec<u32>>, y: Vec<usize> },
}

/// What every run of a plan shares.
struct Plan<'a> {
    ckpt: &'a Path,
    cfg: TextConfig,
    ft: &'a FinetuneConfig,
    classes: &'a ClassIds,
    train: Examples,
    y: Vec<usize>,
    test: TestSplit,
    label: &'a str,
    opts: &'a RunOptions,
    par: &'a Parallel,
}

impl Plan<'_> {
    /// Predictions and truth of the test split with `clf`, in batches of `batch` documents.
    fn score(&self, clf: &TextClassifier, tok: &Tokenizer, device: &Device) -> Result<ClassScores> {
        let batch = self.ft.train.batch_size.max(16);
        let sp = SpecialIds::of(tok)?;
        let mut rng = SslRng::new(self.ft.train.seed);
        let mut predict = |ids: &[&[u32]], pred: &mut Vec<usize>| -> Result<()> {
            for chunk in ids.chunks(batch) {
                let x = inputs(chunk, sp.pad, device)?;
                pred.extend(clf.classifier().predict(&x, &mut rng)?);
            }
            Ok(())
        };
        let (mut pred, mut truth) = (Vec::new(), Vec::new());
        match &self.test {
            TestSplit::Held { ids, y } => {
                let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
                predict(&refs, &mut pred)?;
                truth.clone_from(y);
            }
            TestSplit::Files(paths) => {
                let source = open_labelled(paths, self.label, "test data")?;
                let col = &self.cfg.data.column;
                let cols = vec![ColumnSpec::text(col), ColumnSpec::label(self.label)];
                let mut loader = loader(&source, &self.cfg, cols)?;
                let input = doc_input(&self.cfg);
                while let Some(b) = loader.next_batch()? {
                    let ids = b
                        .text(col)?
                        .iter()
                        .map(|t| doc_ids(tok, t, &input, &sp))
                        .collect::<Result<Vec<_>>>()?;
                    let refs: Vec<&[u32]> = ids.iter().map(Vec::as_slice).collect();
                    predict(&refs, &mut pred)?;
                    truth.extend(self.classes.ids(&b.label_column(self.label)?.strings()));
                }
            }
        }
        Ok(ClassScores::new(&pred, &truth, self.classes.classes.len())?)
    }

    /// Trains and scores one run of the plan.
    fn run(&self, spec: &RunSpec) -> Result<RunScores> {
        let t0 = Instant::now();
        let mut train = spec.train.clone();
        // BERT warms up over a tenth of the run.
        train.warmup_steps = train.warmup_steps.min(train.max_steps / 10);
        let loaded = TextModel::load(self.ckpt, &self.cfg)?;
        let loaded = match spec.start {
            Start::Pretrained => loaded,
            Start::Scratch => loaded.random_init(train.seed)?,
        };
        let TextModel {
            cfg,
            tok,
            model,
            device,
            ..
        } = loaded;
        // A run already begun is resumed; one not yet begun starts fresh.
        let begun = CheckpointManager::new(spec.dir.join("checkpoints"), usize::MAX)
            .latest()?
            .is_some();
        let opts = RunOptions {
            resume: self.opts.resume && begun,
            ..self.opts.clone()
        };
        let run = opts.run_dir(&spec.dir, self.par)?;
        let store = PretextTask::params(&model).clone();
        let bert_cfg = model.bert().config().clone();
        let clf = Classifier::new(
            BertFeatures::new(model),
            self.classes.classes.len(),
            self.ft,
            spec.start,
            &store.builder(train.seed),
        )?;
        let task = TextClassifier::new(clf);
        run.check_params(&store)?;
        // The run's configuration: the model as it now stands (no preset, no init_from: the
        // weights are in the run's checkpoints), its tokenizer, the fine-tuning settings.
        let mut run_cfg = cfg;
        run_cfg.model.config = bert_cfg.clone();
        run_cfg.model.preset.clear();
        run_cfg.model.init_from.clear();
        run_cfg.train = train.clone();
        if self.par.is_main() {
            let tok_path = save_tokenizer(&tok, &spec.dir)?;
            run_cfg.tokenizer.file = std::fs::canonicalize(&tok_path)
                .map_err(|e| TextError::io(&tok_path, e))?
                .to_string_lossy()
                .into_owned();
            run_dir::write_config(&spec.dir, &run_cfg)?;
        }
        let pad = SpecialIds::of(&tok)?.pad;
        // The padded token ids of `idx` (indices into `rows`, a list of the run's rows).
        let docs = |rows: &[usize], idx: &[usize]| -> ssl_core::Result<BertInput> {
            let ids: Vec<&[u32]> = idx
                .iter()
                .map(|&i| self.train.ids[rows[i]].as_slice())
                .collect();
            Ok(inputs(&ids, pad, &device)?)
        };
        if !opts.resume {
            // Frozen mode: the features' statistics over the run's documents, on every rank
            // (a resumed run has them in its checkpoint).
            task.classifier().fit_standardizer(
                spec.rows.len(),
                train.batch_size,
                |idx| docs(&spec.rows, idx),
                &mut SslRng::new(train.seed),
            )?;
        }
        // This rank's share of the run's rows, held as token ids, padded per batch.
        let rows = self
            .par
            .shard(spec.rows.clone(), "labelled training documents")?;
        let mut source = LabelledSource::new(rows.len(), train.batch_size, train.seed, |idx| {
            let y: Vec<usize> = idx.iter().map(|&i| self.y[rows[i]]).collect();
            Labelled::new(docs(&rows, idx)?, &y, &device)
        })?;
        let run_config =
            serde_json::to_value(&run_cfg).map_err(|e| TextError::Pipeline(e.to_string()))?;
        let report =
            opts.trainer(&train, &spec.dir, run_config, self.par)?
                .fit(&task, &mut source, None)?;
        run.finish();
        if report.interrupted {
            return Err(TextError::Pipeline(format!(
                "fine-tuning stopped at step {} of {} in {}: continue it with --resume",
                report.step,
                train.max_steps,
                spec.dir.display()
            )));
        }
        if self.par.is_main() {
            export_hf_dir(&bert_cfg, &store, &tok, &spec.dir.join("hf"))?;
        }
        let test = self.score(&task, &tok, &device)?;
        Ok(RunScores {
            test,
            steps: report.step,
            final_train_loss: final_loss(&report.losses),
            seconds: t0.elapsed().as_secs_f64(),
            dir: spec.dir.clone(),
        })
    }
}

/// The report's file in the output directory of [`finetune`].
pub const FINETUNE_REPORT_FILE: &str = ssl_core::finetune::REPORT_FILE;

/// Fine-tunes the text model of `checkpoint` (a run's checkpoint directory or a Hugging Face
/// BERT directory) configured by `cfg` (both from [`super::stored_config`]) to classify the
/// documents of `data` by `ft.label_column`, and scores it on `test` (or, when `test` is
/// empty, on a seeded stratified fifth of `data`, [`probe_split`] with `finetune.seed`).
///
/// For every fraction of `finetune.label_fractions` (drawn per class with `finetune.seed`) it
/// trains a run from the pretrained weights into `out/fraction-F/pretrained` and, with
/// `finetune.compare_scratch`, the same model from random initialisation (`train.seed`) with
/// the same budget into `out/fraction-F/scratch` (see [`run_plan`]). Each run directory is a
/// text run like a pretrained one (`config.toml`, `tokenizer.json`, `checkpoints/`,
/// `metrics.jsonl`, `hf/`): `embed` and `eval` take it (they ignore the head's
/// `classifier.*` tensors). The classifier is [`BertFeatures`] + a linear head ([`Classifier`]);
/// `finetune.mode = "frozen"` trains the head alone. The report is written to
/// `out/report.json` (through a temporary file) and returned. `finetune.train.lr = 0` is
/// replaced by [`finetune_lr`] of the model's width (and stored so in each run's
/// `config.toml`).
///
/// The labelled training documents are read once (streamed, the `data.max_docs` sample) and
/// kept in memory as token ids, each truncated to `input.max_seq_len`, padded per batch;
/// the test files are streamed at every scoring, keeping only the predictions. With several
/// ranks (`opts.collective`) every rank trains on its share of each run's rows and scores the
/// whole test split; rank 0 writes the files. With `opts.resume` runs that have checkpoints
/// continue from them and the others start.
pub fn finetune(
    checkpoint: &Path,
    cfg: &TextConfig,
    ft: &FinetuneConfig,
    data: &[String],
    test: &[String],
    out: &Path,
    opts: &RunOptions,
) -> Result<FinetuneReport> {
    if data.is_empty() {
        return Err(TextError::Config(
            "no training data given: pass at least one Parquet file, directory or glob".into(),
        ));
    }
    let mut cfg = cfg.clone();
    // The runs train with `finetune.train`; the model loads on its device.
    cfg.train.device.clone_from(&ft.train.device);
    cfg.resolve_lr();
    let loaded = TextModel::load(checkpoint, &cfg)?;
    let mut ft = ft.clone();
    if ft.train.lr == 0.0 {
        ft.train.lr = finetune_lr(loaded.model.bert().config().hidden_size);
    }
    let ft = &ft;
    ft.validate()?;
    let tok = loaded.tok;
    let device = ssl_core::parse_device(&cfg.train.device)?;
    let (par, _) = opts.parallel(device)?;
    let label = ft.label_column.as_str();
    let all = read_examples(data, &cfg, &tok, label)?;
    if all.ids.is_empty() {
        return Err(TextError::InvalidInput(format!(
            "no labelled documents in {} (column {:?})",
            data.join(", "),
            cfg.data.column
        )));
    }
    let (classes, train, y, test_split) = if test.is_empty() {
        let classes = ClassIds::new(&all.labels, None);
        let y_all = classes.ids(&all.labels);
        let (tr, te) = probe_split(&y_all, ft.seed)?;
        let pick = |idx: &[usize]| Examples {
            ids: idx.iter().map(|&i| all.ids[i].clone()).collect(),
            labels: idx.iter().map(|&i| all.labels[i].clone()).collect(),
        };
        let held = TestSplit::Held {
            ids: te.iter().map(|&i| all.ids[i].clone()).collect(),
            y: te.iter().map(|&i| y_all[i]).collect(),
        };
        let y = tr.iter().map(|&i| y_all[i]).collect();
        (classes, pick(&tr), y, held)
    } else {
        let test_labels = read_labels(test, &cfg, label)?;
        let classes = ClassIds::new(&all.labels, Some(&test_labels));
        let y = classes.ids(&all.labels);
        (classes, all, y, TestSplit::Files(test.to_vec()))
    };
    let test_rows = match &test_split {
        TestSplit::Held { y, .. } => y.len(),
        TestSplit::Files(_) => 0,
    };
    let plan = Plan {
        ckpt: checkpoint,
        cfg,
        ft,
        classes: &classes,
        train,
        y,
        test: test_split,
        label,
        opts,
        par: &par,
    };
    std::fs::create_dir_all(out).map_err(|e| TextError::io(out, e))?;
    let mut scored_rows = test_rows;
    let labels = plan.y.clone();
    let mut report = run_plan(
        ft,
        &classes.classes,
        &labels,
        test_rows,
        out,
        |spec| {
            let s = plan.run(spec)?;
            scored_rows = s.test.examples;
            Ok(s)
        },
        |line| {
            if par.is_main() {
                eprintln!("{line}");
            }
        },
    )?;
    report.test_rows = scored_rows;
    if par.is_main() {
        let json = serde_json::to_vec_pretty(&report)
            .map_err(|e| TextError::Pipeline(format!("writing the report: {e}")))?;
        ssl_data::output::write_output(&out.join(FINETUNE_REPORT_FILE), &json)?;
    }
    Ok(report)
}

/// The directory of one run of [`finetune`]'s output (`out/fraction-F/pretrained` or
/// `.../scratch`).
pub fn finetune_run_dir(out: &Path, fraction: f64, start: Start) -> PathBuf {
    ssl_core::finetune::run_dir(out, fraction, start)
}
