//! Learning-rate schedules, evaluated per optimizer step.

use serde::{Deserialize, Serialize};

/// The shape of the learning-rate curve.
#[derive(
    schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// The base rate throughout (after the optional warmup).
    Constant,
    /// Linear warmup, then cosine decay to the floor (MAE, most SSL recipes).
    #[default]
    Cosine,
    /// Linear warmup, then linear decay to the floor (BERT / transformers' default).
    Linear,
}

/// A learning-rate schedule: `lr(step)` for `step` in `0..total_steps`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Curve shape.
    pub kind: ScheduleKind,
    /// Peak learning rate.
    pub base_lr: f64,
    /// Steps of linear warmup from 0 to `base_lr`.
    pub warmup_steps: u64,
    /// Total steps of the run (decay reaches the floor here).
    pub total_steps: u64,
    /// The floor, as a fraction of `base_lr`.
    pub min_lr_ratio: f64,
}

impl LrSchedule {
    /// The learning rate for (0-based) optimizer step `step`.
    pub fn lr(&self, step: u64) -> f64 {
        let base = self.base_lr;
        if step < self.warmup_steps {
            return base * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let floor = base * self.min_lr_ratio;
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).clamp(0.0, 1.0);
        match self.kind {
            ScheduleKind::Constant => base,
            ScheduleKind::Cosine => {
                floor + (base - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            ScheduleKind::Linear => floor + (base - floor) * (1.0 - progress),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(kind: ScheduleKind) -> LrSchedule {
        LrSchedule {
            kind,
            base_lr: 1.0,
            warmup_steps: 10,
            total_steps: 110,
            min_lr_ratio: 0.1,
        }
    }

    #[test]
    fn warmup_is_linear_and_reaches_peak() {
        let c = s(ScheduleKind::Cosine);
        assert!((c.lr(0) - 0.1).abs() < 1e-12);
        assert!((c.lr(4) - 0.5).abs() < 1e-12);
        assert!((c.lr(9) - 1.0).abs() < 1e-12);
        assert!((c.lr(10) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn cosine_and_linear_decay_to_floor() {
        let c = s(ScheduleKind::Cosine);
        assert!((c.lr(60) - 0.55).abs() < 1e-12, "{}", c.lr(60));
        assert!((c.lr(110) - 0.1).abs() < 1e-12);
        assert!((c.lr(500) - 0.1).abs() < 1e-12);
        let l = s(ScheduleKind::Linear);
        assert!((l.lr(60) - 0.55).abs() < 1e-12);
        assert!((l.lr(35) - 0.775).abs() < 1e-12);
        let mut prev = f64::INFINITY;
        for step in 10..=110 {
            assert!(c.lr(step) <= prev + 1e-15);
            prev = c.lr(step);
        }
        assert_eq!(s(ScheduleKind::Constant).lr(80), 1.0);
    }
}
