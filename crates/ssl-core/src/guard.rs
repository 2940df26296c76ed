//! Guards against bad steps: non-finite losses or gradients, and diverging loss.

use serde::{Deserialize, Serialize};

/// What to do with a step whose loss or gradient norm is NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonFiniteAction {
    /// Skip the update; the run goes on.
    Skip,
    /// Too many in a row: stop with an error.
    Stop,
}

/// Counts non-finite steps; `max_in_a_row` consecutive ones stop the run.
#[derive(Debug, Clone)]
pub struct NonFiniteGuard {
    max_in_a_row: u32,
    in_a_row: u32,
    /// Total steps skipped.
    pub skipped: u64,
}

impl NonFiniteGuard {
    /// A guard that stops after `max_in_a_row` consecutive non-finite steps.
    pub fn new(max_in_a_row: u32, skipped: u64) -> Self {
        NonFiniteGuard {
            max_in_a_row: max_in_a_row.max(1),
            in_a_row: 0,
            skipped,
        }
    }

    /// `None` for a finite step (and resets the run of bad steps); otherwise what to do.
    pub fn check(&mut self, loss: f64, grad_norm: f64) -> Option<NonFiniteAction> {
        if loss.is_finite() && grad_norm.is_finite() {
            self.in_a_row = 0;
            return None;
        }
        self.in_a_row += 1;
        self.skipped += 1;
        Some(if self.in_a_row >= self.max_in_a_row {
            NonFiniteAction::Stop
        } else {
            NonFiniteAction::Skip
        })
    }

    /// Consecutive non-finite steps so far.
    pub fn in_a_row(&self) -> u32 {
        self.in_a_row
    }
}

/// Divergence detection settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DivergenceConfig {
    /// A loss above `factor x` its moving average is reported as divergence (0 disables).
    pub factor: f64,
    /// Smoothing of the moving average (per step), e.g. 0.98.
    pub ema: f64,
    /// Steps to observe before judging.
    pub warmup_steps: u64,
}

impl Default for DivergenceConfig {
    fn default() -> Self {
        DivergenceConfig {
            factor: 3.0,
            ema: 0.98,
            warmup_steps: 50,
        }
    }
}

/// An exponential moving average of the loss and the check against it.
#[derive(Debug, Clone)]
pub struct DivergenceDetector {
    cfg: DivergenceConfig,
    /// The moving average (None before the first step).
    pub average: Option<f64>,
    seen: u64,
}

impl DivergenceDetector {
    /// A detector starting from a saved average (`None` for a fresh run) after `seen` steps.
    pub fn new(cfg: DivergenceConfig, average: Option<f64>, seen: u64) -> Self {
        DivergenceDetector { cfg, average, seen }
    }

    /// Feeds a finite loss; returns `Some(average)` when it is far above the average.
    /// Losses are assumed non-negative (MSE, cross-entropy, InfoNCE).
    pub fn observe(&mut self, loss: f64) -> Option<f64> {
        self.seen += 1;
        let verdict = match self.average {
            Some(avg)
                if self.cfg.factor > 0.0
                    && self.seen > self.cfg.warmup_steps
                    && avg > 0.0
                    && loss > self.cfg.factor * avg =>
            {
                Some(avg)
            }
            _ => None,
        };
        self.average = Some(match self.average {
            None => loss,
            Some(avg) => self.cfg.ema * avg + (1.0 - self.cfg.ema) * loss,
        });
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_finite_guard_skips_then_stops() {
        let mut g = NonFiniteGuard::new(3, 0);
        assert_eq!(g.check(1.0, 1.0), None);
        assert_eq!(g.check(f64::NAN, 1.0), Some(NonFiniteAction::Skip));
        assert_eq!(g.check(1.0, f64::INFINITY), Some(NonFiniteAction::Skip));
        assert_eq!(g.check(1.0, 1.0), None);
        assert_eq!(g.check(f64::NAN, 1.0), Some(NonFiniteAction::Skip));
        assert_eq!(g.check(f64::NAN, 1.0), Some(NonFiniteAction::Skip));
        assert_eq!(g.check(f64::NAN, 1.0), Some(NonFiniteAction::Stop));
        assert_eq!(g.skipped, 5);
    }

    #[test]
    fn divergence_is_flagged_only_after_warmup_and_for_spikes() {
        let mut d = DivergenceDetector::new(
            DivergenceConfig {
                factor: 3.0,
                ema: 0.9,
                warmup_steps: 5,
            },
            None,
            0,
        );
        assert_eq!(d.observe(100.0), None, "first step sets the average");
        for _ in 0..10 {
            assert_eq!(d.observe(1.0 + 0.0), None);
        }
        let avg = d.average.unwrap();
        assert!(d.observe(avg * 2.0).is_none());
        assert!(d.observe(d.average.unwrap() * 5.0).is_some());
    }
}
