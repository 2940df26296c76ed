//! Normalisation statistics over the images of every rank of a data-parallel run.

use ssl_core::Parallel;

use crate::augment::channel_stats;
use crate::Result;

/// Per-channel mean and standard deviation of images `(N, C, H*W)` (row-major `data`, this
/// rank's images) over every rank's images: [`channel_stats`] in one process, the same
/// formula on moments summed over ranks otherwise.
pub fn channel_stats_over_ranks(
    par: &Parallel,
    data: &[f32],
    channels: usize,
    hw: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    if par.world == 1 {
        return Ok(channel_stats(data, channels, hw));
    }
    let n = data.len() / (channels * hw).max(1);
    // Per channel: sum, sum of squares; then the pixel count.
    let mut local = vec![0f64; 2 * channels + 1];
    for i in 0..n {
        for c in 0..channels {
            let start = (i * channels + c) * hw;
            for &v in &data[start..start + hw] {
                local[c] += f64::from(v);
                local[channels + c] += f64::from(v) * f64::from(v);
            }
        }
    }
    local[2 * channels] = (n * hw) as f64;
    let sums = par.sum_f64(&local)?;
    let count = sums[2 * channels].max(1.0);
    let mean: Vec<f32> = (0..channels).map(|c| (sums[c] / count) as f32).collect();
    let std: Vec<f32> = (0..channels)
        .map(|c| {
            let m = sums[c] / count;
            ((sums[channels + c] / count - m.powi(2)).max(1e-12).sqrt() as f32).max(1e-3)
        })
        .collect();
    Ok((mean, std))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_stats_over_ranks_match_one_process() {
        // 4 images of 2 channels x 3 pixels, split 3 + 1 over two ranks.
        let data: Vec<f32> = (0..24).map(|v| (v as f32 * 0.37).sin().abs()).collect();
        let one = channel_stats(&data, 2, 3);
        let out = Parallel::on_threads(2, |p| {
            let part = if p.rank == 0 {
                &data[..18]
            } else {
                &data[18..]
            };
            channel_stats_over_ranks(&p, part, 2, 3).unwrap()
        });
        for (m, s) in out {
            for c in 0..2 {
                assert!((m[c] - one.0[c]).abs() < 1e-6, "{m:?} {:?}", one.0);
                assert!((s[c] - one.1[c]).abs() < 1e-6, "{s:?} {:?}", one.1);
            }
        }
    }
}
