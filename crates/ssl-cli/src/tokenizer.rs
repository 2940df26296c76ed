//! `ssl tokenizer train`: ssl-text's [`ssl_text::train_tokenizer_report`] with the settings
//! layered from `[tokenizer.train]`'s defaults, `--config` and `--set`.

use std::path::Path;

use ssl_text::{TextConfig, TokenizerConfig};

use crate::{config, pipelines, CliError};

/// Trains and writes `out/tokenizer.json`; prints the fertility report (JSON) when `heldout`
/// is given.
pub fn train(
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
        println!("{}", pipelines::json(&r)?);
    }
    Ok(())
}
