//! Contrastive pretraining of a multimodal run: pairs in, a run directory out.

use std::path::Path;

use serde::Serialize;
use ssl_core::run_dir::{self, RunOptions, RunSummary};
use ssl_core::{parse_device, Trainer};
use ssl_text::SpecialIds;

use super::{
    build_model, complete_config, init_towers, save_shared_tokenizer, shared_tokenizer,
    train_heldout, MultimodalConfig,
};
use crate::{pair_batch, tokenize_captions, InMemoryPairSource, MultimodalError, Result};

/// What [`pretrain`] returns: where the run stands, with the learnt temperature.
#[derive(Debug, Clone, Serialize)]
pub struct MultimodalRunSummary {
    /// The trainer's summary (steps, losses, last checkpoint).
    pub run: RunSummary,
    /// The model's `logit_scale` at the end (the similarity scale is its exponential).
    pub logit_scale: f64,
}

impl MultimodalRunSummary {
    /// Prints what `ssl pretrain multimodal` prints at the end (rank 0 only): an interruption
    /// and the `done:` line with the losses, `logit_scale`, checkpoint and metrics.
    pub fn print(&self) {
        let metrics = self.run.dir.join("metrics.jsonl");
        let note = format!(", logit_scale {:.3}", self.logit_scale);
        self.run.print_done(&note, &[("metrics", &metrics)]);
    }
}

/// Trains a CLIP model on the image-caption pairs of the Parquet files, directories or globs
/// in `data` (non-empty) into the run directory `out`: splits off `data.heldout_fraction` of
/// the pairs (and filters the rest with `data.filter_checkpoint`), makes the tokenizer
/// (`out/tokenizer.json`), completes `cfg` from the data and the `[init]` runs, writes it to
/// `out/config.toml`, loads the `[init]` towers and trains, with checkpoints and metrics in
/// `out`. Progress goes to stderr. With several ranks every rank reads its own share of the
/// rows and the negatives span every rank.
pub fn pretrain(
    mut cfg: MultimodalConfig,
    data: &[String],
    out: &Path,
    opts: &RunOptions,
) -> Result<MultimodalRunSummary> {
    if data.is_empty() {
        return Err(MultimodalError::Config(
            "no training data: give at least one Parquet file, directory or glob".into(),
        ));
    }
    let device = parse_device(&cfg.train.device)?;
    let (par, device) = opts.parallel(device)?;
    // Checked and locked before anything is written.
    let run = opts.run_dir(out, &par)?;
    let (train, heldout) = train_heldout(data, &cfg, &par)?;
    std::fs::create_dir_all(out).map_err(|e| MultimodalError::Io {
        path: out.to_path_buf(),
        source: e,
    })?;
    check_pairs_per_step(train.len(), heldout.len(), &cfg, &par)?;
    let tok = shared_tokenizer(&mut cfg, &train.captions, out, opts.resume, &par)?;
    complete_config(&mut cfg, &train.images, &tok, &par)?;
    let (store, mut model) = build_model(&cfg, &device)?;
    // A resumed run's model must match its checkpoint before the tokenizer and the
    // configuration are replaced.
    run.check_params(&store)?;
    save_shared_tokenizer(&mut cfg, &tok, out, &par)?;
    if par.is_main() {
        run_dir::write_config(out, &cfg)?;
    }
    if !opts.resume {
        init_towers(&cfg, &model, &device)?;
    }
    if par.world > 1 {
        // Negatives span every rank: each step gathers all ranks' embeddings.
        model.gather_across(par.shared());
    }
    let seqs = tokenize_captions(&tok, &train.captions, &train.ids, cfg.max_seq_len)?;
    let pad = SpecialIds::of(&tok)?.pad;
    eprintln!(
        "{} training pairs ({} held out) {}x{}x{}; {:?} loss; micro-batch {}; {} parameters",
        train.len(),
        heldout.len(),
        cfg.model.image.channels,
        cfg.model.image.image_height,
        cfg.model.image.image_width,
        cfg.model.loss.kind,
        if cfg.model.micro_batch == 0 {
            "off".to_string()
        } else {
            cfg.model.micro_batch.to_string()
        },
        store.num_elements()
    );
    let health = if heldout.len() >= 2 {
        let k = heldout.len().min(64);
        let hseqs = tokenize_captions(&tok, &heldout.captions, &heldout.ids, cfg.max_seq_len)?;
        let idx: Vec<usize> = (0..k).collect();
        Some(pair_batch(&heldout.images, &hseqs, pad, &idx, &device)?)
    } else {
        None
    };
    let mut source = InMemoryPairSource::new(
        train.images.clone(),
        seqs,
        &tok,
        cfg.train.batch_size,
        cfg.train.seed,
        &device,
    )?;
    let run_config =
        serde_json::to_value(&cfg).map_err(|e| MultimodalError::Config(e.to_string()))?;
    let rank = par.rank;
    let mut trainer = opts.trainer(&cfg.train, out, run_config, &par)?;
    let report = trainer.fit(&model, &mut source, health.as_ref())?;
    run.finish();
    Ok(MultimodalRunSummary {
        run: RunSummary::new(out, &report, rank),
        logit_scale: model.logit_scale_value()?,
    })
}

/// Contrastive training needs at least 2 pairs per step: a lone pair has no negative, so its
/// loss is 0 and nothing is learned. Refuses fewer training pairs (over every rank), or a
/// batch of 1, naming the cause.
fn check_pairs_per_step(
    train: usize,
    held: usize,
    cfg: &MultimodalConfig,
    par: &ssl_core::Parallel,
) -> Result<()> {
    let step = train.min(cfg.train.batch_size);
    let n = par.sum_f64(&[train as f64, held as f64, step as f64])?;
    let (n_train, n_held, n_step) = (n[0] as usize, n[1] as usize, n[2] as usize);
    if n_step >= 2 {
        return Ok(());
    }
    let why = if n_train < 2 {
        format!(
            "{n_train} training pair(s) ({n_held} held out by data.heldout_fraction = {}); add pairs",
            cfg.data.heldout_fraction
        )
    } else {
        format!(
            "train.batch_size = {}; set it to 2 or more",
            cfg.train.batch_size
        )
    };
    Err(MultimodalError::InvalidInput(format!(
        "contrastive training needs at least 2 pairs per step (a lone pair has no negative, so its loss is 0): {why}"
    )))
}
