//! `ssl … features`: the feature-sequence pipeline of ssl-timeseries
//! ([`ssl_timeseries::pipeline::features`]) with the configuration layered from defaults,
//! `--config` and `--set`, and the embedded BasicMotions sample when no `--data` is given.

use std::path::Path;

use ssl_core::run_dir::RunOptions;
pub use ssl_timeseries::FeaturesConfig;

use crate::series_common::data_paths;
use crate::{config, CliError};

/// The embedded default data: the BasicMotions training split of the UEA archive
/// (6 accelerometer/gyroscope channels x 100 steps, 40 recordings of 4 activities).
const EMBEDDED_TRAIN: &[u8] = include_bytes!("../data/basic_motions_train.parquet");

/// `ssl pretrain features`.
pub fn pretrain(
    config_file: Option<&Path>,
    data: &[String],
    out: &Path,
    set: &[String],
    resume: bool,
) -> Result<(), CliError> {
    let base = config::base_file(config_file, out, resume);
    let cfg: FeaturesConfig = config::resolve(&FeaturesConfig::default(), base.as_deref(), set)?;
    let paths = data_paths(
        data,
        EMBEDDED_TRAIN,
        "basic_motions_train.parquet",
        "UEA BasicMotions, 40 recordings x 6 channels x 100 steps",
    )?;
    let opts = RunOptions::interactive(resume)?;
    ssl_timeseries::pretrain_features(cfg, &paths.paths, out, &opts)?;
    Ok(())
}

/// `ssl embed features`.
pub fn embed(
    checkpoint: &Path,
    data: &[String],
    out: &Path,
    set: &[String],
) -> Result<(), CliError> {
    let (ckpt, cfg): (_, FeaturesConfig) = config::from_checkpoint(checkpoint, "features", set)?;
    ssl_timeseries::embed_features(&ckpt, &cfg, data, out)?.print();
    Ok(())
}

/// `ssl eval features`: prints one JSON object.
pub fn eval(
    checkpoint: &Path,
    data: &[String],
    test: &[String],
    label_column: Option<&str>,
    set: &[String],
) -> Result<(), CliError> {
    let (ckpt, cfg): (_, FeaturesConfig) = config::from_checkpoint(checkpoint, "features", set)?;
    let report = ssl_timeseries::eval_features(&ckpt, &cfg, data, test, label_column)?;
    println!("{}", crate::series_common::to_json(&report)?);
    Ok(())
}
