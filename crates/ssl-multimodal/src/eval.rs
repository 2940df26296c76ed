//! Evaluation of a trained (or untrained) two-tower model: embedding whole sets,
//! image-to-text and text-to-image recall@K on held-out pairs against chance, and zero-shot
//! classification from class names with prompt templates (CLIP's recipe: embed every
//! prompt of a class, average, re-normalise; predict the most similar class).

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use ssl_core::nn::ops::l2_normalize;
use ssl_core::{Ctx, SslRng};
use ssl_text::{SpecialIds, TextBatch, TokenizedSeq};
use ssl_vision::ImageSet;
use tokenizers::Tokenizer;

use crate::data::tokenize_captions;
use crate::model::{cosine_matrix, pair_scores, ClipModel};
use crate::{MultimodalError, Result};

/// Normalised image embeddings `(N, embed_dim)` of a whole set, in evaluation mode.
pub fn embed_images(
    model: &ClipModel,
    images: &ImageSet,
    batch: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut rng = SslRng::new(0);
    let mut parts = Vec::new();
    let progress = ssl_core::monitor::Progress::task("embed images", images.len() as u64, "images");
    for start in (0..images.len()).step_by(batch.max(1)) {
        let b = images.batch(start, batch.max(1), device)?;
        parts.push(model.encode_image(&b, &mut Ctx::inference(&mut rng))?);
        progress.inc((images.len() - start).min(batch.max(1)) as u64);
    }
    progress.finish();
    if parts.is_empty() {
        return Err(MultimodalError::InvalidInput("no images to embed".into()));
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Normalised text embeddings `(N, embed_dim)` of tokenized captions, in evaluation mode.
pub fn embed_token_seqs(
    model: &ClipModel,
    seqs: &[TokenizedSeq],
    pad_id: u32,
    batch: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut rng = SslRng::new(0);
    let mut parts = Vec::new();
    let progress = ssl_core::monitor::Progress::task("embed texts", seqs.len() as u64, "texts");
    for chunk in seqs.chunks(batch.max(1)) {
        let input = TextBatch {
            seqs: chunk.to_vec(),
            pad_id,
            device: device.clone(),
        }
        .tensors()?;
        parts.push(model.encode_text(&input, &mut Ctx::inference(&mut rng))?);
        progress.inc(chunk.len() as u64);
    }
    progress.finish();
    if parts.is_empty() {
        return Err(MultimodalError::InvalidInput("no captions to embed".into()));
    }
    Ok(Tensor::cat(&parts, 0)?)
}

/// Normalised text embeddings of raw texts (tokenized with `tok`, truncated to `max_len`).
pub fn embed_texts(
    model: &ClipModel,
    tok: &Tokenizer,
    texts: &[String],
    max_len: usize,
    batch: usize,
    device: &Device,
) -> Result<Tensor> {
    let ids: Vec<String> = (0..texts.len()).map(|i| format!("text {i}")).collect();
    let seqs = tokenize_captions(tok, texts, &ids, max_len)?;
    let pad = SpecialIds::of(tok)?.pad;
    embed_token_seqs(model, &seqs, pad, batch, device)
}

/// Recall@K of `n` queries against `n` candidates where query `i`'s match is candidate `i`:
/// `sim` is `(n, n)` row-major, rows are queries. A query hits at K when fewer than K other
/// candidates score strictly higher than its match.
pub fn recall_at_k(sim: &[f32], n: usize, ks: &[usize]) -> Result<Vec<f64>> {
    if n == 0 || sim.len() != n * n {
        return Err(MultimodalError::InvalidInput(format!(
            "recall@K needs an n x n similarity matrix with n > 0 (n = {n}, {} values)",
            sim.len()
        )));
    }
    let ranks: Vec<usize> = (0..n)
        .map(|i| {
            let row = &sim[i * n..(i + 1) * n];
            let own = row[i];
            row.iter()
                .enumerate()
                .filter(|(j, s)| *j != i && **s > own)
                .count()
        })
        .collect();
    Ok(ks
        .iter()
        .map(|&k| ranks.iter().filter(|&&r| r < k).count() as f64 / n as f64)
        .collect())
}

/// Retrieval figures on held-out pairs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievalReport {
    /// Pairs (queries in each direction).
    pub n: usize,
    /// The K of each figure.
    pub k: Vec<usize>,
    /// Image query, caption candidates.
    pub image_to_text: Vec<f64>,
    /// Caption query, image candidates.
    pub text_to_image: Vec<f64>,
    /// A random ranking's recall@K: `min(K, n) / n`.
    pub chance: Vec<f64>,
}

/// Recall@K both ways of paired normalised embeddings (row `i` of each is a pair).
pub fn retrieval(image: &Tensor, text: &Tensor, ks: &[usize]) -> Result<RetrievalReport> {
    let (n, _) = image.dims2()?;
    if text.dims2()?.0 != n {
        return Err(MultimodalError::InvalidInput(format!(
            "{n} image embeddings but {} text embeddings",
            text.dims2()?.0
        )));
    }
    let i2t = cosine_matrix(image, text)?;
    let t2i = cosine_matrix(text, image)?;
    Ok(RetrievalReport {
        n,
        k: ks.to_vec(),
        image_to_text: recall_at_k(&i2t, n, ks)?,
        text_to_image: recall_at_k(&t2i, n, ks)?,
        chance: ks.iter().map(|&k| k.min(n) as f64 / n as f64).collect(),
    })
}

/// Zero-shot classification figures (fields in JSON key order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ZeroShotReport {
    /// Fraction of images whose most similar class prompt is their label.
    pub accuracy: f64,
    /// A uniform random guess: `1 / n_classes`.
    pub chance: f64,
    /// Always predicting the most frequent class.
    pub majority: f64,
    /// Images classified.
    pub n: usize,
    /// Distinct classes (the candidates).
    pub n_classes: usize,
}

/// The prompt of `template` for a class name: `{}` is replaced by the name with `-` and `_`
/// read as spaces (`animal-mammal` -> `animal mammal`).
pub fn prompt(template: &str, class: &str) -> String {
    let name = class.replace(['-', '_'], " ");
    if template.contains("{}") {
        template.replace("{}", &name)
    } else {
        format!("{template} {name}")
    }
}

/// Classifies normalised image embeddings `(N, E)` among the distinct values of `labels`
/// (one per image) by the average embedding of the class's prompts.
pub fn zero_shot(
    model: &ClipModel,
    tok: &Tokenizer,
    image: &Tensor,
    labels: &[String],
    templates: &[String],
    max_len: usize,
    device: &Device,
) -> Result<ZeroShotReport> {
    let (n, _) = image.dims2()?;
    if labels.len() != n || n == 0 {
        return Err(MultimodalError::InvalidInput(format!(
            "{n} images but {} labels",
            labels.len()
        )));
    }
    if templates.is_empty() {
        return Err(MultimodalError::Config(
            "zero-shot classification needs at least one prompt template".into(),
        ));
    }
    let mut classes: Vec<String> = labels.to_vec();
    classes.sort();
    classes.dedup();
    let mut class_emb = Vec::with_capacity(classes.len());
    for c in &classes {
        let prompts: Vec<String> = templates.iter().map(|t| prompt(t, c)).collect();
        let e = embed_texts(model, tok, &prompts, max_len, prompts.len(), device)?;
        class_emb.push(e.mean_keepdim(0)?);
    }
    let class_emb = l2_normalize(&Tensor::cat(&class_emb, 0)?)?;
    let sim = cosine_matrix(image, &class_emb)?;
    let c = classes.len();
    let mut correct = 0usize;
    for (i, label) in labels.iter().enumerate() {
        let row = &sim[i * c..(i + 1) * c];
        let best = row
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (j, &s)| if s > b.1 { (j, s) } else { b },
            )
            .0;
        if &classes[best] == label {
            correct += 1;
        }
    }
    let majority = classes
        .iter()
        .map(|c| labels.iter().filter(|l| *l == c).count())
        .max()
        .unwrap_or(0);
    Ok(ZeroShotReport {
        n,
        n_classes: c,
        accuracy: correct as f64 / n as f64,
        chance: 1.0 / c as f64,
        majority: majority as f64 / n as f64,
    })
}

/// Cosine similarity of each image with its own caption (the pair-quality score).
pub fn score_pairs(image: &Tensor, text: &Tensor) -> Result<Vec<f32>> {
    pair_scores(image, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_on_a_constructed_case() {
        // 4 queries: ranks of the match 0, 1, 3, 0 (query 2's match is last).
        #[rustfmt::skip]
        let sim = vec![
            0.9, 0.1, 0.2, 0.3,
            0.8, 0.5, 0.1, 0.0,
            0.9, 0.8, 0.1, 0.7,
            0.0, 0.1, 0.2, 0.3,
        ];
        let r = recall_at_k(&sim, 4, &[1, 2, 4]).unwrap();
        assert_eq!(r, vec![0.5, 0.75, 1.0]);
        assert!(recall_at_k(&sim, 3, &[1]).is_err());
    }

    #[test]
    fn prompts_read_names() {
        assert_eq!(
            prompt("an emoji of {}", "animal-mammal"),
            "an emoji of animal mammal"
        );
        assert_eq!(prompt("emoji:", "Flags"), "emoji: Flags");
    }
}
