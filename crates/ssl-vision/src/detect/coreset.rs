//! Greedy coreset subsampling (PatchCore's k-center greedy on a random projection).

use ssl_core::SslRng;

/// Picks `target` of the `n` rows of `features` (`n x dim`, row-major) so that every row is
/// close to a picked one: start from a random row, then repeatedly add the row farthest from
/// the picked set. Distances are computed on a Gaussian random projection to `proj_dim`
/// (Johnson-Lindenstrauss, as PatchCore), or on the features when `proj_dim` is 0 or not
/// smaller than `dim`. Returns the picked row indices in the order picked.
pub fn greedy_coreset(
    features: &[f32],
    dim: usize,
    target: usize,
    proj_dim: usize,
    seed: u64,
) -> Vec<usize> {
    let n = features.len().checked_div(dim).unwrap_or(0);
    if target >= n {
        return (0..n).collect();
    }
    if target == 0 {
        return Vec::new();
    }
    let mut rng = SslRng::derived(seed, "coreset");
    let (proj, pd) = if proj_dim > 0 && proj_dim < dim {
        let scale = 1.0 / (proj_dim as f32).sqrt();
        let w = rng.normal_vec(dim * proj_dim, 0.0, scale);
        let mut p = vec![0f32; n * proj_dim];
        for i in 0..n {
            let row = &features[i * dim..(i + 1) * dim];
            let out = &mut p[i * proj_dim..(i + 1) * proj_dim];
            for (k, &x) in row.iter().enumerate() {
                let wr = &w[k * proj_dim..(k + 1) * proj_dim];
                for (o, &wv) in out.iter_mut().zip(wr) {
                    *o += x * wv;
                }
            }
        }
        (p, proj_dim)
    } else {
        (features.to_vec(), dim)
    };
    let mut min_d = vec![f32::INFINITY; n];
    let mut picked = Vec::with_capacity(target);
    let mut cur = rng.below(n);
    for _ in 0..target {
        picked.push(cur);
        let c = &proj[cur * pd..(cur + 1) * pd];
        let mut best = (0usize, -1f32);
        for (i, md) in min_d.iter_mut().enumerate() {
            let r = &proj[i * pd..(i + 1) * pd];
            let d: f32 = r.iter().zip(c).map(|(a, b)| (a - b) * (a - b)).sum();
            if d < *md {
                *md = d;
            }
            if *md > best.1 {
                best = (i, *md);
            }
        }
        cur = best.0;
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_every_cluster_before_repeating_one() {
        // 4 tight clusters of 50 points in 8-D: a coreset of 4 takes one from each.
        let mut rng = SslRng::new(0);
        let centers = [[10f32; 8], [-10f32; 8], [0f32; 8], [25f32; 8]];
        let mut f = Vec::new();
        for c in &centers {
            for _ in 0..50 {
                f.extend(c.iter().map(|v| v + 0.1 * rng.normal()));
            }
        }
        for proj in [0, 4] {
            let picked = greedy_coreset(&f, 8, 4, proj, 1);
            let mut clusters: Vec<usize> = picked.iter().map(|i| i / 50).collect();
            clusters.sort();
            assert_eq!(clusters, vec![0, 1, 2, 3], "proj {proj}");
        }
        assert_eq!(greedy_coreset(&f, 8, 500, 4, 1).len(), 200);
    }
}
