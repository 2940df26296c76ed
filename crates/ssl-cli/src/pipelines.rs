//! `ssl pretrain|embed|eval|config <modality>`: one generic command each over the five library
//! pipelines. Each modality is a [`Pipeline`]: its typed configuration, its embedded sample,
//! and the calls of its crate's pipeline API. This module adds only what a command line does:
//! layering the configuration (defaults, `--config`, `--set`), the sample when no `--data` is
//! given, signals and a progress bar, and printing.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;
use ssl_core::finetune::{FinetuneConfig, FinetuneMode, FinetuneReport};
use ssl_core::run_dir::RunOptions;
use ssl_core::TrainConfig;

use crate::{config, CliError};

/// An embedded data file, used when `ssl pretrain` gets no `--data`.
pub struct Sample {
    /// File name it is written under.
    pub file: &'static str,
    /// The Parquet bytes.
    pub bytes: &'static [u8],
    /// What it is, for the announcement.
    pub what: &'static str,
}

/// One modality's library pipeline, as the commands see it.
pub trait Pipeline {
    /// The typed configuration (the TOML users write).
    type Config: Serialize + DeserializeOwned + Default + schemars::JsonSchema;
    /// The embedded sample.
    const SAMPLE: Sample;
    /// The configuration's training loop settings (its device is checked first).
    fn train(cfg: &Self::Config) -> &TrainConfig;
    /// Trains into `out` and prints the run's summary.
    fn pretrain(
        cfg: Self::Config,
        data: &[String],
        out: &Path,
        opts: &RunOptions,
    ) -> Result<(), CliError>;
    /// The checkpoint meant by `checkpoint` and the configuration stored with it.
    fn stored_config(checkpoint: &Path) -> Result<(PathBuf, Self::Config), CliError>;
    /// Writes the embeddings of `data` to `out` and says so.
    fn embed(ckpt: &Path, cfg: &Self::Config, data: &[String], out: &Path) -> Result<(), CliError>;
    /// The evaluation report as JSON.
    fn eval(
        ckpt: &Path,
        cfg: &Self::Config,
        data: &[String],
        test: &[String],
        label_column: Option<&str>,
    ) -> Result<serde_json::Value, CliError>;
    /// The modality's fine-tuning defaults; `None` where it offers no fine-tuning.
    fn finetune_defaults() -> Option<FinetuneConfig> {
        None
    }
    /// Fine-tunes classifiers from the checkpoint into `out` (see `ssl_core::finetune`).
    fn finetune(
        _ckpt: &Path,
        _cfg: &Self::Config,
        _ft: &FinetuneConfig,
        _data: &[String],
        _test: &[String],
        _out: &Path,
        _opts: &RunOptions,
    ) -> Result<FinetuneReport, CliError> {
        Err(CliError::Config(
            "this modality offers no fine-tuning (text, vision and timeseries do)".into(),
        ))
    }
}

/// `ssl pretrain <modality>`: a new run in `out`, or with `resume` the run there continued
/// from its newest checkpoint with its stored `config.toml` (unless `--config` is given).
pub fn pretrain<P: Pipeline>(
    config_file: Option<&Path>,
    data: &[String],
    out: &Path,
    set: &[String],
    resume: bool,
) -> Result<(), CliError> {
    let base = config::base_file(config_file, out, resume);
    let cfg: P::Config = config::resolve(&P::Config::default(), base.as_deref(), set)?;
    // An unknown device stops the run before the sample is announced.
    ssl_core::parse_device(&P::train(&cfg).device)?;
    let _sample_dir;
    let paths = if data.is_empty() {
        let (dir, path) = config::write_embedded(P::SAMPLE.file, P::SAMPLE.bytes)?;
        eprintln!(
            "no --data given: training on the embedded sample ({})",
            P::SAMPLE.what
        );
        _sample_dir = dir;
        vec![path]
    } else {
        data.to_vec()
    };
    P::pretrain(cfg, &paths, out, &RunOptions::interactive(resume)?)
}

/// The checkpoint and its stored configuration with `--set` applied.
fn stored<P: Pipeline>(
    checkpoint: &Path,
    set: &[String],
) -> Result<(PathBuf, P::Config), CliError> {
    let (ckpt, stored) = P::stored_config(checkpoint)?;
    Ok((ckpt, config::resolve(&stored, None, set)?))
}

/// `ssl embed <modality>`.
pub fn embed<P: Pipeline>(
    checkpoint: &Path,
    data: &[String],
    out: &Path,
    set: &[String],
) -> Result<(), CliError> {
    let (ckpt, cfg) = stored::<P>(checkpoint, set)?;
    P::embed(&ckpt, &cfg, data, out)
}

/// `ssl eval <modality>`: prints one JSON object (keys sorted).
pub fn eval<P: Pipeline>(
    checkpoint: &Path,
    data: &[String],
    test: &[String],
    label_column: Option<&str>,
    set: &[String],
) -> Result<(), CliError> {
    let (ckpt, cfg) = stored::<P>(checkpoint, set)?;
    println!("{}", P::eval(&ckpt, &cfg, data, test, label_column)?);
    Ok(())
}

/// What `ssl finetune` is asked on its command line besides the data.
pub struct FinetuneArgs<'a> {
    /// A TOML file of `[finetune]` keys (as `ssl config <modality> --finetune` prints).
    pub config: Option<&'a Path>,
    /// `--label-column`.
    pub label_column: Option<&'a str>,
    /// `--label-fraction` values (empty: the configuration's).
    pub fractions: &'a [f64],
    /// `--frozen`: train the head only.
    pub frozen: bool,
    /// `--set` overrides: `finetune.*` keys go to the fine-tuning settings, the others to
    /// the checkpoint's stored configuration (its `data.*` keys).
    pub set: &'a [String],
    /// `--resume`: continue the runs in `out` from their newest checkpoints.
    pub resume: bool,
}

/// The fine-tuning settings: the modality's defaults, the `--config` file, the `finetune.*`
/// overrides, then the options that have their own flag.
fn finetune_settings<P: Pipeline>(args: &FinetuneArgs) -> Result<FinetuneConfig, CliError> {
    let defaults = P::finetune_defaults().ok_or_else(|| {
        CliError::Config(
            "this modality offers no fine-tuning (text, vision and timeseries do)".into(),
        )
    })?;
    let own: Vec<String> = args
        .set
        .iter()
        .filter_map(|s| s.strip_prefix("finetune.").map(str::to_string))
        .collect();
    let mut ft: FinetuneConfig = config::resolve(&defaults, args.config, &own)?;
    if let Some(label) = args.label_column {
        ft.label_column = label.to_string();
    }
    if !args.fractions.is_empty() {
        ft.label_fractions = args.fractions.to_vec();
    }
    if args.frozen {
        ft.mode = FinetuneMode::Frozen;
    }
    ft.validate()?;
    Ok(ft)
}

/// `ssl finetune <modality>`: classifiers fine-tuned from the checkpoint on each label
/// fraction (and from random initialisation), their runs under `out`; prints the report.
pub fn finetune<P: Pipeline>(
    checkpoint: &Path,
    data: &[String],
    test: &[String],
    out: &Path,
    args: &FinetuneArgs,
) -> Result<(), CliError> {
    // Every setting is checked before the checkpoint is read or anything trains.
    let ft = finetune_settings::<P>(args)?;
    let rest: Vec<String> = args
        .set
        .iter()
        .filter(|s| !s.starts_with("finetune."))
        .cloned()
        .collect();
    let (ckpt, cfg) = stored::<P>(checkpoint, &rest)?;
    ssl_core::parse_device(&ft.train.device)?;
    let opts = RunOptions::interactive(args.resume)?;
    let report = P::finetune(&ckpt, &cfg, &ft, data, test, out, &opts)?;
    println!("{}", json(&report)?);
    Ok(())
}

/// `ssl config <modality> --finetune`: the modality's fine-tuning defaults, commented.
pub fn finetune_toml<P: Pipeline>(name: &str) -> Result<String, CliError> {
    let defaults = P::finetune_defaults().ok_or_else(|| {
        CliError::Config(format!(
            "{name} offers no fine-tuning (text, vision and timeseries do)"
        ))
    })?;
    Ok(ssl_core::config_doc::commented_toml_of(
        &defaults,
        &format!(
            "The fine-tuning defaults of `ssl finetune {name}`. Give this file (edited) with\n\
         --config, or single keys with `--set finetune.key=value`."
        ),
    )?)
}

/// `ssl config <modality>`: the default configuration as TOML, every key commented from
/// the config types' doc comments.
pub fn default_toml<P: Pipeline>(name: &str) -> Result<String, CliError> {
    Ok(ssl_core::config_doc::commented_toml::<P::Config>(
        &format!(
        "The default configuration of `ssl pretrain {name}`. Every key is optional: a file given\n\
         with --config overrides these defaults and `--set key=value` overrides the file. Run\n\
         `ssl pretrain {name} --config this.toml` after editing; unknown keys are refused."
    ),
    )?)
}

/// A report as a JSON value (its keys print sorted).
pub fn json<T: Serialize>(report: &T) -> Result<serde_json::Value, CliError> {
    serde_json::to_value(report).map_err(|e| CliError::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use crate::config::resolve;
    use serde::de::DeserializeOwned;
    use serde::Serialize;
    use ssl_core::config_doc::{commented_toml, undocumented_keys};
    use toml::Table;

    fn check_commented<T>()
    where
        T: Serialize + schemars::JsonSchema + Default + DeserializeOwned,
    {
        let text = commented_toml::<T>("title").unwrap();
        // It parses back to the defaults.
        let back: T = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(
            Table::try_from(back).unwrap(),
            Table::try_from(T::default()).unwrap()
        );
        // Every key and table has a comment.
        let missing = undocumented_keys(&text);
        assert!(missing.is_empty(), "keys without a comment: {missing:?}");
    }

    /// Every modality's configuration and the detector's print commented, and parse back.
    #[test]
    fn every_configuration_is_commented() {
        check_commented::<ssl_text::TextConfig>();
        check_commented::<ssl_vision::VisionConfig>();
        check_commented::<ssl_timeseries::TimeseriesConfig>();
        check_commented::<ssl_timeseries::FeaturesConfig>();
        check_commented::<ssl_multimodal::MultimodalConfig>();
        check_commented::<ssl_vision::DetectFitConfig>();
        check_commented::<ssl_core::finetune::FinetuneConfig>();
    }

    /// Every recipe under `configs/` reads into its modality's configuration (unknown keys
    /// are errors there, so a renamed key fails here).
    #[test]
    fn every_recipe_reads_into_its_configuration() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            // The header names the command: `ssl pretrain <modality> --config configs/...`.
            let modality = text
                .split("ssl pretrain ")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_else(|| panic!("{}: no `ssl pretrain` line", path.display()));
            let read = |p: &std::path::Path| -> Result<(), crate::CliError> {
                match modality {
                    "text" => drop(resolve(&ssl_text::TextConfig::default(), Some(p), &[])?),
                    "vision" => drop(resolve(&ssl_vision::VisionConfig::default(), Some(p), &[])?),
                    "timeseries" => drop(resolve(
                        &ssl_timeseries::TimeseriesConfig::default(),
                        Some(p),
                        &[],
                    )?),
                    "multimodal" => drop(resolve(
                        &ssl_multimodal::MultimodalConfig::default(),
                        Some(p),
                        &[],
                    )?),
                    other => panic!("{}: unknown modality {other}", path.display()),
                }
                Ok(())
            };
            read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
        assert!(seen >= 4, "{seen} recipes in {}", dir.display());
    }
}
