//! MAE's per-sample random masking: argsort of uniform noise.

use candle_core::{Device, Tensor};
use ssl_core::SslRng;

use crate::{Result, VisionError};

/// One masking of a batch, as MAE's `random_masking` returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct MaskSample {
    /// Patches per image L.
    pub num_patches: usize,
    /// Kept (visible) patch ids per image, in shuffled order: `B x len_keep`.
    pub ids_keep: Vec<Vec<u32>>,
    /// 1 = masked (removed), 0 = kept: `B x L`, in the original patch order.
    pub mask: Vec<Vec<f32>>,
    /// For each image, the position of each original patch in the shuffled order:
    /// `ids_restore[b][i] = j` means patch `i` was shuffled to position `j`.
    pub ids_restore: Vec<Vec<u32>>,
}

impl MaskSample {
    /// Batch size.
    pub fn batch(&self) -> usize {
        self.ids_keep.len()
    }

    /// Visible patches per image.
    pub fn len_keep(&self) -> usize {
        self.ids_keep.first().map_or(0, Vec::len)
    }

    /// A masking from an explicit shuffle per image (`ids_shuffle[b]` a permutation of
    /// `0..L` whose first `len_keep` entries stay visible).
    pub fn from_shuffle(ids_shuffle: Vec<Vec<u32>>, len_keep: usize) -> Result<Self> {
        let l = ids_shuffle.first().map_or(0, Vec::len);
        if len_keep == 0 || len_keep >= l {
            return Err(VisionError::Config(format!(
                "masking keeps {len_keep} of {l} patches: at least one must be kept and one masked"
            )));
        }
        let mut ids_keep = Vec::with_capacity(ids_shuffle.len());
        let mut mask = Vec::with_capacity(ids_shuffle.len());
        let mut ids_restore = Vec::with_capacity(ids_shuffle.len());
        for shuffle in &ids_shuffle {
            if shuffle.len() != l {
                return Err(VisionError::InvalidInput(
                    "every image of a masking needs the same number of patches".into(),
                ));
            }
            let mut restore = vec![u32::MAX; l];
            for (pos, &id) in shuffle.iter().enumerate() {
                let slot = restore.get_mut(id as usize).ok_or_else(|| {
                    VisionError::InvalidInput(format!("patch id {id} out of range 0..{l}"))
                })?;
                if *slot != u32::MAX {
                    return Err(VisionError::InvalidInput(format!(
                        "patch id {id} appears twice in a shuffle"
                    )));
                }
                *slot = pos as u32;
            }
            let m: Vec<f32> = restore
                .iter()
                .map(|&p| if (p as usize) < len_keep { 0.0 } else { 1.0 })
                .collect();
            ids_keep.push(shuffle[..len_keep].to_vec());
            mask.push(m);
            ids_restore.push(restore);
        }
        Ok(MaskSample {
            num_patches: l,
            ids_keep,
            mask,
            ids_restore,
        })
    }

    /// The mask as a `(B, L)` tensor.
    pub fn mask_tensor(&self, device: &Device) -> Result<Tensor> {
        let flat: Vec<f32> = self.mask.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(
            flat,
            (self.batch(), self.num_patches),
            device,
        )?)
    }
}

/// Patches kept when masking `ratio` of `num_patches`: `int(L * (1 - ratio))`, as MAE.
pub fn len_keep(num_patches: usize, ratio: f64) -> usize {
    (num_patches as f64 * (1.0 - ratio)) as usize
}

/// MAE's `random_masking`: per image, uniform noise is argsorted into a shuffle; the first
/// `int(L * (1 - ratio))` shuffled patches stay visible. A pure function of the RNG.
pub fn random_masking(
    batch: usize,
    num_patches: usize,
    ratio: f64,
    rng: &mut SslRng,
) -> Result<MaskSample> {
    if !(0.0..1.0).contains(&ratio) {
        return Err(VisionError::Config(format!(
            "mask ratio {ratio} must be in [0, 1)"
        )));
    }
    let keep = len_keep(num_patches, ratio);
    let shuffles = (0..batch)
        .map(|_| {
            let noise = rng.uniform_vec(num_patches, 0.0, 1.0);
            let mut ids: Vec<u32> = (0..num_patches as u32).collect();
            ids.sort_by(|&a, &b| noise[a as usize].total_cmp(&noise[b as usize]));
            ids
        })
        .collect();
    MaskSample::from_shuffle(shuffles, keep)
}

/// Selects tokens per image: `x` (B, L, D), `ids` B rows of K ids -> (B, K, D).
/// Gradients flow back to `x` (index-select on the flattened batch).
pub fn gather_tokens(x: &Tensor, ids: &[Vec<u32>]) -> Result<Tensor> {
    let (b, l, d) = x.dims3()?;
    let k = ids.first().map_or(0, Vec::len);
    if ids.len() != b || ids.iter().any(|r| r.len() != k) {
        return Err(VisionError::InvalidInput(format!(
            "gather_tokens: {} id rows for a batch of {b}",
            ids.len()
        )));
    }
    let flat: Vec<u32> = ids
        .iter()
        .enumerate()
        .flat_map(|(i, r)| r.iter().map(move |&j| (i * l) as u32 + j))
        .collect();
    let idx = Tensor::from_vec(flat, b * k, x.device())?;
    Ok(x.reshape((b * l, d))?
        .index_select(&idx, 0)?
        .reshape((b, k, d))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invariants_over_many_seeds() {
        let (b, l) = (6, 49);
        for ratio in [0.5, 0.6, 0.75, 0.9] {
            let keep = len_keep(l, ratio);
            let mut total_masked = 0usize;
            for seed in 0..200 {
                let mut rng = SslRng::new(seed);
                let m = random_masking(b, l, ratio, &mut rng).unwrap();
                assert_eq!(m.len_keep(), keep);
                for i in 0..b {
                    // exact count per sample
                    let masked = m.mask[i].iter().filter(|v| **v == 1.0).count();
                    assert_eq!(masked, l - keep);
                    total_masked += masked;
                    // kept ids are exactly the unmasked patches
                    for &id in &m.ids_keep[i] {
                        assert_eq!(m.mask[i][id as usize], 0.0);
                    }
                    // ids_restore inverts the shuffle: shuffle[restore[p]] == p
                    let mut shuffle = vec![0u32; l];
                    for p in 0..l {
                        shuffle[m.ids_restore[i][p] as usize] = p as u32;
                    }
                    assert_eq!(&shuffle[..keep], &m.ids_keep[i][..]);
                    for p in 0..l {
                        assert_eq!(shuffle[m.ids_restore[i][p] as usize] as usize, p);
                    }
                }
                // different per sample
                for i in 1..b {
                    assert_ne!(m.mask[0], m.mask[i], "seed {seed}: samples share a mask");
                }
            }
            let rate = total_masked as f64 / (200 * b * l) as f64;
            assert!((rate - (l - keep) as f64 / l as f64).abs() < 1e-12);
        }
        assert!(random_masking(1, 4, 1.0, &mut SslRng::new(0)).is_err());
        assert!(random_masking(1, 4, 0.9, &mut SslRng::new(0)).is_err());
    }

    #[test]
    fn patches_are_masked_uniformly() {
        let l = 16;
        let mut counts = vec![0usize; l];
        let mut rng = SslRng::new(3);
        for _ in 0..2000 {
            let m = random_masking(1, l, 0.75, &mut rng).unwrap();
            for (c, v) in counts.iter_mut().zip(&m.mask[0]) {
                *c += *v as usize;
            }
        }
        for c in counts {
            let f = c as f64 / 2000.0;
            assert!((f - 0.75).abs() < 0.05, "{f}");
        }
    }

    #[test]
    fn gather_selects_rows() {
        let x = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 2))
            .unwrap();
        let g = gather_tokens(&x, &[vec![2, 0], vec![1, 1]]).unwrap();
        assert_eq!(
            g.to_vec3::<f32>().unwrap(),
            vec![
                vec![vec![4., 5.], vec![0., 1.]],
                vec![vec![8., 9.], vec![8., 9.]]
            ]
        );
    }
}
