//! Decision thresholds calibrated on held-out normal images.

use serde::{Deserialize, Serialize};

use crate::{Result, VisionError};

/// How the threshold is set from the scores of held-out normal images.
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case", deny_unknown_fields)]
pub enum ThresholdMethod {
    /// The `q` quantile of the normal scores (linear interpolation, as numpy's default).
    Quantile {
        /// In (0, 1], e.g. 0.99: about 1% of normal images flagged.
        q: f64,
    },
    /// Mean plus `k` standard deviations of the normal scores.
    MeanStd {
        /// Multiples of the standard deviation, e.g. 3.
        k: f64,
    },
}

impl Default for ThresholdMethod {
    fn default() -> Self {
        ThresholdMethod::Quantile { q: 0.99 }
    }
}

/// The `q` quantile of `values` with linear interpolation between order statistics.
pub fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let pos = q.clamp(0.0, 1.0) * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// The threshold for `scores` of held-out normal images; errors when there are fewer than
/// `min_images` of them or the method's parameter is out of range.
pub fn calibrate_threshold(
    scores: &[f64],
    method: ThresholdMethod,
    min_images: usize,
) -> Result<f64> {
    if scores.len() < min_images.max(2) {
        return Err(VisionError::CalibrationTooSmall {
            needed: min_images.max(2),
            got: scores.len(),
            hint: "give more normal images or raise detect.calibration_fraction".into(),
        });
    }
    if scores.iter().any(|s| !s.is_finite()) {
        return Err(VisionError::InvalidInput(
            "a calibration score is not finite".into(),
        ));
    }
    match method {
        ThresholdMethod::Quantile { q } => {
            if !(q > 0.0 && q <= 1.0) {
                return Err(VisionError::Config(format!(
                    "threshold quantile q = {q} must be in (0, 1]"
                )));
            }
            Ok(quantile(scores, q))
        }
        ThresholdMethod::MeanStd { k } => {
            if !k.is_finite() {
                return Err(VisionError::Config(format!(
                    "threshold k = {k} must be finite"
                )));
            }
            let (m, s) = mean_std(scores);
            Ok(m + k * s)
        }
    }
}

/// Mean and (population) standard deviation.
pub fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len().max(1) as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n;
    (m, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_and_mean_std() {
        let s: Vec<f64> = (0..=100).map(f64::from).collect();
        let t = calibrate_threshold(&s, ThresholdMethod::Quantile { q: 0.95 }, 10).unwrap();
        assert!((t - 95.0).abs() < 1e-9);
        let t = calibrate_threshold(&[1.0, 3.0], ThresholdMethod::MeanStd { k: 2.0 }, 2).unwrap();
        assert!((t - 4.0).abs() < 1e-9);
        let e = calibrate_threshold(&s[..5], ThresholdMethod::default(), 10).unwrap_err();
        assert!(
            matches!(
                e,
                VisionError::CalibrationTooSmall {
                    needed: 10,
                    got: 5,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("at least 10"));
        assert!(calibrate_threshold(&s, ThresholdMethod::Quantile { q: 0.0 }, 2).is_err());
    }
}
