//! The channel statistics of `data.normalize = "channel"` (TS2Vec's reference standardises
//! each channel over the training set): measured before training on a bounded, seeded sample
//! of the training series, streamed, the moments summed over ranks, then stored with the run
//! in its configuration (`data.channel_mean` / `data.channel_std`).

use ssl_core::Parallel;
use ssl_data::{LoaderConfig, ParquetSource, StreamPosition};

use super::common::{check_heldout_fraction, ordered_loader, RowsSpec};
use crate::{
    row_stream, ChannelMoments, ChannelStats, Normalization, NormalizeMode, Result, Split, TsError,
};

/// The channel statistics of a run (`data.normalize = "channel"`, `data.channel_mean` /
/// `data.channel_std` in section `key`): those configured when both are set, else measured on
/// the training series of `paths` as `spec` reads them ([`measure_channel_stats`], at most
/// `bound` series). `None` when `mode` is not `channel` or the task takes forecasting windows
/// (scaled by RevIN instead).
pub(crate) fn channel_stats_for_run(
    mode: NormalizeMode,
    configured: (&[f32], &[f32]),
    key: &str,
    paths: &[String],
    spec: &RowsSpec,
    bound: usize,
    par: &Parallel,
) -> Result<Option<ChannelStats>> {
    if mode != NormalizeMode::Channel || spec.windows.is_some() {
        return Ok(None);
    }
    // A held-out fraction that leaves no training series is named as such, before the sample.
    check_heldout_fraction(spec.heldout_fraction)?;
    let (mean, std) = configured;
    if !mean.is_empty() || !std.is_empty() {
        return Ok(Some(ChannelStats::new(mean.to_vec(), std.to_vec(), key)?));
    }
    let (stats, series) = measure_channel_stats(paths, spec, bound, par)?;
    if par.is_main() {
        eprintln!(
            "{key}.normalize = \"channel\": mean / std of {} channel(s) measured on {series} training series",
            stats.channels()
        );
    }
    Ok(Some(stats))
}

/// Per-channel mean and standard deviation of the training series of `paths` (read by `spec`
/// as they come from the file, before any normalisation, truncated to `data.max_len`, the
/// held-out rows left out) over every rank: each rank reads its first `ceil(bound / ranks)`
/// series in a seeded order (its row groups shuffled with the split's seed, rows shuffled
/// within each, one row group decoded at a time) and the moments are summed over the ranks
/// (a collective: every rank calls it). Returns the statistics and the series measured over
/// every rank; an error when no rank read a series.
pub(crate) fn measure_channel_stats(
    paths: &[String],
    spec: &RowsSpec,
    bound: usize,
    par: &Parallel,
) -> Result<(ChannelStats, usize)> {
    let want = bound.max(1).div_ceil(par.world.max(1));
    let raw = RowsSpec {
        label_column: None,
        normalization: Normalization::None,
        ..spec.clone()
    };
    let source = ParquetSource::open(paths)?;
    let transform = raw.transform(&source, Split::Train)?;
    let loader = LoaderConfig {
        seed: spec.seed,
        shuffle: true,
        ..ordered_loader(
            transform.columns(""),
            want.min(256),
            par.rank,
            par.world,
            spec.skip_bad_rows,
        )
    };
    let mut stream = row_stream(&source, loader, StreamPosition::default(), transform)?;
    let mut moments = ChannelMoments::new();
    let mut width = 0usize;
    while moments.series() < want {
        let got = stream.take((want - moments.series()).min(256))?;
        if got.is_empty() {
            break;
        }
        for e in &got {
            if width == 0 {
                width = e.example.features;
            }
            moments.add(&e.example).map_err(|err| {
                TsError::InvalidInput(format!("column `{}`, row {}: {err}", spec.column, e.row))
            })?;
        }
    }
    drop(stream);
    // Every rank learns the width (a rank may have read nothing) and the series count.
    let agreed = par.sum_f64(&[
        width as f64,
        (width > 0) as u8 as f64,
        moments.series() as f64,
    ])?;
    let ranks_with_data = agreed[1].round() as usize;
    if ranks_with_data == 0 {
        return Err(TsError::InvalidInput(format!(
            "no training series read from column `{}` of {} to measure the channel statistics (data.normalize = \"channel\")",
            spec.column,
            paths.join(", ")
        )));
    }
    let channels = (agreed[0] / agreed[1]).round() as usize;
    // Ranks whose series have another width: every rank learns of it, so all stop alike.
    let differ = par.sum_f64(&[(width != 0 && width != channels) as u8 as f64])?[0];
    if differ > 0.0 {
        return Err(TsError::InvalidInput(format!(
            "column `{}`: the ranks' training series have different numbers of channels (this rank's: {width})",
            spec.column
        )));
    }
    let stats = moments.stats_over_ranks(par, channels)?;
    Ok((stats, agreed[2].round() as usize))
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use arrow::array::{ArrayRef, Float32Builder, ListBuilder};
    use arrow::record_batch::RecordBatch;
    use parquet::file::properties::WriterProperties;

    use super::*;

    /// `rows` series of 2 channels x 12 steps on very different scales (channel 0 around
    /// 1000 with a row-dependent level, channel 1 around 0 in hundredths), in row groups of
    /// 8 rows: the file's path.
    fn two_channel_series(path: &Path, rows: usize) -> Vec<String> {
        let mut x = ListBuilder::new(ListBuilder::new(Float32Builder::new()));
        for i in 0..rows {
            let a: Vec<f32> = (0..12)
                .map(|t| 1000.0 + 5.0 * i as f32 + 20.0 * ((t + i) as f32 / 3.0).sin())
                .collect();
            let b: Vec<f32> = (0..12).map(|t| 0.01 * ((t * i) % 7) as f32).collect();
            for ch in [a, b] {
                x.values().values().append_slice(&ch);
                x.values().append(true);
            }
            x.append(true);
        }
        let batch = RecordBatch::try_from_iter([("x", Arc::new(x.finish()) as ArrayRef)]).unwrap();
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(8))
            .build();
        let file = std::fs::File::create(path).unwrap();
        let mut w =
            parquet::arrow::ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        vec![path.display().to_string()]
    }

    fn spec(heldout_fraction: f64) -> RowsSpec {
        RowsSpec {
            column: "x".into(),
            label_column: None,
            max_len: 0,
            normalization: Normalization::None,
            windows: None,
            skip_bad_rows: false,
            heldout_fraction,
            seed: 7,
            shuffle_buffer_mb: 1.0,
        }
    }

    fn close(a: &ChannelStats, b: &ChannelStats) -> bool {
        let near = |x: &[f32], y: &[f32]| {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|(p, q)| (p - q).abs() <= 1e-5 * p.abs().max(q.abs()).max(1.0))
        };
        near(&a.mean, &b.mean) && near(&a.std, &b.std)
    }

    #[test]
    fn the_statistics_are_the_same_on_one_rank_and_two_and_standardise_every_channel() {
        let dir = tempfile::tempdir().unwrap();
        let data = two_channel_series(&dir.path().join("d.parquet"), 64);
        let spec = spec(0.25);
        // A bound above the training rows: every rank reads its whole share.
        let (one, n1) = measure_channel_stats(&data, &spec, 1000, &Parallel::single()).unwrap();
        let two = Parallel::on_threads(2, |par| {
            measure_channel_stats(&data, &spec, 1000, &par).unwrap()
        });
        let training = (0..64)
            .filter(|&r| !ssl_data::is_heldout(r, 7, 0.25))
            .count();
        assert_eq!(n1, training);
        for (stats, n) in &two {
            assert_eq!(*n, training);
            assert!(close(stats, &one), "{stats:?} against {one:?}");
        }
        assert_eq!(one.channels(), 2);
        assert!(one.mean[0] > 900.0 && one.std[0] > 10.0, "{one:?}");
        assert!(one.mean[1] < 0.1 && one.std[1] < 0.1, "{one:?}");

        // The training series, read with the statistics: zero mean and unit standard
        // deviation per channel.
        let scaled = RowsSpec {
            normalization: Normalization::Channel(Arc::new(one.clone())),
            ..spec.clone()
        };
        let (mut sum, mut sq, mut n) = ([0f64; 2], [0f64; 2], 0f64);
        super::super::common::rows_pass(
            &data,
            |s| scaled.transform(s, Split::Train),
            "",
            16,
            "test",
            |examples| {
                for e in examples {
                    for step in e.example.values.chunks(2) {
                        for j in 0..2 {
                            sum[j] += f64::from(step[j]);
                            sq[j] += f64::from(step[j]).powi(2);
                        }
                        n += 1.0;
                    }
                }
                Ok(true)
            },
        )
        .unwrap();
        for j in 0..2 {
            let mean = sum[j] / n;
            let std = (sq[j] / n - mean * mean).sqrt();
            assert!(mean.abs() < 1e-3, "channel {j}: mean {mean}");
            assert!((std - 1.0).abs() < 1e-3, "channel {j}: std {std}");
        }
    }

    #[test]
    fn the_sample_bound_is_respected_and_the_sample_is_seeded() {
        let dir = tempfile::tempdir().unwrap();
        let data = two_channel_series(&dir.path().join("d.parquet"), 64);
        let spec = spec(0.0);
        let (a, n) = measure_channel_stats(&data, &spec, 10, &Parallel::single()).unwrap();
        assert_eq!(n, 10);
        let (again, _) = measure_channel_stats(&data, &spec, 10, &Parallel::single()).unwrap();
        assert_eq!(a, again, "the same seed draws the same sample");
        let two = Parallel::on_threads(2, |par| {
            measure_channel_stats(&data, &spec, 10, &par).unwrap().1
        });
        assert_eq!(two, [10, 10], "5 series on each of 2 ranks");
        // Not simply the first rows in file order: their level (channel 0 grows with the
        // row) differs from the seeded sample's.
        let first: Vec<f32> = (0..10).map(|i| 1000.0 + 5.0 * i as f32).collect();
        let first_mean = first.iter().sum::<f32>() / 10.0;
        assert!((a.mean[0] - first_mean).abs() > 1.0, "{a:?}");
    }

    #[test]
    fn configured_statistics_are_kept_and_other_modes_measure_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let data = two_channel_series(&dir.path().join("d.parquet"), 16);
        let par = Parallel::single();
        let spec = spec(0.0);
        let got = channel_stats_for_run(
            NormalizeMode::Channel,
            (&[1.0, 2.0], &[3.0, 4.0]),
            "data",
            &data,
            &spec,
            100,
            &par,
        )
        .unwrap()
        .unwrap();
        assert_eq!((got.mean, got.std), (vec![1.0, 2.0], vec![3.0, 4.0]));
        for mode in [NormalizeMode::Series, NormalizeMode::None] {
            let got =
                channel_stats_for_run(mode, (&[], &[]), "data", &data, &spec, 100, &par).unwrap();
            assert!(got.is_none());
        }
    }
}
