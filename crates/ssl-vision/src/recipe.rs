//! MAE's optimisation recipe: AdamW betas (0.9, 0.95), weight decay 0.05 (not on norms,
//! biases, class/mask tokens: ssl-core's parameter groups), lr = base_lr x batch / 256,
//! linear warmup then cosine decay.

use ssl_core::optim::ScheduleKind;
use ssl_core::TrainConfig;

/// `base_lr x effective_batch / 256`, MAE's linear scaling rule.
pub fn scaled_lr(base_lr: f64, batch_size: usize, accum_steps: usize) -> f64 {
    base_lr * (batch_size * accum_steps.max(1)) as f64 / 256.0
}

/// A [`TrainConfig`] with MAE's recipe for `max_steps` steps (warmup: 5% of the steps,
/// MAE's 40 of 800 epochs).
pub fn recipe_train_config(
    base_lr: f64,
    batch_size: usize,
    accum_steps: usize,
    max_steps: u64,
) -> TrainConfig {
    TrainConfig {
        max_steps,
        batch_size,
        accum_steps,
        lr: scaled_lr(base_lr, batch_size, accum_steps),
        schedule: ScheduleKind::Cosine,
        warmup_steps: (max_steps / 20).max(1),
        min_lr_ratio: 0.0,
        weight_decay: 0.05,
        beta1: 0.9,
        beta2: 0.95,
        grad_clip: 0.0,
        ..TrainConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_scaling_and_betas() {
        assert!((scaled_lr(1.5e-4, 4096, 1) - 2.4e-3).abs() < 1e-12);
        let c = recipe_train_config(1e-3, 64, 2, 1000);
        assert!((c.lr - 5e-4).abs() < 1e-12);
        assert_eq!((c.beta1, c.beta2, c.weight_decay), (0.9, 0.95, 0.05));
        assert_eq!(c.warmup_steps, 50);
        assert_eq!(c.schedule, ScheduleKind::Cosine);
    }
}
