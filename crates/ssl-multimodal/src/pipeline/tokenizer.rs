//! The caption tokenizer of a run: `tokenizer.file`, the text tower's run's, a resumed run's,
//! or one trained on the training captions; in a data-parallel run rank 0 makes it and sends
//! it to the others.

use std::path::Path;

use ssl_core::Parallel;
use ssl_text::{load_tokenizer, save_tokenizer, tokenizer_from_json, train_from_texts};
use tokenizers::Tokenizer;

use super::{text_run, MultimodalConfig};
use crate::{MultimodalError, Result};

/// The tokenizer of a run: `tokenizer.file`, the tokenizer of the `init.text_from` run, a
/// resumed run's `out/tokenizer.json`, or one trained on `captions`; saved to
/// `out/tokenizer.json` when `write`, and named in `cfg.tokenizer.file` (absolute) in every
/// case, so the stored configuration finds it again.
pub fn run_tokenizer(
    cfg: &mut MultimodalConfig,
    captions: &[String],
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
        let tok = train_from_texts(captions.iter(), &cfg.tokenizer.train)?;
        eprintln!(
            "trained a {:?} tokenizer ({} tokens) on {} captions in {:.1}s",
            cfg.tokenizer.train.kind,
            tok.get_vocab_size(true),
            captions.len(),
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

/// [`run_tokenizer`] over the ranks of `par`: rank 0 makes the tokenizer (training on its own
/// share of the captions), saves it to `out/tokenizer.json` and sends it; every rank returns
/// it with `cfg.tokenizer.file` naming the saved file. Every rank must call it.
pub fn shared_tokenizer(
    cfg: &mut MultimodalConfig,
    captions: &[String],
    out: &Path,
    resume: bool,
    par: &Parallel,
) -> Result<Tokenizer> {
    if par.world == 1 {
        return run_tokenizer(cfg, captions, out, resume, true);
    }
    let json = if par.is_main() {
        run_tokenizer(cfg, captions, out, resume, true)?
            .to_string(false)
            .map_err(|e| MultimodalError::Config(format!("cannot serialise the tokenizer: {e}")))?
            .into_bytes()
    } else {
        Vec::new()
    };
    let tok = tokenizer_from_json(&par.broadcast_bytes(json)?)?;
    if !par.is_main() {
        // Where rank 0 saved it (written before it was sent).
        cfg.tokenizer.file = saved_path(out);
    }
    Ok(tok)
}
