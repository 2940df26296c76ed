//! Text inputs: tokenization into model sequences (per document, line by line, or packed into
//! blocks of `max_seq_len` as `run_mlm.py`'s `group_texts`), truncation, dynamic padding,
//! batches, and an in-memory resumable [`BatchSource`].

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use ssl_core::{BatchSource, SslRng};
use tokenizers::Tokenizer;

use crate::masking::{find_terms, spans_to_tokens};
use crate::tokenizer::SpecialIds;
use crate::{Result, TextError};

/// How documents become model sequences.
#[derive(
    schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum InputMode {
    /// Every document is one sequence, truncated to `max_seq_len`.
    Document,
    /// Every non-empty line is one sequence, truncated (`run_mlm.py --line_by_line`).
    LineByLine,
    /// Documents are concatenated and cut into full blocks of `max_seq_len` tokens, each
    /// wrapped in `[CLS] ... [SEP]` (`group_texts`); the incomplete tail is dropped unless it
    /// is the only block.
    #[default]
    Packed,
}

/// Input settings.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InputConfig {
    /// How documents become sequences.
    pub mode: InputMode,
    /// Longest sequence, special tokens included.
    pub max_seq_len: usize,
}

impl Default for InputConfig {
    fn default() -> Self {
        InputConfig {
            mode: InputMode::Packed,
            max_seq_len: 128,
        }
    }
}

/// One model sequence, with what masking needs.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenizedSeq {
    /// Token ids, `[CLS]` first and `[SEP]` last.
    pub ids: Vec<u32>,
    /// Word index of each token (`None` for special tokens); unique within the sequence.
    pub word_ids: Vec<Option<u32>>,
    /// True for special tokens.
    pub special: Vec<bool>,
    /// Entity spans as token positions.
    pub entities: Vec<Vec<usize>>,
}

impl TokenizedSeq {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    /// True when the sequence has no token.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Entities of a document: character spans (in chars, end exclusive).
pub type CharSpans = Vec<(usize, usize)>;

struct Piece {
    ids: Vec<u32>,
    words: Vec<Option<u32>>,
    entities: Vec<Vec<usize>>,
}

fn encode_plain(tok: &Tokenizer, text: &str, spans: Option<&CharSpans>) -> Result<Piece> {
    let enc = tok
        .encode_char_offsets(text, false)
        .map_err(TextError::tok)?;
    let special: Vec<bool> = enc
        .get_special_tokens_mask()
        .iter()
        .map(|&s| s != 0)
        .collect();
    let entities = match spans {
        Some(s) if !s.is_empty() => spans_to_tokens(enc.get_offsets(), &special, s),
        _ => Vec::new(),
    };
    Ok(Piece {
        ids: enc.get_ids().to_vec(),
        words: enc.get_word_ids().to_vec(),
        entities,
    })
}

fn wrap(
    ids: &[u32],
    words: &[Option<u32>],
    ents: Vec<Vec<usize>>,
    sp: &SpecialIds,
) -> TokenizedSeq {
    let mut out = TokenizedSeq {
        ids: Vec::with_capacity(ids.len() + 2),
        word_ids: Vec::with_capacity(ids.len() + 2),
        special: Vec::with_capacity(ids.len() + 2),
        entities: ents
            .into_iter()
            .map(|e| e.into_iter().map(|i| i + 1).collect())
            .collect(),
    };
    out.ids.push(sp.cls);
    out.word_ids.push(None);
    out.special.push(true);
    for (i, w) in ids.iter().zip(words) {
        out.ids.push(*i);
        out.word_ids.push(*w);
        out.special.push(false);
    }
    out.ids.push(sp.sep);
    out.word_ids.push(None);
    out.special.push(true);
    out
}

/// Tokenizes `texts` into model sequences. `entities[i]` (if given) are the character spans
/// of text `i`; `terms` (if non-empty) adds every occurrence of those terms as an entity.
pub fn tokenize_texts<S: AsRef<str>>(
    tok: &Tokenizer,
    texts: &[S],
    cfg: &InputConfig,
    entities: Option<&[CharSpans]>,
    terms: &[String],
) -> Result<Vec<TokenizedSeq>> {
    if cfg.max_seq_len < 3 {
        return Err(TextError::Config(format!(
            "input.max_seq_len = {} must be at least 3 ([CLS], a token, [SEP])",
            cfg.max_seq_len
        )));
    }
    let sp = SpecialIds::of(tok)?;
    let room = cfg.max_seq_len - 2;
    // Split into units (documents or lines) with their spans.
    let mut units: Vec<(String, CharSpans)> = Vec::new();
    for (k, t) in texts.iter().enumerate() {
        let t = t.as_ref();
        let given = entities.and_then(|e| e.get(k)).cloned().unwrap_or_default();
        match cfg.mode {
            InputMode::LineByLine => {
                let mut start = 0usize; // in chars
                for line in t.split('\n') {
                    let n = line.chars().count();
                    if !line.trim().is_empty() {
                        let s: CharSpans = given
                            .iter()
                            .filter(|(a, b)| *a >= start && *b <= start + n)
                            .map(|(a, b)| (a - start, b - start))
                            .collect();
                        units.push((line.to_string(), s));
                    }
                    start += n + 1;
                }
            }
            _ => units.push((t.to_string(), given)),
        }
    }
    let mut out = Vec::new();
    let mut buf_ids: Vec<u32> = Vec::new();
    let mut buf_words: Vec<Option<u32>> = Vec::new();
    let mut buf_ents: Vec<Vec<usize>> = Vec::new();
    let mut word_base = 0u32;
    for (text, mut spans) in units {
        if !terms.is_empty() {
            spans.extend(find_terms(&text, terms));
        }
        let piece = encode_plain(tok, &text, Some(&spans))?;
        match cfg.mode {
            InputMode::Document | InputMode::LineByLine => {
                if piece.ids.is_empty() {
                    continue;
                }
                let n = piece.ids.len().min(room);
                let ents = piece
                    .entities
                    .into_iter()
                    .filter(|e| e.iter().all(|&i| i < n))
                    .collect();
                out.push(wrap(&piece.ids[..n], &piece.words[..n], ents, &sp));
            }
            InputMode::Packed => {
                let off = buf_ids.len();
                let max_w = piece.words.iter().flatten().max().map_or(0, |m| m + 1);
                buf_ents.extend(
                    piece
                        .entities
                        .into_iter()
                        .map(|e| e.into_iter().map(|i| i + off).collect()),
                );
                buf_ids.extend(piece.ids);
                buf_words.extend(piece.words.into_iter().map(|w| w.map(|w| w + word_base)));
                word_base += max_w;
                while buf_ids.len() >= room {
                    let ents: Vec<Vec<usize>> = buf_ents
                        .iter()
                        .filter(|e| e.iter().all(|&i| i < room))
                        .cloned()
                        .collect();
                    out.push(wrap(&buf_ids[..room], &buf_words[..room], ents, &sp));
                    buf_ids.drain(..room);
                    buf_words.drain(..room);
                    buf_ents = buf_ents
                        .into_iter()
                        .filter(|e| e.iter().all(|&i| i >= room))
                        .map(|e| e.into_iter().map(|i| i - room).collect())
                        .collect();
                }
            }
        }
    }
    if cfg.mode == InputMode::Packed && out.is_empty() && !buf_ids.is_empty() {
        out.push(wrap(&buf_ids, &buf_words, buf_ents, &sp));
    }
    // Word ids restart per sequence (masking only compares neighbours, but keep them small).
    for s in &mut out {
        let first = s.word_ids.iter().flatten().min().copied().unwrap_or(0);
        for w in s.word_ids.iter_mut().flatten() {
            *w -= first;
        }
    }
    Ok(out)
}

/// A batch of sequences, padded to its longest (dynamic padding) when turned into tensors.
#[derive(Debug, Clone)]
pub struct TextBatch {
    /// The sequences.
    pub seqs: Vec<TokenizedSeq>,
    /// Id of `[PAD]`.
    pub pad_id: u32,
    /// Where tensors go.
    pub device: Device,
}

/// Model inputs as tensors.
#[derive(Debug, Clone)]
pub struct BertInput {
    /// Token ids (B, T), u32.
    pub input_ids: Tensor,
    /// 1 for real tokens, 0 for padding (B, T), f32.
    pub attention_mask: Tensor,
    /// Segment ids (B, T), u32 (all 0 for single texts).
    pub token_type_ids: Tensor,
}

impl TextBatch {
    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
    /// Longest sequence.
    pub fn max_len(&self) -> usize {
        self.seqs.iter().map(|s| s.len()).max().unwrap_or(0)
    }

    /// Tensors for `ids` (one row per sequence, e.g. the masked ids), padded to the longest.
    pub fn tensors_for(&self, ids: &[&[u32]]) -> Result<BertInput> {
        let b = ids.len();
        let t = ids.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let mut flat = vec![self.pad_id; b * t];
        let mut mask = vec![0f32; b * t];
        for (r, s) in ids.iter().enumerate() {
            flat[r * t..r * t + s.len()].copy_from_slice(s);
            mask[r * t..r * t + s.len()]
                .iter_mut()
                .for_each(|m| *m = 1.0);
        }
        Ok(BertInput {
            input_ids: Tensor::from_vec(flat, (b, t), &self.device)?,
            attention_mask: Tensor::from_vec(mask, (b, t), &self.device)?,
            token_type_ids: Tensor::zeros((b, t), DType::U32, &self.device)?,
        })
    }

    /// Tensors of the unmasked sequences.
    pub fn tensors(&self) -> Result<BertInput> {
        let ids: Vec<&[u32]> = self.seqs.iter().map(|s| s.ids.as_slice()).collect();
        self.tensors_for(&ids)
    }
}

/// Sequences in memory, served in a seeded shuffled order per epoch; resumable.
pub struct InMemoryTextSource {
    seqs: Vec<TokenizedSeq>,
    batch_size: usize,
    seed: u64,
    shuffle: bool,
    epoch: u64,
    cursor: usize,
    order: Vec<usize>,
    pad_id: u32,
    device: Device,
}

impl InMemoryTextSource {
    /// A source over `seqs`.
    pub fn new(
        seqs: Vec<TokenizedSeq>,
        batch_size: usize,
        seed: u64,
        shuffle: bool,
        pad_id: u32,
        device: &Device,
    ) -> Result<Self> {
        if seqs.is_empty() {
            return Err(TextError::InvalidInput(
                "no text sequences to train on (empty data or every text empty)".into(),
            ));
        }
        if batch_size == 0 {
            return Err(TextError::Config("batch_size must be at least 1".into()));
        }
        let mut s = InMemoryTextSource {
            order: Vec::new(),
            seqs,
            batch_size,
            seed,
            shuffle,
            epoch: 0,
            cursor: 0,
            pad_id,
            device: device.clone(),
        };
        s.reorder();
        Ok(s)
    }

    fn reorder(&mut self) {
        self.order = (0..self.seqs.len()).collect();
        if self.shuffle {
            let mut rng = SslRng::derived(self.seed ^ self.epoch, "text-order");
            rng.shuffle(&mut self.order);
        }
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    /// True when empty (never, by construction).
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

impl BatchSource<TextBatch> for InMemoryTextSource {
    fn next_batch(&mut self) -> ssl_core::Result<TextBatch> {
        let mut seqs = Vec::with_capacity(self.batch_size);
        while seqs.len() < self.batch_size {
            if self.cursor >= self.order.len() {
                self.epoch += 1;
                self.cursor = 0;
                self.reorder();
            }
            seqs.push(self.seqs[self.order[self.cursor]].clone());
            self.cursor += 1;
        }
        Ok(TextBatch {
            seqs,
            pad_id: self.pad_id,
            device: self.device.clone(),
        })
    }

    fn epoch(&self) -> u64 {
        self.epoch
    }

    fn position(&self) -> Value {
        json!({"epoch": self.epoch, "cursor": self.cursor})
    }

    fn restore(&mut self, position: &Value) -> ssl_core::Result<()> {
        let get = |k: &str| {
            position.get(k).and_then(Value::as_u64).ok_or_else(|| {
                ssl_core::CoreError::InvalidInput(format!(
                    "text source position lacks `{k}`: {position}"
                ))
            })
        };
        self.epoch = get("epoch")?;
        self.cursor = get("cursor")? as usize;
        self.reorder();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::{train_from_texts, TokenizerConfig};

    fn tok() -> Tokenizer {
        let texts: Vec<String> = (0..30)
            .map(|i| {
                format!("the kernel thread {i} sleeps on a wait queue\nmemory barrier number {i}")
            })
            .collect();
        train_from_texts(
            texts.into_iter(),
            &TokenizerConfig {
                vocab_size: 200,
                min_frequency: 1,
                ..Default::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn packed_blocks_are_full_and_wrapped() {
        let t = tok();
        let texts: Vec<String> = (0..20)
            .map(|i| format!("the kernel thread {i} sleeps on a wait queue"))
            .collect();
        let cfg = InputConfig {
            mode: InputMode::Packed,
            max_seq_len: 16,
        };
        let seqs = tokenize_texts(&t, &texts, &cfg, None, &[]).unwrap();
        assert!(seqs.len() > 3);
        for s in &seqs {
            assert_eq!(s.len(), 16);
            assert_eq!(s.ids[0], 2);
            assert_eq!(s.ids[15], 3);
            assert_eq!(s.special.iter().filter(|x| **x).count(), 2);
        }
        // Total tokens conserved up to the dropped tail.
        let all: usize = texts
            .iter()
            .map(|x| t.encode(x.as_str(), false).unwrap().get_ids().len())
            .sum();
        assert!(all - seqs.len() * 14 < 14);
    }

    #[test]
    fn line_by_line_truncates_and_skips_empty_lines() {
        let t = tok();
        let texts =
            vec!["the kernel thread\n\n   \nmemory barrier number 1 2 3 4 5 6 7 8 9".to_string()];
        let cfg = InputConfig {
            mode: InputMode::LineByLine,
            max_seq_len: 6,
        };
        let seqs = tokenize_texts(&t, &texts, &cfg, None, &[]).unwrap();
        assert_eq!(seqs.len(), 2);
        assert!(seqs
            .iter()
            .all(|s| s.len() <= 6 && *s.ids.last().unwrap() == 3));
        assert!(tokenize_texts(
            &t,
            &texts,
            &InputConfig {
                max_seq_len: 2,
                ..cfg
            },
            None,
            &[]
        )
        .is_err());
    }

    #[test]
    fn terms_become_entities_and_padding_is_dynamic() {
        let t = tok();
        let texts = vec!["a wait queue here".to_string(), "kernel".to_string()];
        let cfg = InputConfig {
            mode: InputMode::Document,
            max_seq_len: 64,
        };
        let seqs = tokenize_texts(&t, &texts, &cfg, None, &["wait queue".into()]).unwrap();
        assert_eq!(seqs[0].entities.len(), 1);
        let e = &seqs[0].entities[0];
        let words: Vec<_> = e.iter().map(|&i| seqs[0].word_ids[i]).collect();
        assert!(words.windows(2).all(|w| w[0] <= w[1]));
        let batch = TextBatch {
            seqs,
            pad_id: 0,
            device: Device::Cpu,
        };
        let inp = batch.tensors().unwrap();
        assert_eq!(inp.input_ids.dims(), &[2, batch.max_len()]);
        let m = inp.attention_mask.to_vec2::<f32>().unwrap();
        assert_eq!(m[1].iter().sum::<f32>() as usize, batch.seqs[1].len());
    }

    #[test]
    fn source_resumes_exactly() {
        let seqs: Vec<TokenizedSeq> = (0..10)
            .map(|i| TokenizedSeq {
                ids: vec![2, 10 + i, 3],
                word_ids: vec![None, Some(0), None],
                special: vec![true, false, true],
                entities: vec![],
            })
            .collect();
        let mut a = InMemoryTextSource::new(seqs.clone(), 3, 5, true, 0, &Device::Cpu).unwrap();
        for _ in 0..4 {
            a.next_batch().unwrap();
        }
        let pos = a.position();
        let mut b = InMemoryTextSource::new(seqs, 3, 5, true, 0, &Device::Cpu).unwrap();
        b.restore(&pos).unwrap();
        for _ in 0..5 {
            assert_eq!(a.next_batch().unwrap().seqs, b.next_batch().unwrap().seqs);
        }
    }
}
