//! Training domain tokenizers (BPE, WordPiece, Unigram) on a Parquet text column, streamed,
//! and measuring their fertility (tokens per word).
//!
//! The result is a plain [`tokenizers::Tokenizer`]; [`save_tokenizer`] writes the
//! `tokenizer.json` that Hugging Face `tokenizers` / `transformers` load unchanged. Special
//! tokens always come first, with fixed ids: `[PAD]`=0, `[UNK]`=1, `[CLS]`=2, `[SEP]`=3,
//! `[MASK]`=4; single sequences are wrapped as `[CLS] text [SEP]` (BERT's template).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use ssl_data::{ColumnSpec, DataLoader, LoaderConfig, ParquetSource};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::metaspace::Metaspace as MetaspaceDecoder;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::bpe::{BpeTrainer, BpeTrainerBuilder, BPE};
use tokenizers::models::unigram::{Unigram, UnigramTrainerBuilder};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::models::{ModelWrapper, TrainerWrapper};
use tokenizers::normalizers::{Lowercase, Sequence, StripAccents, NFD, NFKC};
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, NormalizerWrapper, Tokenizer, Trainer};

use crate::{Result, TextError};

/// The special tokens, in id order.
pub const SPECIAL_TOKENS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// The subword model to train.
#[derive(
    schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum TokenizerKind {
    /// Byte-level BPE (GPT-2/RoBERTa style): never produces `[UNK]`.
    Bpe,
    /// WordPiece with `##` continuation (BERT).
    #[default]
    WordPiece,
    /// Unigram language model with the `▁` word-boundary marker (SentencePiece style).
    Unigram,
}

/// The default [`TokenizerConfig::max_word_chars`].
pub const DEFAULT_MAX_WORD_CHARS: usize = 100;

fn default_max_word_chars() -> usize {
    DEFAULT_MAX_WORD_CHARS
}

/// Splits every run of non-blank characters longer than `max` characters into chunks of
/// `max` characters separated by a space (`max == 0`: no limit). Returns the text (borrowed
/// when nothing was split) and the number of runs split.
pub fn split_long_words(text: &str, max: usize) -> (std::borrow::Cow<'_, str>, usize) {
    let too_long = |t: &str| {
        let mut run = 0usize;
        t.chars().any(|c| {
            run = if c.is_whitespace() { 0 } else { run + 1 };
            run > max
        })
    };
    if max == 0 || text.len() <= max || !too_long(text) {
        return (std::borrow::Cow::Borrowed(text), 0);
    }
    let mut out = String::with_capacity(text.len() + text.len() / max + 1);
    let (mut run, mut split, mut counted) = (0usize, 0usize, false);
    for c in text.chars() {
        if c.is_whitespace() {
            run = 0;
            counted = false;
        } else {
            if run == max {
                out.push(' ');
                if !counted {
                    split += 1;
                    counted = true;
                }
                run = 0;
            }
            run += 1;
        }
        out.push(c);
    }
    (std::borrow::Cow::Owned(out), split)
}

/// How to train a tokenizer.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizerConfig {
    /// The subword model.
    pub kind: TokenizerKind,
    /// Target vocabulary size (special tokens included).
    pub vocab_size: usize,
    /// Minimum pair frequency for a BPE/WordPiece merge.
    pub min_frequency: u64,
    /// Lowercase the text.
    pub lowercase: bool,
    /// Unicode NFKC normalisation.
    pub nfkc: bool,
    /// Remove accents (NFD, then drop combining marks).
    pub strip_accents: bool,
    /// Use at most this many documents of the corpus (0: all).
    pub max_docs: usize,
    /// Words (runs of non-blank characters) longer than this many characters are split into
    /// chunks of this length before training, and counted: training time grows with the
    /// square of a word's length (0: no limit).
    #[serde(default = "default_max_word_chars")]
    pub max_word_chars: usize,
    /// Skip (and count on stderr) rows whose text cannot be read (nulls, wrong types)
    /// instead of stopping at the first.
    pub skip_bad_rows: bool,
}

impl Default for TokenizerConfig {
    fn default() -> Self {
        TokenizerConfig {
            kind: TokenizerKind::WordPiece,
            vocab_size: 8000,
            min_frequency: 2,
            lowercase: true,
            nfkc: true,
            strip_accents: false,
            max_docs: 0,
            max_word_chars: DEFAULT_MAX_WORD_CHARS,
            skip_bad_rows: false,
        }
    }
}

impl TokenizerConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.vocab_size <= SPECIAL_TOKENS.len() {
            return Err(TextError::Config(format!(
                "tokenizer.vocab_size = {} must exceed the {} special tokens",
                self.vocab_size,
                SPECIAL_TOKENS.len()
            )));
        }
        Ok(())
    }
}

/// Ids of the special tokens of a tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    /// `[PAD]`.
    pub pad: u32,
    /// `[UNK]`.
    pub unk: u32,
    /// `[CLS]`.
    pub cls: u32,
    /// `[SEP]`.
    pub sep: u32,
    /// `[MASK]`.
    pub mask: u32,
}

impl SpecialIds {
    /// Looks the special tokens up in `tok`; all five must exist.
    pub fn of(tok: &Tokenizer) -> Result<Self> {
        let id = |t: &str| {
            tok.token_to_id(t).ok_or_else(|| {
                TextError::Tokenizer(format!("the tokenizer has no `{t}` token (BERT's special tokens [PAD] [UNK] [CLS] [SEP] [MASK] are required)"))
            })
        };
        Ok(SpecialIds {
            pad: id("[PAD]")?,
            unk: id("[UNK]")?,
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            mask: id("[MASK]")?,
        })
    }
}

fn normalizer(cfg: &TokenizerConfig) -> Option<NormalizerWrapper> {
    let mut parts: Vec<NormalizerWrapper> = Vec::new();
    if cfg.nfkc {
        parts.push(NFKC.into());
    }
    if cfg.strip_accents {
        parts.push(NFD.into());
        parts.push(StripAccents.into());
    }
    if cfg.lowercase {
        parts.push(Lowercase.into());
    }
    (!parts.is_empty()).then(|| Sequence::new(parts).into())
}

fn special_added_tokens() -> Vec<AddedToken> {
    SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect()
}

/// The trainer of each kind, made deterministic: the same texts and settings give the same
/// `tokenizer.json` in every process. Hugging Face's trainers keep their counts in hash maps
/// seeded per process, and two of them let the maps' order reach the result:
///
/// - WordPiece (BPE with a `##` continuing-subword prefix, then converted) gives each `##c`
///   symbol its id in the order it meets the words, and BPE breaks ties between pairs of
///   equal count by their symbols' ids, so the merges chosen, and the vocabulary, changed
///   from run to run. [`WordPieceTrainer`] registers every `##c` before the merges, in
///   character order; ties are then broken by the lower id, i.e. in the order: special
///   tokens, `##c` symbols by character, single characters by character, then merged tokens
///   in the order they were made.
/// - Unigram trains on its word counts in the order of a hash map, and sums them in floating
///   point (in parallel chunks), so the pieces' scores differed in their last bits, and it
///   lists its pieces in the order of a hash set. [`UnigramTrainer`] trains on the words
///   sorted, on one thread; [`canonical_unigram`] deals the scores of the characters it
///   had to add by character and sorts the pieces by score (highest first), then by text.
///
/// Byte-level BPE meets no symbol outside its sorted alphabet and is deterministic as it is.
/// (Tested by training in separate processes: `tests/determinism.rs`.)
enum SubwordTrainer {
    /// Byte-level BPE, as Hugging Face trains it.
    Hf(TrainerWrapper),
    /// Unigram on sorted words, on one thread.
    Unigram(UnigramTrainer),
    /// WordPiece with symbol ids fixed before the merges.
    WordPiece(WordPieceTrainer),
}

impl Trainer for SubwordTrainer {
    type Model = ModelWrapper;

    fn should_show_progress(&self) -> bool {
        false
    }

    fn train(&self, model: &mut ModelWrapper) -> tokenizers::Result<Vec<AddedToken>> {
        match self {
            SubwordTrainer::Hf(t) => t.train(model),
            SubwordTrainer::Unigram(t) => t.train(model),
            SubwordTrainer::WordPiece(t) => t.train(model),
        }
    }

    fn feed<I, S, F>(&mut self, iterator: I, process: F) -> tokenizers::Result<()>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
        F: Fn(&str) -> tokenizers::Result<Vec<String>> + Sync,
    {
        match self {
            SubwordTrainer::Hf(t) => t.feed(iterator, process),
            SubwordTrainer::Unigram(t) => t.feed(iterator, process),
            SubwordTrainer::WordPiece(t) => t.feed(iterator, process),
        }
    }
}

/// WordPiece training as Hugging Face's `WordPieceTrainer` does it (BPE merges with the `##`
/// continuing-subword prefix, the vocabulary then read by WordPiece's greedy longest match),
/// except that every `##c` symbol is registered, in character order, before the merges, so
/// symbol ids, and with them the tie-breaks between equally frequent pairs, do not depend on
/// the order of a hash map. The vocabulary holds the same symbols as Hugging Face's (the
/// `##c` of every character met after a word's first), only their ids differ.
struct WordPieceTrainer {
    /// The BPE trainer (`##` prefix, BERT's special tokens first).
    bpe: BpeTrainer,
    /// The special tokens to add to the tokenizer (the `##c` symbols are plain vocabulary).
    specials: Vec<AddedToken>,
    /// Characters met after the first of a word.
    continuations: Mutex<std::collections::BTreeSet<char>>,
}

impl WordPieceTrainer {
    fn new(bpe: BpeTrainer) -> Self {
        WordPieceTrainer {
            specials: bpe.special_tokens.clone(),
            bpe,
            continuations: Mutex::new(std::collections::BTreeSet::new()),
        }
    }

    fn feed<I, S, F>(&mut self, iterator: I, process: F) -> tokenizers::Result<()>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
        F: Fn(&str) -> tokenizers::Result<Vec<String>> + Sync,
    {
        let continuations = &self.continuations;
        self.bpe.feed(iterator, |text| {
            let words = process(text)?;
            let mut seen = std::collections::BTreeSet::new();
            for w in &words {
                seen.extend(w.chars().skip(1));
            }
            if !seen.is_empty() {
                continuations
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(seen);
            }
            Ok(words)
        })?;
        let prefix = self
            .bpe
            .continuing_subword_prefix
            .clone()
            .unwrap_or_default();
        let symbols = self
            .continuations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|c| AddedToken::from(format!("{prefix}{c}"), true))
            .collect::<Vec<_>>();
        // Registered as the BPE trainer's special tokens: the first ids, in this order. Only
        // BERT's are returned to the tokenizer as special tokens (see `train`).
        self.bpe.special_tokens = self.specials.iter().cloned().chain(symbols).collect();
        Ok(())
    }

    fn train(&self, model: &mut ModelWrapper) -> tokenizers::Result<Vec<AddedToken>> {
        let mut bpe = BPE::default();
        self.bpe.train(&mut bpe)?;
        let mut wordpiece = WordPiece::from_bpe(&bpe);
        if let ModelWrapper::WordPiece(old) = model {
            // Keep the untrained model's settings (unknown token, longest word).
            wordpiece.unk_token = old.unk_token.clone();
            wordpiece.max_input_chars_per_word = old.max_input_chars_per_word;
        }
        *model = ModelWrapper::WordPiece(wordpiece);
        Ok(self.specials.clone())
    }
}

/// Hugging Face's Unigram training (EM with pruning) made independent of hash order and
/// thread count: the words are counted here, handed to it sorted, and it runs on a pool of
/// one thread, so every floating-point sum adds the same terms in the same order in every
/// process and on every machine.
struct UnigramTrainer {
    /// Hugging Face's trainer (its own word counts are not used).
    inner: tokenizers::models::unigram::UnigramTrainer,
    /// Pre-tokenized words and their counts.
    words: std::collections::HashMap<String, u32>,
}

impl UnigramTrainer {
    fn feed<I, S, F>(&mut self, iterator: I, process: F) -> tokenizers::Result<()>
    where
        I: Iterator<Item = S> + Send,
        S: AsRef<str> + Send,
        F: Fn(&str) -> tokenizers::Result<Vec<String>> + Sync,
    {
        for text in iterator {
            for word in process(text.as_ref())? {
                *self.words.entry(word).or_default() += 1;
            }
        }
        Ok(())
    }

    fn train(&self, model: &mut ModelWrapper) -> tokenizers::Result<Vec<AddedToken>> {
        let mut sentences: Vec<(String, u32)> =
            self.words.iter().map(|(w, n)| (w.clone(), *n)).collect();
        sentences.sort_unstable();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
        let mut unigram = Unigram::default();
        let specials = pool.install(|| self.inner.do_train(sentences, &mut unigram))?;
        *model = ModelWrapper::Unigram(unigram);
        Ok(specials)
    }
}

/// Sorts a trained Unigram model's pieces into a canonical order: the special tokens first,
/// in [`SPECIAL_TOKENS`]' order, then by score (highest first), then by text. The trainer
/// lists pieces in the order of a hash set, which differs from process to process, and gives
/// the characters it had to add its lowest scores in that order too (dealt again here).
fn canonical_unigram(tok: &mut Tokenizer) -> Result<()> {
    let ModelWrapper::Unigram(u) = tok.get_model() else {
        return Ok(());
    };
    let rank = |t: &str| SPECIAL_TOKENS.iter().position(|s| *s == t);
    let mut pieces: Vec<(String, f64)> = u.iter().cloned().collect();
    // The trainer gives each character its corpus needs but its model lacks the score
    // `min + k x 1e-4`, k counting those characters in the order of a hash set: the same
    // scores go to the same characters, shuffled. They are dealt again here by character
    // (the highest to the first), which every process does alike.
    const PENALTY_STEP: f64 = 0.0001; // `min_score_penalty_delta` in `UnigramTrainer::finalize`
    let min = pieces
        .iter()
        .filter(|(t, _)| rank(t).is_none())
        .map(|(_, s)| *s)
        .fold(f64::INFINITY, f64::min);
    let single: Vec<usize> = (0..pieces.len())
        .filter(|&i| rank(&pieces[i].0).is_none() && pieces[i].0.chars().count() == 1)
        .collect();
    let mut penalties = std::collections::HashSet::new();
    let mut penalty = 0.0;
    for _ in 0..=single.len() {
        penalties.insert((min + penalty).to_bits());
        penalty += PENALTY_STEP;
    }
    let mut dealt: Vec<usize> = single
        .into_iter()
        .filter(|&i| penalties.contains(&pieces[i].1.to_bits()))
        .collect();
    let mut scores: Vec<f64> = dealt.iter().map(|&i| pieces[i].1).collect();
    scores.sort_by(|a, b| b.total_cmp(a));
    dealt.sort_by(|&a, &b| pieces[a].0.cmp(&pieces[b].0));
    for (i, score) in dealt.into_iter().zip(scores) {
        pieces[i].1 = score;
    }
    pieces.sort_by(|(a, sa), (b, sb)| match (rank(a), rank(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => sb.total_cmp(sa).then_with(|| a.cmp(b)),
    });
    let unk = pieces.iter().position(|(t, _)| t == "[UNK]");
    let model = Unigram::from(pieces, unk, u.byte_fallback()).map_err(TextError::tok)?;
    tok.with_model(model);
    Ok(())
}

/// An untrained tokenizer with the normaliser, pre-tokenizer and decoder of `cfg.kind`, and
/// the matching trainer.
fn untrained(cfg: &TokenizerConfig) -> Result<(Tokenizer, SubwordTrainer)> {
    let specials = special_added_tokens();
    let (mut tok, trainer): (Tokenizer, SubwordTrainer) = match cfg.kind {
        TokenizerKind::Bpe => {
            let model = BPE::builder()
                .unk_token("[UNK]".into())
                .build()
                .map_err(TextError::tok)?;
            let mut tok = Tokenizer::new(model);
            tok.with_pre_tokenizer(Some(ByteLevel::new(true, true, true)));
            tok.with_decoder(Some(ByteLevelDecoder::default()));
            let trainer = BpeTrainerBuilder::new()
                .vocab_size(cfg.vocab_size)
                .min_frequency(cfg.min_frequency)
                .special_tokens(specials)
                .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                .show_progress(false)
                .build();
            (tok, SubwordTrainer::Hf(trainer.into()))
        }
        TokenizerKind::WordPiece => {
            let model = WordPiece::builder()
                .unk_token("[UNK]".into())
                .continuing_subword_prefix("##".into())
                .build()
                .map_err(TextError::tok)?;
            let mut tok = Tokenizer::new(model);
            tok.with_pre_tokenizer(Some(BertPreTokenizer));
            tok.with_decoder(Some(WordPieceDecoder::default()));
            let bpe = BpeTrainerBuilder::new()
                .vocab_size(cfg.vocab_size)
                .min_frequency(cfg.min_frequency)
                .special_tokens(specials)
                .continuing_subword_prefix("##".into())
                .show_progress(false)
                .build();
            (tok, SubwordTrainer::WordPiece(WordPieceTrainer::new(bpe)))
        }
        TokenizerKind::Unigram => {
            let mut tok = Tokenizer::new(Unigram::default());
            tok.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, true)));
            tok.with_decoder(Some(MetaspaceDecoder::new(
                '▁',
                PrependScheme::Always,
                true,
            )));
            let trainer = UnigramTrainerBuilder::default()
                .vocab_size(cfg.vocab_size as u32)
                .special_tokens(specials)
                .unk_token(Some("[UNK]".into()))
                .show_progress(false)
                .build()
                .map_err(TextError::tok)?;
            (
                tok,
                SubwordTrainer::Unigram(UnigramTrainer {
                    inner: trainer,
                    words: std::collections::HashMap::new(),
                }),
            )
        }
    };
    tok.with_normalizer(normalizer(cfg));
    Ok((tok, trainer))
}

/// Adds BERT's `[CLS] $A [SEP]` / `[CLS] $A [SEP] $B [SEP]` post-processor and registers
/// the special tokens so they are never split.
fn finish(tok: &mut Tokenizer) -> Result<()> {
    canonical_unigram(tok)?;
    tok.add_special_tokens(&special_added_tokens());
    let ids = SpecialIds::of(tok)?;
    let post = TemplateProcessing::builder()
        .try_single("[CLS] $A [SEP]")
        .map_err(TextError::tok)?
        .try_pair("[CLS] $A [SEP] $B:1 [SEP]:1")
        .map_err(TextError::tok)?
        .special_tokens(vec![("[CLS]", ids.cls), ("[SEP]", ids.sep)])
        .build()
        .map_err(TextError::tok)?;
    tok.with_post_processor(Some(post));
    Ok(())
}

/// [`split_long_words`] as an owned string, adding the runs split to `split`.
fn limit_words(text: &str, max: usize, split: &AtomicUsize) -> String {
    let (out, n) = split_long_words(text, max);
    if n > 0 {
        split.fetch_add(n, Ordering::Relaxed);
    }
    out.into_owned()
}

/// Says on stderr how many words were split before training.
fn report_split(split: &AtomicUsize, max: usize) {
    let n = split.load(Ordering::Relaxed);
    if n > 0 {
        eprintln!(
            "tokenizer training: {n} word(s) longer than {max} characters split into chunks of {max} (tokenizer.train.max_word_chars; 0 for no limit)"
        );
    }
}

/// Trains a tokenizer on the texts of an iterator.
pub fn train_from_texts<I, S>(texts: I, cfg: &TokenizerConfig) -> Result<Tokenizer>
where
    I: Iterator<Item = S> + Send,
    S: AsRef<str> + Send,
{
    cfg.validate()?;
    let (mut tok, mut trainer) = untrained(cfg)?;
    let split = AtomicUsize::new(0);
    let texts = texts.map(|t| limit_words(t.as_ref(), cfg.max_word_chars, &split));
    tok.train(&mut trainer, texts).map_err(TextError::tok)?;
    report_split(&split, cfg.max_word_chars);
    finish(&mut tok)?;
    Ok(tok)
}

/// A stream of the strings of one text column, read by a background thread through
/// ssl-data's loader, so the corpus never has to fit in memory (the trainer keeps only word
/// counts). Errors end the stream and are returned by [`TextStream::finish`].
pub struct TextStream {
    rx: Option<Receiver<String>>,
    error: Arc<Mutex<Option<TextError>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl TextStream {
    /// Streams `column` of the Parquet files/dirs/globs in `paths`, in file order, at most
    /// `max_docs` documents (0: all). Rows whose index `i` satisfies `skip(i)` are left out
    /// (e.g. a held-out split).
    pub fn open(
        paths: &[String],
        column: &str,
        max_docs: usize,
        skip: impl Fn(usize) -> bool + Send + 'static,
    ) -> Result<Self> {
        Self::open_with(paths, column, max_docs, false, skip)
    }

    /// [`TextStream::open`] that skips (and reports) unreadable rows when `skip_bad_rows`.
    pub fn open_with(
        paths: &[String],
        column: &str,
        max_docs: usize,
        skip_bad_rows: bool,
        skip: impl Fn(usize) -> bool + Send + 'static,
    ) -> Result<Self> {
        let source = ParquetSource::open(paths)?;
        let config = LoaderConfig {
            columns: vec![ColumnSpec::text(column)],
            batch_size: 256,
            shuffle: false,
            epochs: Some(1),
            prefetch: 2,
            skip_bad_rows,
            ..LoaderConfig::default()
        };
        source.check_columns(&config.columns)?;
        let column = column.to_string();
        let (tx, rx) = sync_channel::<String>(4096);
        let error = Arc::new(Mutex::new(None));
        let err2 = error.clone();
        let handle = std::thread::spawn(move || {
            let run = || -> Result<()> {
                let mut loader = DataLoader::new(&source, config)?;
                let mut sent = 0usize;
                while let Some(batch) = loader.next_batch()? {
                    // Global row indices (rows skipped as bad under `skip_bad_rows` leave gaps).
                    for (text, &i) in batch.text(&column)?.iter().zip(batch.rows()) {
                        if skip(i) {
                            continue;
                        }
                        if max_docs > 0 && sent >= max_docs {
                            return Ok(());
                        }
                        if tx.send(text.clone()).is_err() {
                            return Ok(());
                        }
                        sent += 1;
                    }
                }
                Ok(())
            };
            if let Err(e) = run() {
                *err2.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            }
        });
        Ok(TextStream {
            rx: Some(rx),
            error,
            handle: Some(handle),
        })
    }

    /// Waits for the reader and returns the first error it met, if any.
    pub fn finish(mut self) -> Result<()> {
        if let Some(h) = self.handle.take() {
            // Drain so the reader is not blocked on a full channel.
            if let Some(rx) = self.rx.take() {
                while rx.recv().is_ok() {}
            }
            h.join().map_err(|_| {
                TextError::InvalidInput("the Parquet reader thread panicked".into())
            })?;
        }
        match self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The texts, in order (once: later calls yield nothing).
    pub fn texts(&mut self) -> TextIter {
        TextIter(self.rx.take())
    }
}

/// The iterator of a [`TextStream`]; dropping it stops the reader.
pub struct TextIter(Option<Receiver<String>>);

impl Iterator for TextIter {
    type Item = String;
    fn next(&mut self) -> Option<String> {
        self.0.as_ref()?.recv().ok()
    }
}

/// Documents between two progress updates of [`train_from_parquet`].
const PROGRESS_EVERY: usize = 256;

/// Trains a tokenizer on `column` of Parquet data, streamed (see [`TextStream`]), reporting
/// the documents read through [`ssl_core::monitor::Progress::task`].
pub fn train_from_parquet(
    paths: &[String],
    column: &str,
    cfg: &TokenizerConfig,
    skip: impl Fn(usize) -> bool + Send + 'static,
) -> Result<Tokenizer> {
    cfg.validate()?;
    // The documents read are reported against the rows of the files' footers (capped at
    // `max_docs`); rows left out by `skip` (a held-out split) are not counted, so the
    // count may end below it.
    let rows = ParquetSource::open(paths)?.num_rows();
    let total = if cfg.max_docs > 0 {
        rows.min(cfg.max_docs)
    } else {
        rows
    };
    let mut stream = TextStream::open_with(paths, column, cfg.max_docs, cfg.skip_bad_rows, skip)?;
    let (mut tok, mut trainer) = untrained(cfg)?;
    let progress = ssl_core::monitor::Progress::task("tokenizer", total as u64, "documents");
    // Documents with a non-blank character: a tokenizer trained on none would hold only the
    // special tokens.
    let (seen, with_text) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let split = AtomicUsize::new(0);
    let read_all = AtomicBool::new(false);
    let texts = stream
        .texts()
        .inspect(|t| {
            if (seen.fetch_add(1, Ordering::Relaxed) + 1).is_multiple_of(PROGRESS_EVERY) {
                progress.inc(PROGRESS_EVERY as u64);
            }
            if !t.trim().is_empty() {
                with_text.fetch_add(1, Ordering::Relaxed);
            }
        })
        .map(|t| limit_words(&t, cfg.max_word_chars, &split))
        // Once every document is read the trainer computes the vocabulary: said on a line.
        .chain(std::iter::from_fn(|| {
            if !read_all.swap(true, Ordering::Relaxed) {
                let n = seen.load(Ordering::Relaxed);
                progress.inc((n % PROGRESS_EVERY) as u64);
                progress.finish();
                if ssl_core::monitor::progress_enabled() {
                    eprintln!("tokenizer: {n} documents read; computing the vocabulary");
                }
            }
            None
        }));
    let trained = tok.train(&mut trainer, texts).map(|_| ());
    if !read_all.load(Ordering::Relaxed) {
        progress.finish();
    }
    stream.finish()?;
    trained.map_err(TextError::tok)?;
    report_split(&split, cfg.max_word_chars);
    if with_text.load(Ordering::Relaxed) == 0 {
        return Err(TextError::InvalidInput(format!(
            "no text to train the tokenizer on: column `{column}` of {} holds {} documents, all empty or blank",
            paths.join(", "),
            seen.load(Ordering::Relaxed)
        )));
    }
    finish(&mut tok)?;
    Ok(tok)
}

/// Writes `tokenizer.json` (and a minimal `tokenizer_config.json` naming the special tokens,
/// so `transformers.AutoTokenizer` also loads the directory) into `dir`.
pub fn save_tokenizer(tok: &Tokenizer, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| TextError::io(dir, e))?;
    let path = dir.join("tokenizer.json");
    // Through a temporary file and a rename: an interrupted save leaves no partial file.
    let json = tok.to_string(true).map_err(TextError::tok)?;
    ssl_data::output::write_output(&path, json.as_bytes())?;
    let cfg = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
        "sep_token": "[SEP]", "mask_token": "[MASK]",
        "model_max_length": 512,
    });
    let cpath = dir.join("tokenizer_config.json");
    ssl_data::output::write_output(
        &cpath,
        serde_json::to_string_pretty(&cfg)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    Ok(path)
}

/// Loads a `tokenizer.json` file. Padding and truncation stored in the file (e.g.
/// sentence-transformers pad to 128) are switched off: ssl-text pads and truncates itself.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let mut tok = Tokenizer::from_file(path)
        .map_err(|e| TextError::Tokenizer(format!("{}: {e}", path.display())))?;
    tok.with_padding(None);
    tok.with_truncation(None).map_err(TextError::tok)?;
    check_token_ids(&tok, path)?;
    Ok(tok)
}

/// Checks that every token id of `tok` (added tokens included) is below its vocabulary size,
/// the number of rows of the model's embedding table; `path` names the tokenizer in the
/// error.
pub fn check_token_ids(tok: &Tokenizer, path: &Path) -> Result<()> {
    let vocab = tok.get_vocab_size(true);
    let worst = tok
        .get_vocab(true)
        .into_iter()
        .max_by_key(|&(_, id)| id)
        .filter(|&(_, id)| id as usize >= vocab);
    match worst {
        Some((token, id)) => Err(TextError::TokenIdOutOfRange {
            path: path.to_path_buf(),
            token,
            id,
            vocab,
        }),
        None => Ok(()),
    }
}

/// Checks that the tokenizer `tok` (read from `path`) belongs to a model whose embedding
/// table has `model_vocab` rows: [`TextError::VocabMismatch`] when the sizes differ, or, with
/// `allow_smaller` (a Hugging Face model whose table may be padded), only when the tokenizer
/// is larger. Run before any text is embedded, so a wrong tokenizer is a named error instead
/// of an index past the table.
pub fn check_vocab(
    tok: &Tokenizer,
    path: &Path,
    model_vocab: usize,
    allow_smaller: bool,
) -> Result<()> {
    let vocab = tok.get_vocab_size(true);
    if vocab == model_vocab || (allow_smaller && vocab < model_vocab) {
        return Ok(());
    }
    Err(TextError::VocabMismatch {
        path: path.to_path_buf(),
        tokenizer: vocab,
        model: model_vocab,
    })
}

/// Fertility figures of a tokenizer on some text.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Fertility {
    /// Whitespace-separated words seen.
    pub words: u64,
    /// Subword tokens produced (special tokens excluded).
    pub tokens: u64,
    /// Tokens per word.
    pub tokens_per_word: f64,
    /// Fraction of words split into more than one token.
    pub split_word_fraction: f64,
    /// Fraction of tokens that are `[UNK]`.
    pub unk_fraction: f64,
}

/// Tokens per whitespace-separated word of `texts` (each word tokenized on its own, with no
/// special tokens, so the figure does not depend on how the pre-tokenizer splits punctuation).
pub fn fertility<S: AsRef<str>>(tok: &Tokenizer, texts: &[S]) -> Result<Fertility> {
    let unk = tok.token_to_id("[UNK]");
    let (mut words, mut tokens, mut split, mut unks) = (0u64, 0u64, 0u64, 0u64);
    for text in texts {
        let ws: Vec<&str> = text.as_ref().split_whitespace().collect();
        if ws.is_empty() {
            continue;
        }
        let encs = tok
            .encode_batch(ws.clone(), false)
            .map_err(TextError::tok)?;
        for e in encs {
            let n = e.get_ids().len() as u64;
            words += 1;
            tokens += n;
            if n > 1 {
                split += 1;
            }
            if let Some(u) = unk {
                unks += e.get_ids().iter().filter(|&&i| i == u).count() as u64;
            }
        }
    }
    let w = words.max(1) as f64;
    Ok(Fertility {
        words,
        tokens,
        tokens_per_word: tokens as f64 / w,
        split_word_fraction: split as f64 / w,
        unk_fraction: unks as f64 / tokens.max(1) as f64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus() -> Vec<String> {
        let base = [
            "The kernel schedules threads on every CPU.",
            "Interrupt handlers must not sleep; use a workqueue instead.",
            "Memory barriers order loads and stores across CPUs.",
            "The scheduler balances runqueues between cores.",
            "Café naïve résumé — accents appear here.",
        ];
        (0..40).map(|i| base[i % base.len()].to_string()).collect()
    }

    #[test]
    fn every_kind_trains_with_fixed_special_ids_and_cls_sep() {
        for kind in [
            TokenizerKind::Bpe,
            TokenizerKind::WordPiece,
            TokenizerKind::Unigram,
        ] {
            let cfg = TokenizerConfig {
                kind,
                vocab_size: 300,
                min_frequency: 1,
                ..Default::default()
            };
            let tok = train_from_texts(corpus().into_iter(), &cfg).unwrap();
            let ids = SpecialIds::of(&tok).unwrap();
            assert_eq!(
                (ids.pad, ids.unk, ids.cls, ids.sep, ids.mask),
                (0, 1, 2, 3, 4),
                "{kind:?}"
            );
            let e = tok.encode("the scheduler [MASK] cores", true).unwrap();
            let got = e.get_ids();
            assert_eq!(got[0], ids.cls, "{kind:?}");
            assert_eq!(*got.last().unwrap(), ids.sep, "{kind:?}");
            assert!(got.contains(&ids.mask), "{kind:?}: [MASK] must stay whole");
            assert!(tok.get_vocab_size(true) <= 300 + 5, "{kind:?}");
            // Word ids exist for every non-special token.
            for (w, s) in e.get_word_ids().iter().zip(e.get_special_tokens_mask()) {
                if *s == 0 {
                    assert!(w.is_some(), "{kind:?}");
                }
            }
        }
    }

    #[test]
    fn normaliser_options_apply() {
        let cfg = TokenizerConfig {
            vocab_size: 200,
            min_frequency: 1,
            strip_accents: true,
            ..Default::default()
        };
        let tok = train_from_texts(corpus().into_iter(), &cfg).unwrap();
        let e = tok.encode("CAFÉ", false).unwrap();
        let text = e.get_tokens().join("");
        assert!(!text.contains('É') && !text.contains('é'), "{text}");
        assert!(text.contains('c'), "{text}");
    }

    #[test]
    fn fertility_counts_words_and_tokens() {
        let cfg = TokenizerConfig {
            vocab_size: 400,
            min_frequency: 1,
            ..Default::default()
        };
        let tok = train_from_texts(corpus().into_iter(), &cfg).unwrap();
        let f = fertility(&tok, &["kernel kernel", "workqueuekernel"]).unwrap();
        assert_eq!(f.words, 3);
        assert!(f.tokens >= 3);
        assert!(f.tokens_per_word >= 1.0);
        assert!(f.split_word_fraction > 0.0 && f.split_word_fraction < 1.0);
    }

    #[test]
    fn saved_json_loads_back_identically() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TokenizerConfig {
            kind: TokenizerKind::Unigram,
            vocab_size: 200,
            ..Default::default()
        };
        let tok = train_from_texts(corpus().into_iter(), &cfg).unwrap();
        let path = save_tokenizer(&tok, dir.path()).unwrap();
        let back = load_tokenizer(&path).unwrap();
        let s = "Memory barriers order loads.";
        assert_eq!(
            tok.encode(s, true).unwrap().get_ids(),
            back.encode(s, true).unwrap().get_ids()
        );
        assert!(load_tokenizer(&dir.path().join("nope.json")).is_err());
    }

    #[test]
    fn a_token_id_past_the_vocabulary_is_refused_on_load() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = TokenizerConfig {
            vocab_size: 60,
            ..Default::default()
        };
        let tok = train_from_texts(corpus().into_iter(), &cfg).unwrap();
        let path = save_tokenizer(&tok, dir.path()).unwrap();
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let vocab = json["model"]["vocab"].as_object_mut().unwrap();
        let token = vocab.keys().find(|k| !k.starts_with('[')).unwrap().clone();
        vocab.insert(token.clone(), serde_json::json!(2_000_000_000u32));
        std::fs::write(&path, json.to_string()).unwrap();
        let err = load_tokenizer(&path).unwrap_err();
        assert!(
            matches!(&err, TextError::TokenIdOutOfRange { id: 2_000_000_000, token: t, .. } if *t == token),
            "{err}"
        );
        assert!(err.to_string().contains("tokenizer.json"), "{err}");
    }

    #[test]
    fn long_words_are_split_and_counted() {
        let (t, n) = split_long_words("ab abcdefg abcd", 3);
        assert_eq!((t.as_ref(), n), ("ab abc def g abc d", 2));
        let (t, n) = split_long_words("short words only", 10);
        assert!(matches!(t, std::borrow::Cow::Borrowed(_)));
        assert_eq!(n, 0);
        assert_eq!(split_long_words("éééé", 2).0, "éé éé");
        assert_eq!(split_long_words("abcdef", 0).1, 0);
    }

    #[test]
    fn a_huge_word_trains_quickly() {
        // 200k characters of pseudo-random letters as one "word": unsplit, the trainer's time
        // grows with the square of its length.
        let mut x = 12345u32;
        let word: String = (0..200_000)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                char::from(b'a' + ((x >> 16) % 26) as u8)
            })
            .collect();
        let mut texts = corpus();
        texts.push(word);
        let start = std::time::Instant::now();
        for kind in [TokenizerKind::WordPiece, TokenizerKind::Bpe] {
            let cfg = TokenizerConfig {
                kind,
                vocab_size: 300,
                ..Default::default()
            };
            train_from_texts(texts.iter(), &cfg).unwrap();
        }
        assert!(start.elapsed().as_secs() < 60, "{:?}", start.elapsed());
        let old: TokenizerConfig = serde_json::from_str(r#"{"vocab_size": 100}"#).unwrap();
        assert_eq!(old.max_word_chars, DEFAULT_MAX_WORD_CHARS);
    }
}
