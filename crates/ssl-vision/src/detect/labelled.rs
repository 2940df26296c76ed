//! How well a detector separates labelled images: image-level AUROC of the scores and F1 of
//! the flags (the calibrated threshold), normal against defective images.
//!
//! A label is a number per image: 0 is normal, 0.5 or more is defective; values between
//! (ELPV's `defect_prob = 1/3`, an uncertain cell) and missing values (NaN) are left out, so
//! a 0/1 column and ELPV's `defect_prob` are both read as the usual metric says (normal
//! against `defect_prob >= 2/3`).

use serde::Serialize;

/// Labels at or above this are defective.
pub const DEFECT_LABEL_MIN: f64 = 0.5;

/// What `ssl detect score` prints when the images have a label column.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DetectLabelReport {
    /// The label column read.
    pub label_column: String,
    /// Image-level AUROC of the combined score, defective above normal (ties count half);
    /// `null` unless both kinds of image are present.
    pub auroc: Option<f64>,
    /// F1 of the flags (score above the calibrated threshold) for the defective class.
    pub f1: f64,
    /// Flagged defective images over flagged images (0 when nothing is flagged).
    pub precision: f64,
    /// Flagged defective images over defective images (0 when there are none).
    pub recall: f64,
    /// The calibrated threshold the flags come from.
    pub threshold: f64,
    /// Normal images (label 0).
    pub n_normal: usize,
    /// Defective images (label >= [`DEFECT_LABEL_MIN`]).
    pub n_defect: usize,
    /// Images left out: a label strictly between 0 and [`DEFECT_LABEL_MIN`], or none.
    pub n_excluded: usize,
}

/// Whether `label` marks a normal (`Some(false)`) or defective (`Some(true)`) image; `None`
/// for an uncertain or missing label.
pub fn is_defect(label: f64) -> Option<bool> {
    if label == 0.0 {
        Some(false)
    } else if label >= DEFECT_LABEL_MIN {
        Some(true)
    } else {
        None
    }
}

/// AUROC of `scores` for `positive` rows above the others (the Mann-Whitney statistic, ties
/// counting half); `None` unless both kinds are present.
pub fn auroc(scores: &[f64], positive: &[bool]) -> Option<f64> {
    let mut rows: Vec<(f64, bool)> = scores
        .iter()
        .copied()
        .zip(positive.iter().copied())
        .collect();
    let n_pos = rows.iter().filter(|r| r.1).count();
    let n_neg = rows.len() - n_pos;
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    // Sum of the positives' mid-ranks (1-based) over runs of equal scores.
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < rows.len() {
        let mut j = i;
        while j + 1 < rows.len() && rows[j + 1].0 == rows[i].0 {
            j += 1;
        }
        let mid = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += mid * rows[i..=j].iter().filter(|r| r.1).count() as f64;
        i = j + 1;
    }
    let u = rank_sum - (n_pos * (n_pos + 1)) as f64 / 2.0;
    Some(u / (n_pos * n_neg) as f64)
}

/// The report of images with `scores`, `flags` (score above `threshold`) and numeric
/// `labels` (see [`is_defect`]), the labels read from `label_column`.
pub fn label_report(
    label_column: &str,
    scores: &[f64],
    flags: &[bool],
    labels: &[f64],
    threshold: f64,
) -> DetectLabelReport {
    let (mut s, mut defect, mut flag) = (Vec::new(), Vec::new(), Vec::new());
    for ((&sc, &fl), &l) in scores.iter().zip(flags).zip(labels) {
        if let Some(d) = is_defect(l) {
            s.push(sc);
            defect.push(d);
            flag.push(fl);
        }
    }
    let count = |want: (bool, bool)| {
        defect
            .iter()
            .zip(&flag)
            .filter(|&(&d, &f)| (d, f) == want)
            .count()
    };
    let (tp, fp, fn_) = (
        count((true, true)),
        count((false, true)),
        count((true, false)),
    );
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let n_defect = defect.iter().filter(|&&d| d).count();
    DetectLabelReport {
        label_column: label_column.to_string(),
        auroc: auroc(&s, &defect),
        f1: ratio(2 * tp, 2 * tp + fp + fn_),
        precision: ratio(tp, tp + fp),
        recall: ratio(tp, tp + fn_),
        threshold,
        n_normal: defect.len() - n_defect,
        n_defect,
        n_excluded: labels.len() - defect.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auroc_counts_pairs_and_ties_half() {
        assert_eq!(
            auroc(&[0.1, 0.2, 0.9, 0.8], &[false, false, true, true]),
            Some(1.0)
        );
        assert_eq!(
            auroc(&[0.9, 0.8, 0.1, 0.2], &[false, false, true, true]),
            Some(0.0)
        );
        // One tie between a defect and a normal image, one win: (1 + 0.5) / 2.
        assert_eq!(auroc(&[0.5, 0.1, 0.5], &[true, false, false]), Some(0.75));
        assert_eq!(auroc(&[0.5, 0.1], &[true, true]), None);
    }

    #[test]
    fn uncertain_labels_are_left_out_and_f1_counts_the_flags() {
        // Labels: normal, ELPV's uncertain 1/3, defect 2/3, defect 1, normal, missing.
        let labels = [0.0, 1.0 / 3.0, 2.0 / 3.0, 1.0, 0.0, f64::NAN];
        let scores = [0.1, 0.9, 0.8, 0.3, 0.6, 0.9];
        let flags = [false, true, true, false, true, true];
        let r = label_report("defect_prob", &scores, &flags, &labels, 0.5);
        assert_eq!((r.n_normal, r.n_defect, r.n_excluded), (2, 2, 2));
        // tp = 1 (0.8), fp = 1 (0.6), fn = 1 (0.3).
        assert_eq!((r.precision, r.recall, r.f1), (0.5, 0.5, 0.5));
        // Pairs (defect, normal): (0.8, 0.1) (0.8, 0.6) (0.3, 0.1) win, (0.3, 0.6) loses.
        assert_eq!(r.auroc, Some(0.75));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["label_column"], "defect_prob");
    }
}
