//! The best checkpoint and early stopping: which logged figure is watched, in which
//! direction, and the state that decides both (kept in the trainer state, so it survives
//! `--resume`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::{write_dir_atomic, TrainerState};
use crate::optim::AdamW;
use crate::{ParamStore, Result};

/// The directory name of the best checkpoint under `checkpoints/`, outside the rotation of
/// `step-NNNNNNNN` directories (never pruned, never resumed from).
pub const BEST_DIR: &str = "best";

/// Whether a smaller or a larger value of the watched metric is better.
#[derive(
    schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BestMode {
    /// Smaller is better (losses, perplexity, errors).
    #[default]
    Min,
    /// Larger is better (accuracies, recall).
    Max,
}

impl BestMode {
    /// True when `value` is better than `than` by more than `min_delta`.
    pub fn improves(self, value: f64, than: f64, min_delta: f64) -> bool {
        if !value.is_finite() {
            return false;
        }
        match self {
            BestMode::Min => value < than - min_delta,
            BestMode::Max => value > than + min_delta,
        }
    }
}

/// What the trainer remembers of the watched metric (in `trainer_state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestState {
    /// The metric watched (`train.best_metric`).
    pub metric: String,
    /// The step of the best value so far (the step `checkpoints/best` holds).
    pub step: u64,
    /// The best value so far.
    pub value: f64,
    /// The value the last counted improvement reached (early stopping measures
    /// `train.early_stop_min_delta` from it).
    pub reference: f64,
    /// Evaluations since the last improvement of more than `early_stop_min_delta`.
    pub stale_evals: u32,
}

/// The verdict on one logged value of the watched metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BestVerdict {
    /// The value is the best so far: `checkpoints/best` should be written.
    pub new_best: bool,
    /// Early stopping's patience is used up.
    pub stop: bool,
}

impl BestState {
    /// Takes in `value`, logged at `step`, for `metric` watched in `mode`. Early stopping
    /// (patience 0: off) counts evaluations without an improvement of more than `min_delta`.
    pub fn observe(
        state: &mut Option<BestState>,
        metric: &str,
        mode: BestMode,
        step: u64,
        value: f64,
        patience: u32,
        min_delta: f64,
    ) -> BestVerdict {
        let s = match state {
            Some(s) if s.metric == metric => s,
            _ => {
                // The first value seen (or a new metric after a change of configuration).
                if !value.is_finite() {
                    return BestVerdict {
                        new_best: false,
                        stop: false,
                    };
                }
                *state = Some(BestState {
                    metric: metric.to_string(),
                    step,
                    value,
                    reference: value,
                    stale_evals: 0,
                });
                return BestVerdict {
                    new_best: true,
                    stop: false,
                };
            }
        };
        let new_best = mode.improves(value, s.value, 0.0);
        if new_best {
            s.step = step;
            s.value = value;
        }
        if mode.improves(value, s.reference, min_delta) {
            s.reference = value;
            s.stale_evals = 0;
        } else {
            s.stale_evals += 1;
        }
        BestVerdict {
            new_best,
            stop: s.exhausted(patience),
        }
    }

    /// True when early stopping with `patience` (0: off) has run out.
    pub fn exhausted(&self, patience: u32) -> bool {
        patience > 0 && self.stale_evals >= patience
    }
}

/// Writes the checkpoint of `state.step` as `dir/best` (`dir`: the run's `checkpoints/`),
/// replacing the previous best atomically like every checkpoint: the three files written
/// under a temporary name and fsynced, the old best renamed aside, the new one renamed into
/// place, the old one removed. Refuses non-finite parameters. Returns the path.
pub fn save_best(
    dir: &Path,
    params: &ParamStore,
    optimizer: &AdamW,
    state: &TrainerState,
) -> Result<PathBuf> {
    let pid = std::process::id();
    let tmp = dir.join(format!(".tmp-{BEST_DIR}-{pid}"));
    let old = dir.join(format!(".del-{BEST_DIR}-{pid}"));
    let best = dir.join(BEST_DIR);
    write_dir_atomic(dir, &best, &tmp, &old, params, optimizer, state)?;
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_and_patience() {
        let mut s = None;
        let mut seen = Vec::new();
        for (step, v) in [(1, 5.0), (2, 4.0), (3, 3.95), (4, 3.5), (5, 3.6), (6, 3.49)] {
            seen.push(BestState::observe(
                &mut s,
                "eval_loss",
                BestMode::Min,
                step,
                v,
                2,
                0.1,
            ));
        }
        let best: Vec<bool> = seen.iter().map(|v| v.new_best).collect();
        assert_eq!(best, [true, true, true, true, false, true]);
        let stop: Vec<bool> = seen.iter().map(|v| v.stop).collect();
        // 3.95 is not 0.1 better than 4.0 (stale 1); 3.5 is (reset); 3.6, 3.49: stale 1, 2.
        assert_eq!(stop, [false, false, false, false, false, true]);
        let s = s.unwrap();
        assert_eq!((s.step, s.value), (6, 3.49));
        assert!(BestMode::Max.improves(2.0, 1.0, 0.5));
        assert!(!BestMode::Max.improves(f64::NAN, 1.0, 0.0));
    }
}
