//! Normalisation statistics over the images of every rank of a data-parallel run, and the
//! bounded preparation pass that measures them on a streamed run ([`sample_training_images`]:
//! the first `data.stats_images` training images in a seeded order, moments summed over
//! ranks), which also keeps the few images the run shows (health batch, previews, k-NN bank).

use ssl_core::monitor::Progress;
use ssl_core::Parallel;
use ssl_data::{LoaderConfig, StreamPosition};

use super::stream::{check_example_shape, describe, ImageReader, Split};
use crate::augment::channel_stats;
use crate::{ImageSet, Result, VisionError};

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
    Ok(stats_of_moments(&par.sum_f64(&local)?, channels))
}

/// Mean and standard deviation per channel from moments `[sum per channel, sum of squares
/// per channel, pixel count]` (the formula of [`channel_stats`]).
fn stats_of_moments(sums: &[f64], channels: usize) -> (Vec<f32>, Vec<f32>) {
    let count = sums[2 * channels].max(1.0);
    let mean: Vec<f32> = (0..channels).map(|c| (sums[c] / count) as f32).collect();
    let std: Vec<f32> = (0..channels)
        .map(|c| {
            let m = sums[c] / count;
            ((sums[channels + c] / count - m.powi(2)).max(1e-12).sqrt() as f32).max(1e-3)
        })
        .collect();
    (mean, std)
}

/// What the preparation pass over the training images measured on one rank.
pub(crate) struct TrainingSample {
    /// `[C, H, W]` of the images.
    pub shape: [usize; 3],
    /// Per channel: sum, sum of squares; then the pixel count (this rank's images).
    moments: Vec<f64>,
    /// The first images read (for health figures, previews and the online k-NN bank).
    pub images: ImageSet,
    /// Their labels, when a label column is read.
    pub labels: Option<Vec<i64>>,
    /// Training images read by this rank.
    pub seen: usize,
    /// True when the pass read this rank's whole share (`seen` is then its image count).
    pub whole_share: bool,
}

impl TrainingSample {
    /// The normalisation statistics over every rank's sample (moments summed over ranks).
    pub fn stats_over_ranks(&self, par: &Parallel) -> Result<(Vec<f32>, Vec<f32>)> {
        Ok(stats_of_moments(
            &par.sum_f64(&self.moments)?,
            self.shape[0],
        ))
    }

    /// The images this rank holds per epoch when known, else `usize::MAX` (more than
    /// `stats_images` / ranks: a batch is never capped by them).
    pub fn local_images(&self) -> usize {
        if self.whole_share {
            self.seen
        } else {
            usize::MAX
        }
    }
}

/// The preparation pass: reads this rank's first `ceil(stats_images / ranks)` training images
/// in a seeded order (the row groups shuffled with `train.seed` and read one at a time, rows
/// shuffled within each: a sample from across the data at the cost of a few row groups),
/// accumulating the per-channel moments and keeping the first `keep(shape)` images (and
/// labels). Shows progress on rank 0. Errors, on every rank alike, when a rank has no
/// training image.
pub(crate) fn sample_training_images(
    reader: &ImageReader,
    stats_images: usize,
    keep: impl Fn([usize; 3]) -> usize,
    par: &Parallel,
) -> Result<TrainingSample> {
    let want = stats_images.max(1).div_ceil(par.world.max(1));
    let loader = LoaderConfig {
        rank: par.rank,
        world_size: par.world,
        ..reader.loader(256, true, Some(1))
    };
    let mut stream = reader.stream(loader, Split::Train, StreamPosition::default(), false)?;
    let progress = par
        .is_main()
        .then(|| Progress::task("normalisation sample", want as u64, "images"));
    let mut shape = None;
    let mut moments = Vec::new();
    let (mut kept, mut labels, mut keep_n) = (Vec::new(), Vec::new(), 0);
    let mut seen = 0usize;
    let mut whole_share = false;
    while seen < want {
        let got = stream.take((want - seen).min(256))?;
        if got.is_empty() {
            whole_share = true;
            break;
        }
        for e in &got {
            let [c, h, w] = *shape.get_or_insert_with(|| {
                moments = vec![0f64; 2 * e.shape[0] + 1];
                keep_n = keep(e.shape);
                e.shape
            });
            check_example_shape(e, [c, h, w])?;
            let hw = h * w;
            for ch in 0..c {
                for &v in &e.pixels[ch * hw..(ch + 1) * hw] {
                    moments[ch] += f64::from(v);
                    moments[c + ch] += f64::from(v) * f64::from(v);
                }
            }
            moments[2 * c] += hw as f64;
            if seen < keep_n {
                kept.extend_from_slice(&e.pixels);
                labels.extend(e.label);
            }
            seen += 1;
        }
        if let Some(p) = &progress {
            p.set_position(seen as u64);
        }
    }
    if let Some(p) = progress {
        p.finish();
    }
    let empty_ranks = par.sum_f64(&[f64::from(u8::from(seen == 0))])?[0];
    if empty_ranks > 0.0 {
        return Err(VisionError::InvalidInput(format!(
            "{}: no training images{} (data.max_images, data.heldout_fraction and bad rows leave none)",
            describe(reader.source()),
            if par.world > 1 {
                format!(" on {empty_ranks} of {} ranks", par.world)
            } else {
                String::new()
            }
        )));
    }
    let shape = shape.expect("at least one image was read");
    let labels = (labels.len() == kept.len() / shape.iter().product::<usize>().max(1)
        && !labels.is_empty())
    .then_some(labels);
    Ok(TrainingSample {
        shape,
        moments,
        images: ImageSet::new(kept, shape).map_err(|e| VisionError::Config(e.to_string()))?,
        labels,
        seen,
        whole_share,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::config::VisionDataConfig;

    /// The CLI's embedded sample (1,500 Fashion-MNIST images, 28x28 grey) written to `path`
    /// again with row groups of `rows_per_group` rows.
    fn regrouped_sample(rows_per_group: usize, path: &std::path::Path) {
        let src = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../ssl-cli/data/fashion_mnist_sample.parquet"
        );
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(src).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap();
        let props = parquet::file::properties::WriterProperties::builder()
            .set_max_row_group_row_count(Some(rows_per_group))
            .build();
        let mut w = None;
        for batch in reader {
            let batch = batch.unwrap();
            let w = w.get_or_insert_with(|| {
                parquet::arrow::ArrowWriter::try_new(
                    std::fs::File::create(path).unwrap(),
                    batch.schema(),
                    Some(props.clone()),
                )
                .unwrap()
            });
            w.write(&batch).unwrap();
        }
        w.unwrap().close().unwrap();
    }

    #[test]
    fn ranks_sample_their_share_and_agree_on_the_statistics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("images.parquet");
        // 1,500 images in row groups of 100 (15 groups).
        regrouped_sample(100, &path);
        let paths = vec![path.to_string_lossy().into_owned()];
        let data = VisionDataConfig {
            max_images: 1000,
            heldout_fraction: 0.1,
            ..VisionDataConfig::default()
        };
        let reader = ImageReader::open(&paths, &data, None, 3).unwrap();
        assert_eq!(reader.kept_rows(), 1000);
        // A sample larger than the data: every training image, in one process or two.
        let one = sample_training_images(&reader, 4096, |_| 5, &Parallel::single()).unwrap();
        assert!(one.whole_share && one.images.len() == 5);
        let training = (0..1500)
            .filter(|&r| reader.sample().keeps(r) && !ssl_data::is_heldout(r, 3, 0.1))
            .count();
        assert_eq!(one.seen, training);
        let want = one.stats_over_ranks(&Parallel::single()).unwrap();
        let out = Parallel::on_threads(2, |p| {
            let s = sample_training_images(&reader, 4096, |_| 0, &p).unwrap();
            (s.seen, s.stats_over_ranks(&p).unwrap())
        });
        assert_eq!(out.iter().map(|o| o.0).sum::<usize>(), training);
        for (_, (mean, std)) in out {
            assert!((mean[0] - want.0[0]).abs() < 1e-6, "{mean:?} {want:?}");
            assert!((std[0] - want.1[0]).abs() < 1e-6, "{std:?} {want:?}");
        }
        // A bounded sample reads only what it needs.
        let part = sample_training_images(&reader, 150, |_| 0, &Parallel::single()).unwrap();
        assert_eq!(part.seen, 150);
        assert!(!part.whole_share && part.local_images() == usize::MAX);
    }

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
