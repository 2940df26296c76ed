//! Pair-quality filtering: score every pair with a trained model (the cosine similarity of
//! the image with its own caption, as CLIP-score filtering of LAION / DataComp) and drop the
//! lowest-scoring fraction before training.

use crate::{MultimodalError, Result};

/// Indices (ascending) of the pairs kept after dropping the `round(n * drop_fraction)` pairs
/// with the lowest `scores` (ties broken by index, so the result is deterministic).
pub fn keep_best_pairs(scores: &[f32], drop_fraction: f64) -> Result<Vec<usize>> {
    if !(0.0..1.0).contains(&drop_fraction) {
        return Err(MultimodalError::Config(format!(
            "data.filter_drop_fraction = {drop_fraction} must be in [0, 1)"
        )));
    }
    if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
        return Err(MultimodalError::InvalidInput(format!(
            "pair {i} has a non-finite quality score {}",
            scores[i]
        )));
    }
    let n = scores.len();
    let drop = ((n as f64) * drop_fraction).round() as usize;
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut keep = order[drop..].to_vec();
    keep.sort_unstable();
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drops_the_lowest() {
        let s = [0.5, -0.2, 0.9, 0.1, 0.3];
        assert_eq!(keep_best_pairs(&s, 0.4).unwrap(), vec![0, 2, 4]);
        assert_eq!(keep_best_pairs(&s, 0.0).unwrap(), vec![0, 1, 2, 3, 4]);
        assert!(keep_best_pairs(&s, 1.0).is_err());
        assert!(keep_best_pairs(&[f32::NAN], 0.1).is_err());
    }
}
