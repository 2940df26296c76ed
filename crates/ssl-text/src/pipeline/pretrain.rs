//! `pretrain`: BERT masked-LM pretraining on the documents of Parquet files, with a held-out
//! perplexity curve and a Hugging Face export in the run directory.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::Serialize;
use ssl_core::checkpoint::MODEL_FILE;
use ssl_core::run_dir::{self, RunOptions, RunSummary};
use ssl_core::{parse_device, Parallel, ParamStore, Trainer};
use ssl_core::{EvalFigures, HeldoutEval, HookCtx};
use ssl_data::{heldout_label_column, is_heldout};
use tokenizers::Tokenizer;

use super::config::TextConfig;
use super::docs::read_docs_of;
use super::heldout::{read_curve, HeldoutCurve, HeldoutPoint};
use super::online_knn::OnlineKnn;
use super::tokenizer::{shared_tokenizer, tokenize};
use crate::{
    export_hf_dir, load_hf_dir, save_tokenizer, BertConfig, BertForMaskedLM, InMemoryTextSource,
    Result, SpecialIds, TextError,
};

/// The held-out curve's file in a run directory.
pub const HELDOUT_FILE: &str = "heldout.jsonl";

/// What [`pretrain`] returns: the run's summary, the held-out curve and the Hugging Face
/// export.
#[derive(Debug, Clone, Serialize)]
pub struct TextRunSummary {
    /// Steps, losses, checkpoint.
    pub run: RunSummary,
    /// Held-out perplexity before training (unless resumed) and at every kept checkpoint
    /// (what `heldout.jsonl` holds); empty without held-out documents.
    pub heldout: Vec<HeldoutPoint>,
    /// The Hugging Face directory (`out/hf`) of the newest weights; `None` on ranks other
    /// than 0, which export nothing.
    pub hf: Option<PathBuf>,
}

impl TextRunSummary {
    /// Prints what `ssl pretrain text` prints at the end (rank 0 only): the `done:` line with
    /// the checkpoint and the Hugging Face export.
    pub fn print(&self) {
        if let Some(hf) = &self.hf {
            self.run.print_done("", &[("Hugging Face export", hf)]);
        }
    }
}

/// Builds the model of a configuration: from `model.init_from` (a Hugging Face directory),
/// or fresh with the tokenizer's vocabulary and the preset's sizes. Completes `cfg` with what
/// it used (the checkpoint's configuration, or the preset's sizes, vocabulary size and
/// padding id), so the stored configuration rebuilds the same model.
pub fn build_model(
    cfg: &mut TextConfig,
    tok: &Tokenizer,
    device: &Device,
) -> Result<(ParamStore, BertForMaskedLM)> {
    let sp = SpecialIds::of(tok)?;
    if !cfg.model.init_from.is_empty() {
        let hf = load_hf_dir(
            Path::new(&cfg.model.init_from),
            cfg.masking,
            cfg.train.seed,
            device,
        )?;
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
        let p = BertConfig::preset(&cfg.model.preset, 0)?;
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
    )?;
    Ok((store, model))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TextError + '_ {
    move |e| TextError::io(path, e)
}

/// Pretrains the BERT of `cfg` by masked language modelling on the documents of `data`
/// (Parquet files, directories or globs; at least one) into the run directory `out`:
/// `config.toml` (the completed configuration), `tokenizer.json`, `checkpoints/`,
/// `metrics.jsonl` (with `eval_loss`, `eval_perplexity` and `eval_masked_accuracy` every
/// `train.eval_every_steps` steps and at the end, and `eval_knn_accuracy` when the data has
/// `data.label_column`), [`HELDOUT_FILE`] (the same held-out points,
/// and one before training) and `hf/` (the newest weights as a Hugging Face directory).
///
/// A seeded hash of each document's global row index holds out `data.heldout_fraction` of
/// them. The tokenizer is `model.init_from`'s, `tokenizer.file`, the run's own on resume, or
/// trained on the training documents. With several ranks each reads its share of the rows,
/// rank 0 makes the tokenizer and sends it, the held-out figures add every rank's sums, and
/// rank 0 writes the configuration, curve and export. Progress goes to stderr.
pub fn pretrain(
    mut cfg: TextConfig,
    data: &[String],
    out: &Path,
    opts: &RunOptions,
) -> Result<TextRunSummary> {
    if data.is_empty() {
        return Err(TextError::Config(
            "no text data given: pass at least one Parquet file, directory or glob".into(),
        ));
    }
    let resume = opts.resume;
    cfg.train.validate()?;
    cfg.masking.validate()?;
    cfg.check_memory()?;
    let device = parse_device(&cfg.train.device)?;
    let (par, device) = opts.parallel(device)?;
    let paths = data;
    // Checked and locked before anything is written.
    let run = opts.run_dir(out, &par)?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    // Each rank reads its share of the rows; the held-out split and `max_docs` use global row
    // indices, so together the ranks hold out exactly the documents one process would.
    // With held-out documents and `data.label_column` in the data, the labels too (for the
    // online k-NN accuracy).
    let d = &cfg.data;
    let label = heldout_label_column(paths, &d.label_column, d.heldout_fraction)?;
    let docs = read_docs_of(paths, &cfg.data, label.as_deref(), true, Some(&par))?;
    let (seed, frac) = (cfg.train.seed, cfg.data.heldout_fraction);
    let (mut train_docs, mut held_docs) = (Vec::new(), Vec::new());
    let (mut train_ents, mut held_ents) = (Vec::new(), Vec::new());
    let (mut train_labels, mut held_labels) = (Vec::new(), Vec::new());
    let with_ents = docs.entities.is_some();
    let with_labels = docs.labels.is_some();
    let mut ents = docs.entities.map(|e| e.into_iter());
    let mut labels = docs.labels.map(|l| l.into_iter());
    for (t, &i) in docs.texts.into_iter().zip(&docs.rows) {
        let e = ents.as_mut().and_then(|e| e.next()).unwrap_or_default();
        let l = labels.as_mut().and_then(|l| l.next()).unwrap_or_default();
        if is_heldout(i, seed, frac) {
            held_docs.push(t);
            held_ents.push(e);
            held_labels.push(l);
        } else {
            train_docs.push(t);
            train_ents.push(e);
            train_labels.push(l);
        }
    }
    check_training_docs(&train_docs, held_docs.len(), frac, &par)?;
    // Tokenizer: the checkpoint's, a given file, or trained on the training documents. With
    // several ranks rank 0 alone makes it (training on its own share of the training
    // documents) and sends it to the others, so every rank uses the same one.
    let tok_path = out.join("tokenizer.json");
    let tok = shared_tokenizer(&cfg, paths, &tok_path, resume, &train_docs, &par)?;
    let sp = SpecialIds::of(&tok)?;
    let (store, mut model) = build_model(&mut cfg, &tok, &device)?;
    // A resumed run's model must match its checkpoint before the tokenizer and the
    // configuration are replaced.
    run.check_params(&store)?;
    if par.is_main() {
        save_tokenizer(&tok, out)?;
        cfg.tokenizer.file = std::fs::canonicalize(&tok_path)
            .map_err(io(&tok_path))?
            .to_string_lossy()
            .into_owned();
        run_dir::write_config(out, &cfg)?;
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
    // The held-out curve: before training (unless resumed) and at every evaluation, through
    // a trainer hook; every rank evaluates its share and the sums are added up.
    let held_total = par.sum_f64(&[held_seqs.len() as f64])?[0];
    let file = out.join(HELDOUT_FILE);
    let mut curve = HeldoutCurve {
        par: &par,
        seqs: &held_seqs,
        batch_size: cfg.train.batch_size.max(8),
        pad: sp.pad,
        seed,
        device: &device,
        points: if resume {
            read_curve(&file)?
        } else {
            Vec::new()
        },
        file: Some(file),
    };
    if held_total > 0.0 && !resume {
        let b = curve.add(&model, 0)?;
        if par.is_main() {
            eprintln!(
                "held-out before training: perplexity {:.2}, masked accuracy {:.4}",
                b.perplexity, b.masked_accuracy
            );
        }
    }
    // The online k-NN accuracy (`eval_knn_accuracy`): a fixed bank of labelled training
    // documents against the held-out ones (at most `data.heldout_max_seqs` of them), pooled
    // as `embed` pools, in one process only (each rank holds a share).
    let knn = if with_labels && par.world == 1 {
        if cfg.data.heldout_max_seqs > 0 {
            held_docs.truncate(cfg.data.heldout_max_seqs);
            held_labels.truncate(cfg.data.heldout_max_seqs);
        }
        let layer = (cfg.embed.layer >= 0).then_some(cfg.embed.layer as usize);
        model.set_pooling(cfg.embed.pooling, layer)?;
        OnlineKnn::new(&train_docs, &train_labels, held_docs, &held_labels, seed)
    } else {
        if with_labels && par.is_main() {
            eprintln!(
                "note: the held-out k-NN accuracy is computed in one process only; not with {} ranks",
                par.world
            );
        }
        None
    };
    let mut source = InMemoryTextSource::new(
        train_seqs,
        cfg.train.batch_size,
        seed,
        true,
        sp.pad,
        &device,
    )?;
    let run_config = serde_json::to_value(&cfg).map_err(|e| TextError::Pipeline(e.to_string()))?;
    let mut trainer = opts.trainer(&cfg.train, out, run_config, &par)?;
    let report = if held_total > 0.0 {
        // Held-out evaluation every `train.eval_every_steps` (default: at the checkpoint
        // interval) and at the end: `eval_loss`, `eval_perplexity`, `eval_masked_accuracy` in
        // metrics.jsonl, the point in heldout.jsonl.
        let mut eval = HeldoutEval::new(&cfg.train, |ctx: &HookCtx<'_, BertForMaskedLM>| {
            let p = curve.add(ctx.task, ctx.step)?;
            if ctx.is_main() {
                eprintln!(
                    "held-out at step {}: perplexity {:.2}, masked accuracy {:.4}",
                    p.step, p.perplexity, p.masked_accuracy
                );
            }
            let mut figures = EvalFigures::from([
                ("loss".to_string(), p.loss),
                ("perplexity".to_string(), p.perplexity),
                ("masked_accuracy".to_string(), p.masked_accuracy),
            ]);
            if let Some(k) = &knn {
                let acc = k.accuracy(ctx.task, &tok, &cfg, &device)?;
                figures.insert("knn_accuracy".into(), acc);
            }
            Ok(figures)
        });
        trainer.fit_with_hooks(&model, &mut source, None, &mut [&mut eval])?
    } else {
        trainer.fit(&model, &mut source, None)?
    };
    run.finish();
    let curve = curve.points;
    let mut summary = TextRunSummary {
        run: RunSummary::new(out, &report, par.rank),
        heldout: curve,
        hf: None,
    };
    if !par.is_main() {
        return Ok(summary);
    }
    // The newest weights, exported for transformers.
    if let Some(ck) = &report.last_checkpoint {
        store.load_safetensors(&ck.join(MODEL_FILE))?;
    }
    let hf = out.join("hf");
    export_hf_dir(&cfg.model.config, &store, &tok, &hf)?;
    summary.hf = Some(hf);
    Ok(summary)
}

/// Refuses a run with nothing to train on, naming the cause: no documents, every training
/// document held out (`data.heldout_fraction` took them all, as with a one-document set), or
/// every training document empty. Counts are over every rank.
fn check_training_docs(train: &[String], held: usize, frac: f64, par: &Parallel) -> Result<()> {
    let with_text = train.iter().filter(|t| !t.trim().is_empty()).count();
    let n = par.sum_f64(&[train.len() as f64, held as f64, with_text as f64])?;
    let (n_train, n_held, n_text) = (n[0] as usize, n[1] as usize, n[2] as usize);
    if n_text > 0 {
        return Ok(());
    }
    let why = if n_train + n_held == 0 {
        "the data holds no documents".to_string()
    } else if n_train == 0 {
        format!(
            "all {n_held} documents were held out for perplexity (data.heldout_fraction = {frac}); \
             add documents or set data.heldout_fraction = 0"
        )
    } else {
        format!("all {n_train} training documents are empty or blank")
    };
    Err(TextError::InvalidInput(format!(
        "nothing to train on: {why}"
    )))
}
