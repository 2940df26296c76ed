//! Contrastive pretraining of a multimodal run: pairs in, a run directory out.

use std::path::{Path, PathBuf};

use candle_core::Device;
use ssl_core::checkpoint::MODEL_FILE;
use ssl_core::read_safetensors;

use serde::Serialize;
use ssl_core::run_dir::{self, RunOptions, RunSummary};
use ssl_core::{heldout_task_loss, parse_device, HeldoutEval, HookCtx, TrainHook};
use ssl_text::SpecialIds;

use ssl_data::ParquetSource;
use ssl_vision::ImageSet;

use super::{
    build_model, complete_config, heldout_pairs, init_towers, pair_filter, row_split,
    save_shared_tokenizer, shared_tokenizer, shuffle_bytes, training_sample, MultimodalConfig,
};
use crate::export::{write_clip_hf_dir, HF_DIR};
use crate::stream::pair_specs;
use crate::{
    embed_images, embed_token_seqs, pair_batch, retrieval, tokenize_captions, ClipModel,
    MultimodalError, PairSet, PairStreamConfig, Result, StreamingPairSource,
};

/// What [`pretrain`] returns: where the run stands, with the learnt temperature.
#[derive(Debug, Clone, Serialize)]
pub struct MultimodalRunSummary {
    /// The trainer's summary (steps, losses, last checkpoint).
    pub run: RunSummary,
    /// The model's `logit_scale` at the end (the similarity scale is its exponential).
    pub logit_scale: f64,
    /// The towers exported for transformers (`out/hf`, see [`crate::export`]) from the newest
    /// weights; `None` on ranks other than 0.
    pub hf: Option<PathBuf>,
}

impl MultimodalRunSummary {
    /// Prints what `ssl pretrain multimodal` prints at the end (rank 0 only): an interruption
    /// and the `done:` line with the losses, `logit_scale`, checkpoint and metrics.
    pub fn print(&self) {
        let metrics = self.run.dir.join("metrics.jsonl");
        let note = format!(", logit_scale {:.3}", self.logit_scale);
        let mut files: Vec<(&str, &Path)> = vec![("metrics", &metrics)];
        if let Some(hf) = &self.hf {
            files.push(("Hugging Face export", hf));
        }
        self.run.print_done(&note, &files);
    }
}

/// Trains a CLIP model on the image-caption pairs of the Parquet files, directories or globs
/// in `data` (non-empty) into the run directory `out`, streaming them: holds out
/// `data.heldout_fraction` of the rows (by global row index), makes the tokenizer
/// (`out/tokenizer.json`, trained on a capped stream of training captions), reads a bounded
/// seeded sample of training pairs (image shape, normalisation, the pair filter's
/// threshold), completes `cfg` (with `train.max_epochs` turned into steps from the footers'
/// row counts), writes it to `out/config.toml`, loads the `[init]` towers and trains from a
/// [`StreamingPairSource`], with checkpoints (and the stream's position) and metrics in `out`.
/// Progress goes to stderr. With several ranks every rank streams its own row groups and the
/// negatives span every rank.
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
    let source = ParquetSource::open(data)?;
    source.check_columns(&pair_specs(&cfg.data.columns(&[]), true, true)?)?;
    let split = row_split(&cfg, &source)?;
    let (n_train, n_held) = split.counts();
    check_pairs_per_step(n_train, n_held, &cfg)?;
    std::fs::create_dir_all(out).map_err(|e| MultimodalError::Io {
        path: out.to_path_buf(),
        source: e,
    })?;
    let tok = shared_tokenizer(&mut cfg, data, split, out, opts.resume, &par)?;
    let sample = training_sample(&source, &cfg, &split)?;
    if sample.is_empty() {
        return Err(MultimodalError::InvalidInput(format!(
            "no training pair could be read from {} (every training row was skipped)",
            data.join(", ")
        )));
    }
    complete_config(&mut cfg, &sample.images, &tok, &par)?;
    let filter = pair_filter(&cfg, &sample, &par)?;
    let kept = if filter.is_some() {
        1.0 - cfg.data.filter_drop_fraction
    } else {
        1.0
    };
    let per_epoch = ((n_train as f64) * kept).round() as u64;
    if let Some(steps) = cfg.train.apply_epochs(per_epoch, par.world) {
        if par.is_main() {
            eprintln!(
                "train.max_epochs = {}: {steps} steps of {} pairs over {} rank(s) (about {per_epoch} training pairs an epoch, from the footers' {} rows)",
                cfg.train.max_epochs,
                cfg.train.batch_size,
                par.world,
                source.num_rows()
            );
        }
    }
    cfg.check_memory(n_train)?;
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
    let pad = SpecialIds::of(&tok)?.pad;
    // The held-out set, bounded by data.max_heldout_pairs (rank 0 evaluates alone).
    let heldout = if par.world == 1 && n_held >= 2 {
        heldout_pairs(data, &cfg, &[])?
    } else {
        PairSet::new(
            ImageSet::new(Vec::new(), sample.images.shape)?,
            Vec::new(),
            Vec::new(),
            Vec::new(),
        )?
    };
    let m = &cfg.model.image;
    let shape = [m.channels, m.image_height, m.image_width];
    let mut source = StreamingPairSource::new(
        &source,
        PairStreamConfig {
            columns: cfg.data.columns(&[]),
            split,
            batch_size: cfg.train.batch_size,
            seed: cfg.train.seed,
            rank: par.rank,
            world: par.world,
            max_seq_len: cfg.max_seq_len,
            shape,
            shuffle_bytes: shuffle_bytes(&cfg),
            workers: 0,
        },
        &tok,
        filter,
        &device,
    )?;
    eprintln!(
        "{n_train} training pairs ({n_held} held out{}) {}x{}x{}, streamed (shuffle window {} pairs: data.shuffle_buffer_mb = {}); {:?} loss; micro-batch {}; {} parameters",
        if heldout.len() < n_held && !heldout.is_empty() {
            format!(", {} of them evaluated: data.max_heldout_pairs", heldout.len())
        } else {
            String::new()
        },
        cfg.model.image.channels,
        cfg.model.image.image_height,
        cfg.model.image.image_width,
        source.window_rows(),
        cfg.data.shuffle_buffer_mb,
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
    let run_config =
        serde_json::to_value(&cfg).map_err(|e| MultimodalError::Config(e.to_string()))?;
    let rank = par.rank;
    let mut trainer = opts.trainer(&cfg.train, out, run_config, &par)?;
    // Held-out evaluation every `train.eval_every_steps` and at the end: the CLIP loss
    // (`eval_loss`) and recall@K both ways on the held-out pairs. In one process only: the
    // forward pass gathers every rank's embeddings and recall ranks all pairs together.
    let held = HeldoutPairs::new(&heldout, &tok, &cfg, pad, &device)?;
    let mut eval = (par.world == 1 && heldout.len() >= 2).then(|| {
        let (seed, ks) = (cfg.train.seed, cfg.eval.ks.clone());
        let bs = cfg.train.batch_size.max(1);
        HeldoutEval::new(&cfg.train, move |ctx: &HookCtx<'_, ClipModel>| {
            let mut figures =
                heldout_task_loss(&par, ctx.task, &held.batches, seed, ctx.precision)?;
            let img = embed_images(ctx.task, &heldout.images, bs, &device)?;
            let txt = embed_token_seqs(ctx.task, &held.seqs, pad, bs, &device)?;
            let r = retrieval(&img, &txt, &ks)?;
            for (k, (i2t, t2i)) in r.k.iter().zip(r.image_to_text.iter().zip(&r.text_to_image)) {
                figures.insert(format!("image_to_text_r@{k}"), *i2t);
                figures.insert(format!("text_to_image_r@{k}"), *t2i);
            }
            Ok(figures)
        })
    });
    let mut hooks: Vec<&mut dyn TrainHook<ClipModel>> = Vec::new();
    if let Some(e) = &mut eval {
        hooks.push(e);
    }
    let report = trainer.fit_with_hooks(&model, &mut source, health.as_ref(), &mut hooks)?;
    let bad = source.bad_rows();
    if bad.count > 0 {
        eprintln!("training pairs: {bad}");
    }
    if source.blank_captions() > 0 {
        eprintln!(
            "skipped {} training rows with an empty caption in column `{}` (data.skip_bad_rows)",
            source.blank_captions(),
            cfg.data.caption_column
        );
    }
    if source.filtered() > 0 && rank == 0 {
        eprintln!(
            "pair filter: dropped {} training pairs as they streamed",
            source.filtered()
        );
    }
    run.finish();
    // The newest weights (those of the last checkpoint), exported for transformers.
    let hf = if rank == 0 {
        let (params, source) = match &report.last_checkpoint {
            Some(ck) => {
                let path = ck.join(MODEL_FILE);
                (read_safetensors(&path, &Device::Cpu)?, path)
            }
            None => (store.tensors()?, out.to_path_buf()),
        };
        let dir = out.join(HF_DIR);
        write_clip_hf_dir(&cfg, &params, &tok, &source, &dir)?;
        Some(dir)
    } else {
        None
    };
    Ok(MultimodalRunSummary {
        run: RunSummary::new(out, &report, rank),
        logit_scale: model.logit_scale_value()?,
        hf,
    })
}

/// The held-out pairs as the evaluation reads them: tokenized captions, and batches of
/// `train.batch_size` pairs (a last lone pair joins the batch before it: a contrastive loss
/// needs two).
struct HeldoutPairs {
    seqs: Vec<ssl_text::TokenizedSeq>,
    batches: Vec<crate::PairBatch>,
}

impl HeldoutPairs {
    fn new(
        heldout: &crate::PairSet,
        tok: &tokenizers::Tokenizer,
        cfg: &MultimodalConfig,
        pad: u32,
        device: &candle_core::Device,
    ) -> Result<Self> {
        let n = heldout.len();
        if n < 2 {
            return Ok(HeldoutPairs {
                seqs: Vec::new(),
                batches: Vec::new(),
            });
        }
        let seqs = tokenize_captions(tok, &heldout.captions, &heldout.ids, cfg.max_seq_len)?;
        let bs = cfg.train.batch_size.max(2);
        let mut starts: Vec<usize> = (0..n).step_by(bs).collect();
        if n % bs == 1 {
            starts.pop();
        }
        let batches = starts
            .iter()
            .enumerate()
            .map(|(k, &s)| {
                let end = starts.get(k + 1).copied().unwrap_or(n);
                let idx: Vec<usize> = (s..end).collect();
                pair_batch(&heldout.images, &seqs, pad, &idx, device)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(HeldoutPairs { seqs, batches })
    }
}

/// Contrastive training needs at least 2 pairs per step: a lone pair has no negative, so its
/// loss is 0 and nothing is learned. Refuses fewer training pairs (the whole source's, from
/// the row selection), or a batch of 1, naming the cause.
fn check_pairs_per_step(n_train: usize, n_held: usize, cfg: &MultimodalConfig) -> Result<()> {
    if n_train.min(cfg.train.batch_size) >= 2 {
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
