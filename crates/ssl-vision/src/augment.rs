//! Seeded image augmentations: random resized crop, horizontal flip, normalisation (and a
//! hook for per-image extras: SimCLR's photometric views, [`crate::photometric`]).
//! Pure functions of the pixels and an [`SslRng`], applied on the CPU.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use ssl_core::SslRng;

use crate::{Result, VisionError};

/// Augmentation and normalisation settings (MAE's pretraining transform by default:
/// `RandomResizedCrop(scale=(0.2, 1))`, `RandomHorizontalFlip`, `Normalize`).
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Random resized crop on (off: the whole image).
    pub crop: bool,
    /// Range of the crop's area as a fraction of the image.
    pub scale: [f64; 2],
    /// Range of the crop's aspect ratio (width / height), sampled log-uniformly.
    pub ratio: [f64; 2],
    /// Random horizontal flip with probability 0.5 (turn off where orientation matters).
    pub hflip: bool,
    /// Per-channel mean subtracted after augmentation (one value: every channel).
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided by (one value: every channel).
    pub std: Vec<f32>,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            crop: true,
            scale: [0.2, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            hflip: true,
            mean: vec![0.5],
            std: vec![0.5],
        }
    }
}

impl AugmentConfig {
    /// Checks ranges and that mean/std fit `channels`.
    pub fn validate(&self, channels: usize) -> Result<()> {
        let [s0, s1] = self.scale;
        if !(s0 > 0.0 && s0 <= s1 && s1 <= 1.0) {
            return Err(VisionError::Config(format!(
                "augment.scale = {:?} must satisfy 0 < lo <= hi <= 1",
                self.scale
            )));
        }
        let [r0, r1] = self.ratio;
        if !(r0 > 0.0 && r0 <= r1) {
            return Err(VisionError::Config(format!(
                "augment.ratio = {:?} must satisfy 0 < lo <= hi",
                self.ratio
            )));
        }
        for (name, v) in [("mean", &self.mean), ("std", &self.std)] {
            if v.len() != 1 && v.len() != channels {
                return Err(VisionError::Config(format!(
                    "augment.{name} has {} values; give 1 or one per channel ({channels})",
                    v.len()
                )));
            }
        }
        if self.std.iter().any(|s| s.is_nan() || *s <= 0.0) {
            return Err(VisionError::Config(format!(
                "augment.std = {:?} must be positive",
                self.std
            )));
        }
        Ok(())
    }

    fn stat(v: &[f32], c: usize) -> f32 {
        if v.len() == 1 {
            v[0]
        } else {
            v[c]
        }
    }
}

/// A crop box in pixels: `(top, left, height, width)`.
pub type CropBox = (usize, usize, usize, usize);

/// torchvision's `RandomResizedCrop.get_params`: up to 10 tries of an area in `scale` and a
/// log-uniform aspect ratio in `ratio` that fits; otherwise a centre crop at the nearest
/// allowed ratio.
pub fn random_resized_crop_box(
    height: usize,
    width: usize,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut SslRng,
) -> CropBox {
    let area = (height * width) as f64;
    let (lr0, lr1) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * (scale[0] + (scale[1] - scale[0]) * f64::from(rng.uniform()));
        let aspect = (lr0 + (lr1 - lr0) * f64::from(rng.uniform())).exp();
        let w = (target * aspect).sqrt().round() as usize;
        let h = (target / aspect).sqrt().round() as usize;
        if w > 0 && h > 0 && w <= width && h <= height {
            let top = rng.below(height - h + 1);
            let left = rng.below(width - w + 1);
            return (top, left, h, w);
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (h, w) = if in_ratio < ratio[0] {
        (((width as f64) / ratio[0]).round() as usize, width)
    } else if in_ratio > ratio[1] {
        (height, ((height as f64) * ratio[1]).round() as usize)
    } else {
        (height, width)
    };
    let (h, w) = (h.clamp(1, height), w.clamp(1, width));
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// Bilinear resampling (half-pixel centres, as `align_corners=False`) of the `crop` of a
/// `channels x height x width` image to `out_h x out_w`, optionally mirrored left-right.
#[allow(clippy::too_many_arguments)]
pub fn resize_crop(
    src: &[f32],
    channels: usize,
    height: usize,
    width: usize,
    crop: CropBox,
    out_h: usize,
    out_w: usize,
    flip: bool,
) -> Vec<f32> {
    let (top, left, ch, cw) = crop;
    let mut out = vec![0f32; channels * out_h * out_w];
    let sy = ch as f64 / out_h as f64;
    let sx = cw as f64 / out_w as f64;
    for oy in 0..out_h {
        let y = ((oy as f64 + 0.5) * sy - 0.5).clamp(0.0, (ch - 1) as f64);
        let y0 = y.floor() as usize;
        let y1 = (y0 + 1).min(ch - 1);
        let fy = (y - y0 as f64) as f32;
        for ox in 0..out_w {
            let x = ((ox as f64 + 0.5) * sx - 0.5).clamp(0.0, (cw - 1) as f64);
            let x0 = x.floor() as usize;
            let x1 = (x0 + 1).min(cw - 1);
            let fx = (x - x0 as f64) as f32;
            let dst_x = if flip { out_w - 1 - ox } else { ox };
            for c in 0..channels {
                let plane = &src[c * height * width..(c + 1) * height * width];
                let at = |yy: usize, xx: usize| plane[(top + yy) * width + left + xx];
                let v = (1.0 - fy) * ((1.0 - fx) * at(y0, x0) + fx * at(y0, x1))
                    + fy * ((1.0 - fx) * at(y1, x0) + fx * at(y1, x1));
                out[(c * out_h + oy) * out_w + dst_x] = v;
            }
        }
    }
    out
}

/// One augmented, normalised view of a batch of raw `[0, 1]` images `(B, C, H, W)`.
pub fn augment_batch(images: &Tensor, cfg: &AugmentConfig, rng: &mut SslRng) -> Result<Tensor> {
    augment_batch_with(images, cfg, rng, |_, _, _| {})
}

/// [`augment_batch`] with `extra` applied to each image after its crop and flip, before
/// normalisation: `extra(pixels, [C, H, W], rng)` edits one image's raw `[0, 1]` values
/// (planar, `C x H x W`) in place and draws from the same `rng` (SimCLR's colour jitter,
/// grey-scale and blur). The draws interleave per image: crop, flip, then `extra`'s.
pub fn augment_batch_with(
    images: &Tensor,
    cfg: &AugmentConfig,
    rng: &mut SslRng,
    mut extra: impl FnMut(&mut [f32], [usize; 3], &mut SslRng),
) -> Result<Tensor> {
    let (b, c, h, w) = images.dims4()?;
    let src = images.flatten_all()?.to_vec1::<f32>()?;
    let per = c * h * w;
    let mut out = Vec::with_capacity(src.len());
    for i in 0..b {
        let img = &src[i * per..(i + 1) * per];
        let crop = if cfg.crop {
            random_resized_crop_box(h, w, cfg.scale, cfg.ratio, rng)
        } else {
            (0, 0, h, w)
        };
        let flip = cfg.hflip && rng.bernoulli(0.5);
        let start = out.len();
        if crop == (0, 0, h, w) && !flip {
            out.extend_from_slice(img);
        } else {
            out.extend(resize_crop(img, c, h, w, crop, h, w, flip));
        }
        extra(&mut out[start..], [c, h, w], rng);
    }
    let mut out_norm = out;
    normalize_images(&mut out_norm, b, c, h * w, cfg);
    Ok(Tensor::from_vec(out_norm, (b, c, h, w), images.device())?)
}

fn normalize_images(data: &mut [f32], b: usize, c: usize, hw: usize, cfg: &AugmentConfig) {
    for i in 0..b {
        for ch in 0..c {
            let (m, s) = (
                AugmentConfig::stat(&cfg.mean, ch),
                AugmentConfig::stat(&cfg.std, ch),
            );
            let start = (i * c + ch) * hw;
            for v in &mut data[start..start + hw] {
                *v = (*v - m) / s;
            }
        }
    }
}

/// Normalises a batch of raw images `(B, C, H, W)` without augmenting (evaluation).
pub fn normalize_batch(images: &Tensor, cfg: &AugmentConfig) -> Result<Tensor> {
    let (b, c, h, w) = images.dims4()?;
    let mut data = images.flatten_all()?.to_vec1::<f32>()?;
    normalize_images(&mut data, b, c, h * w, cfg);
    Ok(Tensor::from_vec(data, (b, c, h, w), images.device())?)
}

/// Undoes [`normalize_batch`] on flat `(B, C, H, W)` values (for pictures).
pub fn denormalize(data: &mut [f32], channels: usize, hw: usize, cfg: &AugmentConfig) {
    let b = data.len() / (channels * hw).max(1);
    for i in 0..b {
        for ch in 0..channels {
            let (m, s) = (
                AugmentConfig::stat(&cfg.mean, ch),
                AugmentConfig::stat(&cfg.std, ch),
            );
            let start = (i * channels + ch) * hw;
            for v in &mut data[start..start + hw] {
                *v = *v * s + m;
            }
        }
    }
}

/// Per-channel mean and standard deviation of flat `(N, C, H, W)` values.
pub fn channel_stats(data: &[f32], channels: usize, hw: usize) -> (Vec<f32>, Vec<f32>) {
    let n = data.len() / (channels * hw).max(1);
    let mut mean = vec![0f64; channels];
    let mut sq = vec![0f64; channels];
    for i in 0..n {
        for c in 0..channels {
            let start = (i * channels + c) * hw;
            for &v in &data[start..start + hw] {
                mean[c] += f64::from(v);
                sq[c] += f64::from(v) * f64::from(v);
            }
        }
    }
    let count = (n * hw).max(1) as f64;
    let m: Vec<f32> = mean.iter().map(|s| (s / count) as f32).collect();
    let s: Vec<f32> = sq
        .iter()
        .zip(&mean)
        .map(|(q, s)| ((q / count - (s / count).powi(2)).max(1e-12).sqrt() as f32).max(1e-3))
        .collect();
    (m, s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn crop_boxes_respect_scale_and_ratio() {
        let mut rng = SslRng::new(0);
        let (h, w) = (64, 64);
        let mut areas = Vec::new();
        for _ in 0..2000 {
            let (t, l, ch, cw) =
                random_resized_crop_box(h, w, [0.2, 1.0], [0.75, 4.0 / 3.0], &mut rng);
            assert!(t + ch <= h && l + cw <= w && ch > 0 && cw > 0);
            let a = (ch * cw) as f64 / (h * w) as f64;
            assert!(a > 0.17 && a <= 1.0, "{a}");
            let r = cw as f64 / ch as f64;
            assert!(r > 0.7 && r < 1.43, "{r}");
            areas.push(a);
        }
        let mean = areas.iter().sum::<f64>() / areas.len() as f64;
        assert!(mean > 0.5 && mean < 0.65, "mean crop area {mean}");
    }

    #[test]
    fn flip_off_keeps_orientation_and_seed_repeats() {
        let dev = Device::Cpu;
        let v: Vec<f32> = (0..2 * 16).map(|i| (i % 4) as f32 / 4.0).collect();
        let img = Tensor::from_vec(v.clone(), (2, 1, 4, 4), &dev).unwrap();
        let off = AugmentConfig {
            crop: false,
            hflip: false,
            mean: vec![0.0],
            std: vec![1.0],
            ..AugmentConfig::default()
        };
        for seed in 0..20 {
            let out = augment_batch(&img, &off, &mut SslRng::new(seed)).unwrap();
            assert_eq!(out.flatten_all().unwrap().to_vec1::<f32>().unwrap(), v);
        }
        let flip = AugmentConfig {
            hflip: true,
            ..off.clone()
        };
        let mut flipped = 0;
        for seed in 0..40 {
            let out = augment_batch(&img, &flip, &mut SslRng::new(seed)).unwrap();
            let row = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            if row[0] == 0.75 {
                assert_eq!(&row[..4], &[0.75, 0.5, 0.25, 0.0]);
                flipped += 1;
            }
        }
        assert!(flipped > 5 && flipped < 35);
        let a = augment_batch(&img, &AugmentConfig::default(), &mut SslRng::new(9)).unwrap();
        let b = augment_batch(&img, &AugmentConfig::default(), &mut SslRng::new(9)).unwrap();
        let d = (a - b).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn normalisation_uses_per_channel_stats() {
        let dev = Device::Cpu;
        let img = Tensor::from_vec(vec![0.5f32, 0.5, 1.0, 1.0], (1, 2, 1, 2), &dev).unwrap();
        let cfg = AugmentConfig {
            mean: vec![0.5, 0.0],
            std: vec![1.0, 0.5],
            ..AugmentConfig::default()
        };
        let n = normalize_batch(&img, &cfg).unwrap();
        assert_eq!(
            n.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0, 0.0, 2.0, 2.0]
        );
        assert!(cfg.validate(2).is_ok());
        assert!(cfg.validate(3).is_err());
        let (m, s) = channel_stats(&[0.0, 1.0, 2.0, 2.0], 2, 2);
        assert_eq!(m, vec![0.5, 2.0]);
        assert!((s[0] - 0.5).abs() < 1e-6 && (s[1] - 1e-3).abs() < 1e-6);
    }
}
