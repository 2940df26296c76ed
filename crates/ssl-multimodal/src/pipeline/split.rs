//! Which pairs a run trains on and which it holds out, read in bounded memory: the seeded
//! row selection ([`RowSplit`]: `data.max_pairs` sample, `data.heldout_fraction` held out,
//! by global row index), a bounded seeded sample of training pairs (image shape and
//! normalisation statistics, the pair filter's score threshold), and the held-out set
//! (read in file order until `data.max_heldout_pairs` are found).

use std::path::Path;

use ssl_core::Parallel;
use ssl_data::ParquetSource;

use super::{LoadedRun, MultimodalConfig};
use crate::stream::{collect_pairs, visit_pairs, window_rows, CollectOrder, PairFilter};
use crate::{
    embed_images, embed_token_seqs, keep_best_pairs, tokenize_captions, MultimodalError, PairSet,
    Result, RowSplit,
};
use ssl_text::SpecialIds;

/// Salt of the statistics sample's shuffle, apart from the training stream's.
const SAMPLE_SALT: u64 = 0x7361_6d70_6c65;

/// The row selection of `cfg` over `source` (`train.seed`, `data.heldout_fraction`,
/// `data.max_pairs`, the footers' row count).
pub fn row_split(cfg: &MultimodalConfig, source: &ParquetSource) -> Result<RowSplit> {
    if !(0.0..1.0).contains(&cfg.data.heldout_fraction) {
        return Err(MultimodalError::Config(format!(
            "data.heldout_fraction = {} must be in [0, 1)",
            cfg.data.heldout_fraction
        )));
    }
    Ok(RowSplit {
        seed: cfg.train.seed,
        heldout_fraction: cfg.data.heldout_fraction,
        max_pairs: cfg.data.max_pairs,
        num_rows: source.num_rows(),
    })
}

/// Reads every pair of `paths` with the label columns `labels` into memory (skipped rows
/// reported on stderr), keeping the seeded `data.max_pairs` sample of rows: for small sets
/// and tests; the pipeline streams.
pub fn read_run_pairs(
    paths: &[String],
    cfg: &MultimodalConfig,
    labels: &[String],
) -> Result<PairSet> {
    let r = crate::read_pairs_of(paths, &cfg.data.columns(labels), 0, 1)?;
    if r.bad_rows.count > 0 {
        eprintln!("skipped {} bad rows: {}", r.bad_rows.count, r.bad_rows);
    }
    let split = row_split(cfg, &ParquetSource::open(paths)?)?;
    let keep: Vec<usize> = (0..r.set.len())
        .filter(|&k| split.in_sample(r.row_index[k]))
        .collect();
    Ok(if keep.len() == r.set.len() {
        r.set
    } else {
        r.set.select(&keep)
    })
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
pub fn filtering(cfg: &MultimodalConfig) -> bool {
    !cfg.data.filter_checkpoint.is_empty() && cfg.data.filter_drop_fraction > 0.0
}

/// Bytes of the decoded shuffle window (`data.shuffle_buffer_mb`).
pub fn shuffle_bytes(cfg: &MultimodalConfig) -> usize {
    cfg.data.shuffle_buffer_mb.max(1).saturating_mul(1 << 20)
}

/// A seeded sample of at most `data.sample_pairs` training pairs: the first training pairs
/// of a shuffled pass (row groups in a seeded order, rows shuffled within a window of about
/// the sample's size), so only a few row groups are decoded whatever the source's size.
/// Every rank reads the same sample. Progress: `sample pairs`.
pub fn training_sample(
    source: &ParquetSource,
    cfg: &MultimodalConfig,
    split: &RowSplit,
) -> Result<PairSet> {
    let n = cfg.data.sample_pairs.max(2);
    let window = match cfg.data.resize.as_slice() {
        [h, w] => window_rows([cfg.data.color.channels(), *h, *w], shuffle_bytes(cfg), 1).min(n),
        _ => n,
    };
    let order = CollectOrder {
        shuffle: Some(cfg.train.seed ^ SAMPLE_SALT),
        window,
    };
    let got = collect_pairs(
        source,
        &cfg.data.columns(&[]),
        order,
        |i| split.is_training(i),
        n,
        "sample pairs",
    )?;
    if got.bad_rows.count > 0 {
        eprintln!(
            "sample: skipped {} bad rows: {}",
            got.bad_rows.count, got.bad_rows
        );
    }
    Ok(got.set)
}

/// The held-out pairs of `paths` with the label columns `labels`: the rows the run holds
/// out, read in file order until `data.max_heldout_pairs` are found (0: all), so the read
/// is bounded whatever the source's size. Progress: `held-out pairs`.
pub fn heldout_pairs(
    paths: &[String],
    cfg: &MultimodalConfig,
    labels: &[String],
) -> Result<PairSet> {
    let source = ParquetSource::open(paths)?;
    let split = row_split(cfg, &source)?;
    let got = collect_pairs(
        &source,
        &cfg.data.columns(labels),
        eval_order(cfg),
        |i| split.is_heldout(i),
        cfg.data.max_heldout_pairs,
        "held-out pairs",
    )?;
    report_pass(cfg, &got.bad_rows, got.blank_captions);
    Ok(got.set)
}

/// File order, a batch of `train.batch_size` decoded at a time.
fn eval_order(cfg: &MultimodalConfig) -> CollectOrder {
    CollectOrder {
        shuffle: None,
        window: cfg.train.batch_size.max(2),
    }
}

/// Says on stderr what a bounded pass skipped.
fn report_pass(cfg: &MultimodalConfig, bad: &ssl_data::BadRowReport, blanks: usize) {
    if bad.count > 0 {
        eprintln!("skipped {} bad rows: {bad}", bad.count);
    }
    if blanks > 0 {
        eprintln!(
            "skipped {blanks} pairs with an empty caption in column `{}`",
            cfg.data.caption_column
        );
    }
}

/// The pair filter of `cfg` (`data.filter_checkpoint`, `data.filter_drop_fraction`), or
/// `None`: rank 0 scores the training `sample` with the filter run's model and takes the
/// `filter_drop_fraction` quantile of the scores as the threshold (printed with the
/// lowest-scoring captions); every rank gets rank 0's threshold. The stream then drops each
/// training pair scoring under it. Every rank must call it (it is collective).
pub fn pair_filter(
    cfg: &MultimodalConfig,
    sample: &PairSet,
    par: &Parallel,
) -> Result<Option<PairFilter>> {
    if !filtering(cfg) {
        return Ok(None);
    }
    let filt = LoadedRun::open(Path::new(&cfg.data.filter_checkpoint))?;
    let threshold = if par.is_main() {
        let scores = filter_scores(&filt, sample)?;
        let t = filter_threshold(&scores, cfg.data.filter_drop_fraction)?;
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        let worst: Vec<String> = order
            .iter()
            .take(5)
            .map(|&i| format!("{:?} ({:.3})", sample.captions[i], scores[i]))
            .collect();
        eprintln!(
            "pair filter ({}): threshold {t:.4} (the {:.0}% quantile of {} sampled training pairs' scores); pairs under it are dropped as they stream; lowest: {}",
            filt.ckpt.display(),
            cfg.data.filter_drop_fraction * 100.0,
            scores.len(),
            worst.join(", ")
        );
        t.to_le_bytes().to_vec()
    } else {
        Vec::new()
    };
    let bytes = par.broadcast_bytes(threshold)?;
    let threshold = f32::from_le_bytes(bytes.as_slice().try_into().map_err(|_| {
        MultimodalError::Config(format!(
            "internal: the pair filter threshold came as {} bytes",
            bytes.len()
        ))
    })?);
    Ok(Some(PairFilter {
        model: filt.model,
        tok: filt.tok,
        max_seq_len: filt.cfg.max_seq_len,
        device: filt.device,
        threshold,
    }))
}

/// The score under which a pair is dropped so that `drop_fraction` of pairs scoring like
/// `scores` are: halfway between the highest dropped and the lowest kept score of
/// [`keep_best_pairs`] (the lowest score minus one when nothing is dropped).
pub fn filter_threshold(scores: &[f32], drop_fraction: f64) -> Result<f32> {
    let keep = keep_best_pairs(scores, drop_fraction)?;
    if scores.is_empty() {
        return Err(MultimodalError::InvalidInput(
            "no sampled pairs to set the pair filter's threshold from".into(),
        ));
    }
    let mut sorted = scores.to_vec();
    sorted.sort_by(f32::total_cmp);
    let dropped = scores.len() - keep.len();
    Ok(match dropped {
        0 => sorted[0] - 1.0,
        d if d >= sorted.len() => sorted[sorted.len() - 1] + 1.0,
        d => 0.5 * (sorted[d - 1] + sorted[d]),
    })
}

/// Streams the pairs `ssl eval` scores to `visit`, a batch at a time: the rows of `test`
/// when given (the `data.max_pairs` sample), else the run's seeded hold-out of `data`; in
/// file order, at most `data.max_heldout_pairs` (0: all), with the label columns `labels`.
/// Returns the number of pairs; fewer than two held-out pairs is an error.
pub fn visit_eval_pairs(
    cfg: &MultimodalConfig,
    data: &[String],
    test: &[String],
    labels: &[String],
    visit: impl FnMut(PairSet, Vec<usize>) -> Result<()>,
) -> Result<usize> {
    let is_test = !test.is_empty();
    let source = ParquetSource::open(if is_test { test } else { data })?;
    let split = row_split(cfg, &source)?;
    let keep = move |i| {
        if is_test {
            split.in_sample(i)
        } else {
            split.is_heldout(i)
        }
    };
    let label = if is_test {
        "test pairs"
    } else {
        "held-out pairs"
    };
    let cols = cfg.data.columns(labels);
    let r = visit_pairs(
        &source,
        &cols,
        eval_order(cfg),
        keep,
        cfg.data.max_heldout_pairs,
        label,
        visit,
    )?;
    report_pass(cfg, &r.bad_rows, r.blank_captions);
    if !is_test && r.kept < 2 {
        return Err(MultimodalError::Config(format!(
            "data.heldout_fraction = {} holds out {} pairs of {}: give --test or a larger fraction",
            cfg.data.heldout_fraction,
            r.kept,
            data.join(", ")
        )));
    }
    Ok(r.kept)
}

/// The pairs of [`visit_eval_pairs`] collected in memory (bounded by
/// `data.max_heldout_pairs`).
pub fn eval_pairs(
    cfg: &MultimodalConfig,
    data: &[String],
    test: &[String],
    labels: &[String],
) -> Result<PairSet> {
    let mut parts: Vec<PairSet> = Vec::new();
    visit_eval_pairs(cfg, data, test, labels, |set, _| {
        parts.push(set);
        Ok(())
    })?;
    let mut it = parts.into_iter();
    let mut all = it.next().ok_or_else(|| {
        MultimodalError::InvalidInput(format!("no pairs to evaluate in {}", test.join(", ")))
    })?;
    for p in it {
        all.append(p)?;
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_threshold_drops_the_asked_fraction_of_the_sample() {
        let s = [0.5, -0.2, 0.9, 0.1, 0.3];
        let t = filter_threshold(&s, 0.4).unwrap();
        assert!((t - 0.2).abs() < 1e-6, "{t}");
        assert_eq!(s.iter().filter(|&&x| x >= t).count(), 3);
        let t = filter_threshold(&s, 0.0).unwrap();
        assert!(s.iter().all(|&x| x >= t));
        assert!(filter_threshold(&[], 0.1).is_err());
    }
}
