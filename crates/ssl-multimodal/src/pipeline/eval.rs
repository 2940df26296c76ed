//! Evaluation of a trained run on held-out pairs: recall@K both ways and zero-shot
//! classification, for the trained model and for untrained towers of the same shape.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use serde::Serialize;
use ssl_text::SpecialIds;
use tokenizers::Tokenizer;

use super::{build_model, check_shape, eval_pairs, LoadedRun, MultimodalConfig};
use crate::{
    embed_images, embed_token_seqs, retrieval, tokenize_captions, zero_shot, ClipModel, PairSet,
    Result, ZeroShotReport,
};

/// Recall@K keyed `r@K` (`r@1`, `r@5`, ...).
pub type RecallAtK = BTreeMap<String, f64>;

/// Retrieval and zero-shot figures of one model (fields in JSON key order).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MultimodalScores {
    /// Recall@K of a random ranking: `K / N`.
    pub chance: RecallAtK,
    /// Recall@K of the own caption among all held-out captions, per image.
    pub image_to_text: RecallAtK,
    /// Recall@K of the own image among all held-out images, per caption.
    pub text_to_image: RecallAtK,
    /// Zero-shot classification per label column.
    pub zero_shot: BTreeMap<String, ZeroShotReport>,
}

/// What `ssl eval multimodal` prints: one JSON object (fields in JSON key order).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MultimodalEvalReport {
    /// The checkpoint evaluated.
    pub checkpoint: String,
    /// Its `logit_scale`.
    pub logit_scale: f64,
    /// Held-out pairs scored.
    pub n_heldout: usize,
    /// The prompt templates of zero-shot classification.
    pub templates: Vec<String>,
    /// The trained model.
    pub trained: MultimodalScores,
    /// Untrained towers of the same shape (seeded by `train.seed`): the baseline.
    pub untrained: MultimodalScores,
}

/// Retrieval and zero-shot figures of `model` on `heldout`, zero-shot over the label
/// `columns` (read along with the pairs).
pub fn evaluate(
    model: &ClipModel,
    tok: &Tokenizer,
    cfg: &MultimodalConfig,
    heldout: &PairSet,
    columns: &[String],
    device: &Device,
) -> Result<MultimodalScores> {
    let bs = cfg.train.batch_size.max(1);
    let img = embed_images(model, &heldout.images, bs, device)?;
    let seqs = tokenize_captions(tok, &heldout.captions, &heldout.ids, cfg.max_seq_len)?;
    let pad = SpecialIds::of(tok)?.pad;
    let txt = embed_token_seqs(model, &seqs, pad, bs, device)?;
    let r = retrieval(&img, &txt, &cfg.eval.ks)?;
    let named = |v: &[f64]| -> RecallAtK {
        r.k.iter()
            .zip(v)
            .map(|(k, x)| (format!("r@{k}"), *x))
            .collect()
    };
    let mut zs = BTreeMap::new();
    for c in columns {
        let labels = heldout.label_column(c)?;
        let z = zero_shot(
            model,
            tok,
            &img,
            labels,
            &cfg.eval.templates,
            cfg.max_seq_len,
            device,
        )?;
        zs.insert(c.clone(), z);
    }
    Ok(MultimodalScores {
        chance: named(&r.chance),
        image_to_text: named(&r.image_to_text),
        text_to_image: named(&r.text_to_image),
        zero_shot: zs,
    })
}

/// Evaluates the checkpoint `ckpt` (trained with `cfg`, see
/// [`stored_config`](super::stored_config)) on the held-out pairs: `test` when given, else
/// the run's seeded hold-out of `data`. Zero-shot classification runs over `label_column`,
/// or `eval.zero_shot_columns` without one. The trained model and untrained towers of the
/// same shape are scored alike.
pub fn eval(
    ckpt: &Path,
    cfg: &MultimodalConfig,
    data: &[String],
    test: &[String],
    label_column: Option<&str>,
) -> Result<MultimodalEvalReport> {
    let run = LoadedRun::load(ckpt, cfg.clone())?;
    let columns: Vec<String> = match label_column {
        Some(l) => vec![l.to_string()],
        None => cfg.eval.zero_shot_columns.clone(),
    };
    let heldout = eval_pairs(cfg, data, test, &columns)?;
    check_shape(&heldout, cfg)?;
    let trained = evaluate(&run.model, &run.tok, cfg, &heldout, &columns, &run.device)?;
    let (_, fresh) = build_model(cfg, &run.device)?;
    let untrained = evaluate(&fresh, &run.tok, cfg, &heldout, &columns, &run.device)?;
    Ok(MultimodalEvalReport {
        checkpoint: run.ckpt.display().to_string(),
        n_heldout: heldout.len(),
        logit_scale: run.model.logit_scale_value()?,
        templates: cfg.eval.templates.clone(),
        trained,
        untrained,
    })
}
