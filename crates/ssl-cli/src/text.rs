//! The `text` modality's commands: `ssl tokenizer train`, `ssl pretrain|embed|eval text`.
//! The pipeline is [`ssl_text`]'s ([`ssl_text::pretrain`], [`ssl_text::embed`],
//! [`ssl_text::eval`], [`ssl_text::train_tokenizer_report`]); this layers the configuration
//! (defaults, file, `--set`), supplies the embedded sample and prints the reports.

use std::path::{Path, PathBuf};

use ssl_core::run_dir::RunOptions;
use ssl_text::TokenizerConfig;

pub use ssl_text::TextConfig;

use crate::{config, CliError};

/// The embedded default corpus: 120 licence texts of the SPDX licence list (CC0).
const EMBEDDED: &[u8] = include_bytes!("../data/spdx_licenses_sample.parquet");

/// `ssl tokenizer train`: prints the fertility report (JSON) when `heldout` is given.
pub fn tokenizer_train(
    config_file: Option<&Path>,
    data: &[String],
    column: &str,
    out: &Path,
    set: &[String],
    heldout: &[String],
    generic: Option<&Path>,
) -> Result<(), CliError> {
    let cfg: TokenizerConfig =
        config::resolve(&TextConfig::default().tokenizer.train, config_file, set)?;
    let (_, report) = ssl_text::train_tokenizer_report(data, column, &cfg, out, heldout, generic)?;
    if let Some(r) = report {
        println!("{}", json(&r)?);
    }
    Ok(())
}

/// `ssl pretrain text`.
pub fn pretrain(
    config_file: Option<&Path>,
    data: &[String],
    out: &Path,
    set: &[String],
    resume: bool,
) -> Result<(), CliError> {
    let base = config::base_file(config_file, out, resume);
    let cfg: TextConfig = config::resolve(&TextConfig::default(), base.as_deref(), set)?;
    let _tmp;
    let data = if data.is_empty() {
        let (dir, path) = config::write_embedded("spdx_licenses_sample.parquet", EMBEDDED)?;
        eprintln!("no --data given: training on the embedded sample (120 SPDX licence texts, CC0)");
        _tmp = dir;
        vec![path]
    } else {
        data.to_vec()
    };
    let summary = ssl_text::pretrain(cfg, &data, out, &RunOptions::interactive(resume)?)?;
    summary.print();
    Ok(())
}

/// A run's (or Hugging Face directory's) checkpoint and configuration, with `--set` applied.
fn load_config(checkpoint: &Path, set: &[String]) -> Result<(PathBuf, TextConfig), CliError> {
    let (ckpt, stored) = ssl_text::stored_config(checkpoint)?;
    Ok((ckpt, config::resolve(&stored, None, set)?))
}

/// `ssl embed text`.
pub fn embed(
    checkpoint: &Path,
    data: &[String],
    out: &Path,
    set: &[String],
) -> Result<(), CliError> {
    let (ckpt, cfg) = load_config(checkpoint, set)?;
    ssl_text::embed(&ckpt, &cfg, data, out)?;
    Ok(())
}

/// `ssl eval text`: held-out perplexity and masked accuracy on --data, and with labels the
/// linear-probe and k-NN accuracy of the pooled embeddings. Prints one JSON object.
pub fn eval(
    checkpoint: &Path,
    data: &[String],
    test: &[String],
    label_column: Option<&str>,
    set: &[String],
) -> Result<(), CliError> {
    let (ckpt, cfg) = load_config(checkpoint, set)?;
    let report = ssl_text::eval(&ckpt, &cfg, data, test, label_column)?;
    println!("{}", json(&report)?);
    Ok(())
}

fn json<T: serde::Serialize>(report: &T) -> Result<String, CliError> {
    serde_json::to_string(report).map_err(|e| CliError::Config(e.to_string()))
}
