//! Reconstruction-error scoring with complementary masks: the patches are split into `K`
//! disjoint groups; pass `k` hides group `k` and the MAE predicts it from the rest, so every
//! patch is predicted from context exactly once.

use candle_core::DType;
use ssl_core::{Ctx, SslRng};

use crate::masking::MaskSample;
use crate::{MaeTask, Result, VisionError};

/// A seeded partition of `0..num_patches` into `k` groups of (nearly) equal size.
pub fn complementary_groups(num_patches: usize, k: usize, seed: u64) -> Result<Vec<Vec<u32>>> {
    if k < 2 || k > num_patches {
        return Err(VisionError::Config(format!(
            "detect.recon_masks = {k} must be between 2 and the number of patches ({num_patches})"
        )));
    }
    let mut ids: Vec<u32> = (0..num_patches as u32).collect();
    SslRng::derived(seed, "complementary-masks").shuffle(&mut ids);
    let mut groups = vec![Vec::new(); k];
    for (i, id) in ids.into_iter().enumerate() {
        groups[i % k].push(id);
    }
    Ok(groups)
}

/// Per-patch reconstruction errors `(B x L)` of normalised `pixels` `(B, C, H, W)`, each patch
/// scored in the pass where it is hidden.
pub fn reconstruction_errors(
    task: &MaeTask,
    pixels: &candle_core::Tensor,
    groups: &[Vec<u32>],
) -> Result<Vec<f32>> {
    let b = pixels.dim(0)?;
    let l: usize = groups.iter().map(Vec::len).sum();
    let mut out = vec![f32::NAN; b * l];
    let mut rng = SslRng::new(0);
    for group in groups {
        let mut hidden = vec![false; l];
        for &g in group {
            hidden[g as usize] = true;
        }
        let mut shuffle: Vec<u32> = (0..l as u32).filter(|&i| !hidden[i as usize]).collect();
        let keep = shuffle.len();
        shuffle.extend(group.iter().copied());
        let mask = MaskSample::from_shuffle(vec![shuffle; b], keep)?;
        let pred = task.reconstruct(pixels, &mask, &mut Ctx::inference(&mut rng))?;
        let err = task
            .patch_errors(pixels, &pred)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        for i in 0..b {
            for &g in group {
                out[i * l + g as usize] = err[i * l + g as usize];
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_partition_the_patches() {
        let g = complementary_groups(49, 4, 0).unwrap();
        let mut all: Vec<u32> = g.iter().flatten().copied().collect();
        all.sort();
        assert_eq!(all, (0..49).collect::<Vec<u32>>());
        assert!(g.iter().all(|x| x.len() == 12 || x.len() == 13));
        assert!(complementary_groups(4, 1, 0).is_err());
    }
}
