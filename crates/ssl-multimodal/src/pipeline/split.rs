//! Reading a run's pairs and splitting them into training and held-out pairs (seeded by
//! `train.seed`), with the optional pair filter, in one process or over the ranks of a
//! data-parallel run with the same result.

use std::path::Path;

use ssl_core::Parallel;

use super::{LoadedRun, MultimodalConfig};
use crate::{
    embed_images, embed_token_seqs, holdout_split, keep_best_pairs, read_pairs, read_pairs_of,
    tokenize_captions, MultimodalError, PairSet, Result,
};
use ssl_text::SpecialIds;

/// Reads every pair of `paths` with the label columns `labels` (skipped rows reported on
/// stderr), keeping the first `data.max_pairs`.
pub fn read_run_pairs(
    paths: &[String],
    cfg: &MultimodalConfig,
    labels: &[String],
) -> Result<PairSet> {
    let (mut set, bad) = read_pairs(paths, &cfg.data.columns(labels))?;
    if bad.count > 0 {
        eprintln!("skipped {} bad rows: {bad}", bad.count);
    }
    if cfg.data.max_pairs > 0 && set.len() > cfg.data.max_pairs {
        let idx: Vec<usize> = (0..cfg.data.max_pairs).collect();
        set = set.select(&idx);
    }
    Ok(set)
}

/// Quality scores (image-caption cosine) of `pairs` under another run's model.
pub fn filter_scores(run: &LoadedRun, pairs: &PairSet) -> Result<Vec<f32>> {
    let bs = run.cfg.train.batch_size.max(1);
    let img = embed_images(&run.model, &pairs.images, bs, &run.device)?;
    let seqs = tokenize_captions(&run.tok, &pairs.captions, &pairs.ids, run.cfg.max_seq_len)?;
    let pad = SpecialIds::of(&run.tok)?.pad;
    let txt = embed_token_seqs(&run.model, &seqs, pad, bs, &run.device)?;
    crate::pair_scores(&img, &txt)
}

/// True when `data.filter_checkpoint` and a positive `data.filter_drop_fraction` ask for it.
fn filtering(cfg: &MultimodalConfig) -> bool {
    !cfg.data.filter_checkpoint.is_empty() && cfg.data.filter_drop_fraction > 0.0
}

/// (training, held-out) pairs of `paths` for `par`'s rank: the whole source in one process
/// ([`split_pairs`]), this rank's rows with several ([`sharded_split`]).
pub fn train_heldout(
    paths: &[String],
    cfg: &MultimodalConfig,
    par: &Parallel,
) -> Result<(PairSet, PairSet)> {
    if par.world == 1 {
        split_pairs(paths, cfg)
    } else {
        sharded_split(paths, cfg, par)
    }
}

/// Reads all pairs and splits them into (training, held-out) in one process, dropping the
/// training pairs the filter model scores lowest (the worst captions are printed).
pub fn split_pairs(paths: &[String], cfg: &MultimodalConfig) -> Result<(PairSet, PairSet)> {
    let all = read_run_pairs(paths, cfg, &[])?;
    let (mut train_idx, heldout_idx) =
        holdout_split(all.len(), cfg.data.heldout_fraction, cfg.train.seed)?;
    if filtering(cfg) {
        let filt = LoadedRun::open(Path::new(&cfg.data.filter_checkpoint))?;
        let cand = all.select(&train_idx);
        let scores = filter_scores(&filt, &cand)?;
        let keep = keep_best_pairs(&scores, cfg.data.filter_drop_fraction)?;
        let mut dropped: Vec<usize> = (0..cand.len())
            .filter(|i| keep.binary_search(i).is_err())
            .collect();
        dropped.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        let worst: Vec<String> = dropped
            .iter()
            .take(5)
            .map(|&i| format!("{:?} ({:.3})", cand.captions[i], scores[i]))
            .collect();
        eprintln!(
            "pair filter ({}): dropped {} of {} training pairs; lowest: {}",
            filt.ckpt.display(),
            dropped.len(),
            cand.len(),
            worst.join(", ")
        );
        train_idx = keep.iter().map(|&i| train_idx[i]).collect();
    }
    let train = all.select(&train_idx);
    let heldout = all.select(&heldout_idx);
    Ok((train, heldout))
}

/// This rank's share of the pairs (its row groups), split into (training, held-out) exactly
/// as one process splits the whole source: the global row indices of every rank's good rows
/// are gathered, and a row's position among them decides `data.max_pairs`, the hold-out split
/// and, with a pair filter, the score quantile (scores are gathered too). Every rank must
/// call it (it is collective).
pub fn sharded_split(
    paths: &[String],
    cfg: &MultimodalConfig,
    par: &Parallel,
) -> Result<(PairSet, PairSet)> {
    let r = read_pairs_of(paths, &cfg.data.columns(&[]), par.rank, par.world)?;
    r.share
        .report(par.rank, par.world, r.row_index.len(), "pairs");
    if r.bad_rows.count > 0 {
        eprintln!(
            "rank {}: skipped {} bad rows: {}",
            par.rank, r.bad_rows.count, r.bad_rows
        );
    }
    let mut good = par.gather_indices(&r.row_index)?;
    good.sort_unstable();
    let pos = r
        .row_index
        .iter()
        .map(|i| {
            good.binary_search(i).map_err(|_| {
                MultimodalError::Config(format!(
                    "internal: row {i} is missing from the gathered rows"
                ))
            })
        })
        .collect::<Result<Vec<usize>>>()?;
    let n = match cfg.data.max_pairs {
        0 => good.len(),
        m => good.len().min(m),
    };
    let (train_pos, held_pos) = holdout_split(n, cfg.data.heldout_fraction, cfg.train.seed)?;
    let in_set = |set: &[usize]| -> Vec<usize> {
        (0..pos.len())
            .filter(|&k| set.binary_search(&pos[k]).is_ok())
            .collect()
    };
    let mut train_k = in_set(&train_pos);
    let held_k = in_set(&held_pos);
    if filtering(cfg) {
        let filt = LoadedRun::open(Path::new(&cfg.data.filter_checkpoint))?;
        let scores = filter_scores(&filt, &r.set.select(&train_k))?;
        let cand_pos: Vec<usize> = train_k.iter().map(|&k| pos[k]).collect();
        let all_pos = par.gather_indices(&cand_pos)?;
        let all_scores = par.gather_f32(&scores)?;
        // The candidates in one process's order (by position), their scores, the kept ones.
        let mut order: Vec<usize> = (0..all_pos.len()).collect();
        order.sort_unstable_by_key(|&j| all_pos[j]);
        let sorted: Vec<f32> = order.iter().map(|&j| all_scores[j]).collect();
        let keep = keep_best_pairs(&sorted, cfg.data.filter_drop_fraction)?;
        let mut kept: Vec<usize> = keep.iter().map(|&i| all_pos[order[i]]).collect();
        kept.sort_unstable();
        if par.is_main() {
            eprintln!(
                "pair filter ({}): dropped {} of {} training pairs (over all ranks)",
                filt.ckpt.display(),
                sorted.len() - kept.len(),
                sorted.len()
            );
        }
        train_k.retain(|&k| kept.binary_search(&pos[k]).is_ok());
    }
    Ok((r.set.select(&train_k), r.set.select(&held_k)))
}

/// The held-out pairs `ssl eval` scores: `test` when given, else the run's seeded hold-out of
/// `data` (at least two pairs), with the label columns `labels`.
pub fn eval_pairs(
    cfg: &MultimodalConfig,
    data: &[String],
    test: &[String],
    labels: &[String],
) -> Result<PairSet> {
    if !test.is_empty() {
        return read_run_pairs(test, cfg, labels);
    }
    let all = read_run_pairs(data, cfg, labels)?;
    let (_, idx) = holdout_split(all.len(), cfg.data.heldout_fraction, cfg.train.seed)?;
    if idx.len() < 2 {
        return Err(MultimodalError::Config(format!(
            "data.heldout_fraction = {} holds out {} of {} pairs: give --test or a larger fraction",
            cfg.data.heldout_fraction,
            idx.len(),
            all.len()
        )));
    }
    Ok(all.select(&idx))
}
