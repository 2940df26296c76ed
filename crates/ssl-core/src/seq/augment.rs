//! Masks and augmentations for feature sequences: pure functions of the batch and an RNG.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::seq::SeqBatch;
use crate::{Result, SslRng};

/// Chooses timesteps to hide, per row, among the valid ones (`valid` is B x T, 0/1).
///
/// `span == 1`: each valid timestep independently with probability `prob` (for bursty data).
/// `span > 1`: contiguous spans of `span` steps at random starts until `prob` of the valid
/// steps are covered (for smooth data, where single gaps are trivially interpolated).
/// Every row with a valid timestep gets at least one. Returns a B x T 0/1 mask.
pub fn timestep_mask(
    valid: &[f32],
    b: usize,
    t: usize,
    prob: f64,
    span: usize,
    rng: &mut SslRng,
) -> Vec<f32> {
    let mut mask = vec![0f32; b * t];
    for i in 0..b {
        let row = &valid[i * t..(i + 1) * t];
        let valid_idx: Vec<usize> = (0..t).filter(|&s| row[s] > 0.5).collect();
        if valid_idx.is_empty() {
            continue;
        }
        let m = &mut mask[i * t..(i + 1) * t];
        if span <= 1 {
            for &s in &valid_idx {
                if rng.bernoulli(prob) {
                    m[s] = 1.0;
                }
            }
        } else {
            let budget = ((prob * valid_idx.len() as f64).round() as usize).max(1);
            let mut covered = 0;
            let mut tries = 0;
            while covered < budget && tries < 10 * t {
                tries += 1;
                let start = valid_idx[rng.below(valid_idx.len())];
                for s in start..(start + span).min(t) {
                    if row[s] > 0.5 && m[s] == 0.0 && covered < budget {
                        m[s] = 1.0;
                        covered += 1;
                    }
                }
            }
        }
        if !m.iter().any(|v| *v > 0.0) {
            m[valid_idx[rng.below(valid_idx.len())]] = 1.0;
        }
    }
    mask
}

/// Augmentations for contrastive views of sequences.
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SeqAugmentConfig {
    /// Standard deviation of additive Gaussian jitter (0: off).
    pub jitter_std: f32,
    /// Standard deviation of the per-(example, feature) scaling factor around 1 (0: off).
    pub scale_std: f32,
    /// Probability of zeroing each timestep (timestamp masking, 0: off).
    pub time_mask_prob: f64,
    /// Random crop: keep a contiguous window of at least this fraction of the steps (1: off).
    pub min_crop: f64,
}

impl Default for SeqAugmentConfig {
    fn default() -> Self {
        SeqAugmentConfig {
            jitter_std: 0.1,
            scale_std: 0.2,
            time_mask_prob: 0.1,
            min_crop: 0.5,
        }
    }
}

/// One random view of `batch`: scaling, jitter, timestamp masking and a random crop
/// (steps outside the crop become invalid), all drawn from `rng`.
pub fn augment(batch: &SeqBatch, cfg: &SeqAugmentConfig, rng: &mut SslRng) -> Result<SeqBatch> {
    let (b, t, f) = batch.x.dims3()?;
    let mut x = batch.x.flatten_all()?.to_vec1::<f32>()?;
    let mut valid = batch.valid.flatten_all()?.to_vec1::<f32>()?;
    for i in 0..b {
        let n_valid = (0..t).filter(|&s| valid[i * t + s] > 0.5).count();
        let last = (0..t)
            .rev()
            .find(|&s| valid[i * t + s] > 0.5)
            .map_or(0, |s| s + 1);
        let (lo, hi) = if cfg.min_crop < 1.0 && n_valid > 1 {
            let len = ((cfg.min_crop + (1.0 - cfg.min_crop) * f64::from(rng.uniform()))
                * last as f64)
                .ceil() as usize;
            let len = len.clamp(1, last);
            let start = rng.below(last - len + 1);
            (start, start + len)
        } else {
            (0, t)
        };
        let scales: Vec<f32> = (0..f).map(|_| 1.0 + cfg.scale_std * rng.normal()).collect();
        for s in 0..t {
            let vi = i * t + s;
            let hide = s < lo
                || s >= hi
                || (cfg.time_mask_prob > 0.0 && rng.bernoulli(cfg.time_mask_prob));
            for (j, scale) in scales.iter().enumerate() {
                let xi = vi * f + j;
                let noise = if cfg.jitter_std > 0.0 {
                    cfg.jitter_std * rng.normal()
                } else {
                    0.0
                };
                x[xi] = if hide || valid[vi] < 0.5 {
                    0.0
                } else {
                    x[xi] * scale + noise
                };
            }
            if s < lo || s >= hi {
                valid[vi] = 0.0;
            }
        }
        // Never leave a row without a valid step.
        if !(0..t).any(|s| valid[i * t + s] > 0.5) && n_valid > 0 {
            valid[i * t + lo.min(t - 1)] = 1.0;
        }
    }
    let dev = batch.x.device();
    Ok(SeqBatch {
        x: Tensor::from_vec(x, (b, t, f), dev)?,
        valid: Tensor::from_vec(valid, (b, t), dev)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_mask_rate_and_invariants_over_seeds() {
        let (b, t) = (8, 50);
        let mut valid = vec![1f32; b * t];
        for v in &mut valid[40..50] {
            *v = 0.0; // row 0 is padded after 40
        }
        for v in &mut valid[t..2 * t] {
            *v = 0.0; // row 1 is empty
        }
        let mut total = 0.0;
        let mut count = 0.0;
        for seed in 0..50 {
            let mut rng = SslRng::new(seed);
            for span in [1, 5] {
                let m = timestep_mask(&valid, b, t, 0.3, span, &mut rng);
                for i in 0..b * t {
                    assert!(m[i] <= valid[i], "masked a padded step");
                }
                for i in 0..b {
                    let any = m[i * t..(i + 1) * t].iter().any(|v| *v > 0.0);
                    assert_eq!(any, i != 1);
                }
                total += m.iter().sum::<f32>() as f64;
                count += valid.iter().sum::<f32>() as f64;
            }
        }
        let rate = total / count;
        assert!((rate - 0.3).abs() < 0.02, "{rate}");
    }

    #[test]
    fn spans_are_contiguous() {
        let valid = vec![1f32; 100];
        let mut rng = SslRng::new(1);
        let m = timestep_mask(&valid, 1, 100, 0.2, 10, &mut rng);
        let runs =
            m.windows(2).filter(|w| w[0] == 0.0 && w[1] == 1.0).count() + usize::from(m[0] == 1.0);
        assert!(
            runs <= 2,
            "20 masked steps in spans of 10 form at most 2 runs, got {runs}"
        );
        assert_eq!(m.iter().sum::<f32>(), 20.0);
    }

    #[test]
    fn augment_keeps_shapes_and_masks_padding() {
        let dev = candle_core::Device::Cpu;
        let x = Tensor::ones((2, 6, 3), candle_core::DType::F32, &dev).unwrap();
        let valid = Tensor::new(
            &[[1f32, 1., 1., 1., 0., 0.], [1., 1., 1., 1., 1., 1.]],
            &dev,
        )
        .unwrap();
        let batch = SeqBatch { x, valid };
        let mut rng = SslRng::new(0);
        let v = augment(&batch, &SeqAugmentConfig::default(), &mut rng).unwrap();
        assert_eq!(v.x.dims(), [2, 6, 3]);
        let vx = v.x.to_vec3::<f32>().unwrap();
        assert_eq!(vx[0][5], [0., 0., 0.]);
        let vv = v.valid.to_vec2::<f32>().unwrap();
        assert_eq!(vv[0][4], 0.0);
        assert!(vv.iter().all(|r| r.iter().any(|x| *x > 0.0)));
        let off = SeqAugmentConfig {
            jitter_std: 0.0,
            scale_std: 0.0,
            time_mask_prob: 0.0,
            min_crop: 1.0,
        };
        let same = augment(&batch, &off, &mut rng).unwrap();
        assert_eq!(same.x.to_vec3::<f32>().unwrap()[1][0], [1., 1., 1.]);
    }
}
