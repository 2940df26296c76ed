//! The RBF-kernel SVM probe of TS2Vec's evaluation protocol (its `fit_svm`: scikit-learn's
//! `SVC(kernel="rbf", gamma="scale")`, C chosen by 5-fold cross-validation over
//! `1e-4 .. 1e4` and infinity, or C = infinity on sets too small to split).
//!
//! The solver is SMO with second-order working-set selection (Fan, Chen and Lin, 2005: the
//! algorithm of LIBSVM, which scikit-learn wraps), multi-class by one-against-one voting as
//! LIBSVM does. The training rows' kernel matrix is computed once and shared by every fold
//! and every C, so the search costs one kernel matrix plus the SMO runs.

use serde::Serialize;

use super::{check_labels, check_n_classes, feature_rows, stratified_split, ProbeError};

/// The C values TS2Vec's grid search tries (infinity: a hard margin).
pub const SVM_C_GRID: [f64; 10] = [
    1e-4,
    1e-3,
    1e-2,
    1e-1,
    1.0,
    1e1,
    1e2,
    1e3,
    1e4,
    f64::INFINITY,
];

/// Training rows above this are subsampled (stratified, seeded) before fitting, as TS2Vec
/// does at 10,000: the kernel matrix grows with the square of the rows.
pub const SVM_MAX_TRAIN_ROWS: usize = 10_000;

/// The SVM probe's result.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SvmScore {
    /// Test accuracy.
    pub accuracy: f64,
    /// The C chosen by cross-validation (`null` in JSON for infinity).
    #[serde(serialize_with = "finite_or_null")]
    pub c: f64,
    /// The RBF kernel's gamma (`1 / (dim * variance of the training features)`).
    pub gamma: f64,
}

fn finite_or_null<S: serde::Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(*v)
    } else {
        s.serialize_none()
    }
}

/// Gradient tolerance of the stopping rule (LIBSVM's default).
const EPS: f64 = 1e-3;
/// Substitute for a non-positive curvature (LIBSVM's `TAU`).
const TAU: f64 = 1e-12;
/// Iteration cap of one binary problem.
const MAX_ITER: usize = 10_000_000;

/// A binary SVM's dual solution: coefficients `alpha_i y_i` of its rows, and the offset.
struct Binary {
    coef: Vec<f64>,
    rho: f64,
}

/// Solves the dual of a binary C-SVM on the rows `idx` of the kernel matrix `k` (`n x n`,
/// row-major) with labels `y` (+1 / -1, one per entry of `idx`).
fn solve_binary(k: &[f32], n: usize, idx: &[usize], y: &[f64], c: f64) -> Binary {
    let l = idx.len();
    let kk = |a: usize, b: usize| f64::from(k[idx[a] * n + idx[b]]);
    let mut alpha = vec![0f64; l];
    let mut g = vec![-1f64; l];
    let up = |a: f64| a < c;
    let low = |a: f64| a > 0.0;
    for _ in 0..MAX_ITER {
        // i: the most violating index of the "up" set.
        let (mut gmax, mut i) = (f64::NEG_INFINITY, usize::MAX);
        for t in 0..l {
            let v = if y[t] > 0.0 {
                if up(alpha[t]) {
                    -g[t]
                } else {
                    continue;
                }
            } else if low(alpha[t]) {
                g[t]
            } else {
                continue;
            };
            if v >= gmax {
                gmax = v;
                i = t;
            }
        }
        if i == usize::MAX {
            break;
        }
        // j: the largest second-order decrease of the objective.
        let (mut gmax2, mut obj_min, mut j) = (f64::NEG_INFINITY, f64::INFINITY, usize::MAX);
        for t in 0..l {
            let (in_set, grad_diff, v) = if y[t] > 0.0 {
                (low(alpha[t]), gmax + g[t], g[t])
            } else {
                (up(alpha[t]), gmax - g[t], -g[t])
            };
            if !in_set {
                continue;
            }
            if v >= gmax2 {
                gmax2 = v;
            }
            if grad_diff > 0.0 {
                let quad = kk(i, i) + kk(t, t) - 2.0 * kk(i, t);
                let obj = -(grad_diff * grad_diff) / if quad > 0.0 { quad } else { TAU };
                if obj <= obj_min {
                    obj_min = obj;
                    j = t;
                }
            }
        }
        if gmax + gmax2 < EPS || j == usize::MAX {
            break;
        }
        let (ai, aj) = (alpha[i], alpha[j]);
        let kij = kk(i, j);
        let quad = {
            let q = kk(i, i) + kk(j, j) - 2.0 * kij;
            if q > 0.0 {
                q
            } else {
                TAU
            }
        };
        if y[i] != y[j] {
            let delta = (-g[i] - g[j]) / quad;
            let diff = alpha[i] - alpha[j];
            alpha[i] += delta;
            alpha[j] += delta;
            if diff > 0.0 {
                if alpha[j] < 0.0 {
                    alpha[j] = 0.0;
                    alpha[i] = diff;
                }
            } else if alpha[i] < 0.0 {
                alpha[i] = 0.0;
                alpha[j] = -diff;
            }
            // With one C for every row, `C_i - C_j` is 0.
            if diff > 0.0 {
                if alpha[i] > c {
                    alpha[i] = c;
                    alpha[j] = c - diff;
                }
            } else if alpha[j] > c {
                alpha[j] = c;
                alpha[i] = c + diff;
            }
        } else {
            let delta = (g[i] - g[j]) / quad;
            let sum = alpha[i] + alpha[j];
            alpha[i] -= delta;
            alpha[j] += delta;
            if sum > c {
                if alpha[i] > c {
                    alpha[i] = c;
                    alpha[j] = sum - c;
                }
            } else if alpha[j] < 0.0 {
                alpha[j] = 0.0;
                alpha[i] = sum;
            }
            if sum > c {
                if alpha[j] > c {
                    alpha[j] = c;
                    alpha[i] = sum - c;
                }
            } else if alpha[i] < 0.0 {
                alpha[i] = 0.0;
                alpha[j] = sum;
            }
        }
        let (di, dj) = (alpha[i] - ai, alpha[j] - aj);
        for t in 0..l {
            // Q_ti = y_t y_i K_ti.
            g[t] += y[t] * (y[i] * kk(t, i) * di + y[j] * kk(t, j) * dj);
        }
    }
    // The offset: the mean of y_i G_i over free vectors, else the middle of the bounds.
    let (mut ub, mut lb, mut sum, mut free) = (f64::INFINITY, f64::NEG_INFINITY, 0.0, 0usize);
    for t in 0..l {
        let yg = y[t] * g[t];
        if alpha[t] >= c {
            if y[t] < 0.0 {
                ub = ub.min(yg);
            } else {
                lb = lb.max(yg);
            }
        } else if alpha[t] <= 0.0 {
            if y[t] > 0.0 {
                ub = ub.min(yg);
            } else {
                lb = lb.max(yg);
            }
        } else {
            free += 1;
            sum += yg;
        }
    }
    let rho = if free > 0 {
        sum / free as f64
    } else {
        (ub + lb) / 2.0
    };
    Binary {
        coef: alpha.iter().zip(y).map(|(a, y)| a * y).collect(),
        rho,
    }
}

/// A one-against-one multi-class SVM over rows of a shared kernel matrix.
struct OneVsOne {
    /// (class a, class b, rows of the pair (kernel-matrix indices), solution); a positive
    /// decision votes for `a`.
    pairs: Vec<(usize, usize, Vec<usize>, Binary)>,
    n_classes: usize,
}

impl OneVsOne {
    fn fit(k: &[f32], n: usize, rows: &[usize], labels: &[usize], c: f64) -> Self {
        let n_classes = labels.iter().copied().max().map_or(0, |m| m + 1);
        let mut pairs = Vec::new();
        for a in 0..n_classes {
            for b in a + 1..n_classes {
                let mut idx = Vec::new();
                let mut y = Vec::new();
                for (&r, &l) in rows.iter().zip(labels) {
                    if l == a || l == b {
                        idx.push(r);
                        y.push(if l == a { 1.0 } else { -1.0 });
                    }
                }
                let has_both = y.iter().any(|&v| v > 0.0) && y.iter().any(|&v| v < 0.0);
                if !has_both {
                    continue;
                }
                let sol = solve_binary(k, n, &idx, &y, c);
                pairs.push((a, b, idx, sol));
            }
        }
        Self { pairs, n_classes }
    }

    /// The predicted class of a row, given its kernel values against the training rows
    /// (`kernel(r)` for a kernel-matrix index `r`). Ties go to the smaller class.
    fn predict(&self, kernel: impl Fn(usize) -> f64, majority: usize) -> usize {
        if self.pairs.is_empty() {
            return majority;
        }
        let mut votes = vec![0usize; self.n_classes];
        for (a, b, idx, sol) in &self.pairs {
            let f: f64 = idx
                .iter()
                .zip(&sol.coef)
                .filter(|(_, &c)| c != 0.0)
                .map(|(&r, &c)| c * kernel(r))
                .sum::<f64>()
                - sol.rho;
            votes[if f > 0.0 { *a } else { *b }] += 1;
        }
        let best = votes.iter().copied().max().unwrap_or(0);
        votes.iter().position(|&v| v == best).unwrap_or(majority)
    }
}

fn sq_dist(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// `exp(-gamma |a - b|^2)` for every pair of rows of `x` (`n x dim`), row-major.
fn kernel_matrix(x: &[f32], n: usize, dim: usize, gamma: f64) -> Vec<f32> {
    use rayon::prelude::*;
    let mut k = vec![0f32; n * n];
    k.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
        let a = &x[i * dim..(i + 1) * dim];
        for (j, v) in row.iter_mut().enumerate() {
            let b = &x[j * dim..(j + 1) * dim];
            *v = (-gamma * f64::from(sq_dist(a, b))).exp() as f32;
        }
    });
    k
}

fn majority(labels: &[usize]) -> usize {
    let n = labels.iter().copied().max().map_or(0, |m| m + 1);
    let mut counts = vec![0usize; n];
    for &l in labels {
        counts[l] += 1;
    }
    let best = counts.iter().copied().max().unwrap_or(0);
    counts.iter().position(|&c| c == best).unwrap_or(0)
}

/// Fits TS2Vec's SVM probe on `train` (rows `dim` wide, labels below `n_classes`) and scores
/// it on `test`. C is chosen by stratified 5-fold cross-validation over [`SVM_C_GRID`]
/// (the first best); with fewer than 5 rows per class or 50 rows in all, C is infinity, as
/// in TS2Vec. More than [`SVM_MAX_TRAIN_ROWS`] training rows are subsampled (seeded,
/// stratified).
pub fn svm_probe(
    train: (&[f32], &[usize]),
    test: (&[f32], &[usize]),
    dim: usize,
    n_classes: usize,
    seed: u64,
) -> Result<SvmScore, ProbeError> {
    check_n_classes(n_classes)?;
    let rows = feature_rows("train_x", train.0, dim)?;
    check_labels("train_y", train.1, "train_x", rows, n_classes)?;
    let test_rows = feature_rows("test_x", test.0, dim)?;
    check_labels("test_y", test.1, "test_x", test_rows, n_classes)?;
    if rows == 0 {
        return Err(ProbeError::InvalidConfig(
            "svm probe: no training rows".into(),
        ));
    }
    let (mut x, mut y) = (train.0.to_vec(), train.1.to_vec());
    if y.len() > SVM_MAX_TRAIN_ROWS {
        let frac = 1.0 - SVM_MAX_TRAIN_ROWS as f64 / y.len() as f64;
        let (keep, _) = stratified_split(&y, frac, seed)?;
        x = keep
            .iter()
            .flat_map(|&i| x[i * dim..(i + 1) * dim].iter().copied())
            .collect();
        y = keep.iter().map(|&i| y[i]).collect();
    }
    let n = y.len();
    // gamma = "scale": 1 / (dim * variance of every training value).
    let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / x.len() as f64;
    let var = x
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / x.len() as f64;
    let gamma = if var > 0.0 {
        1.0 / (dim as f64 * var)
    } else {
        1.0
    };
    let k = kernel_matrix(&x, n, dim, gamma);
    let fallback = majority(&y);
    let mut counts = vec![0usize; n_classes];
    for &l in &y {
        counts[l] += 1;
    }
    let min_count = counts.iter().copied().filter(|&c| c > 0).min().unwrap_or(0);
    let c = if min_count < 5 || n < 50 {
        f64::INFINITY
    } else {
        let folds = stratified_folds(&y, 5, seed);
        let mut best = (f64::NEG_INFINITY, f64::INFINITY);
        for &c in &SVM_C_GRID {
            let mut correct = 0usize;
            for f in 0..5 {
                let (fit_rows, held): (Vec<usize>, Vec<usize>) =
                    (0..n).partition(|&r| folds[r] != f);
                let labels: Vec<usize> = fit_rows.iter().map(|&r| y[r]).collect();
                let m = OneVsOne::fit(&k, n, &fit_rows, &labels, c);
                correct += held
                    .iter()
                    .filter(|&&r| m.predict(|t| f64::from(k[r * n + t]), fallback) == y[r])
                    .count();
            }
            let acc = correct as f64 / n as f64;
            if acc > best.0 {
                best = (acc, c);
            }
        }
        best.1
    };
    let all: Vec<usize> = (0..n).collect();
    let model = OneVsOne::fit(&k, n, &all, &y, c);
    let correct = test
        .1
        .iter()
        .enumerate()
        .filter(|&(i, &label)| {
            let q = &test.0[i * dim..(i + 1) * dim];
            let kernel =
                |t: usize| (-gamma * f64::from(sq_dist(q, &x[t * dim..(t + 1) * dim]))).exp();
            model.predict(kernel, fallback) == label
        })
        .count();
    Ok(SvmScore {
        accuracy: if test.1.is_empty() {
            0.0
        } else {
            correct as f64 / test.1.len() as f64
        },
        c,
        gamma,
    })
}

/// A fold (0..k) for each row: each class's rows, in a seeded order, dealt round-robin.
fn stratified_folds(y: &[usize], k: usize, seed: u64) -> Vec<usize> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0x5356_4d46);
    let n_classes = y.iter().copied().max().map_or(0, |m| m + 1);
    let mut fold = vec![0usize; y.len()];
    let mut next = 0usize;
    for class in 0..n_classes {
        let mut rows: Vec<usize> = (0..y.len()).filter(|&r| y[r] == class).collect();
        rows.shuffle(&mut rng);
        for r in rows {
            fold[r] = next % k;
            next += 1;
        }
    }
    fold
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points on two rings (not linearly separable), plus a third blob class.
    fn rings(n: usize, phase: f32) -> (Vec<f32>, Vec<usize>) {
        let mut x = Vec::new();
        let mut y = Vec::new();
        for i in 0..n {
            let t = i as f32 * 0.7 + phase;
            let class = i % 3;
            let (px, py) = match class {
                0 => (t.cos(), t.sin()),
                1 => (3.0 * t.cos(), 3.0 * t.sin()),
                _ => (6.0 + 0.3 * t.sin(), 6.0 + 0.3 * t.cos()),
            };
            x.extend([px, py]);
            y.push(class);
        }
        (x, y)
    }

    #[test]
    fn separates_rings_a_linear_probe_cannot() {
        let (x, y) = rings(150, 0.0);
        let (tx, ty) = rings(60, 0.35);
        let s = svm_probe((&x, &y), (&tx, &ty), 2, 3, 0).unwrap();
        assert!(s.accuracy >= 0.98, "{s:?}");
        assert!(s.gamma > 0.0);
        let linear = super::super::probe_scores((&x, &y), (&tx, &ty), 2, 3, 0).unwrap();
        assert!(
            linear.linear < 0.9,
            "a linear probe separates rings? {linear:?}"
        );
    }

    #[test]
    fn tiny_sets_use_a_hard_margin_and_serialise_it_as_null() {
        let (x, y) = rings(12, 0.0);
        let s = svm_probe((&x, &y), (&x, &y), 2, 3, 0).unwrap();
        assert!(s.c.is_infinite());
        assert_eq!(s.accuracy, 1.0, "a hard margin fits its own training rows");
        let json = serde_json::to_value(s).unwrap();
        assert!(json["c"].is_null(), "{json}");
    }

    #[test]
    fn binary_solution_satisfies_the_dual_constraint() {
        let (x, y) = rings(60, 0.0);
        let (x, y): (Vec<f32>, Vec<usize>) = {
            let keep: Vec<usize> = (0..y.len()).filter(|&i| y[i] < 2).collect();
            (
                keep.iter()
                    .flat_map(|&i| [x[2 * i], x[2 * i + 1]])
                    .collect(),
                keep.iter().map(|&i| y[i]).collect(),
            )
        };
        let n = y.len();
        let k = kernel_matrix(&x, n, 2, 0.5);
        let labels: Vec<f64> = y.iter().map(|&l| if l == 0 { 1.0 } else { -1.0 }).collect();
        let idx: Vec<usize> = (0..n).collect();
        let c = 10.0;
        let sol = solve_binary(&k, n, &idx, &labels, c);
        // sum_i alpha_i y_i = 0 and 0 <= alpha_i <= C.
        let s: f64 = sol.coef.iter().sum();
        assert!(s.abs() < 1e-9, "{s}");
        for (cf, yl) in sol.coef.iter().zip(&labels) {
            let a = cf * yl;
            assert!((-1e-12..=c + 1e-9).contains(&a), "{a}");
        }
    }

    #[test]
    fn shapes_are_checked() {
        assert!(svm_probe((&[1.0, 2.0, 3.0], &[0, 1]), (&[], &[]), 2, 2, 0).is_err());
    }
}
