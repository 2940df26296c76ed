//! `ssl … timeseries`: the time-series pipeline of ssl-timeseries
//! ([`ssl_timeseries::pipeline::timeseries`]) with the configuration layered from defaults,
//! `--config` and `--set`, and the embedded GunPoint sample when no `--data` is given.

use std::path::Path;

use ssl_core::run_dir::RunOptions;
pub use ssl_timeseries::TimeseriesConfig;

use crate::series_common::data_paths;
use crate::{config, CliError};

/// The embedded default data: the GunPoint training split of the UCR archive (50 hand
/// trajectories x 150 steps, 2 classes).
const EMBEDDED_TRAIN: &[u8] = include_bytes!("../data/gunpoint_train.parquet");

/// `ssl pretrain timeseries`.
pub fn pretrain(
    config_file: Option<&Path>,
    data: &[String],
    out: &Path,
    set: &[String],
    resume: bool,
) -> Result<(), CliError> {
    let base = config::base_file(config_file, out, resume);
    let cfg: TimeseriesConfig =
        config::resolve(&TimeseriesConfig::default(), base.as_deref(), set)?;
    let paths = data_paths(
        data,
        EMBEDDED_TRAIN,
        "gunpoint_train.parquet",
        "UCR GunPoint, 50 series x 150 steps",
    )?;
    let opts = RunOptions::interactive(resume)?;
    ssl_timeseries::pretrain_timeseries(cfg, &paths.paths, out, &opts)?;
    Ok(())
}

/// `ssl embed timeseries`.
pub fn embed(
    checkpoint: &Path,
    data: &[String],
    out: &Path,
    set: &[String],
) -> Result<(), CliError> {
    let (ckpt, cfg): (_, TimeseriesConfig) =
        config::from_checkpoint(checkpoint, "timeseries", set)?;
    ssl_timeseries::embed_timeseries(&ckpt, &cfg, data, out)?.print();
    Ok(())
}

/// `ssl eval timeseries`: prints one JSON object (forecast errors for a forecasting run on a
/// long series, else pretext loss and probes of the trained and a random-init encoder).
pub fn eval(
    checkpoint: &Path,
    data: &[String],
    test: &[String],
    label_column: Option<&str>,
    set: &[String],
) -> Result<(), CliError> {
    let (ckpt, cfg): (_, TimeseriesConfig) =
        config::from_checkpoint(checkpoint, "timeseries", set)?;
    let report = ssl_timeseries::eval_timeseries(&ckpt, &cfg, data, test, label_column)?;
    println!("{}", crate::series_common::to_json(&report)?);
    Ok(())
}

/// The default configuration (for `ssl config timeseries`).
pub fn default_config() -> TimeseriesConfig {
    TimeseriesConfig::default()
}
