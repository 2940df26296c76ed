//! The probe harness every modality's `eval` shares: label strings to class ids, the test
//! rows (a given test set, or a seeded stratified split of the training set), and the linear
//! probe plus k-NN on one set of embeddings. A pipeline runs it on its pretrained encoder and
//! on its baselines (a randomly initialised encoder of the same shape, the raw inputs) with
//! the same rows, so the figures compare.

use serde::Serialize;

use super::{
    fit_linear_probe, knn_accuracy, stratified_split, KnnConfig, LinearProbeConfig, ProbeError,
};

/// The fraction of the training set that tests the probes when no test set is given.
pub const PROBE_TEST_FRACTION: f64 = 0.2;

/// Linear-probe and k-NN accuracy of one set of embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ProbeScores {
    /// Linear probe test accuracy.
    pub linear: f64,
    /// The probe's L2 strength, chosen on a validation split of the training rows.
    pub l2: f64,
    /// Weighted cosine k-NN test accuracy.
    pub knn: f64,
    /// Training rows.
    pub n_train: usize,
    /// Test rows.
    pub n_test: usize,
    /// Classes (over train and test).
    pub n_classes: usize,
    /// Test rows whose class never occurs in the training rows: no probe can predict them,
    /// so they count as errors (absent from the JSON when 0).
    #[serde(skip_serializing_if = "is_zero")]
    pub unseen_test_rows: usize,
    /// The accuracy of always predicting the most frequent training class: the floor every
    /// probe should clear ([`majority_class_rate`]).
    pub majority_class_rate: f64,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Test rows whose label does not occur among the training labels.
pub fn unseen_test_rows<T: Ord>(train: &[T], test: &[T]) -> usize {
    let seen: std::collections::BTreeSet<&T> = train.iter().collect();
    test.iter().filter(|l| !seen.contains(l)).count()
}

/// The fraction of `test` labels equal to the most frequent `train` label (ties: the
/// smallest label): the accuracy of a classifier that ignores its input. 0 when either set
/// is empty.
pub fn majority_class_rate<T: Ord>(train: &[T], test: &[T]) -> f64 {
    let mut counts: std::collections::BTreeMap<&T, usize> = std::collections::BTreeMap::new();
    for l in train {
        *counts.entry(l).or_default() += 1;
    }
    // The first of the most frequent labels in sorted order.
    let Some(top) = counts
        .iter()
        .fold(None::<(&T, usize)>, |best, (&l, &n)| match best {
            Some((_, b)) if b >= n => best,
            _ => Some((l, n)),
        })
        .map(|(l, _)| l)
    else {
        return 0.0;
    };
    if test.is_empty() {
        return 0.0;
    }
    test.iter().filter(|&l| l == top).count() as f64 / test.len() as f64
}

/// The warning an evaluation prints (once) when test labels never occur in training:
/// `None` when every test label was seen. Names up to five such labels.
pub fn unseen_labels_warning<T: Ord + std::fmt::Display>(
    train: &[T],
    test: &[T],
) -> Option<String> {
    let seen: std::collections::BTreeSet<&T> = train.iter().collect();
    let unseen: std::collections::BTreeSet<&T> =
        test.iter().filter(|l| !seen.contains(l)).collect();
    if unseen.is_empty() {
        return None;
    }
    let rows = unseen_test_rows(train, test);
    let mut names: Vec<String> = unseen.iter().take(5).map(|l| format!("`{l}`")).collect();
    if unseen.len() > 5 {
        names.push(format!("and {} more", unseen.len() - 5));
    }
    Some(format!(
        "warning: {rows} of {} test rows have labels never seen in training ({}): no probe can predict them, so they count as errors",
        test.len(),
        names.join(", ")
    ))
}

/// Prints [`unseen_labels_warning`] to stderr when there is one; returns the unseen rows.
pub fn warn_unseen_labels<T: Ord + std::fmt::Display>(train: &[T], test: &[T]) -> usize {
    if let Some(w) = unseen_labels_warning(train, test) {
        eprintln!("{w}");
    }
    unseen_test_rows(train, test)
}

/// Class ids of label strings: positions in the sorted union of the training and test
/// labels, so both sets agree.
#[derive(Debug, Clone)]
pub struct ClassIds {
    /// The classes, sorted.
    pub classes: Vec<String>,
}

impl ClassIds {
    /// The classes of `train` and `test` together.
    pub fn new(train: &[String], test: Option<&[String]>) -> Self {
        let mut classes: Vec<String> = train.to_vec();
        classes.extend(test.unwrap_or_default().iter().cloned());
        classes.sort();
        classes.dedup();
        ClassIds { classes }
    }

    /// The ids of `labels` (every label is one of the classes this was built from).
    pub fn ids(&self, labels: &[String]) -> Vec<usize> {
        labels
            .iter()
            .map(|s| self.classes.binary_search(s).unwrap_or(0))
            .collect()
    }
}

/// The training and test rows of a probe without a test set: a seeded stratified split that
/// holds out [`PROBE_TEST_FRACTION`] of each class.
pub fn probe_split(labels: &[usize], seed: u64) -> Result<(Vec<usize>, Vec<usize>), ProbeError> {
    stratified_split(labels, PROBE_TEST_FRACTION, seed)
}

/// Rows `idx` of a row-major `(n, dim)` matrix.
pub fn take_rows<T: Copy>(x: &[T], dim: usize, idx: &[usize]) -> Vec<T> {
    idx.iter()
        .flat_map(|&i| x[i * dim..(i + 1) * dim].iter().copied())
        .collect()
}

/// Fits the linear probe (seeded) on `train` and scores it and the k-NN classifier on
/// `test`; rows are `dim` wide, labels below `n_classes`.
pub fn probe_scores(
    train: (&[f32], &[usize]),
    test: (&[f32], &[usize]),
    dim: usize,
    n_classes: usize,
    seed: u64,
) -> Result<ProbeScores, ProbeError> {
    let fitted = fit_linear_probe(
        train.0,
        train.1,
        dim,
        n_classes,
        &LinearProbeConfig {
            seed,
            ..Default::default()
        },
    )?;
    let linear = fitted.accuracy(test.0, test.1)?;
    let knn = knn_accuracy(
        train.0,
        train.1,
        test.0,
        test.1,
        dim,
        n_classes,
        &KnnConfig::default(),
    )?;
    Ok(ProbeScores {
        linear,
        l2: fitted.chosen_l2,
        knn,
        n_train: train.1.len(),
        n_test: test.1.len(),
        n_classes,
        unseen_test_rows: unseen_test_rows(train.1, test.1),
        majority_class_rate: majority_class_rate(train.1, test.1),
    })
}

/// Probes embeddings with label strings: trained on `train` and tested on `test`, or on a
/// seeded stratified split of `train` ([`probe_split`]) when there is no test set.
pub fn probe_labelled(
    train: (&[f32], &[String]),
    test: Option<(&[f32], &[String])>,
    dim: usize,
    seed: u64,
) -> Result<ProbeScores, ProbeError> {
    let classes = ClassIds::new(train.1, test.map(|t| t.1));
    let train_y = classes.ids(train.1);
    let n = classes.classes.len();
    match test {
        Some((x, l)) => probe_scores((train.0, &train_y), (x, &classes.ids(l)), dim, n, seed),
        None => {
            let (tr, te) = probe_split(&train_y, seed)?;
            let (tr_x, te_x) = (take_rows(train.0, dim, &tr), take_rows(train.0, dim, &te));
            let (tr_y, te_y) = (take_rows(&train_y, 1, &tr), take_rows(&train_y, 1, &te));
            probe_scores((&tr_x, &tr_y), (&te_x, &te_y), dim, n, seed)
        }
    }
}

/// TS2Vec's SVM probe ([`super::svm_probe`]) with label strings, on the same rows as
/// [`probe_labelled`]: trained on `train` and tested on `test`, or on the same seeded
/// stratified split of `train` when there is no test set.
pub fn svm_labelled(
    train: (&[f32], &[String]),
    test: Option<(&[f32], &[String])>,
    dim: usize,
    seed: u64,
) -> Result<super::SvmScore, ProbeError> {
    let classes = ClassIds::new(train.1, test.map(|t| t.1));
    let train_y = classes.ids(train.1);
    let n = classes.classes.len();
    match test {
        Some((x, l)) => super::svm_probe((train.0, &train_y), (x, &classes.ids(l)), dim, n, seed),
        None => {
            let (tr, te) = probe_split(&train_y, seed)?;
            let (tr_x, te_x) = (take_rows(train.0, dim, &tr), take_rows(train.0, dim, &te));
            let (tr_y, te_y) = (take_rows(&train_y, 1, &tr), take_rows(&train_y, 1, &te));
            super::svm_probe((&tr_x, &tr_y), (&te_x, &te_y), dim, n, seed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separable_classes_probe_perfectly_and_splits_are_stratified() {
        // Two well separated clusters in 2-D, 20 rows each.
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..40 {
            let c = i % 2;
            let off = if c == 0 { -3.0 } else { 3.0 };
            x.extend([off + (i as f32 * 0.37).sin() * 0.3, (i as f32 * 0.11).cos()]);
            y.push(if c == 0 {
                "cat".to_string()
            } else {
                "dog".to_string()
            });
        }
        let s = probe_labelled((&x, &y), None, 2, 0).unwrap();
        assert_eq!((s.n_train, s.n_test, s.n_classes), (32, 8, 2));
        assert_eq!(svm_labelled((&x, &y), None, 2, 0).unwrap().accuracy, 1.0);
        assert_eq!(s.linear, 1.0);
        assert_eq!(s.knn, 1.0);
        // With a test set whose labels include a class unseen in training.
        let test_y = vec!["dog".to_string(), "eel".to_string()];
        let s = probe_labelled((&x, &y), Some((&[3.0, 0.0, 3.0, 0.0], &test_y)), 2, 0).unwrap();
        assert_eq!((s.n_test, s.n_classes), (2, 3));
        assert_eq!(s.linear, 0.5);
        let ids = ClassIds::new(&y, Some(&test_y));
        assert_eq!(ids.ids(&test_y), vec![1, 2]);
        assert_eq!(s.unseen_test_rows, 1);
        let w = unseen_labels_warning(&y, &test_y).unwrap();
        assert!(w.contains("1 of 2 test rows") && w.contains("`eel`"), "{w}");
        assert!(unseen_labels_warning(&y, &y).is_none());
        let json = serde_json::to_value(probe_labelled((&x, &y), None, 2, 0).unwrap()).unwrap();
        assert!(json.get("unseen_test_rows").is_none(), "{json}");
        // Balanced classes: the majority class is half of the test rows.
        assert_eq!(json["majority_class_rate"], 0.5);
    }

    #[test]
    fn majority_class_rate_counts_test_rows_in_the_most_frequent_training_class() {
        // Training: class 2 most frequent; test: 3 of 4 rows are class 2.
        assert_eq!(majority_class_rate(&[0, 2, 2, 1, 2], &[2, 2, 0, 2]), 0.75);
        // A tie in training goes to the smallest label.
        assert_eq!(majority_class_rate(&["b", "a", "b", "a"], &["a", "b"]), 0.5);
        assert_eq!(majority_class_rate(&[1, 0, 0, 1], &[0, 0, 0, 1]), 0.75);
        // The training majority, not the test majority.
        assert_eq!(majority_class_rate(&[1, 1, 0], &[0, 0, 0, 1]), 0.25);
        assert_eq!(majority_class_rate::<u8>(&[], &[1]), 0.0);
        assert_eq!(majority_class_rate::<u8>(&[1], &[]), 0.0);
    }
}
