//! PatchCore-style scoring: patch embeddings of normal images in a memory bank, greedy
//! coreset subsampling, each test patch scored by its distance to the nearest bank entry.

use candle_core::{DType, Device, Tensor};
use ssl_core::{Ctx, SslRng};

use crate::{Result, VisionError, VisionTransformer};

/// Patch embeddings `(B x L) x D` of normalised `pixels`: the final (normed) tokens when
/// `layer` is 0, else the hidden state after layer `layer`; averaged over a
/// `neighbourhood x neighbourhood` window of the patch grid (PatchCore's local aggregation;
/// 1 = off).
pub fn patch_embeddings(
    vit: &VisionTransformer,
    pixels: &Tensor,
    layer: usize,
    neighbourhood: usize,
) -> Result<(Vec<f32>, usize)> {
    let cfg = vit.config();
    if layer > cfg.depth {
        return Err(VisionError::Config(format!(
            "detect.patch_layer = {layer} but the encoder has {} layers",
            cfg.depth
        )));
    }
    let mut rng = SslRng::new(0);
    let mut ctx = Ctx::inference(&mut rng);
    if layer > 0 {
        ctx = ctx.with_hidden_states();
    }
    let x = vit.embed_patches(pixels)?;
    let (out, hidden) = vit.forward_tokens(&x, &mut ctx)?;
    let t = if layer == 0 {
        out
    } else {
        hidden[layer].clone()
    };
    let (b, n, d) = t.dims3()?;
    let tokens = t
        .narrow(1, 1, n - 1)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let (gh, gw) = cfg.grid()?;
    Ok((aggregate(&tokens, b, gh, gw, d, neighbourhood), d))
}

/// Mean over a `k x k` neighbourhood (clipped at the borders) of each patch's features.
pub fn aggregate(tokens: &[f32], b: usize, gh: usize, gw: usize, d: usize, k: usize) -> Vec<f32> {
    if k <= 1 {
        return tokens.to_vec();
    }
    let r = (k / 2) as isize;
    let mut out = vec![0f32; tokens.len()];
    for i in 0..b {
        for y in 0..gh as isize {
            for x in 0..gw as isize {
                let dst = ((i * gh * gw) + (y as usize) * gw + x as usize) * d;
                let mut count = 0f32;
                for dy in -r..=r {
                    for dx in -r..=r {
                        let (yy, xx) = (y + dy, x + dx);
                        if yy < 0 || xx < 0 || yy >= gh as isize || xx >= gw as isize {
                            continue;
                        }
                        let src = ((i * gh * gw) + yy as usize * gw + xx as usize) * d;
                        for j in 0..d {
                            out[dst + j] += tokens[src + j];
                        }
                        count += 1.0;
                    }
                }
                for v in &mut out[dst..dst + d] {
                    *v /= count;
                }
            }
        }
    }
    out
}

/// A memory bank of normal patch embeddings.
#[derive(Debug, Clone)]
pub struct MemoryBank {
    /// `n x dim` features, row-major.
    pub features: Vec<f32>,
    /// Feature width.
    pub dim: usize,
}

impl MemoryBank {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.features.len() / self.dim.max(1)
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Euclidean distance of each query row (`queries`, `m x dim`) to its nearest entry,
    /// computed as `|q|^2 + |b|^2 - 2 q.b` in chunks on `device`.
    pub fn nearest_distances(&self, queries: &[f32], device: &Device) -> Result<Vec<f32>> {
        let d = self.dim;
        if self.is_empty() {
            return Err(VisionError::InvalidInput("the memory bank is empty".into()));
        }
        let n = self.len();
        let bank = Tensor::from_vec(self.features.clone(), (n, d), device)?;
        let bank_sq = bank.sqr()?.sum(1)?.reshape((1, n))?;
        let bank_t = bank.t()?.contiguous()?;
        let m = queries.len() / d;
        let mut out = Vec::with_capacity(m);
        let chunk = (4_000_000 / n).clamp(1, 4096);
        for start in (0..m).step_by(chunk) {
            let rows = chunk.min(m - start);
            let q = Tensor::from_vec(
                queries[start * d..(start + rows) * d].to_vec(),
                (rows, d),
                device,
            )?;
            let q_sq = q.sqr()?.sum(1)?.reshape((rows, 1))?;
            let dist = q_sq
                .broadcast_add(&bank_sq)?
                .broadcast_sub(&(q.matmul(&bank_t)? * 2.0)?)?;
            let min = dist.min(1)?.to_vec1::<f32>()?;
            out.extend(min.into_iter().map(|v| v.max(0.0).sqrt()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_distance_matches_brute_force() {
        let mut rng = SslRng::new(0);
        let bank = MemoryBank {
            features: rng.normal_vec(50 * 6, 0.0, 1.0),
            dim: 6,
        };
        let q = rng.normal_vec(7 * 6, 0.0, 1.0);
        let got = bank.nearest_distances(&q, &Device::Cpu).unwrap();
        for i in 0..7 {
            let best = (0..50)
                .map(|j| {
                    (0..6)
                        .map(|k| (q[i * 6 + k] - bank.features[j * 6 + k]).powi(2))
                        .sum::<f32>()
                        .sqrt()
                })
                .fold(f32::INFINITY, f32::min);
            assert!((got[i] - best).abs() < 1e-3, "{} vs {best}", got[i]);
        }
    }

    #[test]
    fn aggregation_averages_neighbours() {
        // 1 image, 2x2 grid, d = 1: with k = 3 every patch sees all four.
        let a = aggregate(&[0.0, 1.0, 2.0, 3.0], 1, 2, 2, 1, 3);
        assert_eq!(a, vec![1.5; 4]);
        assert_eq!(aggregate(&[0.0, 1.0], 1, 1, 2, 1, 1), vec![0.0, 1.0]);
    }
}
