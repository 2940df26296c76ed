//! `ssl detect fit` / `ssl detect score`: defect detection learned from normal images only,
//! on a pretrained MAE (ssl-vision's [`ssl_vision::detect::pipeline`]); this module layers
//! the configuration and prints.

use std::path::Path;

use ssl_vision::{DetectFitConfig, VisionConfig};

use crate::{config, CliError};

/// `ssl detect fit`.
pub fn fit(checkpoint: &Path, data: &[String], out: &Path, set: &[String]) -> Result<(), CliError> {
    let (ckpt, vcfg) = ssl_vision::stored_config(checkpoint)?;
    let cfg: DetectFitConfig = config::resolve(&DetectFitConfig::for_model(&vcfg), None, set)?;
    let report = ssl_vision::detect_fit(&ckpt, vcfg, &cfg, data, out)?;
    println!("{}", crate::pipelines::json(&report)?);
    Ok(())
}

/// `ssl detect score`: writes `id, score, flag, heatmap, score_<scorer>...` to `out` and one
/// heat-map PNG per image into `heatmaps` (default: `<out stem>_heatmaps/` beside `out`);
/// prints image-level AUROC and F1 as one JSON line when the images have a label column.
pub fn score(
    detector: &Path,
    data: &[String],
    out: &Path,
    heatmaps: Option<&Path>,
    set: &[String],
) -> Result<(), CliError> {
    let stored = ssl_vision::detector_config(detector)?;
    let vcfg: VisionConfig = config::resolve(&stored, None, set)?;
    let summary = ssl_vision::detect_score(detector, &vcfg, data, out, heatmaps)?;
    // With a label column (`data.label_column`): image-level AUROC and F1, one JSON line.
    if let Some(labelled) = &summary.labelled {
        println!("{}", crate::pipelines::json(labelled)?);
    }
    Ok(())
}

/// `ssl config detect`: `ssl detect fit`'s default settings as commented TOML (the
/// defaults for a model the detector knows nothing of yet; `fit` completes them from the
/// MAE run).
pub fn default_toml() -> Result<String, CliError> {
    Ok(ssl_core::config_doc::commented_toml::<DetectFitConfig>(
        "The default settings of `ssl detect fit`. Pass any of them as --set key=value, e.g.\n\
         --set detect.scorers='[\"patchcore\"]'; keys not set keep these defaults.",
    )?)
}
