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
        [h, w] => Some([*h, *w]),
        other => {
            return Err(VisionError::Config(format!(
                "data.resize = {other:?}: give [height, width] or []"
            )))
        }
    };
    let mut columns = vec![ColumnSpec::image(cfg.column.as_str(), cfg.color, resize)];
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
    })
}
