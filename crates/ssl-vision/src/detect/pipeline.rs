//! Defect detection as library calls (what `ssl detect fit|score` run): a [`Detector`] fitted
//! on the normal images of Parquet files with a pretrained MAE checkpoint, saved with the
//! model and its vision configuration; then images scored, with one heat-map per image and a
//! Parquet table of scores and flags.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use serde::{Deserialize, Serialize};
use ssl_core::checkpoint::MODEL_FILE;

use super::heatmap::save_heatmap;
use super::labelled::{label_report, DetectLabelReport};
use super::{Detector, DetectorConfig, ScorerStats};
use crate::pipeline::stream::{check_example_shape, ImageReader, Split};
use crate::pipeline::{load_model, RowSample, VisionConfig, VisionDataConfig, VisionTask};
use crate::{ImageSet, MaeTask, Result, VisionError};
use ssl_data::StreamPosition;

/// The vision configuration stored with a detector.
pub const VISION_CONFIG_FILE: &str = "vision_config.json";
/// Heat-map colour range in patch z-scores (blue at 0, red at this value).
const HEAT_MAX_Z: f32 = 8.0;
/// Rows per row group of the scores table (written as the images are scored).
const SCORE_ROWS: usize = 4096;

/// Settings of `ssl detect fit` (`--set detect.key=value`, `--set data.key=value`).
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DetectFitConfig {
    /// The detector.
    pub detect: DetectorConfig,
    /// How the images are read (default: the checkpoint's).
    pub data: VisionDataConfig,
}

impl DetectFitConfig {
    /// The defaults for a model configured by `vcfg`: its seed, its data settings, and
    /// PatchCore features from layer [`default_patch_layer`] of the encoder.
    pub fn for_model(vcfg: &VisionConfig) -> Self {
        DetectFitConfig {
            detect: DetectorConfig {
                seed: vcfg.train.seed,
                patch_layer: default_patch_layer(vcfg.model.depth),
                ..DetectorConfig::default()
            },
            data: vcfg.data.clone(),
        }
    }
}

/// The PatchCore layer `ssl detect fit` uses by default for an encoder of `depth` layers:
/// the hidden state after `3 x depth / 4` of them (rounded down; 0, the final normed output,
/// for a 1-layer encoder).
///
/// Chosen by a rule fixed before the test figures were seen: the candidate with the best mean
/// rank of image AUROC over five one-class sets that were not used to develop the detector
/// (Fashion-MNIST classes 5, 6, 9 and emoji Flags, Travel & Places; ELPV reported, not used).
/// With depth-4 MAEs, reconstruction + PatchCore at layer 3 ranked 3.2, at layer 2 (the old
/// `depth / 2`) 3.6, at the final layer 3.8, at layer 1 4.8; the combinations at layers
/// 3 and 2 differ by less than 0.005 AUROC on every set, within the bootstrap noise on five of
/// six (`crates/ssl-vision/README.md`, "Defect-detection defaults").
pub fn default_patch_layer(depth: usize) -> usize {
    3 * depth / 4
}

/// What [`detect_fit`] returns; serialises to the JSON object `ssl detect fit` prints.
#[derive(Debug, Clone, Serialize)]
pub struct DetectFitReport {
    /// The checkpoint directory of the model.
    pub checkpoint: String,
    /// The detector directory written.
    pub detector: String,
    /// Memory-bank entries per scorer that has one.
    pub memory_bank: BTreeMap<String, usize>,
    /// Images held out for calibration.
    pub n_calibration: usize,
    /// Images fitted on.
    pub n_fit: usize,
    /// Each scorer's statistics on normal images.
    pub stats: Vec<ScorerStats>,
    /// The calibrated threshold of the combined score.
    pub threshold: f64,
}

/// What [`detect_score`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct DetectScoreSummary {
    /// The scores table (`id, score, flag, heatmap, score_<scorer>...`).
    pub out: PathBuf,
    /// The heat-map directory.
    pub heatmaps: PathBuf,
    /// Images scored.
    pub scored: usize,
    /// Images flagged (score above the threshold).
    pub flagged: usize,
    /// The detector's threshold.
    pub threshold: f64,
    /// AUROC and F1 against the label column `data.label_column` (0 normal, >= 0.5
    /// defective), when the images have one.
    pub labelled: Option<DetectLabelReport>,
}

/// The MAE of `task`, or a configuration error with the message `not_mae` gives.
fn mae_of(task: &dyn VisionTask, not_mae: impl FnOnce() -> String) -> Result<&MaeTask> {
    task.as_mae().ok_or_else(|| VisionError::Config(not_mae()))
}

/// Fits a detector on the normal images of `data` with the MAE of checkpoint directory
/// `ckpt` configured by `vcfg` (see [`crate::stored_config`]), reading the images as
/// `cfg.data` says, and writes it to the directory `out` with a copy of the model and the
/// vision configuration (`cfg.data` in place of the model's data settings).
///
/// The images stream twice ([`Detector::fit_streamed`]): the fitting images (a bounded,
/// seeded sample of their patch features becomes the memory bank), then the calibration
/// images, a seeded sample of exactly `round(calibration_fraction x n)` of the kept rows.
pub fn detect_fit(
    ckpt: &Path,
    mut vcfg: VisionConfig,
    cfg: &DetectFitConfig,
    data: &[String],
    out: &Path,
) -> Result<DetectFitReport> {
    // An unusable output directory is found before the fitting, not after it.
    ssl_data::output::check_output_dir(out)?;
    let (task, device) = load_model(ckpt, &vcfg)?;
    let mae = mae_of(task.as_ref(), || {
        format!(
            "{}: defect detection needs an MAE checkpoint (task.kind = \"mae\")",
            ckpt.display()
        )
    })?;
    vcfg.data = cfg.data.clone();
    // The normal images stream twice (fitting, then calibration); the calibration images are
    // a seeded sample of exactly round(calibration_fraction x n) of the kept rows.
    let reader = ImageReader::open(data, &cfg.data, None, cfg.detect.seed)?;
    let n = reader.kept_rows();
    let n_cal = Detector::calibration_count(&cfg.detect, n)?;
    let cal_rows = RowSample::smallest(
        reader.source().num_rows(),
        n_cal,
        cfg.detect.seed,
        0x4341_4c49,
        Some(reader.sample().clone()),
    );
    eprintln!(
        "fitting on {n} normal images ({:.0}% held out for calibration); scorers {:?}",
        cfg.detect.calibration_fraction * 100.0,
        cfg.detect.scorers
    );
    let shape = [
        vcfg.model.channels,
        vcfg.model.image_height,
        vcfg.model.image_width,
    ];
    let bs = cfg.detect.batch_size.max(1);
    let fit_reader = reader.clone().excluding(cal_rows.clone());
    let cal_reader = reader.with_sample(cal_rows);
    let det = Detector::fit_streamed(
        mae,
        &cfg.detect,
        &device,
        (n - n_cal, &mut |v| visit_stream(&fit_reader, bs, shape, v)),
        (n_cal, &mut |v| visit_stream(&cal_reader, bs, shape, v)),
    )?;
    det.save(out)?;
    let model_src = ckpt.join(MODEL_FILE);
    let model_dst = out.join(MODEL_FILE);
    std::fs::copy(&model_src, &model_dst).map_err(|e| VisionError::io(&model_dst, e))?;
    let vpath = out.join(VISION_CONFIG_FILE);
    let text =
        serde_json::to_string_pretty(&vcfg).map_err(|e| VisionError::Config(e.to_string()))?;
    std::fs::write(&vpath, text).map_err(|e| VisionError::io(&vpath, e))?;
    let (n_fit, n_calibration) = det.counts();
    Ok(DetectFitReport {
        checkpoint: ckpt.display().to_string(),
        detector: out.display().to_string(),
        memory_bank: det
            .bank_sizes()
            .iter()
            .map(|(k, n)| (k.name().to_string(), *n))
            .collect(),
        n_calibration,
        n_fit,
        stats: det.stats().to_vec(),
        threshold: det.threshold(),
    })
}

/// The vision configuration stored with the detector in directory `detector`.
pub fn detector_config(detector: &Path) -> Result<VisionConfig> {
    let vpath = detector.join(VISION_CONFIG_FILE);
    let text = std::fs::read_to_string(&vpath).map_err(|e| VisionError::io(&vpath, e))?;
    serde_json::from_str(&text).map_err(|e| {
        VisionError::Config(format!(
            "{}: not a vision configuration: {e}",
            vpath.display()
        ))
    })
}

/// Scores the images of `data` with the detector in directory `detector`, its model
/// configured by `vcfg` (see [`detector_config`]): writes `id, score, flag, heatmap,
/// score_<scorer>...` to the Parquet file `out` and one heat-map PNG per image into
/// `heatmaps` (default: `<out stem>_heatmaps/` beside `out`). When the images have the
/// label column `vcfg.data.label_column` (numeric: 0 normal, 0.5 or more defective; see
/// [`super::labelled`]), the summary carries the image-level AUROC and the F1 of the flags.
///
/// The images stream in file order; each batch's scores are written as they are computed.
/// What grows with the images is a (row, score, flag) per image for the summary, and the
/// label column (read whole, 8 bytes a row) when there is one.
pub fn detect_score(
    detector: &Path,
    vcfg: &VisionConfig,
    data: &[String],
    out: &Path,
    heatmaps: Option<&Path>,
) -> Result<DetectScoreSummary> {
    // Outputs are checked before any work: `out` absent or a regular file.
    ssl_data::output::check_output_path(out)?;
    let (task, device) = load_model(detector, vcfg)?;
    let mae = mae_of(task.as_ref(), || {
        "the detector's model is not an MAE".into()
    })?;
    let det = Detector::load(detector)?;
    let reader = ImageReader::open(data, &vcfg.data, None, vcfg.train.seed)?;
    let heat_dir: PathBuf = match heatmaps {
        Some(p) => p.to_path_buf(),
        None => {
            let stem = out
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "scores".into());
            out.with_file_name(format!("{stem}_heatmaps"))
        }
    };
    ssl_data::output::check_output_dir(&heat_dir)?;
    let shape = [
        vcfg.model.channels,
        vcfg.model.image_height,
        vcfg.model.image_width,
    ];
    let [c, h, w] = shape;
    let grid = vcfg.model.grid()?;
    let mut fields = vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("score", DataType::Float64, false),
        Field::new("flag", DataType::Boolean, false),
        Field::new("heatmap", DataType::Utf8, false),
    ];
    for kind in &det.config().scorers {
        fields.push(Field::new(
            format!("score_{}", kind.name()),
            DataType::Float64,
            false,
        ));
    }
    let schema = Arc::new(Schema::new(fields));
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| VisionError::io(dir, e))?;
    }
    // A new file beside `out` (never written through a link or device there), moved into
    // place when complete; removed when anything fails. Each batch of scores is written as
    // it is computed (row groups of SCORE_ROWS rows).
    let (file, tmp) = ssl_data::output::create_temp_beside(out)?;
    let pq_err =
        |e: parquet::errors::ParquetError| VisionError::Config(format!("{}: {e}", out.display()));
    let props = parquet::file::properties::WriterProperties::builder()
        .set_max_row_group_row_count(Some(SCORE_ROWS))
        .build();
    let mut writer = match ArrowWriter::try_new(file, schema.clone(), Some(props)) {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(pq_err(e));
        }
    };
    // What the label report needs: one (row, score, flag) per image.
    let (mut rows, mut values, mut flags) = (Vec::new(), Vec::new(), Vec::new());
    let bs = det.config().batch_size.max(1);
    let mut stream = reader.stream(
        reader.loader(bs, false, Some(1)),
        Split::All,
        StreamPosition::default(),
        true,
    )?;
    let progress =
        ssl_core::monitor::Progress::task("detect score", reader.kept_rows() as u64, "images");
    let mut scored = 0usize;
    let result = (|| -> Result<()> {
        loop {
            let examples = stream.take(bs)?;
            if examples.is_empty() {
                return Ok(());
            }
            let mut set = Vec::with_capacity(examples.len() * c * h * w);
            for e in &examples {
                check_example_shape(e, shape)?;
                set.extend_from_slice(&e.pixels);
            }
            let set = ImageSet::new(set, shape)?;
            let scores = det.score(mae, &set, &device)?;
            let per = set.image_len();
            let mut paths = Vec::with_capacity(scores.len());
            for (k, (s, e)) in scores.iter().zip(&examples).enumerate() {
                let safe: String =
                    e.id.chars()
                        .map(|ch| {
                            if ch.is_ascii_alphanumeric() || ch == '-' || ch == '.' {
                                ch
                            } else {
                                '_'
                            }
                        })
                        .collect();
                let p = heat_dir.join(format!("{:06}_{safe}.png", scored + k));
                save_heatmap(
                    &p,
                    &set.data[k * per..(k + 1) * per],
                    c,
                    h,
                    w,
                    &s.patch_map,
                    grid,
                    (0.0, HEAT_MAX_Z),
                )?;
                paths.push(p.display().to_string());
            }
            let mut cols: Vec<ArrayRef> = vec![
                Arc::new(StringArray::from_iter_values(
                    examples.iter().map(|e| e.id.as_str()),
                )),
                Arc::new(Float64Array::from(
                    scores.iter().map(|s| s.score).collect::<Vec<_>>(),
                )),
                Arc::new(BooleanArray::from(
                    scores.iter().map(|s| s.flag).collect::<Vec<_>>(),
                )),
                Arc::new(StringArray::from(paths)),
            ];
            for k in 0..det.config().scorers.len() {
                cols.push(Arc::new(Float64Array::from(
                    scores.iter().map(|s| s.per_scorer[k]).collect::<Vec<_>>(),
                )));
            }
            let batch = RecordBatch::try_new(schema.clone(), cols)
                .map_err(|e| VisionError::Config(format!("building the scores table: {e}")))?;
            writer.write(&batch).map_err(pq_err)?;
            rows.extend(examples.iter().map(|e| e.row));
            values.extend(scores.iter().map(|s| s.score));
            flags.extend(scores.iter().map(|s| s.flag));
            scored += examples.len();
            progress.inc(examples.len() as u64);
        }
    })()
    .and_then(|()| writer.close().map(|_| ()).map_err(pq_err));
    progress.finish();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    ssl_data::output::move_into_place(&tmp, out)?;
    let flagged = flags.iter().filter(|f| **f).count();
    let labelled = image_labels(data, &vcfg.data.label_column, &rows)?.map(|labels| {
        let col = &vcfg.data.label_column;
        label_report(col, &values, &flags, &labels, det.threshold())
    });
    eprintln!(
        "scored {scored} images: {flagged} flagged (threshold {:.3}); wrote {} and heat-maps in {}",
        det.threshold(),
        out.display(),
        heat_dir.display()
    );
    Ok(DetectScoreSummary {
        out: out.to_path_buf(),
        heatmaps: heat_dir,
        scored,
        flagged,
        threshold: det.threshold(),
        labelled,
    })
}

/// Streams the images `reader` keeps (file order, one epoch) to `visit` in batches of `bs`,
/// each image checked against `shape`.
fn visit_stream(
    reader: &ImageReader,
    bs: usize,
    shape: [usize; 3],
    visit: &mut dyn FnMut(&ImageSet) -> Result<()>,
) -> Result<()> {
    let mut stream = reader.stream(
        reader.loader(bs, false, Some(1)),
        Split::All,
        StreamPosition::default(),
        false,
    )?;
    loop {
        let examples = stream.take(bs)?;
        if examples.is_empty() {
            return Ok(());
        }
        let mut data = Vec::with_capacity(examples.len() * shape.iter().product::<usize>());
        for e in &examples {
            check_example_shape(e, shape)?;
            data.extend_from_slice(&e.pixels);
        }
        visit(&ImageSet::new(data, shape)?)?;
    }
}

/// The numeric labels of the images at global `rows` of `data`, from the column `column`:
/// `None` when `column` is empty, not in the files, or not numeric.
fn image_labels(data: &[String], column: &str, rows: &[usize]) -> Result<Option<Vec<f64>>> {
    if column.is_empty() {
        return Ok(None);
    }
    let source = ssl_data::ParquetSource::open(data)?;
    match source.schema().iter().find(|(n, _)| n == column) {
        None => return Ok(None),
        Some((_, dt)) if !dt.is_numeric() => {
            eprintln!(
                "note: label column `{column}` is {dt}, not numeric (0 normal, >= 0.5 defective): no AUROC / F1"
            );
            return Ok(None);
        }
        Some(_) => {}
    }
    let all = ssl_data::read_numeric_column(data, column)?;
    rows.iter()
        .map(|&r| {
            all.get(r).copied().ok_or_else(|| {
                VisionError::Config(format!(
                    "label column `{column}` has {} rows, image row {r} has none",
                    all.len()
                ))
            })
        })
        .collect::<Result<Vec<f64>>>()
        .map(Some)
}
