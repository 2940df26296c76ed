//! Evaluation of a trained run on held-out pairs: recall@K both ways and zero-shot
//! classification, for the trained model and for untrained towers of the same shape. The
//! pairs stream and are embedded as they come; only their embeddings and labels are held.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Serialize;
use ssl_core::{Ctx, SslRng};
use ssl_text::{SpecialIds, TextBatch};
use tokenizers::Tokenizer;

use super::{build_model, check_shape, visit_eval_pairs, LoadedRun, MultimodalConfig};
use crate::{
    embed_images, embed_token_seqs, retrieval, tokenize_captions, zero_shot, ClipModel,
    MultimodalError, PairSet, Result, ZeroShotReport,
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
    scores_of_embeddings(
        model,
        tok,
        cfg,
        &img,
        &txt,
        &heldout.labels,
        columns,
        device,
    )
}

/// Retrieval and zero-shot figures from the held-out pairs' embeddings under `model`
/// (`image` and `text`, row `i` a pair) and their `labels` (zero-shot over `columns`).
#[allow(clippy::too_many_arguments)]
pub fn scores_of_embeddings(
    model: &ClipModel,
    tok: &Tokenizer,
    cfg: &MultimodalConfig,
    image: &Tensor,
    text: &Tensor,
    labels: &[(String, Vec<String>)],
    columns: &[String],
    device: &Device,
) -> Result<MultimodalScores> {
    let r = retrieval(image, text, &cfg.eval.ks)?;
    let named = |v: &[f64]| -> RecallAtK {
        r.k.iter()
            .zip(v)
            .map(|(k, x)| (format!("r@{k}"), *x))
            .collect()
    };
    let mut zs = BTreeMap::new();
    for c in columns {
        let l = labels
            .iter()
            .find(|(n, _)| n == c)
            .map(|(_, l)| l.as_slice())
            .ok_or_else(|| {
                MultimodalError::InvalidInput(format!("label column `{c}` was not read"))
            })?;
        let z = zero_shot(
            model,
            tok,
            image,
            l,
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
/// the run's seeded hold-out of `data`, at most `data.max_heldout_pairs` of them. Zero-shot
/// classification runs over `label_column`, or `eval.zero_shot_columns` without one. The
/// trained model and untrained towers of the same shape are scored alike. The pairs stream
/// (a batch decoded at a time, embedded by both models as it comes); the `(N, embed_dim)`
/// embeddings and the labels are held for recall@K and zero-shot, which rank all pairs
/// together.
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
    let (_, fresh) = build_model(cfg, &run.device)?;
    let models = [&run.model, &fresh];
    let pad = SpecialIds::of(&run.tok)?.pad;
    let mut rng = SslRng::new(0);
    let (mut img, mut txt): ([Vec<Tensor>; 2], [Vec<Tensor>; 2]) = Default::default();
    let mut labels: Vec<(String, Vec<String>)> =
        columns.iter().map(|c| (c.clone(), Vec::new())).collect();
    let n = visit_eval_pairs(cfg, data, test, &columns, |set, _| {
        check_shape(&set, cfg)?;
        let images = set.images.batch(0, set.len(), &run.device)?;
        let seqs = tokenize_captions(&run.tok, &set.captions, &set.ids, cfg.max_seq_len)?;
        let text = TextBatch {
            seqs,
            pad_id: pad,
            device: run.device.clone(),
        }
        .tensors()?;
        for (m, model) in models.iter().enumerate() {
            img[m].push(model.encode_image(&images, &mut Ctx::inference(&mut rng))?);
            txt[m].push(model.encode_text(&text, &mut Ctx::inference(&mut rng))?);
        }
        for ((_, l), (_, m)) in labels.iter_mut().zip(set.labels) {
            l.extend(m);
        }
        Ok(())
    })?;
    if n == 0 {
        return Err(MultimodalError::InvalidInput(format!(
            "no pairs to evaluate in {}",
            if test.is_empty() { data } else { test }.join(", ")
        )));
    }
    let mut scores = Vec::with_capacity(2);
    for (m, model) in models.iter().enumerate() {
        let i = Tensor::cat(&img[m], 0)?;
        let t = Tensor::cat(&txt[m], 0)?;
        scores.push(scores_of_embeddings(
            model,
            &run.tok,
            cfg,
            &i,
            &t,
            &labels,
            &columns,
            &run.device,
        )?);
    }
    let untrained = scores.pop().expect("two models");
    let trained = scores.pop().expect("two models");
    Ok(MultimodalEvalReport {
        checkpoint: run.ckpt.display().to_string(),
        n_heldout: n,
        logit_scale: run.model.logit_scale_value()?,
        templates: cfg.eval.templates.clone(),
        trained,
        untrained,
    })
}
