//! Evaluation probes on frozen embeddings, shared by all modalities.
//!
//! * [`fit_linear_probe`]: multinomial logistic regression on standardised
//!   features with an L2 strength chosen on a seeded, stratified validation
//!   split, then refitted on the whole training set. The convex objective is
//!   minimised with L-BFGS and a backtracking (Armijo) line search.
//! * [`knn_predict`] / [`knn_accuracy`]: the weighted cosine k-NN classifier
//!   of InstDisc (Wu et al., 2018) and DINO (Caron et al., 2021): rows are
//!   L2-normalised, the `k` most similar training rows vote with weight
//!   `exp(sim / T)`.
//! * [`stratified_split`]: seeded per-class hold-out split.
//!
//! Features are `f32`, row-major, `rows x dim`; labels are class indices in
//! `0..n_classes`. All entry points validate their input and return a
//! [`ProbeError`] that says what is wrong instead of panicking.

mod harness;
mod online_knn;
mod svm;

pub use harness::{
    majority_class_rate, probe_labelled, probe_scores, probe_split, svm_labelled, take_rows,
    unseen_labels_warning, unseen_test_rows, warn_unseen_labels, ClassIds, ProbeScores,
    PROBE_TEST_FRACTION,
};
pub use online_knn::{knn_bank_rows, KnnLabels, KNN_BANK_MAX};
pub use svm::{svm_probe, SvmScore, SVM_C_GRID, SVM_MAX_TRAIN_ROWS};

use ndarray::{Array1, Array2, ArrayView2, Axis};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use thiserror::Error;

/// Errors returned by the probes.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ProbeError {
    /// A feature buffer's length is not a multiple of `dim`.
    #[error("{what} has {len} values, which is not a multiple of dim = {dim}")]
    RaggedFeatures {
        /// Which argument (e.g. `train_x`).
        what: &'static str,
        /// Its length.
        len: usize,
        /// The stated feature dimension.
        dim: usize,
    },
    /// Labels and features disagree on the number of rows.
    #[error("{labels} has {label_rows} rows but {features} has {feature_rows}")]
    RowMismatch {
        /// Name of the label argument.
        labels: &'static str,
        /// Number of labels.
        label_rows: usize,
        /// Name of the feature argument.
        features: &'static str,
        /// Number of feature rows.
        feature_rows: usize,
    },
    /// A label is not below `n_classes`.
    #[error("{what}[{index}] = {label} is out of range for n_classes = {n_classes}")]
    LabelOutOfRange {
        /// Name of the label argument.
        what: &'static str,
        /// Position of the bad label.
        index: usize,
        /// The bad label.
        label: usize,
        /// The stated number of classes.
        n_classes: usize,
    },
    /// A feature value is NaN or infinite.
    #[error("{what} value at row {row}, column {col} is not finite ({value})")]
    NonFinite {
        /// Name of the feature argument.
        what: &'static str,
        /// Row of the offending value.
        row: usize,
        /// Column of the offending value.
        col: usize,
        /// The offending value.
        value: f32,
    },
    /// A required input has no rows.
    #[error("{0} is empty")]
    Empty(&'static str),
    /// A feature matrix has a different dimension than the fitted model.
    #[error("model was fitted on dim = {expected} features but got dim = {got}")]
    DimMismatch {
        /// Dimension the model was fitted on.
        expected: usize,
        /// Dimension passed now.
        got: usize,
    },
    /// A configuration value or size argument is invalid.
    #[error("invalid probe configuration: {0}")]
    InvalidConfig(String),
}

// ---------------------------------------------------------------------------
// Input validation helpers
// ---------------------------------------------------------------------------

/// Checks a feature buffer and returns its number of rows.
fn feature_rows(what: &'static str, x: &[f32], dim: usize) -> Result<usize, ProbeError> {
    if dim == 0 {
        return Err(ProbeError::InvalidConfig("dim must be at least 1".into()));
    }
    if !x.len().is_multiple_of(dim) {
        return Err(ProbeError::RaggedFeatures {
            what,
            len: x.len(),
            dim,
        });
    }
    if let Some(pos) = x.iter().position(|v| !v.is_finite()) {
        return Err(ProbeError::NonFinite {
            what,
            row: pos / dim,
            col: pos % dim,
            value: x[pos],
        });
    }
    Ok(x.len() / dim)
}

/// Checks a label vector against a feature row count and `n_classes`.
fn check_labels(
    labels_name: &'static str,
    y: &[usize],
    features_name: &'static str,
    rows: usize,
    n_classes: usize,
) -> Result<(), ProbeError> {
    if y.len() != rows {
        return Err(ProbeError::RowMismatch {
            labels: labels_name,
            label_rows: y.len(),
            features: features_name,
            feature_rows: rows,
        });
    }
    if let Some((index, &label)) = y.iter().enumerate().find(|(_, &l)| l >= n_classes) {
        return Err(ProbeError::LabelOutOfRange {
            what: labels_name,
            index,
            label,
            n_classes,
        });
    }
    Ok(())
}

fn check_n_classes(n_classes: usize) -> Result<(), ProbeError> {
    if n_classes < 2 {
        return Err(ProbeError::InvalidConfig(format!(
            "n_classes must be at least 2, got {n_classes}"
        )));
    }
    Ok(())
}

/// Index of the largest value (first one on ties).
fn argmax<'a>(values: impl IntoIterator<Item = &'a f64>) -> usize {
    let mut best = 0;
    let mut best_v = f64::NEG_INFINITY;
    for (i, &v) in values.into_iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best
}

/// Fraction of positions where `pred == truth` (0 for empty input).
fn accuracy_of(pred: &[usize], truth: &[usize]) -> f64 {
    if truth.is_empty() {
        return 0.0;
    }
    let hits = pred.iter().zip(truth).filter(|(p, t)| p == t).count();
    hits as f64 / truth.len() as f64
}

// ---------------------------------------------------------------------------
// Stratified split
// ---------------------------------------------------------------------------

/// Seeded stratified split of the row indices `0..labels.len()`.
///
/// For each class with `n_c` rows, `round(fraction * n_c)` randomly chosen
/// rows go to the hold-out set, except that when `fraction < 1` at least one
/// row of every class stays in the training part. Both index vectors are
/// returned sorted ascending as `(train_idx, holdout_idx)`. The result
/// depends only on `labels`, `fraction` and `seed`.
///
/// # Errors
/// [`ProbeError::InvalidConfig`] if `fraction` is not within `[0, 1]`.
pub fn stratified_split(
    labels: &[usize],
    fraction: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>), ProbeError> {
    if !(0.0..=1.0).contains(&fraction) {
        return Err(ProbeError::InvalidConfig(format!(
            "split fraction must be within [0, 1], got {fraction}"
        )));
    }
    let mut by_class: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, &l) in labels.iter().enumerate() {
        by_class.entry(l).or_default().push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut train = Vec::with_capacity(labels.len());
    let mut holdout = Vec::new();
    for mut idx in by_class.into_values() {
        let n_c = idx.len();
        if n_c == 0 {
            continue;
        }
        idx.shuffle(&mut rng);
        let mut h = (fraction * n_c as f64).round() as usize;
        if fraction < 1.0 {
            h = h.min(n_c - 1);
        }
        holdout.extend_from_slice(&idx[..h]);
        train.extend_from_slice(&idx[h..]);
    }
    train.sort_unstable();
    holdout.sort_unstable();
    Ok((train, holdout))
}

// ---------------------------------------------------------------------------
// Multinomial logistic regression
// ---------------------------------------------------------------------------

/// Configuration of [`fit_linear_probe`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearProbeConfig {
    /// Candidate L2 strengths λ (objective: mean cross-entropy
    /// `+ λ/2 ‖W‖²`, bias unpenalised). With a single value no validation
    /// split is made.
    pub l2_grid: Vec<f64>,
    /// Fraction of the training set held out (stratified) to choose λ.
    pub val_fraction: f64,
    /// Maximum L-BFGS iterations per fit.
    pub max_iter: usize,
    /// Convergence threshold on the largest absolute gradient entry.
    pub tolerance: f64,
    /// Seed of the validation split.
    pub seed: u64,
    /// With fewer rows than features, fit in coordinates of the rows' span (the same
    /// iterates at a fraction of the cost; only the stopping test, on the largest gradient
    /// entry, reads other coordinates). On by default.
    #[serde(default = "default_row_space")]
    pub row_space: bool,
}

fn default_row_space() -> bool {
    true
}

impl Default for LinearProbeConfig {
    /// Eight log-spaced strengths `1e-6, 1e-5, …, 1e1`, a 20 % validation
    /// split, 300 iterations, tolerance `1e-6`, seed 0, the row-space fit on.
    fn default() -> Self {
        Self {
            row_space: true,
            l2_grid: (0..8).map(|i| 10f64.powi(i - 6)).collect(),
            val_fraction: 0.2,
            max_iter: 300,
            tolerance: 1e-6,
            seed: 0,
        }
    }
}

/// Validation result for one candidate L2 strength.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct L2Trial {
    /// The L2 strength.
    pub l2: f64,
    /// Accuracy on the validation split of a model fitted on the rest.
    pub val_accuracy: f64,
    /// L-BFGS iterations used.
    pub iterations: usize,
    /// Whether the optimiser met its tolerance.
    pub converged: bool,
}

/// A fitted linear probe: standardisation plus a softmax classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearProbeModel {
    /// Feature dimension.
    pub dim: usize,
    /// Number of classes.
    pub n_classes: usize,
    /// Per-feature mean of the training data.
    pub mean: Vec<f64>,
    /// Per-feature `1 / std` of the training data (0 for constant features).
    pub inv_std: Vec<f64>,
    /// Weights on standardised features, row-major `dim x n_classes`.
    pub weights: Vec<f64>,
    /// Per-class bias.
    pub bias: Vec<f64>,
    /// The L2 strength used for the final fit.
    pub chosen_l2: f64,
    /// Validation accuracy for every grid value (empty with a one-value grid).
    pub validation: Vec<L2Trial>,
    /// Accuracy of the final model on its own training data.
    pub train_accuracy: f64,
    /// L-BFGS iterations of the final fit.
    pub iterations: usize,
    /// Whether the final fit met its tolerance.
    pub converged: bool,
}

/// Rows of standardised features processed at once when predicting.
const PREDICT_CHUNK: usize = 4096;

impl LinearProbeModel {
    /// Predicted class of every row of `x` (row-major, `dim` columns).
    ///
    /// # Errors
    /// If `x`'s length is not a multiple of `dim` or it has a non-finite value.
    pub fn predict(&self, x: &[f32]) -> Result<Vec<usize>, ProbeError> {
        feature_rows("x", x, self.dim)?;
        let w = ArrayView2::from_shape((self.dim, self.n_classes), &self.weights)
            .map_err(|e| ProbeError::InvalidConfig(format!("corrupt model weights: {e}")))?;
        if self.bias.len() != self.n_classes
            || self.mean.len() != self.dim
            || self.inv_std.len() != self.dim
        {
            return Err(ProbeError::InvalidConfig(
                "corrupt model: bias/mean/inv_std lengths do not match dim and n_classes".into(),
            ));
        }
        let bias = Array1::from(self.bias.clone());
        let mut out = Vec::with_capacity(x.len() / self.dim);
        for chunk in x.chunks(PREDICT_CHUNK * self.dim) {
            let xs = standardize(chunk, self.dim, &self.mean, &self.inv_std);
            let logits = xs.dot(&w) + &bias;
            out.extend(logits.rows().into_iter().map(|r| argmax(r.iter())));
        }
        Ok(out)
    }

    /// Fraction of rows of `x` whose predicted class equals `y`.
    ///
    /// # Errors
    /// As [`predict`](Self::predict), plus a mismatch between `y` and the
    /// rows of `x`, a label out of range, or an empty `x`.
    pub fn accuracy(&self, x: &[f32], y: &[usize]) -> Result<f64, ProbeError> {
        let rows = feature_rows("x", x, self.dim)?;
        check_labels("y", y, "x", rows, self.n_classes)?;
        if rows == 0 {
            return Err(ProbeError::Empty("x"));
        }
        let pred = self.predict(x)?;
        Ok(accuracy_of(&pred, y))
    }
}

/// Standardises a row-major `f32` block into an `f64` matrix.
fn standardize(x: &[f32], dim: usize, mean: &[f64], inv_std: &[f64]) -> Array2<f64> {
    let rows = x.len() / dim;
    let mut out = Array2::<f64>::zeros((rows, dim));
    for (mut orow, irow) in out.rows_mut().into_iter().zip(x.chunks_exact(dim)) {
        for (((o, &v), m), s) in orow.iter_mut().zip(irow).zip(mean).zip(inv_std) {
            *o = (f64::from(v) - m) * s;
        }
    }
    out
}

/// Per-column mean and `1/std` (population std; 0 for constant columns).
fn column_stats(x: &[f32], dim: usize) -> (Vec<f64>, Vec<f64>) {
    let rows = (x.len() / dim).max(1) as f64;
    let mut mean = vec![0.0; dim];
    for r in x.chunks_exact(dim) {
        for (m, &v) in mean.iter_mut().zip(r) {
            *m += f64::from(v);
        }
    }
    mean.iter_mut().for_each(|m| *m /= rows);
    let mut var = vec![0.0; dim];
    for r in x.chunks_exact(dim) {
        for ((s, &v), m) in var.iter_mut().zip(r).zip(&mean) {
            let d = f64::from(v) - m;
            *s += d * d;
        }
    }
    let inv_std = var
        .iter()
        .zip(&mean)
        .map(|(s, m)| {
            let sd = (s / rows).sqrt();
            // Treat columns whose spread is at rounding level as constant.
            if sd > 1e-12 * m.abs().max(1e-30) && sd > 1e-30 {
                1.0 / sd
            } else {
                0.0
            }
        })
        .collect();
    (mean, inv_std)
}

/// An orthonormal basis `V` (`dim x r`) of the span of the rows of `x` (`n x dim`, `n < dim`),
/// or `None` when the rows span everything anyway.
///
/// The L2-regularised softmax objective depends on the weights `W` through `X W` and
/// `|W|^2`; its gradient `X^T G + l2 W` stays in the rows' span when `W` does, so L-BFGS
/// started at zero never leaves it, and since `V` is orthonormal the problem in `Z` (`W = V Z`)
/// on the features `X V` has the same values, gradients' inner products and iterates: the same
/// fit, at `r / dim` of the cost per evaluation (1,434 emoji at 64x64x3: 12,288 columns -> at
/// most 1,434). Built by a pivoted Cholesky factorisation of the Gram matrix `X X^T`: the
/// pivot rows `S` (stopping when the largest remaining squared residual falls below `1e-9` of
/// the largest row norm, i.e. rows inside the span to that precision) give `V = X_S^T L_S^-T`,
/// with `V^T V = L_S^-1 X_S X_S^T L_S^-T = I`.
fn row_space_basis(x: &Array2<f64>) -> Option<Array2<f64>> {
    let (n, d) = x.dim();
    if n == 0 || n >= d {
        return None;
    }
    let gram = x.dot(&x.t());
    let mut residual: Vec<f64> = (0..n).map(|i| gram[[i, i]]).collect();
    let scale = residual.iter().copied().fold(0.0, f64::max);
    if scale <= 0.0 {
        return None;
    }
    let tol = 1e-9 * scale;
    // Columns of the factor, each over all n rows (K ~= L L^T); `pivots` in order.
    let mut l_cols: Vec<Vec<f64>> = Vec::new();
    let mut pivots: Vec<usize> = Vec::new();
    let mut used = vec![false; n];
    loop {
        let next = (0..n)
            .filter(|&i| !used[i])
            .max_by(|&a, &b| residual[a].total_cmp(&residual[b]));
        let Some(p) = next.filter(|&p| residual[p] > tol) else {
            break;
        };
        let root = residual[p].sqrt();
        let mut col: Vec<f64> = (0..n).map(|i| gram[[i, p]]).collect();
        for prev in &l_cols {
            let f = prev[p];
            for (c, v) in col.iter_mut().zip(prev) {
                *c -= f * v;
            }
        }
        for (i, c) in col.iter_mut().enumerate() {
            *c /= root;
            residual[i] -= *c * *c;
        }
        used[p] = true;
        pivots.push(p);
        l_cols.push(col);
    }
    let r = pivots.len();
    if r == 0 {
        return None;
    }
    // L_S (r x r, lower triangular in pivot order): row k = pivot k's entries of the factor.
    let l_s = Array2::from_shape_fn((r, r), |(k, j)| l_cols[j][pivots[k]]);
    // V^T = L_S^-1 X_S, by forward substitution, one row of V^T at a time.
    let mut vt = Array2::<f64>::zeros((r, d));
    for k in 0..r {
        let mut row = x.row(pivots[k]).to_owned();
        for j in 0..k {
            let f = l_s[[k, j]];
            row.scaled_add(-f, &vt.row(j));
        }
        row /= l_s[[k, k]];
        vt.row_mut(k).assign(&row);
    }
    Some(vt.reversed_axes())
}

/// The regularised multinomial logistic objective on standardised features.
struct Softmax<'a> {
    x: ArrayView2<'a, f64>,
    y: &'a [usize],
    n_classes: usize,
    l2: f64,
}

impl Softmax<'_> {
    fn n_params(&self) -> usize {
        (self.x.ncols() + 1) * self.n_classes
    }

    /// Objective value; writes the gradient into `grad`.
    /// `theta` = W (row-major `dim x C`) followed by b (`C`).
    fn eval(&self, theta: &[f64], grad: &mut [f64]) -> f64 {
        let (n, d) = self.x.dim();
        let c = self.n_classes;
        let (w_flat, b) = theta.split_at(d * c);
        let w = ArrayView2::from_shape((d, c), w_flat).expect("theta has (dim + 1) * C entries");
        let mut g = self.x.dot(&w);
        let inv_n = 1.0 / n.max(1) as f64;
        let mut loss = 0.0;
        for (mut row, &yi) in g.rows_mut().into_iter().zip(self.y) {
            let mut max = f64::NEG_INFINITY;
            for (z, bj) in row.iter_mut().zip(b) {
                *z += bj;
                max = max.max(*z);
            }
            let mut s = 0.0;
            for z in row.iter_mut() {
                *z = (*z - max).exp();
                s += *z;
            }
            loss += s.ln() - row[yi].ln();
            let inv_s = 1.0 / s;
            for z in row.iter_mut() {
                *z *= inv_s * inv_n;
            }
            row[yi] -= inv_n;
        }
        let (gw, gb) = grad.split_at_mut(d * c);
        let xtg = self.x.t().dot(&g);
        for ((o, v), wv) in gw.iter_mut().zip(xtg.iter()).zip(w_flat) {
            *o = v + self.l2 * wv;
        }
        for (o, v) in gb.iter_mut().zip(g.sum_axis(Axis(0)).iter()) {
            *o = *v;
        }
        let reg: f64 = w_flat.iter().map(|v| v * v).sum::<f64>() * 0.5 * self.l2;
        loss * inv_n + reg
    }

    fn predict(&self, x: ArrayView2<'_, f64>, theta: &[f64]) -> Vec<usize> {
        let d = x.ncols();
        let c = self.n_classes;
        let (w_flat, b) = theta.split_at(d * c);
        let w = ArrayView2::from_shape((d, c), w_flat).expect("theta has (dim + 1) * C entries");
        let logits = x.dot(&w) + ndarray::ArrayView1::from(b);
        logits
            .rows()
            .into_iter()
            .map(|r| argmax(r.iter()))
            .collect()
    }
}

/// Outcome of an L-BFGS run.
struct LbfgsOutcome {
    theta: Vec<f64>,
    iterations: usize,
    converged: bool,
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn inf_norm(a: &[f64]) -> f64 {
    a.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// Minimises a smooth convex function with L-BFGS (memory 10) and a
/// backtracking Armijo line search with quadratic interpolation.
fn lbfgs(
    mut f: impl FnMut(&[f64], &mut [f64]) -> f64,
    mut theta: Vec<f64>,
    max_iter: usize,
    gtol: f64,
) -> LbfgsOutcome {
    const MEMORY: usize = 10;
    const C1: f64 = 1e-4;
    const FTOL: f64 = 1e-12;
    let n = theta.len();
    let mut g = vec![0.0; n];
    let mut fx = f(&theta, &mut g);
    let mut hist: VecDeque<(Vec<f64>, Vec<f64>, f64)> = VecDeque::with_capacity(MEMORY);
    let mut dir = vec![0.0; n];
    let mut trial = vec![0.0; n];
    let mut g_new = vec![0.0; n];
    let mut alpha = [0.0; MEMORY];
    if inf_norm(&g) <= gtol {
        return LbfgsOutcome {
            theta,
            iterations: 0,
            converged: true,
        };
    }
    for iter in 1..=max_iter {
        // Two-loop recursion: dir = -H g.
        dir.copy_from_slice(&g);
        for (k, (s, y, rho)) in hist.iter().enumerate().rev() {
            alpha[k] = rho * dot(s, &dir);
            dir.iter_mut()
                .zip(y)
                .for_each(|(d, yv)| *d -= alpha[k] * yv);
        }
        let gamma = hist.back().map_or(1.0, |(s, y, _)| {
            dot(s, y) / dot(y, y).max(f64::MIN_POSITIVE)
        });
        dir.iter_mut().for_each(|d| *d *= gamma);
        for (k, (s, y, rho)) in hist.iter().enumerate() {
            let beta = rho * dot(y, &dir);
            dir.iter_mut()
                .zip(s)
                .for_each(|(d, sv)| *d += (alpha[k] - beta) * sv);
        }
        dir.iter_mut().for_each(|d| *d = -*d);
        let mut slope = dot(&g, &dir);
        if slope >= 0.0 || slope.is_nan() {
            hist.clear();
            dir.iter_mut().zip(&g).for_each(|(d, gv)| *d = -gv);
            slope = -dot(&g, &g);
        }
        let mut step = if hist.is_empty() {
            (1.0 / dot(&g, &g).sqrt()).min(1.0)
        } else {
            1.0
        };
        // Backtracking line search.
        let mut accepted = None;
        for _ in 0..40 {
            trial
                .iter_mut()
                .zip(&theta)
                .zip(&dir)
                .for_each(|((t, x), d)| *t = x + step * d);
            let ft = f(&trial, &mut g_new);
            if ft.is_finite() && ft <= fx + C1 * step * slope {
                accepted = Some(ft);
                break;
            }
            let denom = 2.0 * (ft - fx - slope * step);
            let interp = if ft.is_finite() && denom > 0.0 {
                -slope * step * step / denom
            } else {
                0.5 * step
            };
            step = interp.clamp(0.1 * step, 0.5 * step);
        }
        let Some(f_new) = accepted else {
            if hist.is_empty() {
                // No descent possible even along -g: at machine precision.
                return LbfgsOutcome {
                    theta,
                    iterations: iter,
                    converged: inf_norm(&g) <= gtol * 10.0,
                };
            }
            hist.clear();
            continue;
        };
        let s: Vec<f64> = trial.iter().zip(&theta).map(|(a, b)| a - b).collect();
        let y: Vec<f64> = g_new.iter().zip(&g).map(|(a, b)| a - b).collect();
        let sy = dot(&s, &y);
        if sy > 1e-12 * dot(&y, &y) && sy > 0.0 {
            if hist.len() == MEMORY {
                hist.pop_front();
            }
            hist.push_back((s, y, 1.0 / sy));
        }
        std::mem::swap(&mut theta, &mut trial);
        std::mem::swap(&mut g, &mut g_new);
        let f_old = fx;
        fx = f_new;
        if inf_norm(&g) <= gtol {
            return LbfgsOutcome {
                theta,
                iterations: iter,
                converged: true,
            };
        }
        if f_old - fx <= FTOL * f_old.abs().max(fx.abs()).max(1.0) {
            return LbfgsOutcome {
                theta,
                iterations: iter,
                converged: true,
            };
        }
    }
    LbfgsOutcome {
        theta,
        iterations: max_iter,
        converged: false,
    }
}

fn check_linear_config(cfg: &LinearProbeConfig) -> Result<(), ProbeError> {
    if cfg.l2_grid.is_empty() {
        return Err(ProbeError::InvalidConfig("l2_grid is empty".into()));
    }
    if let Some(bad) = cfg.l2_grid.iter().find(|v| !(v.is_finite() && **v >= 0.0)) {
        return Err(ProbeError::InvalidConfig(format!(
            "l2_grid values must be finite and >= 0, got {bad}"
        )));
    }
    if cfg.l2_grid.len() > 1 && !(cfg.val_fraction > 0.0 && cfg.val_fraction < 1.0) {
        return Err(ProbeError::InvalidConfig(format!(
            "val_fraction must be in (0, 1) when l2_grid has several values, got {}",
            cfg.val_fraction
        )));
    }
    if cfg.max_iter == 0 {
        return Err(ProbeError::InvalidConfig(
            "max_iter must be at least 1".into(),
        ));
    }
    if !(cfg.tolerance.is_finite() && cfg.tolerance >= 0.0) {
        return Err(ProbeError::InvalidConfig(format!(
            "tolerance must be finite and >= 0, got {}",
            cfg.tolerance
        )));
    }
    Ok(())
}

fn select_rows(x: &Array2<f64>, idx: &[usize]) -> Array2<f64> {
    x.select(Axis(0), idx)
}

/// Fits a [`LinearProbeModel`] on `train_x` (row-major, `dim` columns) and
/// labels `train_y` in `0..n_classes`.
///
/// Features are standardised with the mean and standard deviation of the
/// whole training set (constant features are zeroed). If `cfg.l2_grid` has
/// several values, a stratified `cfg.val_fraction` split (seeded by
/// `cfg.seed`) is held out, one model per strength is fitted on the rest
/// (from the largest strength down, each warm-started from the previous
/// solution), and the strength with the best validation accuracy is chosen
/// (ties go to the larger strength). The final model is refitted on all
/// training rows with that strength.
///
/// # Errors
/// On inconsistent sizes, labels out of range, non-finite features, fewer
/// than 2 classes, an invalid configuration, or a training set too small to
/// leave both a fitting and a validation part.
pub fn fit_linear_probe(
    train_x: &[f32],
    train_y: &[usize],
    dim: usize,
    n_classes: usize,
    cfg: &LinearProbeConfig,
) -> Result<LinearProbeModel, ProbeError> {
    check_n_classes(n_classes)?;
    check_linear_config(cfg)?;
    let rows = feature_rows("train_x", train_x, dim)?;
    check_labels("train_y", train_y, "train_x", rows, n_classes)?;
    if rows == 0 {
        return Err(ProbeError::Empty("train_x"));
    }
    let (mean, inv_std) = column_stats(train_x, dim);
    let x = standardize(train_x, dim, &mean, &inv_std);
    // Wider than tall (raw pixels of larger images): the same problem in coordinates of the
    // rows' span, where every iterate lies (see `row_space_basis`).
    let basis = if cfg.row_space && dim > rows {
        row_space_basis(&x)
    } else {
        None
    };
    let x = match &basis {
        Some(v) => x.dot(v),
        None => x,
    };
    let fit_dim = x.ncols();
    let n_params = (fit_dim + 1) * n_classes;
    // Objective evaluations, against the most the fits may take (silent unless the
    // process turned progress on, as the `ssl` binary does).
    let bar = crate::monitor::Progress::task(
        &format!("probe: linear ({rows} rows x {fit_dim} features)"),
        ((cfg.l2_grid.len() + 1) * (cfg.max_iter + 1)) as u64,
        "evaluations",
    );

    let mut validation = Vec::new();
    let mut theta = vec![0.0; n_params];
    let chosen_l2 = if cfg.l2_grid.len() == 1 {
        cfg.l2_grid[0]
    } else {
        let (fit_idx, val_idx) = stratified_split(train_y, cfg.val_fraction, cfg.seed)?;
        if fit_idx.is_empty() || val_idx.is_empty() {
            return Err(ProbeError::InvalidConfig(format!(
                "train_x has {rows} rows, too few for a {} validation split \
                 (fitting part {} rows, validation part {} rows); pass a single l2 value",
                cfg.val_fraction,
                fit_idx.len(),
                val_idx.len()
            )));
        }
        let x_fit = select_rows(&x, &fit_idx);
        let y_fit: Vec<usize> = fit_idx.iter().map(|&i| train_y[i]).collect();
        let x_val = select_rows(&x, &val_idx);
        let y_val: Vec<usize> = val_idx.iter().map(|&i| train_y[i]).collect();
        let mut grid = cfg.l2_grid.clone();
        grid.sort_by(|a, b| b.total_cmp(a));
        grid.dedup();
        let mut best: Option<(f64, f64, Vec<f64>)> = None;
        for &l2 in &grid {
            let problem = Softmax {
                x: x_fit.view(),
                y: &y_fit,
                n_classes,
                l2,
            };
            let out = lbfgs(
                |t, g| {
                    bar.inc(1);
                    problem.eval(t, g)
                },
                theta.clone(),
                cfg.max_iter,
                cfg.tolerance,
            );
            let acc = accuracy_of(&problem.predict(x_val.view(), &out.theta), &y_val);
            validation.push(L2Trial {
                l2,
                val_accuracy: acc,
                iterations: out.iterations,
                converged: out.converged,
            });
            // Strictly better only: grid runs from large to small, so ties
            // keep the larger strength.
            if best.as_ref().is_none_or(|(_, b, _)| acc > *b) {
                best = Some((l2, acc, out.theta.clone()));
            }
            theta = out.theta;
        }
        let (l2, _, warm) =
            best.ok_or_else(|| ProbeError::InvalidConfig("l2_grid is empty".into()))?;
        theta = warm;
        l2
    };

    let problem = Softmax {
        x: x.view(),
        y: train_y,
        n_classes,
        l2: chosen_l2,
    };
    debug_assert_eq!(problem.n_params(), n_params);
    let out = lbfgs(
        |t, g| {
            bar.inc(1);
            problem.eval(t, g)
        },
        theta,
        cfg.max_iter,
        cfg.tolerance,
    );
    bar.finish();
    let train_accuracy = accuracy_of(&problem.predict(x.view(), &out.theta), train_y);
    let (w, b) = out.theta.split_at(fit_dim * n_classes);
    let weights = match &basis {
        // W = V Z: the weights on the standardised features themselves.
        Some(v) => {
            let z = ArrayView2::from_shape((fit_dim, n_classes), w)
                .map_err(|e| ProbeError::InvalidConfig(format!("probe weights: {e}")))?;
            v.dot(&z).iter().copied().collect()
        }
        None => w.to_vec(),
    };
    Ok(LinearProbeModel {
        dim,
        n_classes,
        mean,
        inv_std,
        weights,
        bias: b.to_vec(),
        chosen_l2,
        validation,
        train_accuracy,
        iterations: out.iterations,
        converged: out.converged,
    })
}

// ---------------------------------------------------------------------------
// Weighted k-NN
// ---------------------------------------------------------------------------

/// Configuration of the weighted cosine k-NN classifier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnnConfig {
    /// Number of neighbours (capped at the number of training rows).
    pub k: usize,
    /// Temperature `T` of the vote weights `exp(sim / T)`.
    pub temperature: f64,
}

impl Default for KnnConfig {
    /// `k = 20`, `T = 0.07` as in InstDisc and DINO.
    fn default() -> Self {
        Self {
            k: 20,
            temperature: 0.07,
        }
    }
}

/// Upper bound on the number of similarity entries held at once.
const KNN_BLOCK_ENTRIES: usize = 1 << 22;

/// Copies `x` into an `f32` matrix with L2-normalised rows.
fn normalized_matrix(x: &[f32], dim: usize) -> Array2<f32> {
    let rows = x.len() / dim;
    let mut data = x.to_vec();
    crate::linalg::l2_normalize_rows(&mut data, dim);
    Array2::from_shape_vec((rows, dim), data).unwrap_or_else(|_| Array2::zeros((0, dim)))
}

/// Predicts the class of every row of `test_x` with weighted cosine k-NN
/// over (`train_x`, `train_y`).
///
/// Rows are L2-normalised (all-zero rows have similarity 0 to everything),
/// the `k` most similar training rows are found, and class `c` scores
/// `Σ exp(sim / T)` over the neighbours labelled `c`; the highest score wins
/// (lowest class index on ties). The test set is processed in chunks so that
/// at most about 4 M similarities are held in memory.
///
/// # Errors
/// On inconsistent sizes, labels out of range, non-finite features, an empty
/// training set, fewer than 2 classes, `k = 0` or a temperature that is not
/// finite and positive.
pub fn knn_predict(
    train_x: &[f32],
    train_y: &[usize],
    test_x: &[f32],
    dim: usize,
    n_classes: usize,
    cfg: &KnnConfig,
) -> Result<Vec<usize>, ProbeError> {
    check_n_classes(n_classes)?;
    if cfg.k == 0 {
        return Err(ProbeError::InvalidConfig("k must be at least 1".into()));
    }
    if !(cfg.temperature.is_finite() && cfg.temperature > 0.0) {
        return Err(ProbeError::InvalidConfig(format!(
            "temperature must be finite and > 0, got {}",
            cfg.temperature
        )));
    }
    let n_train = feature_rows("train_x", train_x, dim)?;
    check_labels("train_y", train_y, "train_x", n_train, n_classes)?;
    if n_train == 0 {
        return Err(ProbeError::Empty("train_x"));
    }
    let n_test = feature_rows("test_x", test_x, dim)?;
    let train = normalized_matrix(train_x, dim);
    let k = cfg.k.min(n_train);
    let inv_t = 1.0 / cfg.temperature;
    let chunk_rows = (KNN_BLOCK_ENTRIES / n_train).clamp(1, 1024);

    let mut out = Vec::with_capacity(n_test);
    let mut top: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    let mut votes = vec![0.0f64; n_classes];
    for chunk in test_x.chunks(chunk_rows * dim) {
        let test = normalized_matrix(chunk, dim);
        let sims = test.dot(&train.t());
        for row in sims.rows() {
            top.clear();
            for (j, &s) in row.iter().enumerate() {
                if top.len() == k && s <= top[k - 1].0 {
                    continue;
                }
                let pos = top.partition_point(|&(v, _)| v >= s);
                top.insert(pos, (s, j));
                top.truncate(k);
            }
            votes.iter_mut().for_each(|v| *v = 0.0);
            for &(s, j) in &top {
                votes[train_y[j]] += (f64::from(s) * inv_t).exp();
            }
            out.push(argmax(votes.iter()));
        }
    }
    Ok(out)
}

/// Accuracy of [`knn_predict`] on (`test_x`, `test_y`).
///
/// # Errors
/// As [`knn_predict`], plus a mismatch between `test_y` and the rows of
/// `test_x`, a test label out of range, or an empty test set.
pub fn knn_accuracy(
    train_x: &[f32],
    train_y: &[usize],
    test_x: &[f32],
    test_y: &[usize],
    dim: usize,
    n_classes: usize,
    cfg: &KnnConfig,
) -> Result<f64, ProbeError> {
    check_n_classes(n_classes)?;
    let n_test = feature_rows("test_x", test_x, dim)?;
    check_labels("test_y", test_y, "test_x", n_test, n_classes)?;
    if n_test == 0 {
        return Err(ProbeError::Empty("test_x"));
    }
    let pred = knn_predict(train_x, train_y, test_x, dim, n_classes, cfg)?;
    Ok(accuracy_of(&pred, test_y))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn gaussian(rng: &mut ChaCha8Rng) -> f32 {
        let u1: f64 = rng.random::<f64>().max(1e-300);
        let u2: f64 = rng.random();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    /// Gaussian blobs: class c has mean `sep * e_c` (plus an offset) in `dim`
    /// dimensions, unit noise.
    fn blobs(
        n_per_class: usize,
        n_classes: usize,
        dim: usize,
        sep: f32,
        rng: &mut ChaCha8Rng,
    ) -> (Vec<f32>, Vec<usize>) {
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n_per_class * n_classes {
            let c = i % n_classes;
            for j in 0..dim {
                let mu = if j == c { sep } else { 0.0 } + 3.0;
                x.push(mu + gaussian(rng));
            }
            y.push(c);
        }
        (x, y)
    }

    #[test]
    fn stratified_split_is_stratified_and_seeded() {
        let labels: Vec<usize> = (0..100).map(|i| if i < 70 { 0 } else { 1 }).collect();
        let (tr, ho) = stratified_split(&labels, 0.2, 3).unwrap();
        assert_eq!(ho.len(), 20);
        assert_eq!(tr.len(), 80);
        assert_eq!(ho.iter().filter(|&&i| labels[i] == 0).count(), 14);
        let mut all: Vec<usize> = tr.iter().chain(&ho).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(stratified_split(&labels, 0.2, 3).unwrap().1, ho);
        assert_ne!(stratified_split(&labels, 0.2, 4).unwrap().1, ho);
        // A singleton class stays in the training part.
        let (tr, ho) = stratified_split(&[0, 0, 0, 0, 1], 0.5, 0).unwrap();
        assert!(tr.contains(&4) && !ho.contains(&4));
        assert!(stratified_split(&labels, 1.5, 0).is_err());
        // Sparse, huge label values are fine.
        let (tr, ho) = stratified_split(&[usize::MAX, 5, usize::MAX, 5], 0.5, 0).unwrap();
        assert_eq!((tr.len(), ho.len()), (2, 2));
        assert!(stratified_split(&labels, f64::NAN, 0).is_err());
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (n, d, c) = (13, 4, 3);
        let x = Array2::from_shape_fn((n, d), |_| f64::from(gaussian(&mut rng)));
        let y: Vec<usize> = (0..n).map(|i| i % c).collect();
        let problem = Softmax {
            x: x.view(),
            y: &y,
            n_classes: c,
            l2: 0.3,
        };
        let theta: Vec<f64> = (0..problem.n_params())
            .map(|_| f64::from(gaussian(&mut rng)) * 0.5)
            .collect();
        let mut grad = vec![0.0; theta.len()];
        problem.eval(&theta, &mut grad);
        let mut scratch = vec![0.0; theta.len()];
        let h = 1e-6;
        for i in 0..theta.len() {
            let mut tp = theta.clone();
            tp[i] += h;
            let mut tm = theta.clone();
            tm[i] -= h;
            let fd =
                (problem.eval(&tp, &mut scratch) - problem.eval(&tm, &mut scratch)) / (2.0 * h);
            assert!(
                (fd - grad[i]).abs() < 1e-7,
                "param {i}: fd {fd} vs grad {}",
                grad[i]
            );
        }
    }

    #[test]
    fn lbfgs_reaches_the_optimum() {
        // With l2 > 0 the optimum has a tiny gradient; compare against a
        // known property: the gradient norm at the result.
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (n, d, c) = (200, 6, 3);
        let x = Array2::from_shape_fn((n, d), |_| f64::from(gaussian(&mut rng)));
        let y: Vec<usize> = (0..n).map(|i| i % c).collect();
        let problem = Softmax {
            x: x.view(),
            y: &y,
            n_classes: c,
            l2: 1e-2,
        };
        let out = lbfgs(
            |t, g| problem.eval(t, g),
            vec![0.0; problem.n_params()],
            500,
            1e-9,
        );
        assert!(out.converged);
        let mut g = vec![0.0; problem.n_params()];
        problem.eval(&out.theta, &mut g);
        assert!(inf_norm(&g) < 1e-7, "{}", inf_norm(&g));
    }

    #[test]
    fn separable_blobs_are_learned() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (tx, ty) = blobs(60, 3, 10, 8.0, &mut rng);
        let (ex, ey) = blobs(40, 3, 10, 8.0, &mut rng);
        let model = fit_linear_probe(&tx, &ty, 10, 3, &LinearProbeConfig::default()).unwrap();
        assert_eq!(model.accuracy(&ex, &ey).unwrap(), 1.0);
        assert_eq!(model.train_accuracy, 1.0);
        assert_eq!(model.validation.len(), 8);
        assert!(model.chosen_l2 > 0.0);
    }

    #[test]
    fn random_labels_give_chance_accuracy() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (n, d, c) = (400, 20, 4);
        let x: Vec<f32> = (0..n * d).map(|_| gaussian(&mut rng)).collect();
        let y: Vec<usize> = (0..n).map(|_| rng.random_range(0..c)).collect();
        let ex: Vec<f32> = (0..n * d).map(|_| gaussian(&mut rng)).collect();
        let ey: Vec<usize> = (0..n).map(|_| rng.random_range(0..c)).collect();
        let model = fit_linear_probe(&x, &y, d, c, &LinearProbeConfig::default()).unwrap();
        let acc = model.accuracy(&ex, &ey).unwrap();
        assert!((0.15..=0.35).contains(&acc), "accuracy {acc}");
        let acc = knn_accuracy(&x, &y, &ex, &ey, d, c, &KnnConfig::default()).unwrap();
        assert!((0.15..=0.35).contains(&acc), "knn accuracy {acc}");
    }

    #[test]
    fn l2_grid_prefers_strong_regularisation_for_noisy_small_data() {
        // 1 weakly informative feature plus 150 noise features, 60 samples.
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (n, d) = (60, 151);
        let mut x = Vec::with_capacity(n * d);
        let mut y = Vec::with_capacity(n);
        for i in 0..n {
            let c = i % 2;
            x.push(gaussian(&mut rng) + if c == 1 { 1.5 } else { -1.5 });
            x.extend((1..d).map(|_| gaussian(&mut rng)));
            y.push(c);
        }
        let cfg = LinearProbeConfig::default();
        let model = fit_linear_probe(&x, &y, d, 2, &cfg).unwrap();
        assert!(cfg.l2_grid.contains(&model.chosen_l2));
        assert_eq!(model.validation.len(), cfg.l2_grid.len());
        let best = model
            .validation
            .iter()
            .map(|t| t.val_accuracy)
            .fold(0.0, f64::max);
        let chosen = model
            .validation
            .iter()
            .find(|t| t.l2 == model.chosen_l2)
            .unwrap();
        assert_eq!(chosen.val_accuracy, best);
        assert!(model.chosen_l2 >= 1e-1, "{model:?}");
    }

    #[test]
    fn linear_probe_reports_bad_input() {
        let cfg = LinearProbeConfig::default();
        let x = vec![0.0f32; 24];
        let e = fit_linear_probe(&x, &[0; 10], 2, 2, &cfg).unwrap_err();
        assert_eq!(e.to_string(), "train_y has 10 rows but train_x has 12");
        let e = fit_linear_probe(&x[..23], &[0; 8], 3, 2, &cfg).unwrap_err();
        assert!(e.to_string().contains("not a multiple of dim"), "{e}");
        let mut y = vec![0usize; 12];
        y[4] = 7;
        let e = fit_linear_probe(&x, &y, 2, 2, &cfg).unwrap_err();
        assert_eq!(
            e.to_string(),
            "train_y[4] = 7 is out of range for n_classes = 2"
        );
        let mut bad = x.clone();
        bad[3] = f32::INFINITY;
        let e = fit_linear_probe(&bad, &[0; 12], 2, 2, &cfg).unwrap_err();
        assert!(e.to_string().contains("row 1, column 1"), "{e}");
        let e = fit_linear_probe(&x[..4], &[0, 1], 2, 2, &cfg).unwrap_err();
        assert!(e.to_string().contains("too few"), "{e}");
        let cfg_bad = LinearProbeConfig {
            l2_grid: vec![],
            ..cfg
        };
        assert!(fit_linear_probe(&x, &[0; 12], 2, 2, &cfg_bad).is_err());
    }

    /// Features wider than the rows (and with duplicated rows, so the span is smaller
    /// still): the row-space fit gives the direct fit's weights, choice of strength and
    /// predictions.
    #[test]
    fn the_row_space_fit_equals_the_direct_fit_when_features_outnumber_rows() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (mut tx, mut ty) = blobs(12, 3, 90, 1.5, &mut rng);
        // Two exact copies of earlier rows: 38 rows spanning at most 36 directions.
        for r in [0usize, 5] {
            let row = tx[r * 90..(r + 1) * 90].to_vec();
            tx.extend(row);
            ty.push(ty[r]);
        }
        let (ex, _) = blobs(10, 3, 90, 1.5, &mut rng);
        let direct = LinearProbeConfig {
            row_space: false,
            tolerance: 1e-10,
            max_iter: 2000,
            ..Default::default()
        };
        let projected = LinearProbeConfig {
            row_space: true,
            ..direct.clone()
        };
        let a = fit_linear_probe(&tx, &ty, 90, 3, &direct).unwrap();
        let b = fit_linear_probe(&tx, &ty, 90, 3, &projected).unwrap();
        assert_eq!(a.chosen_l2, b.chosen_l2);
        assert_eq!(a.validation.len(), b.validation.len());
        for (va, vb) in a.validation.iter().zip(&b.validation) {
            assert_eq!(va.val_accuracy, vb.val_accuracy, "{va:?} {vb:?}");
        }
        let wmax = a.weights.iter().fold(0.0f64, |m, w| m.max(w.abs()));
        for (wa, wb) in a.weights.iter().zip(&b.weights) {
            assert!((wa - wb).abs() <= 1e-5 * wmax, "{wa} vs {wb} (max {wmax})");
        }
        for (ba, bb) in a.bias.iter().zip(&b.bias) {
            assert!((ba - bb).abs() <= 1e-5 * wmax.max(1.0), "{ba} vs {bb}");
        }
        assert_eq!(a.predict(&ex).unwrap(), b.predict(&ex).unwrap());
        // The basis is orthonormal and spans the rows: projecting a row onto it keeps it.
        let (mean, inv_std) = column_stats(&tx, 90);
        let x = standardize(&tx, 90, &mean, &inv_std);
        let v = row_space_basis(&x).unwrap();
        assert!(v.ncols() <= 36, "rank {}", v.ncols());
        let vtv = v.t().dot(&v);
        for ((i, j), val) in vtv.indexed_iter() {
            let want = if i == j { 1.0 } else { 0.0 };
            assert!((val - want).abs() < 1e-8, "V^T V [{i},{j}] = {val}");
        }
        let back = x.dot(&v).dot(&v.t());
        for (p, q) in back.iter().zip(x.iter()) {
            assert!((p - q).abs() < 1e-6, "{p} vs {q}");
        }
        // Tall features: no basis, the direct fit.
        assert!(row_space_basis(&x.t().to_owned()).is_none());
    }

    #[test]
    fn single_l2_value_skips_validation() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let (tx, ty) = blobs(5, 2, 3, 6.0, &mut rng);
        let cfg = LinearProbeConfig {
            l2_grid: vec![0.1],
            ..Default::default()
        };
        let model = fit_linear_probe(&tx, &ty, 3, 2, &cfg).unwrap();
        assert!(model.validation.is_empty());
        assert_eq!(model.chosen_l2, 0.1);
        assert!(model.predict(&tx[..5]).is_err());
        assert_eq!(model.predict(&tx).unwrap().len(), 10);
    }

    #[test]
    fn knn_on_clusters() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (tx, ty) = blobs(50, 4, 8, 6.0, &mut rng);
        let (ex, ey) = blobs(25, 4, 8, 6.0, &mut rng);
        let acc = knn_accuracy(&tx, &ty, &ex, &ey, 8, 4, &KnnConfig::default()).unwrap();
        assert!(acc > 0.98, "{acc}");
    }

    #[test]
    fn knn_on_alternating_angular_sectors() {
        // 2-D points labelled by alternating 45° sectors: not linearly
        // separable, but cosine neighbourhoods are pure.
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let mut make = |n: usize| {
            let mut x = Vec::new();
            let mut y = Vec::new();
            for _ in 0..n {
                let sector = rng.random_range(0..8usize);
                let theta =
                    (sector as f64 + 0.1 + 0.8 * rng.random::<f64>()) * std::f64::consts::FRAC_PI_4;
                let r = 0.5 + rng.random::<f64>() * 2.0;
                x.push((r * theta.cos()) as f32);
                x.push((r * theta.sin()) as f32);
                y.push(sector % 2);
            }
            (x, y)
        };
        let (tx, ty) = make(800);
        let (ex, ey) = make(200);
        let acc = knn_accuracy(&tx, &ty, &ex, &ey, 2, 2, &KnnConfig::default()).unwrap();
        assert!(acc > 0.97, "{acc}");
    }

    #[test]
    fn knn_vote_weights_depend_on_temperature() {
        // Query (1, 0). One class-1 neighbour at cosine 1.0, two class-0
        // neighbours at cosine 0.8.
        let train = [1.0f32, 0.0, 0.8, 0.6, 0.8, -0.6];
        let labels = [1usize, 0, 0];
        let query = [2.0f32, 0.0];
        let sharp = KnnConfig {
            k: 3,
            temperature: 0.07,
        };
        let flat = KnnConfig {
            k: 3,
            temperature: 10.0,
        };
        assert_eq!(
            knn_predict(&train, &labels, &query, 2, 2, &sharp).unwrap(),
            vec![1]
        );
        assert_eq!(
            knn_predict(&train, &labels, &query, 2, 2, &flat).unwrap(),
            vec![0]
        );
        // k = 1 takes the nearest only; k larger than the set is capped.
        let one = KnnConfig {
            k: 1,
            temperature: 10.0,
        };
        assert_eq!(
            knn_predict(&train, &labels, &query, 2, 2, &one).unwrap(),
            vec![1]
        );
        let many = KnnConfig {
            k: 50,
            temperature: 10.0,
        };
        assert_eq!(
            knn_predict(&train, &labels, &query, 2, 2, &many).unwrap(),
            vec![0]
        );
    }

    #[test]
    fn knn_reports_bad_input() {
        let cfg = KnnConfig::default();
        let x = [1.0f32, 0.0, 0.0, 1.0];
        let e = knn_accuracy(&x, &[0, 1], &x, &[0], 2, 2, &cfg).unwrap_err();
        assert_eq!(e.to_string(), "test_y has 1 rows but test_x has 2");
        let e = knn_predict(
            &x,
            &[0, 1],
            &x,
            2,
            2,
            &KnnConfig {
                k: 0,
                temperature: 0.1,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("k must be"));
        let e = knn_predict(
            &x,
            &[0, 1],
            &x,
            2,
            2,
            &KnnConfig {
                k: 1,
                temperature: 0.0,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("temperature"));
        assert!(knn_predict(&[], &[], &x, 2, 2, &cfg).is_err());
        assert!(knn_accuracy(&x, &[0, 1], &[], &[], 2, 2, &cfg).is_err());
        assert_eq!(
            knn_predict(&x, &[0, 1], &[], 2, 2, &cfg).unwrap(),
            Vec::<usize>::new()
        );
    }
}
