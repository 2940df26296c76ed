//! `eval`: held-out perplexity and masked accuracy of a trained model on documents, and with
//! labels the linear-probe and k-NN accuracy of its pooled embeddings, beside those of a
//! randomly initialised model of the same shape and the majority-class rate.

use std::path::Path;

use serde::Serialize;
use ssl_core::probe::{probe_labelled, warn_unseen_labels, ProbeScores};

use super::config::TextConfig;
use super::docs::read_docs;
use super::embed::TextModel;
use super::tokenizer::tokenize;
use crate::{evaluate_mlm, Pooling, Result, SpecialIds};

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

/// Evaluates the model of checkpoint directory `ckpt` configured by `cfg` (see
/// [`super::stored_config`]) on the documents of `data`: masked-LM perplexity and masked
/// accuracy (masking seeded by `train.seed`), and when `data` has the label column
/// (`label_column`, else `data.label_column`) the linear probe and k-NN on the pooled
/// embeddings, tested on `test` when given, else on a seeded stratified split of `data`.
pub fn eval(
    ckpt: &Path,
    cfg: &TextConfig,
    data: &[String],
    test: &[String],
    label_column: Option<&str>,
) -> Result<TextEvalReport> {
    let l = TextModel::load(ckpt, cfg)?;
    let label = label_column.unwrap_or(&l.cfg.data.label_column).to_string();
    let has_label = ssl_data::ParquetSource::open(data)?.has_column(&label);
    let docs = read_docs(data, &l.cfg.data, has_label.then_some(label.as_str()), true)?;
    let sp = SpecialIds::of(&l.tok)?;
    let seqs = tokenize(&l.tok, &docs.texts, docs.entities.as_deref(), &l.cfg)?;
    let mlm = evaluate_mlm(
        &l.model,
        &seqs,
        l.cfg.train.batch_size.max(8),
        sp.pad,
        l.cfg.train.seed,
        &l.device,
    )?;
    let mut report = TextEvalReport {
        checkpoint: l.ckpt.display().to_string(),
        perplexity: mlm.perplexity,
        masked_loss: mlm.loss,
        masked_accuracy: mlm.masked_accuracy,
        masked_tokens: mlm.masked_tokens,
        probe: None,
    };
    if let Some(train_labels) = docs.labels {
        let test_docs = if test.is_empty() {
            None
        } else {
            Some(read_docs(test, &l.cfg.data, Some(&label), false)?)
        };
        if let Some(test_labels) = test_docs.as_ref().and_then(|t| t.labels.as_ref()) {
            warn_unseen_labels(&train_labels, test_labels);
        }
        // The model's probes, and the same configuration and tokenizer with fresh weights
        // probed on the same rows (the split is seeded alike): what pretraining adds.
        let seed = l.cfg.train.seed;
        let probe = |m: &TextModel| -> Result<(ProbeScores, usize)> {
            let (emb, dim) = m.embed_texts(&docs.texts)?;
            let test_set = match &test_docs {
                Some(t) => Some((
                    m.embed_texts(&t.texts)?.0,
                    t.labels.clone().unwrap_or_default(),
                )),
                None => None,
            };
            let test = test_set.as_ref().map(|(x, y)| (&x[..], &y[..]));
            Ok((probe_labelled((&emb, &train_labels), test, dim, seed)?, dim))
        };
        let (scores, dim) = probe(&l)?;
        let (rscores, _) = probe(&l.random_init(seed)?)?;
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
    }
    Ok(report)
}
