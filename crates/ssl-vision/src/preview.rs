//! PNG grids of original | masked | reconstruction, one row per image (MAE's visualisation).

use std::path::Path;

use candle_core::{DType, Tensor, D};
use image::{Rgb, RgbImage};
use ssl_core::{Ctx, SslRng};

use crate::augment::{denormalize, normalize_batch};
use crate::patch::{patchify, unpatchify};
use crate::vit::Images;
use crate::{MaeTask, Result, VisionError};

/// Grey value drawn where a patch is masked.
const MASKED_GREY: f32 = 0.35;

/// The three panels of each image, `[0, 1]` values `(B, C, H, W)`: original, masked
/// (hidden patches grey), reconstruction (predicted hidden patches pasted into the visible
/// ones). `seed` fixes the masks, so successive previews of one run are comparable.
pub fn reconstruction_panels(task: &MaeTask, images: &Images, seed: u64) -> Result<[Vec<f32>; 3]> {
    let vit = task.encoder().config();
    let (p, c) = (vit.patch_size, vit.channels);
    let grid = vit.grid()?;
    let b = images.len();
    let mut rng = SslRng::derived(seed, "preview-mask");
    let pixels = normalize_batch(&images.pixels, task.augment())?;
    let mask = crate::random_masking(b, grid.0 * grid.1, task.config().mask_ratio, &mut rng)?;
    let mut ctx = Ctx::inference(&mut rng);
    let mut pred = task.reconstruct(&pixels, &mask, &mut ctx)?;
    if task.config().norm_pix_loss {
        // Back from per-patch normalised space with the true patch statistics (MAE's demo).
        let t = patchify(&pixels, p)?;
        let n = t.dim(D::Minus1)? as f64;
        let mean = t.mean_keepdim(D::Minus1)?;
        let var = (t.broadcast_sub(&mean)?.sqr()?.sum_keepdim(D::Minus1)? / (n - 1.0).max(1.0))?;
        pred = pred
            .broadcast_mul(&(var + 1e-6)?.sqrt()?)?
            .broadcast_add(&mean)?;
    }
    let m = mask
        .mask_tensor(pixels.device())?
        .unsqueeze(2)?
        .broadcast_as(pred.shape())?
        .contiguous()?;
    let target = patchify(&pixels, p)?;
    let keep = (m.ones_like()? - &m)?;
    let pasted = ((&pred * &m)? + (&target * &keep)?)?;
    let masked = ((&target * &keep)? + (&m * f64::from(MASKED_GREY))?)?;
    let hw = vit.image_height * vit.image_width;
    let to_unit = |patches: &Tensor, already_unit: bool| -> Result<Vec<f32>> {
        let img = unpatchify(patches, p, c, grid)?;
        let mut v = img.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if !already_unit {
            denormalize(&mut v, c, hw, task.augment());
        }
        Ok(v.into_iter().map(|x| x.clamp(0.0, 1.0)).collect())
    };
    let original = images.pixels.flatten_all()?.to_vec1::<f32>()?;
    // The masked panel: visible pixels denormalised, masked patches a flat grey.
    let mut masked_v = to_unit(&masked, false)?;
    let mvec = crate::patch::unpatchify(&m, p, c, grid)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    for (v, mm) in masked_v.iter_mut().zip(&mvec) {
        if *mm > 0.5 {
            *v = MASKED_GREY;
        }
    }
    Ok([original, masked_v, to_unit(&pasted, false)?])
}

/// Draws panels `(B, C, H, W)` side by side, one row per image, scaled up by `scale`.
pub fn grid_image(
    panels: &[&[f32]],
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    scale: usize,
) -> RgbImage {
    let gap = 2u32;
    let s = scale.max(1) as u32;
    let (tw, th) = (w as u32 * s, h as u32 * s);
    let cols = panels.len() as u32;
    let mut img = RgbImage::from_pixel(
        cols * (tw + gap) + gap,
        b as u32 * (th + gap) + gap,
        Rgb([255, 255, 255]),
    );
    let hw = h * w;
    for (col, panel) in panels.iter().enumerate() {
        for i in 0..b {
            for y in 0..h {
                for x in 0..w {
                    let px = |ch: usize| -> u8 {
                        let ch = if c >= 3 { ch } else { 0 };
                        (panel[(i * c + ch) * hw + y * w + x].clamp(0.0, 1.0) * 255.0).round() as u8
                    };
                    let rgb = Rgb([px(0), px(1), px(2)]);
                    for dy in 0..s {
                        for dx in 0..s {
                            img.put_pixel(
                                gap + col as u32 * (tw + gap) + x as u32 * s + dx,
                                gap + i as u32 * (th + gap) + y as u32 * s + dy,
                                rgb,
                            );
                        }
                    }
                }
            }
        }
    }
    img
}

/// Writes the original | masked | reconstruction grid of `images` to `path` (PNG).
pub fn save_reconstruction_grid(
    task: &MaeTask,
    images: &Images,
    seed: u64,
    path: &Path,
) -> Result<()> {
    let [o, m, r] = reconstruction_panels(task, images, seed)?;
    let vit = task.encoder().config();
    let (h, w) = (vit.image_height, vit.image_width);
    let scale = (128 / h.max(w)).clamp(1, 8);
    let img = grid_image(&[&o, &m, &r], images.len(), vit.channels, h, w, scale);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| VisionError::io(dir, e))?;
    }
    img.save(path).map_err(|e| VisionError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AugmentConfig, MaeConfig, ViTConfig};
    use candle_core::Device;
    use ssl_core::ParamStore;

    #[test]
    fn grid_has_three_panels_and_keeps_visible_pixels() {
        let vit = ViTConfig {
            image_height: 8,
            image_width: 8,
            channels: 1,
            patch_size: 2,
            dim: 16,
            depth: 1,
            heads: 2,
            ..ViTConfig::default()
        };
        let mae = MaeConfig {
            decoder_dim: 8,
            decoder_depth: 1,
            decoder_heads: 2,
            norm_pix_loss: true,
            ..MaeConfig::default()
        };
        let store = ParamStore::new(&Device::Cpu);
        let task = MaeTask::new(&vit, &mae, &AugmentConfig::default(), &store.builder(0)).unwrap();
        let mut rng = SslRng::new(0);
        let imgs = Images::from_vec(
            rng.uniform_vec(2 * 64, 0.0, 1.0),
            [2, 1, 8, 8],
            &Device::Cpu,
        )
        .unwrap();
        let [o, m, r] = reconstruction_panels(&task, &imgs, 1).unwrap();
        let visible: Vec<usize> = (0..128).filter(|&i| m[i] != MASKED_GREY).collect();
        assert!(!visible.is_empty() && visible.len() < 128);
        for &i in &visible {
            assert!((o[i] - r[i]).abs() < 1e-5 && (o[i] - m[i]).abs() < 1e-5);
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g/x.png");
        save_reconstruction_grid(&task, &imgs, 1, &p).unwrap();
        let g = image::open(&p).unwrap();
        assert_eq!(g.width(), 3 * (8 * 8 + 2) + 2);
    }
}
