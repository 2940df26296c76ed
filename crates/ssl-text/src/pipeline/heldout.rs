//! Held-out masked-LM evaluation over the ranks of a run, and the points of the held-out
//! curve (`heldout.jsonl`).

use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};
use ssl_core::Parallel;

use crate::{evaluate_mlm, BertForMaskedLM, MlmEval, Result, TextError, TokenizedSeq};

/// One line of `heldout.jsonl`: the held-out figures of the model at a step (0: before
/// training). Fields in alphabetical order, as the file has always had them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HeldoutPoint {
    /// Mean cross-entropy over the masked tokens.
    pub loss: f64,
    /// Fraction of masked tokens predicted exactly.
    pub masked_accuracy: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// The training step of the checkpoint evaluated.
    pub step: u64,
}

impl HeldoutPoint {
    /// The point of `eval` at `step`.
    pub fn new(step: u64, eval: &MlmEval) -> Self {
        HeldoutPoint {
            loss: eval.loss,
            masked_accuracy: eval.masked_accuracy,
            perplexity: eval.perplexity,
            step,
        }
    }
}

/// Held-out masked-LM evaluation. With several ranks every rank evaluates its own sequences
/// and the sums (cross-entropy over masked tokens, masked tokens, correct predictions) are
/// added over ranks, so the figures cover the held-out documents of all ranks. Every rank must
/// call it (it is collective).
pub fn heldout_eval(
    par: &Parallel,
    model: &BertForMaskedLM,
    seqs: &[TokenizedSeq],
    batch_size: usize,
    pad: u32,
    seed: u64,
    device: &Device,
) -> Result<MlmEval> {
    if par.world == 1 {
        return evaluate_mlm(model, seqs, batch_size, pad, seed, device);
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
    local?;
    if sums[3] > 0.0 {
        return Err(TextError::Pipeline(format!(
            "held-out evaluation failed on {} other rank(s)",
            sums[3] as usize
        )));
    }
    let n = sums[1];
    if n == 0.0 {
        return Err(TextError::Pipeline(
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

/// The held-out curve: at each evaluation (the pipeline calls [`HeldoutCurve::add`] from
/// its `ssl_core::HeldoutEval` hook) the model is evaluated on the held-out sequences
/// ([`heldout_eval`], over all ranks) and the point is added to the curve, which rank 0 writes
/// to `heldout.jsonl` (atomically, after each point). A resumed run keeps the points the file
/// already holds below its first new step.
pub struct HeldoutCurve<'a> {
    /// The run's ranks (every rank evaluates its share).
    pub par: &'a Parallel,
    /// This rank's held-out sequences.
    pub seqs: &'a [TokenizedSeq],
    /// Sequences per evaluation batch.
    pub batch_size: usize,
    /// The padding id.
    pub pad: u32,
    /// The masking seed (the same masks at every point).
    pub seed: u64,
    /// Where the model runs.
    pub device: &'a Device,
    /// The file rank 0 writes (`None`: keep the curve in memory only).
    pub file: Option<PathBuf>,
    /// The curve so far, in step order.
    pub points: Vec<HeldoutPoint>,
}

impl HeldoutCurve<'_> {
    /// Evaluates the model now and adds the point of `step` (replacing any later points, left
    /// by a run that went further before being resumed from an earlier checkpoint).
    pub fn add(&mut self, model: &BertForMaskedLM, step: u64) -> Result<HeldoutPoint> {
        let e = heldout_eval(
            self.par,
            model,
            self.seqs,
            self.batch_size,
            self.pad,
            self.seed,
            self.device,
        )?;
        let point = HeldoutPoint::new(step, &e);
        self.points.retain(|p| p.step < step);
        self.points.push(point);
        if self.par.is_main() {
            if let Some(file) = &self.file {
                write_curve(file, &self.points)?;
            }
        }
        Ok(point)
    }
}

/// The points of a `heldout.jsonl` file (none when it does not exist).
pub fn read_curve(file: &Path) -> Result<Vec<HeldoutPoint>> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(TextError::Io {
                path: file.to_path_buf(),
                source: e,
            })
        }
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                TextError::Pipeline(format!("{}, line {}: {e}", file.display(), i + 1))
            })
        })
        .collect()
}

/// Writes the curve as one JSON object per line, through a temporary file and a rename.
fn write_curve(file: &Path, points: &[HeldoutPoint]) -> Result<()> {
    let mut text = String::new();
    for p in points {
        text.push_str(&serde_json::to_string(p).map_err(|e| TextError::Pipeline(e.to_string()))?);
        text.push('\n');
    }
    Ok(ssl_data::output::write_output(file, text.as_bytes())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{build_model, tokenize, TextConfig};
    use crate::{InputMode, SpecialIds, TokenizerConfig};

    #[test]
    fn heldout_sums_are_added_over_ranks() {
        let texts: Vec<String> = (0..24)
            .map(|i| format!("the quick brown fox {i} jumps over the lazy dog {}", i * 7))
            .collect();
        let tok = crate::train_from_texts(
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
            let out = Parallel::on_threads(2, |p| {
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
