//! Masking strategies for masked language modelling, as pure functions of a tokenized
//! sequence (token ids, word ids, special-token mask, entity spans) and a seeded [`SslRng`].
//!
//! Every strategy picks positions among the *candidates* (tokens that are neither special nor
//! padding), then replaces each picked unit with `[MASK]` (80%), a random token (10%) or leaves
//! it unchanged (10%), as transformers' `DataCollatorForLanguageModeling`. Labels hold the
//! original id at picked positions and [`IGNORE_INDEX`] everywhere else.
//!
//! - [`MaskStrategy::Token`]: each candidate independently with probability `mask_prob` (BERT).
//! - [`MaskStrategy::WholeWord`]: whole words (all tokens sharing a word id) in random order
//!   until `round(mask_prob x candidates)` tokens (at least 1) are picked, skipping words that
//!   would overshoot (`DataCollatorForWholeWordMask`). Works from word ids, so with any
//!   tokenizer (BPE, Unigram, WordPiece).
//! - [`MaskStrategy::Span`]: SpanBERT. Span lengths in whole words ~ Geometric(`span_p`)
//!   clipped at `max_span_words`, starting at a random word, until the same 15% budget is
//!   reached; the 80/10/10 decision is made once per span.
//! - [`MaskStrategy::Entity`]: each entity span (token positions) is masked whole with
//!   probability `entity_prob`; whole words then fill the remaining 15% budget.

use serde::{Deserialize, Serialize};
use ssl_core::SslRng;

use crate::{Result, TextError};

/// Label of positions that do not count in the loss (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Which positions to mask.
#[derive(
    schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum MaskStrategy {
    /// Independent tokens (BERT).
    #[default]
    Token,
    /// Whole words.
    WholeWord,
    /// Contiguous spans of whole words (SpanBERT).
    Span,
    /// Whole entity spans first, whole words for the rest of the budget.
    Entity,
}

/// Masking settings (defaults: BERT's 15% and 80/10/10, SpanBERT's Geometric(0.2) clipped at 10).
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskingConfig {
    /// The strategy.
    pub strategy: MaskStrategy,
    /// Fraction of candidate tokens selected.
    pub mask_prob: f64,
    /// Of the selected, the fraction replaced by `[MASK]`.
    pub mask_token_prob: f64,
    /// Of the selected, the fraction replaced by a random token (the rest stays unchanged).
    pub random_token_prob: f64,
    /// Success probability of the geometric span-length distribution (span masking).
    pub span_p: f64,
    /// Longest span in words (span masking).
    pub max_span_words: usize,
    /// Probability that each entity is masked (entity masking).
    pub entity_prob: f64,
}

impl Default for MaskingConfig {
    fn default() -> Self {
        MaskingConfig {
            strategy: MaskStrategy::Token,
            mask_prob: 0.15,
            mask_token_prob: 0.8,
            random_token_prob: 0.1,
            span_p: 0.2,
            max_span_words: 10,
            entity_prob: 0.5,
        }
    }
}

impl MaskingConfig {
    /// Checks the probabilities.
    pub fn validate(&self) -> Result<()> {
        for (k, v) in [
            ("mask_prob", self.mask_prob),
            ("mask_token_prob", self.mask_token_prob),
            ("random_token_prob", self.random_token_prob),
            ("entity_prob", self.entity_prob),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(TextError::Config(format!(
                    "masking.{k} = {v} must be in [0, 1]"
                )));
            }
        }
        if self.mask_token_prob + self.random_token_prob > 1.0 + 1e-12 {
            return Err(TextError::Config(format!(
                "masking.mask_token_prob + masking.random_token_prob = {} exceeds 1",
                self.mask_token_prob + self.random_token_prob
            )));
        }
        if !(self.span_p > 0.0 && self.span_p <= 1.0) || self.max_span_words == 0 {
            return Err(TextError::Config(format!(
                "masking.span_p = {} must be in (0, 1] and masking.max_span_words = {} at least 1",
                self.span_p, self.max_span_words
            )));
        }
        Ok(())
    }
}

/// One tokenized sequence as the masking functions see it.
#[derive(Debug, Clone, Copy)]
pub struct MaskInput<'a> {
    /// Token ids.
    pub ids: &'a [u32],
    /// Word index of each token (`None` for special tokens).
    pub word_ids: &'a [Option<u32>],
    /// True for special and padding tokens (never masked).
    pub special: &'a [bool],
    /// Entity spans as lists of token positions (entity masking only).
    pub entities: &'a [Vec<usize>],
}

/// The vocabulary facts masking needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaskVocab {
    /// Vocabulary size (random replacements are uniform over it, as transformers does).
    pub size: u32,
    /// Id of `[MASK]`.
    pub mask_id: u32,
}

/// A masked sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Masked {
    /// The corrupted input ids.
    pub input_ids: Vec<u32>,
    /// Original id at selected positions, [`IGNORE_INDEX`] elsewhere.
    pub labels: Vec<i64>,
}

impl Masked {
    /// Number of selected positions.
    pub fn selected(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// Groups candidate positions into words: consecutive tokens sharing a word id form one unit,
/// a candidate without word id is a unit of its own.
pub fn word_units(input: &MaskInput) -> Vec<Vec<usize>> {
    let mut units: Vec<Vec<usize>> = Vec::new();
    let mut last: Option<u32> = None;
    for i in 0..input.ids.len() {
        if input.special[i] {
            last = None;
            continue;
        }
        match input.word_ids[i] {
            Some(w) if last == Some(w) => {
                if let Some(u) = units.last_mut() {
                    u.push(i);
                }
            }
            w => {
                units.push(vec![i]);
                last = w;
            }
        }
    }
    units
}

fn budget(candidates: usize, p: f64) -> usize {
    if candidates == 0 || p <= 0.0 {
        return 0;
    }
    ((candidates as f64 * p).round() as usize).clamp(1, candidates)
}

/// The geometric span length in {1, 2, ...} clipped at `max`.
pub fn sample_span_len(p: f64, max: usize, rng: &mut SslRng) -> usize {
    let mut len = 1;
    while len < max && !rng.bernoulli(p) {
        len += 1;
    }
    len
}

/// Applies the 80/10/10 replacement to one group of positions (one decision for the group).
fn corrupt(
    positions: &[usize],
    out: &mut Masked,
    ids: &[u32],
    cfg: &MaskingConfig,
    vocab: MaskVocab,
    rng: &mut SslRng,
) {
    let u = rng.uniform() as f64;
    for &i in positions {
        out.labels[i] = i64::from(ids[i]);
        if u < cfg.mask_token_prob {
            out.input_ids[i] = vocab.mask_id;
        } else if u < cfg.mask_token_prob + cfg.random_token_prob {
            out.input_ids[i] = rng.below(vocab.size.max(1) as usize) as u32;
        }
    }
}

/// Masks one sequence with the configured strategy.
pub fn mask_sequence(
    input: &MaskInput,
    cfg: &MaskingConfig,
    vocab: MaskVocab,
    rng: &mut SslRng,
) -> Result<Masked> {
    let n = input.ids.len();
    if input.word_ids.len() != n || input.special.len() != n {
        return Err(TextError::InvalidInput(format!(
            "masking: {} ids, {} word ids and {} special flags must have one length",
            n,
            input.word_ids.len(),
            input.special.len()
        )));
    }
    let mut out = Masked {
        input_ids: input.ids.to_vec(),
        labels: vec![IGNORE_INDEX; n],
    };
    let candidates: usize = input.special.iter().filter(|s| !**s).count();
    match cfg.strategy {
        MaskStrategy::Token => {
            for i in 0..n {
                if !input.special[i] && rng.bernoulli(cfg.mask_prob) {
                    corrupt(&[i], &mut out, input.ids, cfg, vocab, rng);
                }
            }
        }
        MaskStrategy::WholeWord => {
            let picked = pick_words(input, budget(candidates, cfg.mask_prob), &[], rng);
            for i in picked {
                corrupt(&[i], &mut out, input.ids, cfg, vocab, rng);
            }
        }
        MaskStrategy::Span => {
            let units = word_units(input);
            let limit = budget(candidates, cfg.mask_prob);
            let mut used = vec![false; units.len()];
            let mut count = 0;
            let mut attempts = 0;
            while count < limit && attempts < 20 * units.len().max(1) && !units.is_empty() {
                attempts += 1;
                let len = sample_span_len(cfg.span_p, cfg.max_span_words, rng);
                let start = rng.below(units.len());
                let end = (start + len).min(units.len());
                if used[start..end].iter().any(|u| *u) {
                    continue;
                }
                let positions: Vec<usize> = units[start..end].iter().flatten().copied().collect();
                if count + positions.len() > limit {
                    continue;
                }
                used[start..end].iter_mut().for_each(|u| *u = true);
                count += positions.len();
                corrupt(&positions, &mut out, input.ids, cfg, vocab, rng);
            }
        }
        MaskStrategy::Entity => {
            let mut taken = vec![false; n];
            for ent in input.entities {
                let valid =
                    !ent.is_empty() && ent.iter().all(|&i| i < n && !input.special[i] && !taken[i]);
                if valid && rng.bernoulli(cfg.entity_prob) {
                    for &i in ent {
                        taken[i] = true;
                    }
                    corrupt(ent, &mut out, input.ids, cfg, vocab, rng);
                }
            }
            let count = taken.iter().filter(|t| **t).count();
            let rest = budget(candidates, cfg.mask_prob).saturating_sub(count);
            if rest > 0 {
                let taken_pos: Vec<usize> = (0..n).filter(|&i| taken[i]).collect();
                for i in pick_words(input, rest, &taken_pos, rng) {
                    corrupt(&[i], &mut out, input.ids, cfg, vocab, rng);
                }
            }
        }
    }
    Ok(out)
}

/// Whole words in random order until `limit` tokens, skipping words that would overshoot or
/// that touch an excluded position.
fn pick_words(input: &MaskInput, limit: usize, exclude: &[usize], rng: &mut SslRng) -> Vec<usize> {
    let mut units = word_units(input);
    units.retain(|u| !u.iter().any(|i| exclude.contains(i)));
    rng.shuffle(&mut units);
    let mut picked = Vec::new();
    for u in units {
        if picked.len() >= limit {
            break;
        }
        if picked.len() + u.len() > limit {
            continue;
        }
        picked.extend(u);
    }
    picked.sort_unstable();
    picked
}

/// Token positions of each character span `(start, end)` (end exclusive): the tokens whose
/// character offsets overlap it. Spans covering no token are dropped.
pub fn spans_to_tokens(
    offsets: &[(usize, usize)],
    special: &[bool],
    spans: &[(usize, usize)],
) -> Vec<Vec<usize>> {
    spans
        .iter()
        .filter_map(|&(s, e)| {
            let toks: Vec<usize> = offsets
                .iter()
                .enumerate()
                .filter(|(i, (a, b))| !special[*i] && b > a && *a < e && *b > s)
                .map(|(i, _)| i)
                .collect();
            (!toks.is_empty()).then_some(toks)
        })
        .collect()
}

/// Character spans (in chars, end exclusive) of every case-insensitive occurrence of the
/// `terms` in `text` that starts and ends at a word boundary; longer terms win overlaps.
pub fn find_terms(text: &str, terms: &[String]) -> Vec<(usize, usize)> {
    let chars: Vec<char> = text.chars().flat_map(|c| c.to_lowercase()).collect();
    // Lowercasing may change lengths (rare); fall back to no matches rather than bad offsets.
    if chars.len() != text.chars().count() {
        return Vec::new();
    }
    let mut terms: Vec<Vec<char>> = terms
        .iter()
        .map(|t| t.chars().flat_map(|c| c.to_lowercase()).collect::<Vec<_>>())
        .filter(|t| !t.is_empty())
        .collect();
    terms.sort_by_key(|t| std::cmp::Reverse(t.len()));
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let mut taken = vec![false; chars.len()];
    let mut spans = Vec::new();
    for t in &terms {
        let mut i = 0;
        while i + t.len() <= chars.len() {
            let end = i + t.len();
            if chars[i..end] == t[..]
                && (i == 0 || !is_word(chars[i - 1]))
                && (end == chars.len() || !is_word(chars[end]))
                && !taken[i..end].iter().any(|x| *x)
            {
                taken[i..end].iter_mut().for_each(|x| *x = true);
                spans.push((i, end));
                i = end;
            } else {
                i += 1;
            }
        }
    }
    spans.sort_unstable();
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: MaskVocab = MaskVocab {
        size: 1000,
        mask_id: 4,
    };

    /// [CLS] w0(3 tokens) w1 w2(2) ... [SEP] [PAD] [PAD]
    fn seq(words: &[usize]) -> (Vec<u32>, Vec<Option<u32>>, Vec<bool>) {
        let mut ids = vec![2u32];
        let mut w = vec![None];
        let mut s = vec![true];
        for (k, &len) in words.iter().enumerate() {
            for j in 0..len {
                ids.push(100 + (k * 10 + j) as u32);
                w.push(Some(k as u32));
                s.push(false);
            }
        }
        ids.extend([3, 0, 0]);
        w.extend([None, None, None]);
        s.extend([true, true, true]);
        (ids, w, s)
    }

    fn check_invariants(inp: &MaskInput, m: &Masked) {
        for i in 0..inp.ids.len() {
            if inp.special[i] {
                assert_eq!(m.labels[i], IGNORE_INDEX, "special position {i} labelled");
                assert_eq!(m.input_ids[i], inp.ids[i], "special position {i} changed");
            } else if m.labels[i] == IGNORE_INDEX {
                assert_eq!(
                    m.input_ids[i], inp.ids[i],
                    "unselected position {i} changed"
                );
            } else {
                assert_eq!(m.labels[i], i64::from(inp.ids[i]));
            }
        }
    }

    fn whole_words_only(inp: &MaskInput, m: &Masked) {
        for u in word_units(inp) {
            let sel: Vec<bool> = u.iter().map(|&i| m.labels[i] != IGNORE_INDEX).collect();
            assert!(
                sel.iter().all(|x| *x) || sel.iter().all(|x| !*x),
                "word {u:?} split: {sel:?}"
            );
        }
    }

    #[test]
    fn token_masking_rate_and_80_10_10() {
        let words: Vec<usize> = vec![1; 100];
        let (ids, w, s) = seq(&words);
        let inp = MaskInput {
            ids: &ids,
            word_ids: &w,
            special: &s,
            entities: &[],
        };
        let cfg = MaskingConfig::default();
        let (mut sel, mut masked, mut same, mut total) = (0usize, 0usize, 0usize, 0usize);
        for seed in 0..400 {
            let m = mask_sequence(&inp, &cfg, V, &mut SslRng::new(seed)).unwrap();
            check_invariants(&inp, &m);
            total += 100;
            for ((label, new), old) in m.labels.iter().zip(&m.input_ids).zip(&ids) {
                if *label != IGNORE_INDEX {
                    sel += 1;
                    if *new == V.mask_id {
                        masked += 1;
                    } else if new == old {
                        same += 1;
                    }
                }
            }
        }
        let rate = sel as f64 / total as f64;
        assert!((rate - 0.15).abs() < 0.01, "rate {rate}");
        let fm = masked as f64 / sel as f64;
        let fs = same as f64 / sel as f64;
        assert!((fm - 0.8).abs() < 0.02, "mask fraction {fm}");
        // Unchanged: 10% plus the 0.1% chance a random draw hits the original id.
        assert!((fs - 0.1).abs() < 0.02, "unchanged fraction {fs}");
    }

    #[test]
    fn whole_word_keeps_words_whole_and_meets_budget() {
        let (ids, w, s) = seq(&[3, 1, 2, 1, 4, 1, 1, 2, 1, 1, 3, 1, 1, 2, 1, 1, 1, 2, 3, 1]);
        let inp = MaskInput {
            ids: &ids,
            word_ids: &w,
            special: &s,
            entities: &[],
        };
        let cand = s.iter().filter(|x| !**x).count();
        let cfg = MaskingConfig {
            strategy: MaskStrategy::WholeWord,
            ..Default::default()
        };
        let mut total = 0;
        for seed in 0..300 {
            let m = mask_sequence(&inp, &cfg, V, &mut SslRng::new(seed)).unwrap();
            check_invariants(&inp, &m);
            whole_words_only(&inp, &m);
            assert!(m.selected() <= budget(cand, 0.15));
            total += m.selected();
        }
        let rate = total as f64 / (300 * cand) as f64;
        assert!((rate - 0.15).abs() < 0.03, "{rate}");
    }

    #[test]
    fn span_lengths_follow_clipped_geometric() {
        let mut rng = SslRng::new(1);
        let n = 20_000;
        let lens: Vec<usize> = (0..n).map(|_| sample_span_len(0.2, 10, &mut rng)).collect();
        assert!(lens.iter().all(|&l| (1..=10).contains(&l)));
        let mean = lens.iter().sum::<usize>() as f64 / n as f64;
        // E[min(Geo(0.2), 10)] = sum_{k=0}^{9} 0.8^k = 4.463.
        let expect: f64 = (0..10).map(|k| 0.8f64.powi(k)).sum();
        assert!((mean - expect).abs() < 0.08, "{mean} vs {expect}");
        let p1 = lens.iter().filter(|&&l| l == 1).count() as f64 / n as f64;
        assert!((p1 - 0.2).abs() < 0.015, "{p1}");
    }

    #[test]
    fn span_masking_masks_contiguous_whole_words_within_budget() {
        let words: Vec<usize> = (0..200).map(|i| 1 + i % 3).collect();
        let (ids, w, s) = seq(&words);
        let inp = MaskInput {
            ids: &ids,
            word_ids: &w,
            special: &s,
            entities: &[],
        };
        let cand = s.iter().filter(|x| !**x).count();
        let cfg = MaskingConfig {
            strategy: MaskStrategy::Span,
            ..Default::default()
        };
        let mut total = 0;
        let mut spans = 0;
        for seed in 0..100 {
            let m = mask_sequence(&inp, &cfg, V, &mut SslRng::new(seed)).unwrap();
            check_invariants(&inp, &m);
            whole_words_only(&inp, &m);
            assert!(m.selected() <= budget(cand, 0.15));
            total += m.selected();
            // Count runs of selected positions.
            let mut prev = false;
            for l in &m.labels {
                let on = *l != IGNORE_INDEX;
                if on && !prev {
                    spans += 1;
                }
                prev = on;
            }
        }
        let rate = total as f64 / (100 * cand) as f64;
        let cap = budget(cand, 0.15) as f64 / cand as f64;
        assert!(rate > 0.13 && rate <= cap + 1e-9, "{rate} (cap {cap})");
        // Runs are multi-word on average (adjacent spans may merge, so this is a lower bound
        // on the mean span: tokens per run well above one word's 2 tokens).
        let per_run = total as f64 / spans as f64;
        assert!(per_run > 4.0, "tokens per run {per_run}");
    }

    #[test]
    fn entity_masking_masks_entities_whole() {
        let (ids, w, s) = seq(&[1, 2, 1, 3, 1, 1, 2, 1, 1, 1]);
        // Entities: positions of word 1 (tokens 2,3) and of words 3..4 (tokens 5..8).
        let ents = vec![vec![2, 3], vec![5, 6, 7, 8]];
        let inp = MaskInput {
            ids: &ids,
            word_ids: &w,
            special: &s,
            entities: &ents,
        };
        let cfg = MaskingConfig {
            strategy: MaskStrategy::Entity,
            ..Default::default()
        };
        let mut hits = [0usize; 2];
        for seed in 0..400 {
            let m = mask_sequence(&inp, &cfg, V, &mut SslRng::new(seed)).unwrap();
            check_invariants(&inp, &m);
            whole_words_only(&inp, &m);
            for (k, e) in ents.iter().enumerate() {
                let sel: Vec<bool> = e.iter().map(|&i| m.labels[i] != IGNORE_INDEX).collect();
                if sel.iter().all(|x| *x) {
                    hits[k] += 1;
                }
            }
        }
        for h in hits {
            let f = h as f64 / 400.0;
            assert!(f > 0.45 && f < 0.65, "entity masked in {f} of runs");
        }
    }

    #[test]
    fn edge_cases_short_all_special_long_word() {
        for strategy in [
            MaskStrategy::Token,
            MaskStrategy::WholeWord,
            MaskStrategy::Span,
            MaskStrategy::Entity,
        ] {
            let cfg = MaskingConfig {
                strategy,
                ..Default::default()
            };
            // All special: nothing selected.
            let (ids, w, s) = seq(&[]);
            let inp = MaskInput {
                ids: &ids,
                word_ids: &w,
                special: &s,
                entities: &[],
            };
            for seed in 0..50 {
                let m = mask_sequence(&inp, &cfg, V, &mut SslRng::new(seed)).unwrap();
                assert_eq!(m.selected(), 0);
                assert_eq!(m.input_ids, ids);
            }
            // Empty sequence.
            let m = mask_sequence(
                &MaskInput {
                    ids: &[],
                    word_ids: &[],
                    special: &[],
                    entities: &[],
                },
                &cfg,
                V,
                &mut SslRng::new(0),
            )
            .unwrap();
            assert!(m.labels.is_empty());
            // One-token text: budget-based strategies always pick it.
            let (ids, w, s) = seq(&[1]);
            let inp = MaskInput {
                ids: &ids,
                word_ids: &w,
                special: &s,
                entities: &[],
            };
            for seed in 0..50 {
                let m = mask_sequence(&inp, &cfg, V, &mut SslRng::new(seed)).unwrap();
                check_invariants(&inp, &m);
                if strategy != MaskStrategy::Token {
                    assert_eq!(m.selected(), 1, "{strategy:?}");
                }
            }
            // One very long word (longer than the budget) plus short ones: never split.
            let (ids, w, s) = seq(&[30, 1, 1, 1]);
            let inp = MaskInput {
                ids: &ids,
                word_ids: &w,
                special: &s,
                entities: &[],
            };
            for seed in 0..50 {
                let m = mask_sequence(&inp, &cfg, V, &mut SslRng::new(seed)).unwrap();
                check_invariants(&inp, &m);
                if strategy != MaskStrategy::Token {
                    whole_words_only(&inp, &m);
                }
            }
        }
        // Mismatched lengths are an error, not a panic.
        let bad = MaskInput {
            ids: &[1, 2],
            word_ids: &[None],
            special: &[false, false],
            entities: &[],
        };
        assert!(mask_sequence(&bad, &MaskingConfig::default(), V, &mut SslRng::new(0)).is_err());
    }

    #[test]
    fn same_seed_same_mask() {
        let (ids, w, s) = seq(&[2, 1, 3, 1, 1, 2, 1]);
        let inp = MaskInput {
            ids: &ids,
            word_ids: &w,
            special: &s,
            entities: &[],
        };
        for strategy in [
            MaskStrategy::Token,
            MaskStrategy::WholeWord,
            MaskStrategy::Span,
        ] {
            let cfg = MaskingConfig {
                strategy,
                ..Default::default()
            };
            let a = mask_sequence(&inp, &cfg, V, &mut SslRng::new(9)).unwrap();
            let b = mask_sequence(&inp, &cfg, V, &mut SslRng::new(9)).unwrap();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn terms_and_spans_map_to_tokens() {
        let text = "Use the Page Cache; page caches differ from the page cache.";
        let spans = find_terms(text, &["page cache".into(), "cache".into()]);
        assert_eq!(spans, vec![(8, 18), (48, 58)]);
        // Tokens: "Use"(0,3) "the"(4,7) "Page"(8,12) "Ca"(13,15) "##che"(15,18)
        let offsets = vec![(0, 0), (0, 3), (4, 7), (8, 12), (13, 15), (15, 18), (0, 0)];
        let special = vec![true, false, false, false, false, false, true];
        let toks = spans_to_tokens(&offsets, &special, &spans);
        assert_eq!(toks, vec![vec![3, 4, 5]]);
        assert!(MaskingConfig {
            mask_prob: 1.5,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
