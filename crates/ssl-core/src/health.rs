//! Embedding-health figures computed on a batch of embeddings.
//!
//! Two collapse diagnostics are reported:
//!
//! * the mean over dimensions of the per-dimension standard deviation, both on
//!   the raw embeddings and on L2-normalised rows. The latter is SimSiam's
//!   collapse check (Chen & He, 2021): for healthy, roughly isotropic
//!   embeddings it is close to `1/sqrt(dim)`, for collapsed ones it is ~0;
//! * the effective rank as in RankMe (Garrido et al., 2023): with the singular
//!   values `σ` of the embedding matrix, `p_k = σ_k / Σσ + ε` and
//!   `erank = exp(-Σ p_k ln p_k)`, which lies between 1 (collapse onto a line)
//!   and `min(rows, dim)`.

use crate::linalg::{symmetric_eigenvalues, LinalgError};
use ndarray::ArrayView2;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The `ε` added to the normalised singular values in RankMe.
pub const RANKME_EPS: f64 = 1e-7;

/// Errors returned by [`embedding_health`].
#[derive(Debug, Error)]
pub enum HealthError {
    /// The slice length does not equal `rows * dim`.
    #[error("embedding buffer has {len} values but rows * dim = {rows} * {dim} = {expected}")]
    ShapeMismatch {
        /// Length of the buffer that was passed.
        len: usize,
        /// Stated number of rows.
        rows: usize,
        /// Stated embedding dimension.
        dim: usize,
        /// `rows * dim`.
        expected: usize,
    },
    /// Fewer than two rows or zero dimensions were given.
    #[error(
        "embedding health needs at least 2 rows and 1 dimension, got {rows} rows x {dim} dims"
    )]
    TooSmall {
        /// Stated number of rows.
        rows: usize,
        /// Stated embedding dimension.
        dim: usize,
    },
    /// An embedding value is NaN or infinite.
    #[error("embedding value at row {row}, dimension {col} is not finite ({value})")]
    NonFinite {
        /// Row of the offending value.
        row: usize,
        /// Dimension of the offending value.
        col: usize,
        /// The offending value.
        value: f32,
    },
    /// The eigenvalue solver failed.
    #[error("singular value computation failed: {0}")]
    Linalg(#[from] LinalgError),
}

/// Collapse diagnostics of a batch of embeddings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingHealth {
    /// Number of embeddings (rows) in the batch.
    pub rows: usize,
    /// Embedding dimension.
    pub dim: usize,
    /// Mean over dimensions of the per-dimension standard deviation
    /// (unbiased, `rows - 1` denominator) of the raw embeddings.
    pub mean_std: f64,
    /// The same figure on L2-normalised rows (SimSiam's collapse check):
    /// about `1/sqrt(dim)` when healthy, about 0 when collapsed.
    pub mean_std_normalized: f64,
    /// `1 / sqrt(dim)`, the reference value for `mean_std_normalized`.
    pub isotropic_std_reference: f64,
    /// Mean L2 norm of the rows.
    pub mean_norm: f64,
    /// RankMe effective rank of the (uncentred) embedding matrix, in
    /// `[1, min(rows, dim)]` (up to the `ε` smoothing).
    pub effective_rank: f64,
    /// Singular values of the embedding matrix, descending
    /// (`min(rows, dim)` of them).
    pub singular_values: Vec<f64>,
}

/// Computes [`EmbeddingHealth`] for `rows` embeddings of dimension `dim`,
/// stored row-major in `emb`.
///
/// Singular values come from the eigenvalues of the smaller Gram matrix
/// (`rows x rows` or `dim x dim`, accumulated in `f64`), so the cost is
/// `O(rows · dim · min(rows, dim) + min(rows, dim)³)`.
///
/// # Errors
/// A [`HealthError`] when the buffer length is not `rows * dim`, when there
/// are fewer than 2 rows or no dimensions, or when a value is not finite.
pub fn embedding_health(
    emb: &[f32],
    rows: usize,
    dim: usize,
) -> Result<EmbeddingHealth, HealthError> {
    let expected = rows.saturating_mul(dim);
    if emb.len() != expected {
        return Err(HealthError::ShapeMismatch {
            len: emb.len(),
            rows,
            dim,
            expected,
        });
    }
    if rows < 2 || dim == 0 {
        return Err(HealthError::TooSmall { rows, dim });
    }
    if let Some(pos) = emb.iter().position(|v| !v.is_finite()) {
        return Err(HealthError::NonFinite {
            row: pos / dim,
            col: pos % dim,
            value: emb[pos],
        });
    }

    let x: Vec<f64> = emb.iter().map(|&v| f64::from(v)).collect();
    let norms: Vec<f64> = x
        .chunks_exact(dim)
        .map(|r| r.iter().map(|v| v * v).sum::<f64>().sqrt())
        .collect();
    let mean_norm = norms.iter().sum::<f64>() / rows as f64;
    let normalized: Vec<f64> = x
        .chunks_exact(dim)
        .zip(&norms)
        .flat_map(|(r, &n)| {
            let inv = if n > 0.0 { 1.0 / n } else { 0.0 };
            r.iter().map(move |v| v * inv)
        })
        .collect();

    let mean_std = mean_column_std(&x, rows, dim);
    let mean_std_normalized = mean_column_std(&normalized, rows, dim);

    let singular_values = singular_values(&x, rows, dim)?;
    let effective_rank = rankme(&singular_values);

    Ok(EmbeddingHealth {
        rows,
        dim,
        mean_std,
        mean_std_normalized,
        isotropic_std_reference: 1.0 / (dim as f64).sqrt(),
        mean_norm,
        effective_rank,
        singular_values,
    })
}

/// RankMe effective rank of a set of singular values:
/// `exp(-Σ p_k ln p_k)` with `p_k = σ_k / Σσ + ε` ([`RANKME_EPS`]).
///
/// Negative or non-finite entries are treated as 0. An all-zero input gives
/// a value of about 1 (complete collapse); an empty input gives 0.
pub fn rankme(singular_values: &[f64]) -> f64 {
    if singular_values.is_empty() {
        return 0.0;
    }
    let clean = |s: f64| if s.is_finite() && s > 0.0 { s } else { 0.0 };
    let total: f64 = singular_values.iter().map(|&s| clean(s)).sum();
    let entropy: f64 = singular_values
        .iter()
        .map(|&s| {
            let share = if total > 0.0 { clean(s) / total } else { 0.0 };
            let p = share + RANKME_EPS;
            -p * p.ln()
        })
        .sum();
    entropy.exp()
}

/// Mean over columns of the unbiased per-column standard deviation.
fn mean_column_std(x: &[f64], rows: usize, dim: usize) -> f64 {
    let mut mean = vec![0.0; dim];
    for r in x.chunks_exact(dim) {
        for (m, v) in mean.iter_mut().zip(r) {
            *m += v;
        }
    }
    for m in mean.iter_mut() {
        *m /= rows as f64;
    }
    let mut var = vec![0.0; dim];
    for r in x.chunks_exact(dim) {
        for ((s, v), m) in var.iter_mut().zip(r).zip(&mean) {
            let d = v - m;
            *s += d * d;
        }
    }
    let denom = (rows - 1) as f64;
    var.iter().map(|s| (s / denom).sqrt()).sum::<f64>() / dim as f64
}

/// Singular values (descending) of the `rows x dim` matrix `x` from the
/// eigenvalues of its smaller Gram matrix.
fn singular_values(x: &[f64], rows: usize, dim: usize) -> Result<Vec<f64>, HealthError> {
    let view = ArrayView2::from_shape((rows, dim), x).map_err(|_| HealthError::ShapeMismatch {
        len: x.len(),
        rows,
        dim,
        expected: rows * dim,
    })?;
    let gram = if rows <= dim {
        view.dot(&view.t())
    } else {
        view.t().dot(&view)
    };
    let k = rows.min(dim);
    let flat: Vec<f64> = gram.iter().copied().collect();
    let eig = symmetric_eigenvalues(&flat, k)?;
    Ok(eig.into_iter().map(|l| l.max(0.0).sqrt()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn gaussian(rng: &mut ChaCha8Rng) -> f32 {
        // Box-Muller.
        let u1: f64 = rng.random::<f64>().max(1e-300);
        let u2: f64 = rng.random();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    #[test]
    fn collapsed_embeddings() {
        let row = [0.3f32, -1.2, 2.0, 0.5, 0.0, 1.0, -0.7, 0.1];
        let emb: Vec<f32> = (0..64).flat_map(|_| row).collect();
        let h = embedding_health(&emb, 64, 8).unwrap();
        assert!(h.mean_std < 1e-6, "{h:?}");
        assert!(h.mean_std_normalized < 1e-6, "{h:?}");
        assert!((h.effective_rank - 1.0).abs() < 1e-3, "{h:?}");
        assert_eq!(h.singular_values.len(), 8);
    }

    #[test]
    fn isotropic_gaussian_has_full_rank() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (rows, dim) = (2000, 16);
        let emb: Vec<f32> = (0..rows * dim).map(|_| gaussian(&mut rng)).collect();
        let h = embedding_health(&emb, rows, dim).unwrap();
        assert!(h.effective_rank > 0.97 * dim as f64, "{h:?}");
        assert!(h.effective_rank <= dim as f64 + 1e-6);
        assert!((h.mean_std - 1.0).abs() < 0.05, "{h:?}");
        let r = h.mean_std_normalized / h.isotropic_std_reference;
        assert!((r - 1.0).abs() < 0.05, "{h:?}");
    }

    #[test]
    fn low_rank_data() {
        // rows < dim exercises the rows x rows Gram path.
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let (rows, dim, k) = (50, 64, 3);
        let basis: Vec<f32> = (0..k * dim).map(|_| gaussian(&mut rng)).collect();
        let mut emb = vec![0f32; rows * dim];
        for r in 0..rows {
            let coef: Vec<f32> = (0..k).map(|_| gaussian(&mut rng)).collect();
            for c in 0..dim {
                emb[r * dim + c] = (0..k).map(|j| coef[j] * basis[j * dim + c]).sum();
            }
        }
        let h = embedding_health(&emb, rows, dim).unwrap();
        assert!(h.effective_rank <= k as f64 + 0.05, "{h:?}");
        assert!(h.effective_rank > 1.5, "{h:?}");
        assert_eq!(h.singular_values.len(), rows);
        assert!(h.singular_values[k] < 1e-3 * h.singular_values[0]);
    }

    #[test]
    fn rankme_of_equal_values() {
        assert!((rankme(&[2.0; 10]) - 10.0).abs() < 1e-4);
        assert!((rankme(&[0.0; 4]) - 1.0).abs() < 1e-4);
        assert_eq!(rankme(&[]), 0.0);
    }

    #[test]
    fn reports_bad_input() {
        let e = embedding_health(&[0.0; 10], 3, 4).unwrap_err();
        assert!(e.to_string().contains("10 values"), "{e}");
        let e = embedding_health(&[0.0; 4], 1, 4).unwrap_err();
        assert!(matches!(e, HealthError::TooSmall { .. }));
        let mut v = vec![0.0f32; 8];
        v[5] = f32::NAN;
        let e = embedding_health(&v, 2, 4).unwrap_err();
        assert!(e.to_string().contains("row 1, dimension 1"), "{e}");
    }
}
