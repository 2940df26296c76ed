//! The online k-NN accuracy of held-out documents while pretraining (`eval_knn_accuracy`,
//! solo-learn style): at each held-out evaluation a fixed sample of the labelled training
//! documents (the bank) and the held-out documents (the queries) are embedded with the live
//! model in inference mode, and each query is classified by its neighbours in the bank.

use candle_core::Device;
use ssl_core::probe::{knn_accuracy, ClassIds, KnnConfig};
use ssl_core::SslRng;
use tokenizers::Tokenizer;

use super::config::TextConfig;
use super::embed::embed_documents;
use crate::BertForMaskedLM;

/// At most this many training documents form the bank.
pub const MAX_BANK: usize = 2000;

/// The bank and the queries of the online k-NN accuracy, chosen once per run.
pub struct OnlineKnn {
    bank: Vec<String>,
    bank_y: Vec<usize>,
    queries: Vec<String>,
    query_y: Vec<usize>,
    n_classes: usize,
}

impl OnlineKnn {
    /// A bank of at most [`MAX_BANK`] of the training documents `train` (chosen with `seed`)
    /// and the held-out documents `held` as queries, with their labels. Labels are classes by
    /// their text (the sorted union of the bank's and the queries'). `None` when either side
    /// is empty or the labels are not one per document.
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
        let mut idx: Vec<usize> = (0..train.len()).collect();
        if idx.len() > MAX_BANK {
            SslRng::derived(seed, "online-knn-bank").shuffle(&mut idx);
            idx.truncate(MAX_BANK);
            idx.sort_unstable();
        }
        let bank: Vec<String> = idx.iter().map(|&i| train[i].clone()).collect();
        let bank_labels: Vec<String> = idx.iter().map(|&i| train_y[i].clone()).collect();
        let classes = ClassIds::new(&bank_labels, Some(held_y));
        Some(OnlineKnn {
            bank,
            bank_y: classes.ids(&bank_labels),
            queries: held,
            query_y: classes.ids(held_y),
            n_classes: classes.classes.len(),
        })
    }

    /// The number of (bank, query) documents.
    pub fn sizes(&self) -> (usize, usize) {
        (self.bank.len(), self.queries.len())
    }

    /// The k-NN accuracy ([`KnnConfig::default`]) of the queries against the bank, both
    /// embedded with `model` (pooled as it is set to pool) in inference mode, quietly (the
    /// training progress line is showing).
    pub fn accuracy(
        &self,
        model: &BertForMaskedLM,
        tok: &Tokenizer,
        cfg: &TextConfig,
        device: &Device,
    ) -> ssl_core::Result<f64> {
        let (bank, dim) = embed_documents(model, tok, &self.bank, cfg, device, false)?;
        let (queries, _) = embed_documents(model, tok, &self.queries, cfg, device, false)?;
        Ok(knn_accuracy(
            &bank,
            &self.bank_y,
            &queries,
            &self.query_y,
            dim,
            self.n_classes,
            &KnnConfig::default(),
        )?)
    }
}
