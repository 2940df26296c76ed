//! Small dense linear-algebra helpers used by the evaluation code.
//!
//! Everything here works on plain row-major slices so that it can be used
//! without a tensor library: a symmetric eigenvalue solver (Householder
//! tridiagonalisation followed by the implicit QL algorithm), a numerically
//! stable log-sum-exp and an in-place row L2 normalisation.

use thiserror::Error;

/// Errors returned by the linear-algebra helpers.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum LinalgError {
    /// The slice length does not match the stated matrix size.
    #[error("matrix slice has {len} elements but an {n}x{n} matrix needs {expected}")]
    ShapeMismatch {
        /// Length of the slice that was passed.
        len: usize,
        /// Stated matrix order.
        n: usize,
        /// Expected slice length (`n * n`).
        expected: usize,
    },
    /// The matrix contains a NaN or an infinity.
    #[error("matrix entry ({row}, {col}) is not finite ({value})")]
    NonFinite {
        /// Row of the offending entry.
        row: usize,
        /// Column of the offending entry.
        col: usize,
        /// The offending value.
        value: f64,
    },
    /// The QL iteration did not converge (should not happen for finite input).
    #[error("symmetric eigenvalue iteration did not converge for eigenvalue {index} of {n}")]
    NoConvergence {
        /// Index of the eigenvalue being isolated when the iteration gave up.
        index: usize,
        /// Matrix order.
        n: usize,
    },
}

/// Eigenvalues of the symmetric `n x n` matrix stored row-major in `a`,
/// sorted in descending order.
///
/// The matrix is symmetrised as `(A + Aᵀ) / 2` before decomposition, so a
/// slightly asymmetric input (for example a Gram matrix with rounding noise)
/// is accepted. The algorithm is Householder reduction to tridiagonal form
/// (`O(n³)`) followed by the implicit QL algorithm with Wilkinson shifts,
/// which is backward stable; `n` of a few hundred takes milliseconds.
///
/// # Errors
/// [`LinalgError::ShapeMismatch`] if `a.len() != n * n`,
/// [`LinalgError::NonFinite`] if an entry is NaN or infinite.
pub fn symmetric_eigenvalues(a: &[f64], n: usize) -> Result<Vec<f64>, LinalgError> {
    let expected = n.checked_mul(n).ok_or(LinalgError::ShapeMismatch {
        len: a.len(),
        n,
        expected: usize::MAX,
    })?;
    if a.len() != expected {
        return Err(LinalgError::ShapeMismatch {
            len: a.len(),
            n,
            expected,
        });
    }
    if let Some(pos) = a.iter().position(|v| !v.is_finite()) {
        return Err(LinalgError::NonFinite {
            row: pos / n,
            col: pos % n,
            value: a[pos],
        });
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut m = vec![0.0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            m[i * n + j] = 0.5 * (a[i * n + j] + a[j * n + i]);
        }
    }
    let (mut d, mut e) = householder_tridiagonal(&mut m, n);
    tridiagonal_ql(&mut d, &mut e)?;
    d.sort_by(|x, y| y.total_cmp(x));
    Ok(d)
}

/// Reduces the symmetric matrix `m` (row-major, destroyed) to tridiagonal
/// form. Returns the diagonal `d` and the off-diagonal `e`, where `e[i]`
/// couples `d[i]` and `d[i + 1]` and `e[n - 1] = 0`.
fn householder_tridiagonal(m: &mut [f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut d = vec![0.0; n];
    let mut e = vec![0.0; n];
    let mut v = vec![0.0; n];
    let mut p = vec![0.0; n];
    for k in 0..n.saturating_sub(2) {
        // Column below the diagonal: x = m[k+1.., k].
        let lo = k + 1;
        let scale: f64 = (lo..n).map(|i| m[i * n + k].abs()).sum();
        d[k] = m[k * n + k];
        if scale == 0.0 {
            e[k] = 0.0;
            continue;
        }
        let mut norm2 = 0.0;
        for i in lo..n {
            let x = m[i * n + k] / scale;
            v[i] = x;
            norm2 += x * x;
        }
        let norm = norm2.sqrt();
        let alpha = if v[lo] > 0.0 { -norm } else { norm };
        e[k] = alpha * scale;
        v[lo] -= alpha;
        let vnorm2: f64 = (lo..n).map(|i| v[i] * v[i]).sum();
        if vnorm2 == 0.0 {
            continue;
        }
        let inv = 1.0 / vnorm2.sqrt();
        for vi in v.iter_mut().take(n).skip(lo) {
            *vi *= inv;
        }
        // p = A v on the trailing block, K = vᵀ p, q = p - K v.
        let mut kk = 0.0;
        for i in lo..n {
            let row = &m[i * n..i * n + n];
            let s: f64 = (lo..n).map(|j| row[j] * v[j]).sum();
            p[i] = s;
            kk += v[i] * s;
        }
        for i in lo..n {
            p[i] -= kk * v[i];
        }
        // A <- A - 2 (v qᵀ + q vᵀ) on the trailing block.
        for i in lo..n {
            let vi2 = 2.0 * v[i];
            let pi2 = 2.0 * p[i];
            let row = &mut m[i * n..i * n + n];
            for j in lo..n {
                row[j] -= vi2 * p[j] + pi2 * v[j];
            }
        }
    }
    if n >= 2 {
        d[n - 2] = m[(n - 2) * n + (n - 2)];
        e[n - 2] = m[(n - 1) * n + (n - 2)];
    }
    d[n - 1] = m[(n - 1) * n + (n - 1)];
    e[n - 1] = 0.0;
    (d, e)
}

/// Implicit QL with shifts on a symmetric tridiagonal matrix (eigenvalues
/// only). On return `d` holds the eigenvalues in no particular order.
fn tridiagonal_ql(d: &mut [f64], e: &mut [f64]) -> Result<(), LinalgError> {
    let n = d.len();
    for l in 0..n {
        let mut iter = 0usize;
        loop {
            let mut m = l;
            while m + 1 < n {
                let dd = d[m].abs() + d[m + 1].abs();
                if e[m].abs() <= f64::EPSILON * dd {
                    break;
                }
                m += 1;
            }
            if m == l {
                break;
            }
            iter += 1;
            if iter > 100 {
                return Err(LinalgError::NoConvergence { index: l, n });
            }
            let mut g = (d[l + 1] - d[l]) / (2.0 * e[l]);
            let mut r = g.hypot(1.0);
            g = d[m] - d[l] + e[l] / (g + r.copysign(g));
            let mut s = 1.0;
            let mut c = 1.0;
            let mut p = 0.0;
            let mut underflow = false;
            let mut i = m;
            while i > l {
                i -= 1;
                let f = s * e[i];
                let b = c * e[i];
                r = f.hypot(g);
                e[i + 1] = r;
                if r == 0.0 {
                    d[i + 1] -= p;
                    e[m] = 0.0;
                    underflow = true;
                    break;
                }
                s = f / r;
                c = g / r;
                g = d[i + 1] - p;
                r = (d[i] - g) * s + 2.0 * c * b;
                p = s * r;
                d[i + 1] = g + p;
                g = c * r - b;
            }
            if underflow {
                continue;
            }
            d[l] -= p;
            e[l] = g;
            e[m] = 0.0;
        }
    }
    Ok(())
}

/// Numerically stable `ln(Σ exp(xᵢ))`.
///
/// Returns `-inf` for an empty slice or when every entry is `-inf`, `+inf`
/// if any entry is `+inf`, and NaN if any entry is NaN.
pub fn log_sum_exp(xs: &[f64]) -> f64 {
    let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if xs.iter().any(|x| x.is_nan()) {
        return f64::NAN;
    }
    if max.is_infinite() {
        return max;
    }
    let s: f64 = xs.iter().map(|&x| (x - max).exp()).sum();
    max + s.ln()
}

/// L2-normalises each row of the row-major matrix `data` (rows of length
/// `dim`) in place. Rows with zero norm are left as zeros; a trailing partial
/// row (when `data.len()` is not a multiple of `dim`) is ignored. Returns the
/// number of zero rows.
pub fn l2_normalize_rows(data: &mut [f32], dim: usize) -> usize {
    if dim == 0 {
        return 0;
    }
    let mut zero = 0;
    for row in data.chunks_exact_mut(dim) {
        let norm = row
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 && norm.is_finite() {
            let inv = (1.0 / norm) as f32;
            for v in row.iter_mut() {
                *v *= inv;
            }
        } else {
            zero += 1;
        }
    }
    zero
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn assert_close(a: &[f64], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= tol, "{a:?} vs {b:?}");
        }
    }

    /// Random orthogonal matrix from Gram-Schmidt on Gaussian-ish columns.
    fn random_orthogonal(n: usize, rng: &mut ChaCha8Rng) -> Vec<f64> {
        let mut q = vec![0.0; n * n]; // columns stored as rows of q
        for c in 0..n {
            let mut v: Vec<f64> = (0..n).map(|_| rng.random::<f64>() - 0.5).collect();
            for _ in 0..2 {
                for prev in 0..c {
                    let dot: f64 = (0..n).map(|i| v[i] * q[prev * n + i]).sum();
                    for i in 0..n {
                        v[i] -= dot * q[prev * n + i];
                    }
                }
            }
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            for i in 0..n {
                q[c * n + i] = v[i] / norm;
            }
        }
        q
    }

    #[test]
    fn diagonal_matrix() {
        let a = [3.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 7.5];
        let ev = symmetric_eigenvalues(&a, 3).unwrap();
        assert_close(&ev, &[7.5, 3.0, -1.0], 1e-12);
    }

    #[test]
    fn two_by_two_analytic() {
        let (a, b, c) = (2.0, 1.5, -0.5);
        let mid = (a + c) / 2.0;
        let rad = (((a - c) / 2.0f64).powi(2) + b * b).sqrt();
        let ev = symmetric_eigenvalues(&[a, b, b, c], 2).unwrap();
        assert_close(&ev, &[mid + rad, mid - rad], 1e-12);
    }

    #[test]
    fn trivial_sizes() {
        assert!(symmetric_eigenvalues(&[], 0).unwrap().is_empty());
        assert_close(&symmetric_eigenvalues(&[4.0], 1).unwrap(), &[4.0], 0.0);
    }

    #[test]
    fn orthogonally_conjugated_diagonal() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for &n in &[5usize, 40, 120] {
            let q = random_orthogonal(n, &mut rng);
            // Include repeated and zero eigenvalues.
            let mut lam: Vec<f64> = (0..n).map(|i| (i % 7) as f64 * 1.5 - 3.0).collect();
            // A = Qᵀ diag(lam) Q with Q's rows orthonormal.
            let mut a = vec![0.0; n * n];
            for i in 0..n {
                for j in 0..n {
                    a[i * n + j] = (0..n).map(|k| q[k * n + i] * lam[k] * q[k * n + j]).sum();
                }
            }
            let ev = symmetric_eigenvalues(&a, n).unwrap();
            lam.sort_by(|x, y| y.total_cmp(x));
            assert_close(&ev, &lam, 1e-9 * n as f64);
        }
    }

    #[test]
    fn shape_and_finiteness_errors() {
        let err = symmetric_eigenvalues(&[1.0, 2.0, 3.0], 2).unwrap_err();
        assert!(err.to_string().contains("3 elements"), "{err}");
        let err = symmetric_eigenvalues(&[1.0, f64::NAN, 0.0, 1.0], 2).unwrap_err();
        assert!(matches!(err, LinalgError::NonFinite { row: 0, col: 1, .. }));
    }

    #[test]
    fn log_sum_exp_is_stable() {
        let x = [1000.0, 1000.0];
        assert!((log_sum_exp(&x) - (1000.0 + 2f64.ln())).abs() < 1e-12);
        assert!((log_sum_exp(&[-1000.0, -1000.0]) - (-1000.0 + 2f64.ln())).abs() < 1e-12);
        assert_eq!(log_sum_exp(&[]), f64::NEG_INFINITY);
        assert!(log_sum_exp(&[1.0, f64::NAN]).is_nan());
    }

    #[test]
    fn normalizes_rows() {
        let mut d = vec![3.0f32, 4.0, 0.0, 0.0];
        assert_eq!(l2_normalize_rows(&mut d, 2), 1);
        assert_eq!(d, vec![0.6, 0.8, 0.0, 0.0]);
    }
}
