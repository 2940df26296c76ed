//! A trained text model loaded back (from a run's checkpoint or a Hugging Face directory),
//! and `embed`: pooled document embeddings written to Parquet.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use ssl_core::checkpoint::MODEL_FILE;
use ssl_core::nn::MatmulPrecision;
use ssl_core::run_dir;
use ssl_core::{parse_device, Ctx, ParamStore, SslRng};
use ssl_data::{DataLoader, EmbedSummary, EmbeddingWriter, LoaderConfig, ParquetSource};
use tokenizers::Tokenizer;

use super::config::TextConfig;
use super::docs::{doc_columns, docs_of_batch};
use super::stream::RowFilter;
use crate::{
    check_vocab, load_hf_dir, load_tokenizer, tokenize_texts, BertForMaskedLM, InputConfig,
    InputMode, Result, SpecialIds, TextBatch, TokenizedSeq,
};

/// Whether `dir` is a Hugging Face model directory (it has a `config.json`).
fn is_hf_dir(dir: &Path) -> bool {
    dir.join("config.json").is_file()
}

/// The checkpoint directory of `checkpoint` (a run directory or one checkpoint directory)
/// and the configuration stored with it. A Hugging Face directory (with `config.json`) is
/// returned as is with the default configuration, for evaluating a model before adaptation.
pub fn stored_config(checkpoint: &Path) -> Result<(PathBuf, TextConfig)> {
    if is_hf_dir(checkpoint) {
        return Ok((checkpoint.to_path_buf(), TextConfig::default()));
    }
    Ok(run_dir::stored_config(checkpoint, "text")?)
}

/// A trained model ready to embed or evaluate: its configuration, tokenizer and weights.
pub struct TextModel {
    /// The configuration it runs with.
    pub cfg: TextConfig,
    /// The checkpoint (or Hugging Face) directory it was loaded from.
    pub ckpt: PathBuf,
    /// Its tokenizer.
    pub tok: Tokenizer,
    /// The model, pooling set from `cfg.embed`.
    pub model: BertForMaskedLM,
    /// The device it lives on (`train.device`).
    pub device: Device,
}

impl TextModel {
    /// Loads the model of checkpoint directory `ckpt` configured by `cfg` (see
    /// [`stored_config`]): the tokenizer `tokenizer.file` and the weights of
    /// `ckpt/model.safetensors`, or everything from a Hugging Face directory.
    pub fn load(ckpt: &Path, cfg: &TextConfig) -> Result<Self> {
        let cfg = cfg.clone();
        let device = parse_device(&cfg.train.device)?;
        let layer = (cfg.embed.layer >= 0).then_some(cfg.embed.layer as usize);
        if is_hf_dir(ckpt) {
            let hf = load_hf_dir(ckpt, cfg.masking, cfg.train.seed, &device)?;
            let mut model = hf.model;
            model.set_pooling(cfg.embed.pooling, layer)?;
            return Ok(TextModel {
                cfg,
                ckpt: ckpt.to_path_buf(),
                tok: hf.tokenizer,
                model,
                device,
            });
        }
        let tok_path = Path::new(&cfg.tokenizer.file);
        let tok = load_tokenizer(tok_path)?;
        check_vocab(&tok, tok_path, cfg.model.config.vocab_size, false)?;
        let sp = SpecialIds::of(&tok)?;
        let store = ParamStore::new(&device);
        let mut model =
            BertForMaskedLM::new(&cfg.model.config, cfg.masking, sp.mask, &store.builder(0))?;
        store.load_safetensors(&ckpt.join(MODEL_FILE))?;
        model.set_pooling(cfg.embed.pooling, layer)?;
        Ok(TextModel {
            cfg,
            ckpt: ckpt.to_path_buf(),
            tok,
            model,
            device,
        })
    }

    /// The same model with fresh weights: a randomly initialised BERT of this model's
    /// configuration (initialised as a pretraining run seeded with `seed` starts), with the
    /// same tokenizer, pooling and layer. The baseline of an evaluation.
    pub fn random_init(&self, seed: u64) -> Result<Self> {
        let sp = SpecialIds::of(&self.tok)?;
        let store = ParamStore::new(&self.device);
        let bert_cfg = self.model.bert().config().clone();
        let mut model =
            BertForMaskedLM::new(&bert_cfg, self.cfg.masking, sp.mask, &store.builder(seed))?;
        let layer = (self.cfg.embed.layer >= 0).then_some(self.cfg.embed.layer as usize);
        model.set_pooling(self.cfg.embed.pooling, layer)?;
        Ok(TextModel {
            cfg: self.cfg.clone(),
            ckpt: self.ckpt.clone(),
            tok: self.tok.clone(),
            model,
            device: self.device.clone(),
        })
    }

    /// Embeddings of whole documents (one sequence each, truncated to `input.max_seq_len`),
    /// in evaluation mode, with a progress bar: the row-major values and the embedding width.
    pub fn embed_texts(&self, texts: &[String]) -> Result<(Vec<f32>, usize)> {
        self.embed_documents(texts, true)
    }

    /// [`TextModel::embed_texts`] without a progress bar (the caller shows its own).
    pub fn embed_quietly(&self, texts: &[String]) -> Result<(Vec<f32>, usize)> {
        self.embed_documents(texts, false)
    }

    /// [`embed_documents`] with this model, its configuration and device, and the run's
    /// `train.matmul_precision` where it is not slower on this machine
    /// ([`ssl_core::inference_precision`]).
    fn embed_documents(&self, texts: &[String], progress: bool) -> Result<(Vec<f32>, usize)> {
        let precision = ssl_core::inference_precision(&self.cfg.train, &self.device);
        embed_documents(
            &self.model,
            &self.tok,
            texts,
            &self.cfg,
            &self.device,
            precision,
            progress,
        )
    }
}

/// The sequence of one document truncated to `input.max_seq_len` (document mode), as
/// [`tokenize_texts`] makes it, without tokenizing the whole of a long document: a prefix cut
/// at a whitespace (pre-tokenizers split there, so the prefix's tokens are the document's
/// first tokens) is tokenized first, and the whole text only when the prefix does not fill the
/// sequence. `None` for a document without tokens.
pub(super) fn document_seq(
    tok: &Tokenizer,
    text: &str,
    input: &InputConfig,
) -> Result<Option<TokenizedSeq>> {
    let one = |t: &str| -> Result<Option<TokenizedSeq>> {
        Ok(tokenize_texts(tok, &[t], input, None, &[])?
            .into_iter()
            .next())
    };
    let max_bytes = input.max_seq_len.saturating_mul(16).saturating_add(64);
    if text.len() > max_bytes {
        let mut cut = max_bytes;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        if let Some(ws) = text[..cut].rfind(char::is_whitespace) {
            if let Some(seq) = one(&text[..ws])? {
                if seq.len() >= input.max_seq_len {
                    return Ok(Some(seq));
                }
            }
        }
    }
    one(text)
}

/// Embeddings of whole documents with `model` (any BERT, such as the one being trained):
/// one sequence each, tokenized by `tok` and truncated to `cfg.input.max_seq_len`, batches of
/// `cfg.train.batch_size` (at least 16), in inference mode with products in `precision` (a
/// run's own during training; [`ssl_core::inference_precision`] of `train.matmul_precision`
/// for a stored model), pooled as the model is set to pool. Returns the row-major values and the embedding width;
/// shows a progress bar only with `progress` (not while a training progress line is showing).
pub fn embed_documents(
    model: &BertForMaskedLM,
    tok: &Tokenizer,
    texts: &[String],
    cfg: &TextConfig,
    device: &Device,
    precision: MatmulPrecision,
    progress: bool,
) -> Result<(Vec<f32>, usize)> {
    let input = InputConfig {
        mode: InputMode::Document,
        max_seq_len: cfg.input.max_seq_len,
    };
    let sp = SpecialIds::of(tok)?;
    let mut out = Vec::new();
    let mut dim = model.bert().config().hidden_size;
    let mut rng = SslRng::new(0);
    let bs = cfg.train.batch_size.max(16);
    let bar =
        progress.then(|| ssl_core::monitor::Progress::task("embed", texts.len() as u64, "texts"));
    for chunk in texts.chunks(bs) {
        // Empty texts still get a row ([CLS] [SEP]).
        let mut seqs = Vec::with_capacity(chunk.len());
        for t in chunk {
            seqs.push(document_seq(tok, t, &input)?.unwrap_or(TokenizedSeq {
                ids: vec![sp.cls, sp.sep],
                word_ids: vec![None, None],
                special: vec![true, true],
                entities: vec![],
            }));
        }
        let batch = TextBatch {
            seqs,
            pad_id: sp.pad,
            device: device.clone(),
        };
        let mut ctx = Ctx::inference(&mut rng).with_precision(precision);
        let e = ssl_core::PretextTask::embed(model, &batch, &mut ctx)?;
        dim = e.dim(1)?;
        out.extend(e.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        if let Some(b) = &bar {
            b.inc(chunk.len() as u64);
        }
    }
    if let Some(b) = bar {
        b.finish();
    }
    Ok((out, dim))
}

/// A one-epoch, file-order loader over the documents of `source` (with `label` and, with
/// `entities`, the entity spans), in batches of `rows` rows, and the `data.max_docs` sample of
/// `cfg` (seeded by `train.seed`).
pub(super) fn doc_loader(
    source: &ParquetSource,
    cfg: &TextConfig,
    label: Option<&str>,
    entities: bool,
    rows: usize,
) -> Result<(DataLoader, RowFilter)> {
    let loader = LoaderConfig {
        columns: doc_columns(&cfg.data, label, entities),
        batch_size: rows.max(1),
        shuffle: false,
        epochs: Some(1),
        skip_bad_rows: cfg.data.skip_bad_rows,
        prefetch: 2,
        ..LoaderConfig::default()
    };
    let filter = RowFilter::new(&cfg.data, cfg.train.seed, source.num_rows());
    Ok((DataLoader::new(source, loader)?, filter))
}

/// Says on stderr how many rows a loader skipped under `data.skip_bad_rows`.
pub(super) fn report_bad_rows(loader: &DataLoader) {
    let bad = loader.bad_rows();
    if bad.count > 0 {
        eprintln!("skipped {} bad rows: {bad}", bad.count);
    }
}

/// Embeds the documents of `data` with the model of checkpoint directory `ckpt` configured
/// by `cfg` (see [`stored_config`]; pooling and layer from `embed`) and writes `(id,
/// embedding)` rows to the Parquet file `out`, with the model, checkpoint, pooling and layer
/// in its metadata. The documents are streamed in file order and the embeddings written in
/// row groups as they are computed: memory does not grow with the number of rows. The rows
/// are those of the `data.max_docs` sample (all when 0).
pub fn embed(ckpt: &Path, cfg: &TextConfig, data: &[String], out: &Path) -> Result<EmbedSummary> {
    let l = TextModel::load(ckpt, cfg)?;
    let source = ParquetSource::open(data)?;
    let rows = l.cfg.train.batch_size.max(16) * 4;
    let (mut loader, filter) = doc_loader(&source, &l.cfg, None, false, rows)?;
    let mut meta = BTreeMap::new();
    meta.insert("model".to_string(), "ssl-text BertForMaskedLM".to_string());
    meta.insert("checkpoint".to_string(), l.ckpt.display().to_string());
    meta.insert(
        "pooling".to_string(),
        format!("{:?}", l.cfg.embed.pooling).to_lowercase(),
    );
    meta.insert("layer".to_string(), l.cfg.embed.layer.to_string());
    let bar = ssl_core::monitor::Progress::task("embed", source.num_rows() as u64, "rows");
    let mut writer: Option<EmbeddingWriter> = None;
    while let Some(batch) = loader.next_batch()? {
        let docs = docs_of_batch(&batch, batch.rows(), &l.cfg.data, None, false, |i| {
            filter.sampled(i)
        })?;
        bar.inc(batch.len() as u64);
        if docs.texts.is_empty() {
            continue;
        }
        let (emb, dim) = l.embed_quietly(&docs.texts)?;
        if writer.is_none() {
            writer = Some(EmbeddingWriter::create(out, dim, meta.clone())?);
        }
        if let Some(w) = writer.as_mut() {
            w.write(&docs.ids, &emb)?;
        }
    }
    bar.finish();
    report_bad_rows(&loader);
    let writer = match writer {
        Some(w) => w,
        None => EmbeddingWriter::create(out, l.model.bert().config().hidden_size, meta)?,
    };
    let dim = writer.dim();
    let rows = writer.finish()?;
    Ok(EmbedSummary {
        out: out.to_path_buf(),
        rows,
        dim,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{train_from_texts, TokenizerConfig, TokenizerKind};

    #[test]
    fn a_long_document_gives_the_sequence_of_its_whole_text() {
        let words = [
            "kernel",
            "page-cache",
            "écrit",
            "workqueue",
            "x",
            "irq_handler()",
        ];
        let long: String = (0..3000)
            .map(|i| format!("{}{}", words[i % 6], if i % 7 == 0 { "\n\t" } else { "  " }))
            .collect();
        let short = "a short kernel document".to_string();
        for kind in [
            TokenizerKind::Bpe,
            TokenizerKind::WordPiece,
            TokenizerKind::Unigram,
        ] {
            let cfg = TokenizerConfig {
                kind,
                vocab_size: 200,
                ..TokenizerConfig::default()
            };
            let tok = train_from_texts([long.as_str(), short.as_str()].iter(), &cfg).unwrap();
            for max_seq_len in [8, 64, 300] {
                let input = InputConfig {
                    mode: InputMode::Document,
                    max_seq_len,
                };
                for text in [&long, &short] {
                    let whole = tokenize_texts(&tok, &[text], &input, None, &[]).unwrap();
                    let fast = document_seq(&tok, text, &input).unwrap();
                    assert_eq!(fast.as_ref(), whole.first(), "{kind:?} {max_seq_len}");
                }
            }
        }
    }
}
