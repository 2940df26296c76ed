//! The online k-NN accuracy of held-out rows while pretraining (`eval_knn_accuracy`,
//! solo-learn style): a fixed sample of the labelled training rows (the bank) and the
//! held-out rows (the queries), embedded by the live encoder at each evaluation, each query
//! classified by its neighbours in the bank. The modalities embed; this holds what they share.

use super::{knn_accuracy, ClassIds, KnnConfig, ProbeError};
use crate::SslRng;

/// At most this many training rows form the bank.
pub const KNN_BANK_MAX: usize = 2000;

/// The rows of a training set of `n` rows that form the bank: all of them up to
/// [`KNN_BANK_MAX`], else that many chosen with `seed`, in row order.
pub fn knn_bank_rows(n: usize, seed: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    if idx.len() > KNN_BANK_MAX {
        SslRng::derived(seed, "online-knn-bank").shuffle(&mut idx);
        idx.truncate(KNN_BANK_MAX);
        idx.sort_unstable();
    }
    idx
}

/// The class ids of an online k-NN's bank and queries.
#[derive(Debug, Clone)]
pub struct KnnLabels {
    bank: Vec<usize>,
    queries: Vec<usize>,
    n_classes: usize,
}

impl KnnLabels {
    /// Labels that are class ids already (classes `0..=max`).
    pub fn from_ids(bank: Vec<usize>, queries: Vec<usize>) -> Self {
        let n_classes = bank.iter().chain(&queries).max().map_or(0, |m| m + 1);
        KnnLabels {
            bank,
            queries,
            n_classes,
        }
    }

    /// Labels as text: classes are the sorted union of the bank's and the queries' labels.
    pub fn from_labels(bank: &[String], queries: &[String]) -> Self {
        let classes = ClassIds::new(bank, Some(queries));
        KnnLabels {
            bank: classes.ids(bank),
            queries: classes.ids(queries),
            n_classes: classes.classes.len(),
        }
    }

    /// The number of queries.
    pub fn n_queries(&self) -> usize {
        self.queries.len()
    }

    /// The k-NN accuracy ([`KnnConfig::default`]) of the `queries` embeddings against the
    /// `bank` ones, both row-major and `dim` wide, in the order of the labels.
    pub fn accuracy(&self, bank: &[f32], queries: &[f32], dim: usize) -> Result<f64, ProbeError> {
        knn_accuracy(
            bank,
            &self.bank,
            queries,
            &self.queries,
            dim,
            self.n_classes,
            &KnnConfig::default(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bank_is_every_row_or_a_seeded_sample_in_order() {
        assert_eq!(knn_bank_rows(5, 1), vec![0, 1, 2, 3, 4]);
        let a = knn_bank_rows(5000, 7);
        assert_eq!(a.len(), KNN_BANK_MAX);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(a, knn_bank_rows(5000, 7));
        assert_ne!(a, knn_bank_rows(5000, 8));
    }

    #[test]
    fn text_labels_and_ids_classify_alike() {
        let bank = [[0.0f32, 1.0], [1.0, 0.0]].concat();
        let queries = [[0.1f32, 0.9], [0.9, 0.1]].concat();
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let by_text = KnnLabels::from_labels(&s(&["cat", "dog"]), &s(&["cat", "dog"]));
        let by_id = KnnLabels::from_ids(vec![3, 1], vec![3, 1]);
        assert_eq!(by_text.accuracy(&bank, &queries, 2).unwrap(), 1.0);
        assert_eq!(by_id.accuracy(&bank, &queries, 2).unwrap(), 1.0);
        assert_eq!(by_id.n_queries(), 2);
    }
}
