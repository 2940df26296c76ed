//! Images (with ids and labels) read from Parquet for the pipeline, in one process or as one
//! rank's share of a data-parallel run.

use ssl_core::Parallel;
use ssl_data::{read_all, ColumnSpec, ReadOptions, Share};

use super::config::VisionDataConfig;
use crate::{ImageSet, Result, VisionError};

/// Images (and ids, labels) read from Parquet.
pub struct LoadedImages {
    /// The pixels, `[0, 1]`.
    pub images: ImageSet,
    /// Row ids.
    pub ids: Vec<String>,
    /// Labels as class ids, when asked for.
    pub labels: Option<Vec<i64>>,
    /// The global row index of each image (the held-out split is decided on it).
    pub rows: Vec<usize>,
}

/// Reads the image column of every file, directory or glob in `paths` as `cfg` says (and
/// the label column `label_column`, and `cfg.id_column` when set); keeps the first
/// `cfg.max_images` images when that is non-zero.
pub fn load_images(
    paths: &[String],
    cfg: &VisionDataConfig,
    label_column: Option<&str>,
) -> Result<LoadedImages> {
    load_images_of(paths, cfg, label_column, None)
}

/// [`load_images`] for rank `par.rank`'s share of the rows (its row groups; see
/// [`ssl_data::read_all`]). `cfg.max_images` keeps the rows whose global row index is below
/// it, so the ranks together hold the images one process would (unless bad rows were
/// skipped).
pub fn load_rank_images(
    paths: &[String],
    cfg: &VisionDataConfig,
    label_column: Option<&str>,
    par: &Parallel,
) -> Result<LoadedImages> {
    load_images_of(paths, cfg, label_column, Some(par))
}

/// [`load_images`] for this rank's share of the rows when `par` is given (every row
/// otherwise). With a share, `data.max_images` keeps the rows whose global row index is below
/// it; reading everything, it keeps the first `max_images` rows read (the same rows unless bad
/// rows were skipped).
fn load_images_of(
    paths: &[String],
    cfg: &VisionDataConfig,
    label_column: Option<&str>,
    par: Option<&Parallel>,
) -> Result<LoadedImages> {
    let resize = match cfg.resize.as_slice() {
        [] => None,
        [h, w] if *h == 0 || *w == 0 => {
            return Err(VisionError::Config(format!(
                "data.resize = [{h}, {w}]: height and width must be at least 1 (or [] to keep the images' size)"
            )))
        }
        [h, w] => Some([*h, *w]),
        other => {
            return Err(VisionError::Config(format!(
                "data.resize = {other:?}: give [height, width] or []"
            )))
        }
    };
    let mut columns = vec![ColumnSpec::image(cfg.column.as_str(), cfg.color, resize)
        .with_max_pixels(cfg.max_image_pixels)];
    if let Some(l) = label_column {
        columns.push(ColumnSpec::label(l));
    }
    if !cfg.id_column.is_empty() {
        columns.push(ColumnSpec::id(cfg.id_column.as_str()));
    }
    let options = match par {
        Some(p) => ReadOptions::for_rank(p.rank, p.world, cfg.skip_bad_rows),
        None => ReadOptions {
            skip_bad_rows: cfg.skip_bad_rows,
            ..Default::default()
        },
    };
    let table = read_all(paths, &columns, &options)?;
    if let Some(p) = par {
        table
            .share
            .report(p.rank, p.world, table.row_index.len(), "images");
    }
    if table.bad_rows.count > 0 {
        eprintln!(
            "skipped {} bad rows: {}",
            table.bad_rows.count, table.bad_rows
        );
    }
    let batch = table.batch;
    let img = batch.image(&cfg.column)?;
    let [b, c, h, w] = img.shape;
    let per = c * h * w;
    if table.share != Share::All {
        let keep: Vec<usize> = (0..b)
            .filter(|&k| cfg.max_images == 0 || table.row_index[k] < cfg.max_images)
            .collect();
        let images = ImageSet::new(
            keep.iter()
                .flat_map(|&k| img.data[k * per..(k + 1) * per].iter().copied())
                .collect(),
            [c, h, w],
        )
        .map_err(|e| VisionError::Config(e.to_string()))?;
        let labels = match label_column {
            Some(l) => {
                let ids = batch.labels(l)?;
                Some(keep.iter().map(|&k| ids[k]).collect())
            }
            None => None,
        };
        return Ok(LoadedImages {
            images,
            ids: keep.iter().map(|&k| batch.ids()[k].clone()).collect(),
            labels,
            rows: keep.iter().map(|&k| table.row_index[k]).collect(),
        });
    }
    let keep = if cfg.max_images > 0 {
        cfg.max_images.min(b)
    } else {
        b
    };
    let images = ImageSet::new(img.data[..keep * per].to_vec(), [c, h, w])
        .map_err(|e| VisionError::Config(e.to_string()))?;
    let labels = match label_column {
        Some(l) => Some(batch.labels(l)?[..keep].to_vec()),
        None => None,
    };
    Ok(LoadedImages {
        images,
        ids: batch.ids()[..keep].to_vec(),
        labels,
        rows: table.row_index[..keep].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VisionConfig;

    /// The CLI's embedded sample: 1,500 Fashion-MNIST images (28x28 grey) with labels.
    fn sample() -> Vec<u8> {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../ssl-cli/data/fashion_mnist_sample.parquet"
        );
        std::fs::read(p).unwrap()
    }

    /// Writes the Parquet file `bytes` to `path` again with row groups of `rows_per_group` rows.
    fn regroup(bytes: &[u8], rows_per_group: usize, path: &std::path::Path) {
        let src = path.with_extension("src");
        std::fs::write(&src, bytes).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&src).unwrap(),
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
    fn a_zero_resize_is_refused_by_key() {
        let data = VisionDataConfig {
            resize: vec![0, 0],
            ..VisionDataConfig::default()
        };
        let Err(err) = load_images(&["missing.parquet".to_string()], &data, None) else {
            panic!("a zero resize was accepted");
        };
        let err = err.to_string();
        assert!(err.contains("data.resize = [0, 0]"), "{err}");
    }

    #[test]
    fn ranks_read_their_images_with_global_caps_and_statistics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("images.parquet");
        // 1,500 images in row groups of 100 (15 groups).
        regroup(&sample(), 100, &path);
        let paths = vec![path.to_string_lossy().into_owned()];
        let data = VisionDataConfig {
            max_images: 1000,
            ..VisionDataConfig::default()
        };
        let one = load_images(&paths, &data, None).unwrap();
        assert_eq!(one.ids.len(), 1000);
        // One process's normalisation statistics.
        let single = Parallel::on_threads(1, |p| {
            let mut c = VisionConfig::default();
            c.complete(&one.images, &p).unwrap();
            c.task.augment
        });
        let want_stats = &single[0];
        let out = Parallel::on_threads(2, |p| {
            let l = load_rank_images(&paths, &data, None, &p).unwrap();
            let mut c = VisionConfig::default();
            c.complete(&l.images, &p).unwrap();
            (l.ids, c.task.augment.mean, c.task.augment.std)
        });
        let mut ids = Vec::new();
        for (rank_ids, mean, std) in out {
            // 5 groups of 100 below the cap on each rank.
            assert_eq!(rank_ids.len(), 500);
            ids.extend(rank_ids);
            for (a, b) in mean.iter().zip(&want_stats.mean) {
                assert!((a - b).abs() < 1e-6, "{mean:?}");
            }
            for (a, b) in std.iter().zip(&want_stats.std) {
                assert!((a - b).abs() < 1e-6, "{std:?}");
            }
        }
        let mut want = one.ids.clone();
        want.sort();
        ids.sort();
        assert_eq!(ids, want);
    }
}
