//! Optimisation: AdamW with parameter groups, learning-rate schedules, gradient clipping.

mod adamw;
mod clip;
mod schedule;

pub use adamw::{AdamW, AdamWConfig};
pub use clip::{clip_grad_norm, clip_scale, global_norm};
pub use schedule::{LrSchedule, ScheduleKind};
