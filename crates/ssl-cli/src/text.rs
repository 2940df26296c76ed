//! The `text` modality: tokenizer training, BERT masked-LM pretraining (from scratch or
//! adapted from a Hugging Face directory), embeddings and evaluation (held-out perplexity,
//! masked accuracy, linear probe / k-NN).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde_json::json;
use ssl_core::checkpoint::{CheckpointManager, MODEL_FILE};
use ssl_core::probe::{
    fit_linear_probe, knn_accuracy, stratified_split, KnnConfig, LinearProbeConfig,
};
use ssl_core::{
    parse_device, Ctx, LoopTrainer, ParamStore, PretextTask, SslRng, StopFlag, Trainer,
};
use ssl_data::{read_all, ColumnSpec, EmbeddingWriter, ReadOptions};
use ssl_text::{
    evaluate_mlm, export_hf_dir, load_hf_dir, load_tokenizer, save_tokenizer, tokenize_texts,
    train_from_parquet, train_from_texts, BertConfig, BertForMaskedLM, CharSpans,
    InMemoryTextSource, InputConfig, InputMode, MlmEval, SpecialIds, TextBatch, TokenizedSeq,
    TokenizerConfig,
};
use tokenizers::Tokenizer;

use crate::parallel::Parallel;
use crate::{config, CliError};

/// The embedded default corpus: 120 licence texts of the SPDX licence list (CC0).
const EMBEDDED: &[u8] = include_bytes!("../data/spdx_licenses_sample.parquet");

fn text_err(e: ssl_text::TextError) -> CliError {
    CliError::Config(e.to_string())
}

pub use ssl_text::{DataConfig, TextConfig};

/// Whether row `i` is held out: a seeded hash of the index, so streaming readers agree.
pub fn is_heldout(i: usize, seed: u64, fraction: f64) -> bool {
    if fraction <= 0.0 {
        return false;
    }
    let mut z = (i as u64) ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z as f64 / u64::MAX as f64) < fraction
}

struct Docs {
    texts: Vec<String>,
    ids: Vec<String>,
    labels: Option<Vec<String>>,
    /// Entity character spans per document (`data.entity_column`), when read.
    entities: Option<Vec<CharSpans>>,
    /// Each document's global row index in the source (files in order, rows in file order).
    rows: Vec<usize>,
}

/// Parses one row of `data.entity_column`: JSON `[[start, end], ...]` in characters.
fn parse_spans(cell: &str, column: &str, row: usize) -> Result<CharSpans, CliError> {
    if cell.trim().is_empty() {
        return Ok(Vec::new());
    }
    let spans: Vec<(usize, usize)> = serde_json::from_str(cell).map_err(|e| {
        CliError::Config(format!(
            "column {column:?}, row {row}: entity spans must be JSON [[start, end], ...] \
             (character offsets): {e}"
        ))
    })?;
    if let Some((s, e)) = spans.iter().find(|(s, e)| s >= e) {
        return Err(CliError::Config(format!(
            "column {column:?}, row {row}: entity span [{s}, {e}] is empty or reversed"
        )));
    }
    Ok(spans)
}

/// Reads the text column (and the id, label and, with `entities`, the entity-span columns).
fn read_docs(
    paths: &[String],
    cfg: &DataConfig,
    label: Option<&str>,
    entities: bool,
) -> Result<Docs, CliError> {
    read_docs_of(paths, cfg, label, entities, None)
}

/// [`read_docs`] for this rank's share of the rows when `par` is given (every row otherwise).
/// `data.max_docs` counts global row indices: the documents kept are the rows whose index in
/// the whole source is below it, whichever rank reads them.
fn read_docs_of(
    paths: &[String],
    cfg: &DataConfig,
    label: Option<&str>,
    entities: bool,
    par: Option<&Parallel>,
) -> Result<Docs, CliError> {
    let entities = entities && !cfg.entity_column.is_empty();
    let mut cols = vec![ColumnSpec::text(&cfg.column)];
    if !cfg.id_column.is_empty() {
        cols.push(ColumnSpec::text(&cfg.id_column));
    }
    if let Some(l) = label {
        cols.push(ColumnSpec::text(l));
    }
    if entities {
        cols.push(ColumnSpec::text(&cfg.entity_column));
    }
    let options = par.map_or_else(ReadOptions::default, |p| p.read_options(false));
    let table = read_all(paths, &cols, &options)?;
    if let Some(p) = par {
        p.report_share(&table.share, table.row_index.len(), "documents");
    }
    // Positions (in this table) of the rows kept under `max_docs`, in order.
    let keep: Vec<usize> = (0..table.row_index.len())
        .filter(|&k| cfg.max_docs == 0 || table.row_index[k] < cfg.max_docs)
        .collect();
    let pick = |v: &[String]| -> Vec<String> { keep.iter().map(|&k| v[k].clone()).collect() };
    let texts = pick(table.batch.text(&cfg.column)?);
    let rows: Vec<usize> = keep.iter().map(|&k| table.row_index[k]).collect();
    let ids: Vec<String> = if cfg.id_column.is_empty() {
        rows.iter().map(|i| i.to_string()).collect()
    } else {
        pick(table.batch.text(&cfg.id_column)?)
    };
    let labels = match label {
        Some(l) => Some(pick(table.batch.text(l)?)),
        None => None,
    };
    let spans = if entities {
        let col = &cfg.entity_column;
        let cells = table.batch.text(col)?;
        Some(
            keep.iter()
                .map(|&k| parse_spans(&cells[k], col, table.row_index[k]))
                .collect::<Result<Vec<_>, _>>()?,
        )
    } else {
        None
    };
    Ok(Docs {
        texts,
        ids,
        labels,
        entities: spans,
        rows,
    })
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CliError + '_ {
    move |e| CliError::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// Writes the embedded corpus to a temporary directory and returns its path.
fn embedded(dir: &tempfile::TempDir) -> Result<Vec<String>, CliError> {
    let p = dir.path().join("spdx_licenses_sample.parquet");
    std::fs::write(&p, EMBEDDED).map_err(io(&p))?;
    eprintln!("no --data given: training on the embedded sample (120 SPDX licence texts, CC0)");
    Ok(vec![p.to_string_lossy().into_owned()])
}

fn tempdir() -> Result<tempfile::TempDir, CliError> {
    tempfile::tempdir().map_err(|e| CliError::Io {
        path: std::env::temp_dir(),
        source: e,
    })
}

/// `ssl tokenizer train`.
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
    let t0 = std::time::Instant::now();
    let tok = train_from_parquet(data, column, &cfg, |_| false).map_err(text_err)?;
    let path = save_tokenizer(&tok, out).map_err(text_err)?;
    eprintln!(
        "trained a {:?} tokenizer of {} tokens in {:.1}s: {}",
        cfg.kind,
        tok.get_vocab_size(true),
        t0.elapsed().as_secs_f64(),
        path.display()
    );
    if !heldout.is_empty() {
        let docs = read_docs(
            heldout,
            &DataConfig {
                column: column.into(),
                ..Default::default()
            },
            None,
            false,
        )?;
        let f = ssl_text::fertility(&tok, &docs.texts).map_err(text_err)?;
        let mut report = json!({"tokenizer": path.display().to_string(), "heldout_docs": docs.texts.len(), "fertility": f});
        if let Some(g) = generic {
            let gt = load_tokenizer(g).map_err(text_err)?;
            let gf = ssl_text::fertility(&gt, &docs.texts).map_err(text_err)?;
            if let Some(m) = report.as_object_mut() {
                m.insert("generic_tokenizer".into(), json!(g.display().to_string()));
                m.insert("generic_fertility".into(), json!(gf));
            }
        }
        println!("{report}");
    }
    Ok(())
}

/// Builds the model of a configuration: from `init_from`, or fresh with the tokenizer's vocabulary.
fn build_model(
    cfg: &mut TextConfig,
    tok: &Tokenizer,
    device: &Device,
) -> Result<(ParamStore, BertForMaskedLM), CliError> {
    let sp = SpecialIds::of(tok).map_err(text_err)?;
    if !cfg.model.init_from.is_empty() {
        let hf = load_hf_dir(
            Path::new(&cfg.model.init_from),
            cfg.masking,
            cfg.train.seed,
            device,
        )
        .map_err(text_err)?;
        eprintln!(
            "loaded {} ({}); MLM head {}; unused checkpoint tensors: {:?}",
            cfg.model.init_from,
            format_args!(
                "{} layers x {}",
                hf.config.num_hidden_layers, hf.config.hidden_size
            ),
            if hf.fresh_head {
                "freshly initialised"
            } else {
                "from the checkpoint"
            },
            hf.unused
        );
        cfg.model.config = hf.config.clone();
        cfg.model.preset.clear();
        return Ok((hf.store, hf.model));
    }
    if !cfg.model.preset.is_empty() {
        let p = BertConfig::preset(&cfg.model.preset, 0).map_err(text_err)?;
        let c = &mut cfg.model.config;
        c.hidden_size = p.hidden_size;
        c.num_hidden_layers = p.num_hidden_layers;
        c.num_attention_heads = p.num_attention_heads;
        c.intermediate_size = p.intermediate_size;
        cfg.model.preset.clear();
    }
    cfg.model.config.vocab_size = tok.get_vocab_size(true);
    cfg.model.config.pad_token_id = sp.pad;
    let store = ParamStore::new(device);
    let model = BertForMaskedLM::new(
        &cfg.model.config,
        cfg.masking,
        sp.mask,
        &store.builder(cfg.train.seed),
    )
    .map_err(text_err)?;
    Ok((store, model))
}

fn tokenize(
    tok: &Tokenizer,
    texts: &[String],
    entities: Option<&[CharSpans]>,
    cfg: &TextConfig,
) -> Result<Vec<TokenizedSeq>, CliError> {
    tokenize_texts(tok, texts, &cfg.input, entities, &cfg.data.entity_terms).map_err(text_err)
}

/// The tokenizer of a pretraining run: the checkpoint's (`model.init_from`), a given file,
/// the run's own on resume, or a new one trained on the training documents: streamed from
/// `paths` (skipping held-out rows and rows past `data.max_docs`) when `docs` is `None`,
/// else trained on `docs`.
fn make_tokenizer(
    cfg: &TextConfig,
    paths: &[String],
    tok_path: &Path,
    resume: bool,
    docs: Option<&[String]>,
) -> Result<Tokenizer, CliError> {
    if !cfg.model.init_from.is_empty() {
        return load_tokenizer(&Path::new(&cfg.model.init_from).join("tokenizer.json"))
            .map_err(text_err);
    }
    if !cfg.tokenizer.file.is_empty() {
        return load_tokenizer(Path::new(&cfg.tokenizer.file)).map_err(text_err);
    }
    if resume && tok_path.is_file() {
        return load_tokenizer(tok_path).map_err(text_err);
    }
    let (seed, frac, max_docs) = (cfg.train.seed, cfg.data.heldout_fraction, cfg.data.max_docs);
    let train_cfg = TokenizerConfig {
        max_docs: 0,
        ..cfg.tokenizer.train.clone()
    };
    let t0 = std::time::Instant::now();
    let tok = match docs {
        None => train_from_parquet(paths, &cfg.data.column, &train_cfg, move |i| {
            is_heldout(i, seed, frac) || (max_docs > 0 && i >= max_docs)
        }),
        Some(d) => train_from_texts(d.iter(), &train_cfg),
    }
    .map_err(text_err)?;
    eprintln!(
        "trained a {:?} tokenizer ({} tokens) in {:.1}s{}",
        cfg.tokenizer.train.kind,
        tok.get_vocab_size(true),
        t0.elapsed().as_secs_f64(),
        docs.map(|d| format!(" on rank 0's {} training documents", d.len()))
            .unwrap_or_default()
    );
    Ok(tok)
}

/// A tokenizer from its `tokenizer.json` text, set up as [`load_tokenizer`] sets up a file.
pub(crate) fn tokenizer_from_json(json: &[u8]) -> Result<Tokenizer, CliError> {
    let bad = |e: String| CliError::Config(format!("the tokenizer sent by rank 0: {e}"));
    let text = std::str::from_utf8(json).map_err(|e| bad(e.to_string()))?;
    let mut tok: Tokenizer = text.parse().map_err(|e| bad(format!("{e}")))?;
    tok.with_padding(None);
    tok.with_truncation(None).map_err(|e| bad(format!("{e}")))?;
    Ok(tok)
}

/// Held-out masked-LM evaluation. With several ranks every rank evaluates its own sequences
/// and the sums (cross-entropy over masked tokens, masked tokens, correct predictions) are
/// added over ranks, so the figures cover the held-out documents of all ranks. Every rank must
/// call it (it is collective).
fn heldout_eval(
    par: &Parallel,
    model: &BertForMaskedLM,
    seqs: &[TokenizedSeq],
    batch_size: usize,
    pad: u32,
    seed: u64,
    device: &Device,
) -> Result<MlmEval, CliError> {
    if par.world == 1 {
        return evaluate_mlm(model, seqs, batch_size, pad, seed, device).map_err(text_err);
    }
    let local = if seqs.is_empty() {
        Ok(None)
    } else {
        evaluate_mlm(model, seqs, batch_size, pad, seed, device).map(Some)
    };
    let sums = match &local {
        Ok(Some(e)) => {
            let n = e.masked_tokens as f64;
            [e.loss * n, n, e.masked_accuracy * n, 0.0]
        }
        Ok(None) => [0.0; 4],
        Err(_) => [0.0, 0.0, 0.0, 1.0],
    };
    let sums = par.sum_f64(&sums)?;
    if let Err(e) = local {
        return Err(text_err(e));
    }
    if sums[3] > 0.0 {
        return Err(CliError::Config(format!(
            "held-out evaluation failed on {} other rank(s)",
            sums[3] as usize
        )));
    }
    let n = sums[1];
    if n == 0.0 {
        return Err(CliError::Config(
            "no maskable token in the held-out data of any rank".into(),
        ));
    }
    let loss = sums[0] / n.round();
    Ok(MlmEval {
        loss,
        perplexity: loss.exp(),
        masked_accuracy: sums[2].round() / n.round(),
        masked_tokens: n.round() as usize,
    })
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
    let mut cfg: TextConfig = config::resolve(&TextConfig::default(), base.as_deref(), set)?;
    cfg.train.validate()?;
    cfg.masking.validate().map_err(text_err)?;
    let device = parse_device(&cfg.train.device)?;
    let (mut par, device) = Parallel::init(device)?;
    let _tmp;
    let paths = if data.is_empty() {
        let d = tempdir()?;
        let p = embedded(&d)?;
        _tmp = d;
        p
    } else {
        data.to_vec()
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    // Each rank reads its share of the rows; the held-out split and `max_docs` use global row
    // indices, so together the ranks hold out exactly the documents one process would.
    let docs = read_docs_of(&paths, &cfg.data, None, true, Some(&par))?;
    let (seed, frac) = (cfg.train.seed, cfg.data.heldout_fraction);
    let (mut train_docs, mut held_docs) = (Vec::new(), Vec::new());
    let (mut train_ents, mut held_ents) = (Vec::new(), Vec::new());
    let with_ents = docs.entities.is_some();
    let mut ents = docs.entities.map(|e| e.into_iter());
    for (t, &i) in docs.texts.into_iter().zip(&docs.rows) {
        let e = ents.as_mut().and_then(|e| e.next()).unwrap_or_default();
        if is_heldout(i, seed, frac) {
            held_docs.push(t);
            held_ents.push(e);
        } else {
            train_docs.push(t);
            train_ents.push(e);
        }
    }
    // Tokenizer: the checkpoint's, a given file, or trained on the training documents. With
    // several ranks rank 0 alone makes it (training on its own share of the training
    // documents) and sends it to the others, so every rank uses the same one.
    let tok_path = out.join("tokenizer.json");
    let tok = if par.world == 1 {
        make_tokenizer(&cfg, &paths, &tok_path, resume, None)?
    } else {
        let json = if par.is_main() {
            let tok = make_tokenizer(&cfg, &paths, &tok_path, resume, Some(&train_docs))?;
            tok.to_string(false)
                .map_err(|e| CliError::Config(format!("cannot serialise the tokenizer: {e}")))?
                .into_bytes()
        } else {
            Vec::new()
        };
        tokenizer_from_json(&par.broadcast_bytes(json)?)?
    };
    if par.is_main() {
        save_tokenizer(&tok, out).map_err(text_err)?;
        cfg.tokenizer.file = std::fs::canonicalize(&tok_path)
            .map_err(io(&tok_path))?
            .to_string_lossy()
            .into_owned();
    }
    let sp = SpecialIds::of(&tok).map_err(text_err)?;
    let (store, model) = build_model(&mut cfg, &tok, &device)?;
    if par.is_main() {
        config::write_run_config(out, &config::to_toml(&cfg)?)?;
    }

    let train_seqs = tokenize(
        &tok,
        &train_docs,
        with_ents.then_some(&train_ents[..]),
        &cfg,
    )?;
    let mut held_seqs = tokenize(&tok, &held_docs, with_ents.then_some(&held_ents[..]), &cfg)?;
    if cfg.data.heldout_max_seqs > 0 {
        // With several ranks each evaluates at most its part of the cap.
        held_seqs.truncate(cfg.data.heldout_max_seqs.div_ceil(par.world));
    }
    eprintln!(
        "{} training documents -> {} sequences; {} held-out documents -> {} sequences; BERT {} layers x {} ({} parameters)",
        train_docs.len(),
        train_seqs.len(),
        held_docs.len(),
        held_seqs.len(),
        cfg.model.config.num_hidden_layers,
        cfg.model.config.hidden_size,
        store.num_elements()
    );
    let eval_bs = cfg.train.batch_size.max(8);
    let held_total = par.sum_f64(&[held_seqs.len() as f64])?[0];
    let evaluate =
        |par: &Parallel| heldout_eval(par, &model, &held_seqs, eval_bs, sp.pad, seed, &device);
    let before = if held_total == 0.0 || resume {
        None
    } else {
        Some(evaluate(&par)?)
    };
    if let (Some(b), true) = (&before, par.is_main()) {
        eprintln!(
            "held-out before training: perplexity {:.2}, masked accuracy {:.4}",
            b.perplexity, b.masked_accuracy
        );
    }
    let mut source = InMemoryTextSource::new(
        train_seqs,
        cfg.train.batch_size,
        seed,
        true,
        sp.pad,
        &device,
    )
    .map_err(text_err)?;
    let run_config = serde_json::to_value(&cfg).map_err(|e| CliError::Config(e.to_string()))?;
    let mut trainer = LoopTrainer::new(cfg.train.clone(), Some(out.to_path_buf()))?
        .resume(resume)
        .run_config(run_config)
        .stop_flag(StopFlag::from_signals()?)
        .progress(true)
        .collective(par.take());
    let report = trainer.fit(&model, &mut source, None)?;
    if par.is_main() && !report.params_without_grad.is_empty() {
        eprintln!(
            "warning: parameters without gradient: {:?}",
            report.params_without_grad
        );
    }
    // Held-out perplexity of every kept checkpoint (and of the initial model): the curve.
    // With several ranks rank 0 loads each checkpoint and sends its weights to the others;
    // every rank evaluates its held-out share and the sums are added up.
    let mut curve = Vec::new();
    if let Some(b) = &before {
        curve.push(json!({"step": 0, "perplexity": b.perplexity, "loss": b.loss, "masked_accuracy": b.masked_accuracy}));
    }
    if held_total > 0.0 {
        let kept = if par.is_main() {
            CheckpointManager::new(out.join("checkpoints"), cfg.train.keep_checkpoints).list()?
        } else {
            Vec::new()
        };
        let steps: Vec<u64> = if par.world == 1 {
            kept.iter().map(|(s, _)| *s).collect()
        } else {
            let list = serde_json::to_vec(&kept.iter().map(|(s, _)| *s).collect::<Vec<_>>())
                .map_err(|e| CliError::Config(e.to_string()))?;
            serde_json::from_slice(&par.broadcast_bytes(list)?)
                .map_err(|e| CliError::Config(format!("checkpoint steps from rank 0: {e}")))?
        };
        for (k, &step) in steps.iter().enumerate() {
            if let Some((_, dir)) = kept.get(k) {
                store.load_safetensors(&dir.join(MODEL_FILE))?;
            }
            par.broadcast_params(&store)?;
            let e = evaluate(&par)?;
            if par.is_main() {
                eprintln!(
                    "held-out at step {step}: perplexity {:.2}, masked accuracy {:.4}",
                    e.perplexity, e.masked_accuracy
                );
            }
            curve.push(json!({"step": step, "perplexity": e.perplexity, "loss": e.loss, "masked_accuracy": e.masked_accuracy}));
        }
        if par.is_main() {
            let p = out.join("heldout.jsonl");
            let text: String = curve.iter().map(|v| format!("{v}\n")).collect();
            std::fs::write(&p, text).map_err(io(&p))?;
        }
    }
    if !par.is_main() {
        return Ok(());
    }
    // The newest weights, exported for transformers.
    if let Some(ck) = &report.last_checkpoint {
        store.load_safetensors(&ck.join(MODEL_FILE))?;
    }
    let hf = out.join("hf");
    export_hf_dir(&cfg.model.config, &store, &tok, &hf).map_err(text_err)?;
    let first = report.losses.first().map(|(_, l)| *l).unwrap_or(f64::NAN);
    let last = report.losses.last().map(|(_, l)| *l).unwrap_or(f64::NAN);
    eprintln!(
        "done: step {} (loss {first:.4} -> {last:.4}); checkpoint {}; Hugging Face export {}",
        report.step,
        report
            .last_checkpoint
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        hf.display()
    );
    Ok(())
}

struct Loaded {
    cfg: TextConfig,
    ckpt: PathBuf,
    tok: Tokenizer,
    model: BertForMaskedLM,
    device: Device,
}

/// Loads a run's model: its stored configuration, tokenizer and weights. A Hugging Face
/// directory (with config.json) works too, for evaluating a checkpoint before adaptation.
fn load_model(checkpoint: &Path, set: &[String]) -> Result<Loaded, CliError> {
    if checkpoint.join("config.json").is_file() {
        let cfg: TextConfig = config::resolve(&TextConfig::default(), None, set)?;
        let device = parse_device(&cfg.train.device)?;
        let hf = load_hf_dir(checkpoint, cfg.masking, cfg.train.seed, &device).map_err(text_err)?;
        let mut model = hf.model;
        model
            .set_pooling(cfg.embed.pooling, layer_of(&cfg))
            .map_err(text_err)?;
        return Ok(Loaded {
            cfg,
            ckpt: checkpoint.to_path_buf(),
            tok: hf.tokenizer,
            model,
            device,
        });
    }
    let (ckpt, cfg): (PathBuf, TextConfig) = config::from_checkpoint(checkpoint, "text", set)?;
    let device = parse_device(&cfg.train.device)?;
    let tok = load_tokenizer(Path::new(&cfg.tokenizer.file)).map_err(text_err)?;
    let sp = SpecialIds::of(&tok).map_err(text_err)?;
    let store = ParamStore::new(&device);
    let mut model =
        BertForMaskedLM::new(&cfg.model.config, cfg.masking, sp.mask, &store.builder(0))
            .map_err(text_err)?;
    store.load_safetensors(&ckpt.join(MODEL_FILE))?;
    model
        .set_pooling(cfg.embed.pooling, layer_of(&cfg))
        .map_err(text_err)?;
    Ok(Loaded {
        cfg,
        ckpt,
        tok,
        model,
        device,
    })
}

fn layer_of(cfg: &TextConfig) -> Option<usize> {
    (cfg.embed.layer >= 0).then_some(cfg.embed.layer as usize)
}

/// Embeddings of whole documents (one sequence each, truncated), in evaluation mode.
fn embed_docs(l: &Loaded, texts: &[String]) -> Result<(Vec<f32>, usize), CliError> {
    let input = InputConfig {
        mode: InputMode::Document,
        max_seq_len: l.cfg.input.max_seq_len,
    };
    let sp = SpecialIds::of(&l.tok).map_err(text_err)?;
    let mut out = Vec::new();
    let mut dim = l.model.bert().config().hidden_size;
    let mut rng = SslRng::new(0);
    let bs = l.cfg.train.batch_size.max(16);
    for chunk in texts.chunks(bs) {
        // Empty texts still get a row ([CLS] [SEP]).
        let mut seqs = Vec::with_capacity(chunk.len());
        for t in chunk {
            let s = tokenize_texts(&l.tok, std::slice::from_ref(t), &input, None, &[])
                .map_err(text_err)?;
            seqs.push(s.into_iter().next().unwrap_or(TokenizedSeq {
                ids: vec![sp.cls, sp.sep],
                word_ids: vec![None, None],
                special: vec![true, true],
                entities: vec![],
            }));
        }
        let batch = TextBatch {
            seqs,
            pad_id: sp.pad,
            device: l.device.clone(),
        };
        // The run's product precision (`train.matmul_precision`) applies to embedding too.
        let mut ctx = Ctx::inference(&mut rng).with_precision(l.cfg.train.matmul_precision);
        let e = l.model.embed(&batch, &mut ctx)?;
        dim = e.dim(1)?;
        out.extend(e.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok((out, dim))
}

/// `ssl embed text`.
pub fn embed(
    checkpoint: &Path,
    data: &[String],
    out: &Path,
    set: &[String],
) -> Result<(), CliError> {
    let l = load_model(checkpoint, set)?;
    let docs = read_docs(data, &l.cfg.data, None, false)?;
    let (emb, dim) = embed_docs(&l, &docs.texts)?;
    let mut meta = BTreeMap::new();
    meta.insert("model".to_string(), "ssl-text BertForMaskedLM".to_string());
    meta.insert("checkpoint".to_string(), l.ckpt.display().to_string());
    meta.insert(
        "pooling".to_string(),
        format!("{:?}", l.cfg.embed.pooling).to_lowercase(),
    );
    meta.insert("layer".to_string(), l.cfg.embed.layer.to_string());
    let mut w = EmbeddingWriter::create(out, dim, meta)?;
    w.write(&docs.ids, &emb)?;
    let n = w.finish()?;
    eprintln!(
        "wrote {n} embeddings of dimension {dim} to {}",
        out.display()
    );
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
    let l = load_model(checkpoint, set)?;
    let label = label_column.unwrap_or(&l.cfg.data.label_column).to_string();
    let has_label = {
        let src = ssl_data::ParquetSource::open(data)?;
        src.schema().iter().any(|(n, _)| *n == label)
    };
    let docs = read_docs(data, &l.cfg.data, has_label.then_some(label.as_str()), true)?;
    let sp = SpecialIds::of(&l.tok).map_err(text_err)?;
    let seqs = tokenize(&l.tok, &docs.texts, docs.entities.as_deref(), &l.cfg)?;
    let mlm = evaluate_mlm(
        &l.model,
        &seqs,
        l.cfg.train.batch_size.max(8),
        sp.pad,
        l.cfg.train.seed,
        &l.device,
    )
    .map_err(text_err)?;
    let mut report = json!({
        "checkpoint": l.ckpt.display().to_string(),
        "perplexity": mlm.perplexity,
        "masked_loss": mlm.loss,
        "masked_accuracy": mlm.masked_accuracy,
        "masked_tokens": mlm.masked_tokens,
    });
    if let Some(train_labels) = docs.labels {
        let test_docs = if test.is_empty() {
            None
        } else {
            Some(read_docs(test, &l.cfg.data, Some(&label), false)?)
        };
        let (emb, dim) = embed_docs(&l, &docs.texts)?;
        let mut classes: Vec<String> = train_labels.clone();
        if let Some(t) = &test_docs {
            classes.extend(t.labels.clone().unwrap_or_default());
        }
        classes.sort();
        classes.dedup();
        let id_of = |s: &String| classes.binary_search(s).unwrap_or(0);
        let train_y: Vec<usize> = train_labels.iter().map(id_of).collect();
        let (tr_x, tr_y, te_x, te_y) = match &test_docs {
            Some(t) => {
                let (te, _) = embed_docs(&l, &t.texts)?;
                let te_y = t
                    .labels
                    .as_ref()
                    .map(|v| v.iter().map(id_of).collect())
                    .unwrap_or_default();
                (emb, train_y, te, te_y)
            }
            None => {
                let (a, b) = stratified_split(&train_y, 0.2, l.cfg.train.seed)?;
                let pick = |idx: &[usize]| -> (Vec<f32>, Vec<usize>) {
                    (
                        idx.iter()
                            .flat_map(|&i| emb[i * dim..(i + 1) * dim].iter().copied())
                            .collect(),
                        idx.iter().map(|&i| train_y[i]).collect(),
                    )
                };
                let (x1, y1) = pick(&a);
                let (x2, y2) = pick(&b);
                (x1, y1, x2, y2)
            }
        };
        let probe = fit_linear_probe(
            &tr_x,
            &tr_y,
            dim,
            classes.len(),
            &LinearProbeConfig {
                seed: l.cfg.train.seed,
                ..Default::default()
            },
        )?;
        let linear = probe.accuracy(&te_x, &te_y)?;
        let knn = knn_accuracy(
            &tr_x,
            &tr_y,
            &te_x,
            &te_y,
            dim,
            classes.len(),
            &KnnConfig::default(),
        )?;
        if let Some(m) = report.as_object_mut() {
            m.insert("linear_probe_accuracy".into(), json!(linear));
            m.insert("knn_accuracy".into(), json!(knn));
            m.insert("n_train".into(), json!(tr_y.len()));
            m.insert("n_test".into(), json!(te_y.len()));
            m.insert("n_classes".into(), json!(classes.len()));
            m.insert("embedding_dim".into(), json!(dim));
            m.insert("pooling".into(), json!(l.cfg.embed.pooling));
            m.insert("layer".into(), json!(l.cfg.embed.layer));
        }
    }
    println!("{report}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heldout_split_is_seeded_and_near_the_fraction() {
        let n = 20_000;
        let held = (0..n).filter(|&i| is_heldout(i, 3, 0.05)).count() as f64 / n as f64;
        assert!((held - 0.05).abs() < 0.01, "{held}");
        assert!((0..100).all(|i| is_heldout(i, 3, 0.05) == is_heldout(i, 3, 0.05)));
        assert!((0..100).all(|i| !is_heldout(i, 3, 0.0)));
    }

    fn write_parquet(path: &Path, texts: &[&str], spans: &[&str]) {
        use arrow::array::{ArrayRef, StringArray};
        use arrow::record_batch::RecordBatch;
        use std::sync::Arc;
        let batch = RecordBatch::try_from_iter([
            (
                "text",
                Arc::new(StringArray::from(texts.to_vec())) as ArrayRef,
            ),
            (
                "ents",
                Arc::new(StringArray::from(spans.to_vec())) as ArrayRef,
            ),
        ])
        .unwrap();
        let f = std::fs::File::create(path).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    #[test]
    fn entity_span_column_reaches_the_tokenized_sequences() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ents.parquet");
        let texts = [
            "the kernel module loads firmware",
            "a scheduler runs tasks",
            "nothing here",
        ];
        // "kernel module" = chars 4..17; "scheduler" = 2..11; no spans in row 2.
        write_parquet(&path, &texts, &["[[4, 17]]", "[[2,11]]", ""]);
        let cfg = DataConfig {
            entity_column: "ents".into(),
            ..DataConfig::default()
        };
        let paths = vec![path.to_string_lossy().into_owned()];
        let docs = read_docs(&paths, &cfg, None, true).unwrap();
        let ents = docs.entities.clone().unwrap();
        assert_eq!(ents, vec![vec![(4, 17)], vec![(2, 11)], vec![]]);
        // Without asking for entities the column is not read.
        assert!(read_docs(&paths, &cfg, None, false)
            .unwrap()
            .entities
            .is_none());

        let tok =
            ssl_text::train_from_texts(texts.iter().copied(), &TokenizerConfig::default()).unwrap();
        let mut text_cfg = TextConfig::default();
        text_cfg.input.mode = InputMode::LineByLine;
        let seqs = tokenize(&tok, &docs.texts, Some(&ents), &text_cfg).unwrap();
        // Line by line with one line per document: one sequence each, in order.
        assert_eq!(seqs.len(), 3);
        for (seq, text, spans) in [(&seqs[0], texts[0], (4, 17)), (&seqs[1], texts[1], (2, 11))] {
            assert_eq!(seq.entities.len(), 1, "{text}");
            let words: Vec<String> = seq.entities[0]
                .iter()
                .map(|&p| tok.id_to_token(seq.ids[p]).unwrap_or_default())
                .collect();
            let joined = words.join("").replace(['Ġ', '#'], "");
            let want: String = text
                .chars()
                .skip(spans.0)
                .take(spans.1 - spans.0)
                .filter(|c| !c.is_whitespace())
                .collect();
            assert_eq!(joined, want);
        }
        assert!(seqs[2].entities.is_empty());
    }

    #[test]
    fn malformed_entity_spans_name_the_column_and_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.parquet");
        write_parquet(&path, &["a b", "c d"], &["[[0,1]]", "[[0 1]]"]);
        let cfg = DataConfig {
            entity_column: "ents".into(),
            ..DataConfig::default()
        };
        let paths = vec![path.to_string_lossy().into_owned()];
        let e = read_docs(&paths, &cfg, None, true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("\"ents\"") && e.contains("row 1"), "{e}");
        write_parquet(&path, &["a b"], &["[[3,1]]"]);
        let e = read_docs(&paths, &cfg, None, true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("row 0") && e.contains("reversed"), "{e}");
    }

    /// Writes `texts` as a Parquet file with row groups of `rows_per_group` rows.
    fn write_grouped(path: &Path, texts: &[String], rows_per_group: usize) {
        use arrow::array::{ArrayRef, StringArray};
        use arrow::record_batch::RecordBatch;
        use std::sync::Arc;
        let batch = RecordBatch::try_from_iter([(
            "text",
            Arc::new(StringArray::from(texts.to_vec())) as ArrayRef,
        )])
        .unwrap();
        let props = parquet::file::properties::WriterProperties::builder()
            .set_max_row_group_row_count(Some(rows_per_group))
            .build();
        let f = std::fs::File::create(path).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    #[test]
    fn ranks_read_their_row_groups_and_together_hold_one_process_documents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docs.parquet");
        let texts: Vec<String> = (0..30).map(|i| format!("document number {i}")).collect();
        write_grouped(&path, &texts, 4);
        let paths = vec![path.to_string_lossy().into_owned()];
        let cfg = DataConfig {
            max_docs: 25,
            ..DataConfig::default()
        };
        let one = read_docs(&paths, &cfg, None, false).unwrap();
        assert_eq!(one.rows, (0..25).collect::<Vec<_>>());
        let shares = crate::parallel::on_ranks(3, |p| {
            let d = read_docs_of(&paths, &cfg, None, false, Some(&p)).unwrap();
            (p.rank, d.rows, d.texts, d.ids)
        });
        let mut all = Vec::new();
        for (rank, rows, docs, ids) in shares {
            // Row groups of 4 rows dealt round robin: row i is in group i / 4.
            assert!(
                rows.iter().all(|&i| (i / 4) % 3 == rank && i < 25),
                "{rows:?}"
            );
            for ((&i, t), id) in rows.iter().zip(&docs).zip(&ids) {
                assert_eq!(t, &texts[i]);
                assert_eq!(id, &i.to_string());
            }
            all.extend(rows);
        }
        all.sort_unstable();
        assert_eq!(all, one.rows);
        // So the held-out documents of all ranks are one process's.
        let held = |rows: &[usize]| -> Vec<usize> {
            rows.iter()
                .copied()
                .filter(|&i| is_heldout(i, 7, 0.2))
                .collect()
        };
        assert_eq!(held(&all), held(&one.rows));
        assert!(!held(&all).is_empty());
    }

    #[test]
    fn heldout_sums_are_added_over_ranks() {
        let texts: Vec<String> = (0..24)
            .map(|i| format!("the quick brown fox {i} jumps over the lazy dog {}", i * 7))
            .collect();
        let tok = ssl_text::train_from_texts(
            texts.iter(),
            &TokenizerConfig {
                vocab_size: 200,
                ..TokenizerConfig::default()
            },
        )
        .unwrap();
        let mut cfg = TextConfig::default();
        cfg.input.mode = InputMode::LineByLine;
        let seqs = tokenize(&tok, &texts, None, &cfg).unwrap();
        let sp = SpecialIds::of(&tok).unwrap();
        let model_of = || {
            let mut c = cfg.clone();
            build_model(&mut c, &tok, &Device::Cpu).unwrap()
        };
        let (_store, model) = model_of();
        let eval =
            |s: &[TokenizedSeq]| evaluate_mlm(&model, s, 8, sp.pad, 3, &Device::Cpu).unwrap();
        let whole = eval(&seqs);
        let (a, b) = (eval(&seqs[..10]), eval(&seqs[10..]));
        for split in [seqs.len(), 10] {
            let out = crate::parallel::on_ranks(2, |p| {
                let (_store, model) = model_of();
                let mine = if p.rank == 0 {
                    &seqs[..split]
                } else {
                    &seqs[split..]
                };
                heldout_eval(&p, &model, mine, 8, sp.pad, 3, &Device::Cpu).unwrap()
            });
            // Everything on rank 0: one process's figures; split: the two parts' sums added.
            let want = if split == seqs.len() {
                whole
            } else {
                let n = (a.masked_tokens + b.masked_tokens) as f64;
                let loss = (a.loss * a.masked_tokens as f64 + b.loss * b.masked_tokens as f64) / n;
                let acc = (a.masked_accuracy * a.masked_tokens as f64
                    + b.masked_accuracy * b.masked_tokens as f64)
                    / n;
                MlmEval {
                    loss,
                    perplexity: loss.exp(),
                    masked_accuracy: acc,
                    masked_tokens: n as usize,
                }
            };
            for e in out {
                assert_eq!(e.masked_tokens, want.masked_tokens);
                assert!(
                    (e.loss - want.loss).abs() < 1e-6,
                    "{} {}",
                    e.loss,
                    want.loss
                );
                assert!((e.masked_accuracy - want.masked_accuracy).abs() < 1e-9);
            }
        }
    }
}
