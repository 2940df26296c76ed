//! `eval`: held-out perplexity and masked accuracy of a trained model on documents, and with
//! labels the linear-probe and k-NN accuracy of its pooled embeddings, beside those of a
//! randomly initialised model of the same shape and the majority-class rate.

use std::path::Path;

use serde::Serialize;
use ssl_core::probe::{probe_labelled, warn_unseen_labels, ProbeScores};

use ssl_data::ParquetSource;

use super::config::TextConfig;
use super::docs::docs_of_batch;
use super::embed::{doc_loader, report_bad_rows, TextModel};
use super::stream::LOADER_BATCH_ROWS;
use super::tokenizer::tokenize;
use crate::{MlmAccum, Pooling, Result, SpecialIds};

/// The probe part of [`TextEvalReport`]: linear-probe and k-NN accuracy of the pooled
/// embeddings (present when the documents have labels).
#[derive(Debug, Clone, Serialize)]
pub struct TextProbeReport {
    /// Linear probe test accuracy.
    pub linear_probe_accuracy: f64,
    /// Weighted cosine k-NN test accuracy.
    pub knn_accuracy: f64,
    /// Linear probe test accuracy of a randomly initialised BERT of the same configuration
    /// and tokenizer (seeded by `train.seed`), on the same rows.
    pub random_init_linear_probe_accuracy: f64,
    /// k-NN test accuracy of that randomly initialised BERT.
    pub random_init_knn_accuracy: f64,
    /// The accuracy of always predicting the most frequent training class: the floor of
    /// every probe above.
    pub majority_class_rate: f64,
    /// Training rows of the probes.
    pub n_train: usize,
    /// Test rows (the test set, or a seeded stratified 20% of the training documents).
    pub n_test: usize,
    /// Classes over training and test labels.
    pub n_classes: usize,
    /// Embedding width.
    pub embedding_dim: usize,
    /// How documents were pooled (`embed.pooling`).
    pub pooling: Pooling,
    /// The hidden state pooled (`embed.layer`).
    pub layer: i64,
    /// Test rows whose label never occurs in training (absent when 0; a warning is printed).
    #[serde(skip_serializing_if = "is_zero")]
    pub unseen_test_rows: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// What `ssl eval text` prints, as one JSON object (these keys).
#[derive(Debug, Clone, Serialize)]
pub struct TextEvalReport {
    /// The checkpoint (or Hugging Face) directory evaluated.
    pub checkpoint: String,
    /// `exp(masked_loss)`.
    pub perplexity: f64,
    /// Mean cross-entropy over the masked tokens.
    pub masked_loss: f64,
    /// Fraction of masked tokens predicted exactly.
    pub masked_accuracy: f64,
    /// Masked tokens evaluated.
    pub masked_tokens: usize,
    /// Probe accuracies, when the documents have labels.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub probe: Option<TextProbeReport>,
}

/// Pooled embeddings and labels of labelled documents, gathered while streaming.
#[derive(Default)]
struct Probed {
    emb: Vec<f32>,
    random_emb: Vec<f32>,
    labels: Vec<String>,
    dim: usize,
}

impl Probed {
    /// Embeds `texts` with the model and the randomly initialised one and keeps their labels.
    fn add(
        &mut self,
        l: &TextModel,
        random: &TextModel,
        texts: &[String],
        labels: Vec<String>,
    ) -> Result<()> {
        if texts.is_empty() {
            return Ok(());
        }
        let (e, dim) = l.embed_quietly(texts)?;
        self.emb.extend(e);
        self.random_emb.extend(random.embed_quietly(texts)?.0);
        self.labels.extend(labels);
        self.dim = dim;
        Ok(())
    }
}

/// Streams the labelled documents of `data` (the `data.max_docs` sample) into `probed`.
fn embed_labelled(
    l: &TextModel,
    random: &TextModel,
    data: &[String],
    label: &str,
    probed: &mut Probed,
) -> Result<()> {
    let source = ParquetSource::open(data)?;
    let rows = LOADER_BATCH_ROWS;
    let (mut loader, filter) = doc_loader(&source, &l.cfg, Some(label), false, rows)?;
    let bar = ssl_core::monitor::Progress::task("eval test", source.num_rows() as u64, "rows");
    while let Some(batch) = loader.next_batch()? {
        let docs = docs_of_batch(&batch, batch.rows(), &l.cfg.data, Some(label), false, |i| {
            filter.sampled(i)
        })?;
        probed.add(l, random, &docs.texts, docs.labels.unwrap_or_default())?;
        bar.inc(batch.len() as u64);
    }
    bar.finish();
    report_bad_rows(&loader);
    Ok(())
}

/// Evaluates the model of checkpoint directory `ckpt` configured by `cfg` (see
/// [`super::stored_config`]) on the documents of `data`: masked-LM perplexity and masked
/// accuracy (masking seeded by `train.seed`), and when `data` has the label column
/// (`label_column`, else `data.label_column`) the linear probe and k-NN on the pooled
/// embeddings, tested on `test` when given, else on a seeded stratified split of `data`.
///
/// The documents are streamed (tokenized and packed per loader batch of
/// [`LOADER_BATCH_ROWS`] rows, as training packs them) and never held whole; the probes hold
/// the pooled embeddings (N x D floats, for the model and the random-init baseline) and the
/// labels of every labelled document, as fitting them needs.
pub fn eval(
    ckpt: &Path,
    cfg: &TextConfig,
    data: &[String],
    test: &[String],
    label_column: Option<&str>,
) -> Result<TextEvalReport> {
    let l = TextModel::load(ckpt, cfg)?;
    let label = label_column.unwrap_or(&l.cfg.data.label_column).to_string();
    let source = ParquetSource::open(data)?;
    let has_label = source.has_column(&label);
    let label_opt = has_label.then_some(label.as_str());
    let sp = SpecialIds::of(&l.tok)?;
    let seed = l.cfg.train.seed;
    // The same configuration and tokenizer with fresh weights, probed on the same rows (the
    // split is seeded alike): what pretraining adds.
    let random = if has_label {
        Some(l.random_init(seed)?)
    } else {
        None
    };
    let mut mlm = MlmAccum::new(l.cfg.train.batch_size.max(8), sp.pad, seed, &l.device);
    let mut train = Probed::default();
    let (mut loader, filter) = doc_loader(&source, &l.cfg, label_opt, true, LOADER_BATCH_ROWS)?;
    let bar = ssl_core::monitor::Progress::task("eval", source.num_rows() as u64, "rows");
    while let Some(batch) = loader.next_batch()? {
        let docs = docs_of_batch(&batch, batch.rows(), &l.cfg.data, label_opt, true, |i| {
            filter.sampled(i)
        })?;
        let seqs = tokenize(&l.tok, &docs.texts, docs.entities.as_deref(), &l.cfg)?;
        mlm.add(&l.model, seqs)?;
        if let Some(r) = &random {
            train.add(&l, r, &docs.texts, docs.labels.unwrap_or_default())?;
        }
        bar.inc(batch.len() as u64);
    }
    bar.finish();
    report_bad_rows(&loader);
    let mlm = mlm.finish(&l.model)?;
    let mut report = TextEvalReport {
        checkpoint: l.ckpt.display().to_string(),
        perplexity: mlm.perplexity,
        masked_loss: mlm.loss,
        masked_accuracy: mlm.masked_accuracy,
        masked_tokens: mlm.masked_tokens,
        probe: None,
    };
    let Some(random) = random else {
        return Ok(report);
    };
    let test_set = if test.is_empty() {
        None
    } else {
        let mut t = Probed::default();
        embed_labelled(&l, &random, test, &label, &mut t)?;
        warn_unseen_labels(&train.labels, &t.labels);
        Some(t)
    };
    let dim = if train.dim > 0 {
        train.dim
    } else {
        l.model.bert().config().hidden_size
    };
    let scores = probe_labelled(
        (&train.emb, &train.labels),
        test_set.as_ref().map(|t| (&t.emb[..], &t.labels[..])),
        dim,
        seed,
    )?;
    let rscores: ProbeScores = probe_labelled(
        (&train.random_emb, &train.labels),
        test_set
            .as_ref()
            .map(|t| (&t.random_emb[..], &t.labels[..])),
        dim,
        seed,
    )?;
    report.probe = Some(TextProbeReport {
        linear_probe_accuracy: scores.linear,
        knn_accuracy: scores.knn,
        random_init_linear_probe_accuracy: rscores.linear,
        random_init_knn_accuracy: rscores.knn,
        majority_class_rate: scores.majority_class_rate,
        n_train: scores.n_train,
        n_test: scores.n_test,
        n_classes: scores.n_classes,
        embedding_dim: dim,
        pooling: l.cfg.embed.pooling,
        layer: l.cfg.embed.layer,
        unseen_test_rows: scores.unseen_test_rows,
    });
    Ok(report)
}
