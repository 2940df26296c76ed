//! `pretrain`: BERT masked-LM pretraining on the documents of Parquet files, with a held-out
//! perplexity curve and a Hugging Face export in the run directory.

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::Serialize;
use ssl_core::checkpoint::MODEL_FILE;
use ssl_core::run_dir::{self, RunOptions, RunSummary};
use ssl_core::{parse_device, ParamStore, Trainer};
use ssl_core::{EvalFigures, HeldoutEval, HookCtx};
use ssl_data::{heldout_label_column, ParquetSource};
use tokenizers::Tokenizer;

use super::config::TextConfig;
use super::heldout::{read_curve, HeldoutCurve, HeldoutPoint};
use super::online_knn::OnlineKnn;
use super::stream::{
    estimate_epoch, read_heldout, read_knn_bank, DocPacker, RowFilter, StreamingTextSource,
};
use super::tokenizer::shared_tokenizer;
use crate::{
    export_hf_dir, load_hf_dir, save_tokenizer, BertForMaskedLM, Result, SpecialIds, TextError,
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

/// Builds the model of a configuration: from `model.init_from` (a Hugging Face directory;
/// without an MLM head there, the fresh head's rate factor is
/// [`TextConfig::fresh_head_lr_scale`], so call [`TextConfig::resolve_lr`] first), or fresh
/// with the tokenizer's vocabulary and the preset's sizes. Completes `cfg` with what it used
/// (the checkpoint's configuration, or the preset's sizes, vocabulary size and padding id), so
/// the stored configuration rebuilds the same model.
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
        let mut model = hf.model;
        if hf.fresh_head {
            // A random head at the adaptation rate learns too slowly and sends noise into
            // the encoder: it trains at least at the from-scratch rate.
            model.set_head_lr_scale(cfg.fresh_head_lr_scale());
        }
        return Ok((hf.store, model));
    }
    if !cfg.model.preset.is_empty() {
        cfg.model.config = cfg.model_sizes()?;
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
/// The documents are streamed ([`StreamingTextSource`]), never held whole: training starts
/// after the held-out set (capped by `data.heldout_max_seqs`) is read. A seeded hash of each
/// document's global row index holds out `data.heldout_fraction` of them; `data.max_docs` is a
/// seeded sample of the rows ([`RowFilter`]). With `train.max_epochs` the step count comes
/// from an estimate of the sequences per epoch ([`estimate_epoch`]), printed. The tokenizer is
/// `model.init_from`'s, `tokenizer.file`, the run's own on resume, or trained on the training
/// rows (streamed). With several ranks each streams its share of the row groups, rank 0
/// makes the tokenizer and sends it, the held-out figures add every rank's sums, and rank 0
/// writes the configuration, curve and export. Progress goes to stderr. `train.lr = 0` (the
/// default) becomes the from-scratch or the adaptation rate ([`TextConfig::resolve_lr`]).
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
    cfg.resolve_lr();
    cfg.train.validate()?;
    cfg.masking.validate()?;
    cfg.check_memory()?;
    let device = parse_device(&cfg.train.device)?;
    let (par, device) = opts.parallel(device)?;
    let paths = data;
    // Checked and locked before anything is written.
    let run = opts.run_dir(out, &par)?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    // The documents are streamed, never held whole: the held-out split and the `max_docs`
    // sample use global row indices, so together the ranks train on and hold out exactly the
    // documents one process would. With held-out documents and `data.label_column` in the
    // data, the labels too (for the online k-NN accuracy).
    let source = ParquetSource::open(paths)?;
    let (seed, frac) = (cfg.train.seed, cfg.data.heldout_fraction);
    let filter = RowFilter::new(&cfg.data, seed, source.num_rows());
    let label = heldout_label_column(paths, &cfg.data.label_column, frac)?;
    check_training_rows(source.num_rows(), &filter, frac)?;
    // Tokenizer: the checkpoint's, a given file, or trained on the training rows (streamed,
    // by rank 0, which sends it to the others).
    let tok_path = out.join("tokenizer.json");
    let tok = shared_tokenizer(&cfg, paths, &tok_path, resume, &par)?;
    let sp = SpecialIds::of(&tok)?;
    let (store, mut model) = build_model(&mut cfg, &tok, &device)?;
    // A resumed run's model must match its checkpoint before the tokenizer and the
    // configuration are replaced.
    run.check_params(&store)?;
    let packer = DocPacker::new(&tok, &cfg, filter, label.as_deref());
    // Training source first: it refuses data without rows before anything else is read.
    let source_train = StreamingTextSource::new(
        &source,
        packer.clone(),
        par.rank,
        par.world,
        sp.pad,
        &device,
    )?;
    if cfg.train.max_epochs > 0.0 {
        // Sequences are not rows: sequences per document are estimated from a sample.
        if par.is_main() {
            eprintln!(
                "train.max_epochs = {}: estimating sequences per document from the first training documents",
                cfg.train.max_epochs
            );
        }
        let est = estimate_epoch(&source, &packer)?;
        if let Some(steps) = cfg.train.apply_epochs(est.seqs, par.world) {
            if par.is_main() {
                eprintln!(
                    "train.max_epochs = {}: about {} training sequences per epoch (estimated: \
                     {:.0} training documents x {:.2} sequences per document, measured on {} \
                     documents) -> train.max_steps = {steps}",
                    cfg.train.max_epochs,
                    est.seqs,
                    est.train_docs,
                    est.seqs_per_doc,
                    est.sample_docs
                );
            }
        }
    }
    if par.is_main() {
        save_tokenizer(&tok, out)?;
        cfg.tokenizer.file = std::fs::canonicalize(&tok_path)
            .map_err(io(&tok_path))?
            .to_string_lossy()
            .into_owned();
        run_dir::write_config(out, &cfg)?;
    }
    // The held-out set, read until the cap (with several ranks each reads at most its part of
    // it), and for the online k-NN (one process only) up to as many labelled documents.
    let knn_wanted = label.is_some() && par.world == 1;
    let cap = cfg.data.heldout_max_seqs;
    let held = read_heldout(
        &source,
        &packer,
        par.rank,
        par.world,
        cap.div_ceil(par.world),
        match (knn_wanted, cap) {
            (false, _) => 0,
            (true, 0) => usize::MAX,
            (true, c) => c,
        },
    )?;
    let held_seqs = held.seqs;
    eprintln!(
        "streaming {} rows ({} of them training documents, expected); {} held-out documents read -> {} sequences; BERT {} layers x {} ({} parameters)",
        source.num_rows(),
        (source.num_rows() as f64 * filter.sample_fraction() * (1.0 - frac.clamp(0.0, 1.0)))
            .round(),
        held.docs,
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
    // documents (at most ssl_core::probe::KNN_BANK_MAX, from a seeded shuffled pass) against
    // the held-out ones (at most `data.heldout_max_seqs` of them), pooled as `embed` pools, in
    // one process only (each rank holds a share).
    let knn = if knn_wanted {
        let bank = read_knn_bank(&source, &packer)?;
        let (bank, bank_y): (Vec<String>, Vec<String>) = bank.into_iter().unzip();
        let (queries, query_y): (Vec<String>, Vec<String>) = held.labelled.into_iter().unzip();
        let layer = (cfg.embed.layer >= 0).then_some(cfg.embed.layer as usize);
        model.set_pooling(cfg.embed.pooling, layer)?;
        OnlineKnn::new(&bank, &bank_y, queries, &query_y, seed)
    } else {
        if label.is_some() && par.is_main() {
            eprintln!(
                "note: the held-out k-NN accuracy is computed in one process only; not with {} ranks",
                par.world
            );
        }
        None
    };
    let mut source = source_train;
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
                let acc = k.accuracy(ctx.task, &tok, &cfg, &device, ctx.precision)?;
                figures.insert("knn_accuracy".into(), acc);
            }
            Ok(figures)
        });
        trainer.fit_with_hooks(&model, &mut source, None, &mut [&mut eval])?
    } else {
        trainer.fit(&model, &mut source, None)?
    };
    run.finish();
    let bad = source.bad_rows();
    if bad.count > 0 {
        let who = if par.world > 1 {
            format!("rank {}: ", par.rank)
        } else {
            String::new()
        };
        eprintln!("{who}training documents: {bad}");
    }
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

/// Refuses, from the row indices alone (before anything is read), a run with no training row:
/// no rows, or every row held out (`data.heldout_fraction` took them all, as with a
/// one-document set) or outside the `data.max_docs` sample. Blank documents are found by the
/// stream (see [`StreamingTextSource`]).
fn check_training_rows(rows: usize, filter: &RowFilter, frac: f64) -> Result<()> {
    if (0..rows).any(|i| filter.training(i)) {
        return Ok(());
    }
    let held = (0..rows).filter(|&i| filter.heldout(i)).count();
    let why = if rows == 0 {
        "the data holds no documents".to_string()
    } else if held > 0 {
        format!(
            "all {held} documents were held out for perplexity (data.heldout_fraction = {frac}); \
             add documents or set data.heldout_fraction = 0"
        )
    } else {
        format!("none of the {rows} rows is in the data.max_docs sample")
    };
    Err(TextError::InvalidInput(format!(
        "nothing to train on: {why}"
    )))
}
