//! The caption tokenizer of a run: `tokenizer.file`, the text tower's run's, a resumed run's,
//! or one trained on the training captions (streamed from Parquet, capped by
//! `tokenizer.train.max_docs`); in a data-parallel run rank 0 makes it and sends it to the
//! others.

use std::path::Path;

use ssl_core::Parallel;
use ssl_text::{broadcast_tokenizer, load_tokenizer, save_tokenizer, train_from_parquet};
use tokenizers::Tokenizer;

use super::{text_run, MultimodalConfig};
use crate::{Result, RowSplit};

/// The tokenizer of a run: `tokenizer.file`, the tokenizer of the `init.text_from` run, a
/// resumed run's `out/tokenizer.json`, or one trained on the caption column of the training
/// rows of `data` (`split`), streamed and capped at `tokenizer.train.max_docs`; saved to
/// `out/tokenizer.json` when `write`, and named in `cfg.tokenizer.file` (absolute) in every
/// case, so the stored configuration finds it again.
pub fn run_tokenizer(
    cfg: &mut MultimodalConfig,
    data: &[String],
    split: RowSplit,
    out: &Path,
    resume: bool,
    write: bool,
) -> Result<Tokenizer> {
    let saved = out.join("tokenizer.json");
    let tok = if !cfg.tokenizer.file.is_empty() {
        load_tokenizer(Path::new(&cfg.tokenizer.file))?
    } else if !cfg.init.text_from.is_empty() {
        let (_, text) = text_run(&cfg.init.text_from)?;
        load_tokenizer(Path::new(&text.tokenizer.file))?
    } else if resume && saved.is_file() {
        load_tokenizer(&saved)?
    } else {
        let t0 = std::time::Instant::now();
        let tok = train_from_parquet(
            data,
            &cfg.data.caption_column,
            &cfg.tokenizer.train,
            move |i| !split.is_training(i),
        )?;
        let cap = match cfg.tokenizer.train.max_docs {
            0 => String::new(),
            n => format!(" (at most {n}: tokenizer.train.max_docs)"),
        };
        eprintln!(
            "trained a {:?} tokenizer ({} tokens) on the training captions{cap} in {:.1}s",
            cfg.tokenizer.train.kind,
            tok.get_vocab_size(true),
            t0.elapsed().as_secs_f64()
        );
        tok
    };
    if write {
        save_tokenizer(&tok, out)?;
    }
    cfg.tokenizer.file = saved_path(out);
    Ok(tok)
}

/// `out/tokenizer.json`, absolute where it exists: what `tokenizer.file` names after a run.
fn saved_path(out: &Path) -> String {
    let saved = out.join("tokenizer.json");
    std::fs::canonicalize(&saved)
        .unwrap_or(saved)
        .to_string_lossy()
        .into_owned()
}

/// [`run_tokenizer`] over the ranks of `par`: rank 0 makes the tokenizer (training on the
/// training captions of the whole source) and sends it; every rank returns it. Nothing is written:
/// [`save_shared_tokenizer`] saves it once the run is known to be sound. Every rank must call
/// it.
pub fn shared_tokenizer(
    cfg: &mut MultimodalConfig,
    data: &[String],
    split: RowSplit,
    out: &Path,
    resume: bool,
    par: &Parallel,
) -> Result<Tokenizer> {
    let tok = broadcast_tokenizer(par, || run_tokenizer(cfg, data, split, out, resume, false))?;
    if !par.is_main() {
        cfg.tokenizer.file = saved_path(out);
    }
    Ok(tok)
}

/// Rank 0 saves `tok` to `out/tokenizer.json`; every rank sets `cfg.tokenizer.file` to the
/// saved file's absolute path (sent by rank 0). Every rank must call it.
pub fn save_shared_tokenizer(
    cfg: &mut MultimodalConfig,
    tok: &Tokenizer,
    out: &Path,
    par: &Parallel,
) -> Result<()> {
    let path = if par.is_main() {
        save_tokenizer(tok, out)?;
        saved_path(out).into_bytes()
    } else {
        Vec::new()
    };
    let path = par.broadcast_bytes(path)?;
    cfg.tokenizer.file = String::from_utf8_lossy(&path).into_owned();
    Ok(())
}
