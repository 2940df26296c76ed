//! `ssl tokenizer train`: ssl-text's [`ssl_text::train_tokenizer_report`] with the settings
//! layered from `[tokenizer.train]`'s defaults, `--config` and `--set`.

use std::path::Path;

use ssl_core::StopFlag;
use ssl_text::{TextConfig, TokenizerConfig};

use crate::{config, pipelines, CliError};

/// Trains and writes `out/tokenizer.json`; prints the fertility report (JSON) when `heldout`
/// is given.
///
/// SIGINT / SIGTERM: tokenizer training cannot stop midway, so a signal that arrives while it
/// runs lets it finish and save (the file is written through a temporary file and a rename,
/// never partially) and the command exits 0 with a line saying it was interrupted after
/// saving; a signal before training starts exits 0 with nothing written. A second signal
/// exits at once (status 130) without a partial file.
pub fn train(
    config_file: Option<&Path>,
    data: &[String],
    column: &str,
    out: &Path,
    set: &[String],
    heldout: &[String],
    generic: Option<&Path>,
) -> Result<(), CliError> {
    // First, so that a signal during training never kills the process half-way.
    let stop = StopFlag::from_signals()?;
    let cfg: TokenizerConfig =
        config::resolve(&TextConfig::default().tokenizer.train, config_file, set)?;
    if stop.is_set() {
        eprintln!("interrupted before tokenizer training started: nothing written");
        return Ok(());
    }
    let (path, report) =
        ssl_text::train_tokenizer_report(data, column, &cfg, out, heldout, generic)?;
    if stop.is_set() {
        eprintln!(
            "interrupted: tokenizer training cannot stop midway, so it finished and saved {}",
            path.display()
        );
    }
    if let Some(r) = report {
        println!("{}", pipelines::json(&r)?);
    }
    Ok(())
}
