//! `ssl detect fit` / `ssl detect score`: defect detection learned from normal images only,
//! on a pretrained MAE (ssl-vision's reconstruction and PatchCore scorers).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use serde::{Deserialize, Serialize};
use serde_json::json;
use ssl_core::checkpoint::MODEL_FILE;
use ssl_core::parse_device;
use ssl_vision::detect::heatmap::save_heatmap;
use ssl_vision::detect::{Detector, DetectorConfig};

use crate::config;
use crate::vision::{
    check_shape, load_images, load_model, vis, AnyVisionTask, VisionConfig, VisionDataConfig,
};
use crate::CliError;

/// The vision configuration stored with a detector.
const VISION_CONFIG_FILE: &str = "vision_config.json";
/// Heat-map colour range in patch z-scores (blue at 0, red at this value).
const HEAT_MAX_Z: f32 = 8.0;

/// Settings of `ssl detect fit` (`--set detect.key=value`, `--set data.key=value`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DetectFitConfig {
    /// The detector.
    pub detect: DetectorConfig,
    /// How the images are read (default: the checkpoint's).
    pub data: VisionDataConfig,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |e| CliError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// `ssl detect fit`.
pub fn fit(checkpoint: &Path, data: &[String], out: &Path, set: &[String]) -> Result<(), CliError> {
    let (ckpt, mut vcfg, task, device) = load_model(checkpoint, &[])?;
    let AnyVisionTask::Mae(mae) = &task else {
        return Err(CliError::Config(format!(
            "{}: defect detection needs an MAE checkpoint (task.kind = \"mae\")",
            ckpt.display()
        )));
    };
    let defaults = DetectFitConfig {
        detect: DetectorConfig {
            seed: vcfg.train.seed,
            // PatchCore's mid-level features: the middle layer of the encoder (on ELPV the
            // final layer's features scored below the raw-pixel baseline; README).
            patch_layer: vcfg.model.depth / 2,
            ..DetectorConfig::default()
        },
        data: vcfg.data.clone(),
    };
    let cfg: DetectFitConfig = config::resolve(&defaults, None, set)?;
    vcfg.data = cfg.data.clone();
    let loaded = load_images(data, &cfg.data, None)?;
    check_shape(&loaded.images, &vcfg)?;
    eprintln!(
        "fitting on {} normal images ({:.0}% held out for calibration); scorers {:?}",
        loaded.images.len(),
        cfg.detect.calibration_fraction * 100.0,
        cfg.detect.scorers
    );
    let det = Detector::fit(mae, &loaded.images, &cfg.detect, &device).map_err(vis)?;
    det.save(out).map_err(vis)?;
    let model_src = ckpt.join(MODEL_FILE);
    let model_dst = out.join(MODEL_FILE);
    std::fs::copy(&model_src, &model_dst).map_err(io(&model_dst))?;
    let vpath = out.join(VISION_CONFIG_FILE);
    let text = serde_json::to_string_pretty(&vcfg).map_err(|e| CliError::Config(e.to_string()))?;
    std::fs::write(&vpath, text).map_err(io(&vpath))?;
    let (n_fit, n_cal) = det.counts();
    println!(
        "{}",
        json!({
            "detector": out.display().to_string(),
            "checkpoint": ckpt.display().to_string(),
            "n_fit": n_fit,
            "n_calibration": n_cal,
            "memory_bank": det.bank_sizes().iter().map(|(k, n)| (k.name().to_string(), *n)).collect::<std::collections::BTreeMap<_, _>>(),
            "threshold": det.threshold(),
            "stats": det.stats(),
        })
    );
    Ok(())
}

/// `ssl detect score`: writes `id, score, flag, heatmap, score_<scorer>...` to `out` and one
/// heat-map PNG per image into `heatmaps` (default: `<out stem>_heatmaps/` beside `out`).
pub fn score(
    detector: &Path,
    data: &[String],
    out: &Path,
    heatmaps: Option<&Path>,
    set: &[String],
) -> Result<(), CliError> {
    let vpath = detector.join(VISION_CONFIG_FILE);
    let text = std::fs::read_to_string(&vpath).map_err(io(&vpath))?;
    let stored: VisionConfig = serde_json::from_str(&text).map_err(|e| {
        CliError::Config(format!(
            "{}: not a vision configuration: {e}",
            vpath.display()
        ))
    })?;
    let vcfg: VisionConfig = config::resolve(&stored, None, set)?;
    let device = parse_device(&vcfg.train.device)?;
    let (store, task) = AnyVisionTask::build(&vcfg, &device)?;
    store.load_safetensors(&detector.join(MODEL_FILE))?;
    let AnyVisionTask::Mae(mae) = &task else {
        return Err(CliError::Config(
            "the detector's model is not an MAE".into(),
        ));
    };
    let det = Detector::load(detector).map_err(vis)?;
    let loaded = load_images(data, &vcfg.data, None)?;
    check_shape(&loaded.images, &vcfg)?;
    let scores = det.score(mae, &loaded.images, &device).map_err(vis)?;
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
    let [c, h, w] = loaded.images.shape;
    let grid = vcfg.model.grid().map_err(vis)?;
    let per = loaded.images.image_len();
    let mut paths = Vec::with_capacity(scores.len());
    for (i, (s, id)) in scores.iter().zip(&loaded.ids).enumerate() {
        let safe: String = id
            .chars()
            .map(|ch| {
                if ch.is_ascii_alphanumeric() || ch == '-' || ch == '.' {
                    ch
                } else {
                    '_'
                }
            })
            .collect();
        let p = heat_dir.join(format!("{i:06}_{safe}.png"));
        save_heatmap(
            &p,
            &loaded.images.data[i * per..(i + 1) * per],
            c,
            h,
            w,
            &s.patch_map,
            grid,
            (0.0, HEAT_MAX_Z),
        )
        .map_err(vis)?;
        paths.push(p.display().to_string());
    }
    let mut fields = vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("score", DataType::Float64, false),
        Field::new("flag", DataType::Boolean, false),
        Field::new("heatmap", DataType::Utf8, false),
    ];
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(loaded.ids.clone())),
        Arc::new(Float64Array::from(
            scores.iter().map(|s| s.score).collect::<Vec<_>>(),
        )),
        Arc::new(BooleanArray::from(
            scores.iter().map(|s| s.flag).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(paths)),
    ];
    for (k, kind) in det.config().scorers.iter().enumerate() {
        fields.push(Field::new(
            format!("score_{}", kind.name()),
            DataType::Float64,
            false,
        ));
        cols.push(Arc::new(Float64Array::from(
            scores.iter().map(|s| s.per_scorer[k]).collect::<Vec<_>>(),
        )));
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), cols)
        .map_err(|e| CliError::Config(format!("building the scores table: {e}")))?;
    let tmp = out.with_extension("parquet.tmp");
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let file = File::create(&tmp).map_err(io(&tmp))?;
    let pq_err =
        |e: parquet::errors::ParquetError| CliError::Config(format!("{}: {e}", out.display()));
    let mut writer = ArrowWriter::try_new(file, schema, None).map_err(pq_err)?;
    writer.write(&batch).map_err(pq_err)?;
    writer.close().map_err(pq_err)?;
    std::fs::rename(&tmp, out).map_err(io(out))?;
    let flagged = scores.iter().filter(|s| s.flag).count();
    eprintln!(
        "scored {} images: {flagged} flagged (threshold {:.3}); wrote {} and heat-maps in {}",
        scores.len(),
        det.threshold(),
        out.display(),
        heat_dir.display()
    );
    Ok(())
}
