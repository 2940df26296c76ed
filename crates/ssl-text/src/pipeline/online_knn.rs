//! The online k-NN accuracy of held-out documents while pretraining (`eval_knn_accuracy`,
//! see [`ssl_core::probe::KnnLabels`]): a fixed bank of labelled training documents and the
//! held-out documents, embedded with the live model in inference mode at each evaluation.

use candle_core::Device;
use ssl_core::nn::MatmulPrecision;
use ssl_core::probe::{knn_bank_rows, KnnLabels};
use tokenizers::Tokenizer;

use super::config::TextConfig;
use super::embed::embed_documents;
use crate::BertForMaskedLM;

/// The bank and the queries of the online k-NN accuracy, chosen once per run.
pub struct OnlineKnn {
    bank: Vec<String>,
    queries: Vec<String>,
    labels: KnnLabels,
}

impl OnlineKnn {
    /// A bank of the training documents `train` ([`knn_bank_rows`] with `seed`) and the
    /// held-out documents `held` as queries, with their labels (classes by their text).
    /// `None` when either side is empty or the labels are not one per document.
    pub fn new(
        train: &[String],
        train_y: &[String],
        held: Vec<String>,
        held_y: &[String],
        seed: u64,
    ) -> Option<Self> {
        if train.is_empty() || held.is_empty() {
            return None;
        }
        if train.len() != train_y.len() || held.len() != held_y.len() {
            return None;
        }
        let idx = knn_bank_rows(train.len(), seed);
        let bank: Vec<String> = idx.iter().map(|&i| train[i].clone()).collect();
        let bank_labels: Vec<String> = idx.iter().map(|&i| train_y[i].clone()).collect();
        Some(OnlineKnn {
            bank,
            queries: held,
            labels: KnnLabels::from_labels(&bank_labels, held_y),
        })
    }

    /// The number of (bank, query) documents.
    pub fn sizes(&self) -> (usize, usize) {
        (self.bank.len(), self.queries.len())
    }

    /// The k-NN accuracy of the queries against the bank, both embedded with `model` (pooled
    /// as it is set to pool) in inference mode with products in `precision` (the run's),
    /// quietly (the training progress line is showing).
    pub fn accuracy(
        &self,
        model: &BertForMaskedLM,
        tok: &Tokenizer,
        cfg: &TextConfig,
        device: &Device,
        precision: MatmulPrecision,
    ) -> ssl_core::Result<f64> {
        let embed =
            |texts: &[String]| embed_documents(model, tok, texts, cfg, device, precision, false);
        let (bank, dim) = embed(&self.bank)?;
        let (queries, _) = embed(&self.queries)?;
        Ok(self.labels.accuracy(&bank, &queries, dim)?)
    }
}
