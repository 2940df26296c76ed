//! The tokenizer of a run (the adapted checkpoint's, a given file, a resumed run's, or one
//! trained on the training documents; in a data-parallel run rank 0's, sent to the others),
//! and `ssl tokenizer train` as a library call with its fertility report.

use std::path::{Path, PathBuf};

use serde::Serialize;
use ssl_core::Parallel;
use ssl_data::ParquetSource;
use tokenizers::Tokenizer;

use super::config::{DataConfig, TextConfig};
use super::docs::read_docs;
use super::stream::RowFilter;
use crate::{
    fertility, load_tokenizer, save_tokenizer, tokenize_texts, train_from_parquet,
    train_from_texts, CharSpans, Fertility, Result, TextError, TokenizedSeq, TokenizerConfig,
};

/// Tokenizes `texts` into the run's input sequences (`input`: documents, lines or packed
/// blocks), with `entities` (character spans per text) and `data.entity_terms` marking the
/// entity tokens.
pub fn tokenize(
    tok: &Tokenizer,
    texts: &[String],
    entities: Option<&[CharSpans]>,
    cfg: &TextConfig,
) -> Result<Vec<TokenizedSeq>> {
    tokenize_texts(tok, texts, &cfg.input, entities, &cfg.data.entity_terms)
}

/// The tokenizer of a pretraining run: the checkpoint's (`model.init_from`), a given file,
/// the run's own `tok_path` on resume, or a new one trained on the training documents:
/// streamed from `paths` (the rows of the `data.max_docs` sample that are not held out, at
/// most `tokenizer.train.max_docs` of them when set, with progress on stderr) when `docs` is
/// `None`, else trained on `docs`.
pub fn make_tokenizer(
    cfg: &TextConfig,
    paths: &[String],
    tok_path: &Path,
    resume: bool,
    docs: Option<&[String]>,
) -> Result<Tokenizer> {
    if !cfg.model.init_from.is_empty() {
        return load_tokenizer(&Path::new(&cfg.model.init_from).join("tokenizer.json"));
    }
    if !cfg.tokenizer.file.is_empty() {
        return load_tokenizer(Path::new(&cfg.tokenizer.file));
    }
    if resume && tok_path.is_file() {
        return load_tokenizer(tok_path);
    }
    let train_cfg = TokenizerConfig {
        skip_bad_rows: cfg.tokenizer.train.skip_bad_rows || cfg.data.skip_bad_rows,
        ..cfg.tokenizer.train.clone()
    };
    let t0 = std::time::Instant::now();
    let tok = match docs {
        None => {
            let rows = ParquetSource::open(paths)?.num_rows();
            let filter = RowFilter::new(&cfg.data, cfg.train.seed, rows);
            train_from_parquet(paths, &cfg.data.column, &train_cfg, move |i| {
                !filter.training(i)
            })
        }
        Some(d) => train_from_texts(d.iter(), &train_cfg),
    }?;
    eprintln!(
        "trained a {:?} tokenizer ({} tokens) in {:.1}s{}",
        cfg.tokenizer.train.kind,
        tok.get_vocab_size(true),
        t0.elapsed().as_secs_f64(),
        docs.map(|d| format!(" on {} documents", d.len()))
            .unwrap_or_default()
    );
    Ok(tok)
}

/// [`make_tokenizer`] over the ranks of `par`: rank 0 alone makes it (training one on the
/// training rows of `paths`, streamed, as a single process would) and sends it to the others,
/// so every rank uses the same one. Every rank must call it.
pub fn shared_tokenizer(
    cfg: &TextConfig,
    paths: &[String],
    tok_path: &Path,
    resume: bool,
    par: &Parallel,
) -> Result<Tokenizer> {
    broadcast_tokenizer(par, || make_tokenizer(cfg, paths, tok_path, resume, None))
}

/// The tokenizer `make` returns on rank 0, on every rank: rank 0 alone calls `make` and sends
/// the result (as `tokenizer.json` text) to the others; a single process just calls it.
/// Every rank must call it.
pub fn broadcast_tokenizer<E: From<TextError>>(
    par: &Parallel,
    make: impl FnOnce() -> std::result::Result<Tokenizer, E>,
) -> std::result::Result<Tokenizer, E> {
    if par.world == 1 {
        return make();
    }
    let json = if par.is_main() {
        make()?
            .to_string(false)
            .map_err(|e| TextError::Pipeline(format!("cannot serialise the tokenizer: {e}")))?
            .into_bytes()
    } else {
        Vec::new()
    };
    let json = par.broadcast_bytes(json).map_err(TextError::from)?;
    Ok(tokenizer_from_json(&json)?)
}

/// A tokenizer from its `tokenizer.json` text (as rank 0 sends it), set up as
/// [`load_tokenizer`] sets up a file.
pub fn tokenizer_from_json(json: &[u8]) -> Result<Tokenizer> {
    let bad = |e: String| TextError::Pipeline(format!("the tokenizer sent by rank 0: {e}"));
    let text = std::str::from_utf8(json).map_err(|e| bad(e.to_string()))?;
    let mut tok: Tokenizer = text.parse().map_err(|e| bad(format!("{e}")))?;
    tok.with_padding(None);
    tok.with_truncation(None).map_err(|e| bad(format!("{e}")))?;
    Ok(tok)
}

/// The fertility report of `ssl tokenizer train --heldout`: tokens per word of the trained
/// tokenizer on held-out documents, and of a generic tokenizer for comparison.
#[derive(Debug, Clone, Serialize)]
pub struct FertilityReport {
    /// The saved `tokenizer.json`.
    pub tokenizer: String,
    /// Held-out documents measured.
    pub heldout_docs: usize,
    /// The trained tokenizer's fertility on them.
    pub fertility: Fertility,
    /// The generic tokenizer compared with, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generic_tokenizer: Option<String>,
    /// The generic tokenizer's fertility on the same documents.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generic_fertility: Option<Fertility>,
}

/// Trains a tokenizer (`cfg`) on the text `column` of `data` (streamed), saves it to
/// `out/tokenizer.json` (with its Hugging Face `tokenizer_config.json`) and, when `heldout`
/// names files, measures its fertility on their documents, and that of the `generic`
/// tokenizer when given. Returns the saved file and the report (`None` without `heldout`).
pub fn train_tokenizer_report(
    data: &[String],
    column: &str,
    cfg: &TokenizerConfig,
    out: &Path,
    heldout: &[String],
    generic: Option<&Path>,
) -> Result<(PathBuf, Option<FertilityReport>)> {
    let t0 = std::time::Instant::now();
    let tok = train_from_parquet(data, column, cfg, |_| false)?;
    let path = save_tokenizer(&tok, out)?;
    eprintln!(
        "trained a {:?} tokenizer of {} tokens in {:.1}s: {}",
        cfg.kind,
        tok.get_vocab_size(true),
        t0.elapsed().as_secs_f64(),
        path.display()
    );
    if heldout.is_empty() {
        return Ok((path, None));
    }
    let docs = read_docs(
        heldout,
        &DataConfig {
            column: column.into(),
            ..Default::default()
        },
        None,
        false,
    )?;
    let mut report = FertilityReport {
        tokenizer: path.display().to_string(),
        heldout_docs: docs.texts.len(),
        fertility: fertility(&tok, &docs.texts)?,
        generic_tokenizer: None,
        generic_fertility: None,
    };
    if let Some(g) = generic {
        let gt = load_tokenizer(g)?;
        report.generic_fertility = Some(fertility(&gt, &docs.texts)?);
        report.generic_tokenizer = Some(g.display().to_string());
    }
    Ok((path, Some(report)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{train_from_texts, TokenizerConfig};

    #[test]
    fn every_rank_gets_rank_0s_tokenizer_and_only_rank_0_makes_it() {
        let corpus = |words: &[&str]| -> Vec<String> {
            (0..40)
                .map(|i| format!("{} {i}", words[i % words.len()]))
                .collect()
        };
        let cfg = TokenizerConfig {
            vocab_size: 120,
            ..TokenizerConfig::default()
        };
        let out = Parallel::on_threads(3, |par| {
            // Each rank would train a different tokenizer on its own words.
            let words: &[&str] = match par.rank {
                0 => &["kernel module", "driver"],
                1 => &["licence", "warranty"],
                _ => &["apple", "pear"],
            };
            let mut calls = 0;
            let tok = broadcast_tokenizer::<TextError>(&par, || {
                calls += 1;
                train_from_texts(corpus(words).iter(), &cfg)
            })
            .unwrap();
            (par.rank, calls, tok.to_string(false).unwrap())
        });
        let rank0 = &out[0].2;
        for (rank, calls, json) in &out {
            assert_eq!(*calls, usize::from(*rank == 0), "rank {rank}");
            assert_eq!(json, rank0, "rank {rank}");
        }
        assert!(rank0.contains("kernel"));
    }
}
