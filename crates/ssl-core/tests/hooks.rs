//! The training loop's extension points: hooks are called after every step, at every
//! checkpoint and once at the end; what they add is logged; an error stops the run; a stop
//! request ends it gracefully; a hook that leaves the random stream alone changes nothing.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::{Map, Value};
use ssl_core::seq::{MaskedFeatureTask, SeqTransformerEncoder};
use ssl_core::{CoreError, HookCtx, LoopTrainer, TrainHook, TrainReport, Trainer};

type Task = MaskedFeatureTask<SeqTransformerEncoder>;

#[derive(Default)]
struct Recorder {
    steps: Vec<u64>,
    checkpoints: Vec<(u64, PathBuf)>,
    ends: Vec<u64>,
    /// Fail in `after_step` at this step.
    fail_at: Option<u64>,
    /// Request a stop in `after_step` at this step.
    stop_at: Option<u64>,
}

impl TrainHook<Task> for Recorder {
    fn after_step(
        &mut self,
        ctx: &HookCtx<'_, Task>,
        metrics: &mut Map<String, Value>,
    ) -> ssl_core::Result<()> {
        assert_eq!(metrics["step"].as_u64(), Some(ctx.step));
        assert!(metrics.contains_key("loss") && metrics.contains_key("masked_mse"));
        self.steps.push(ctx.step);
        metrics.insert("hook_step_twice".into(), (2 * ctx.step).into());
        if self.fail_at == Some(ctx.step) {
            return Err(CoreError::Config(format!("hook failed at {}", ctx.step)));
        }
        if self.stop_at == Some(ctx.step) {
            ctx.stop.request();
        }
        Ok(())
    }

    fn at_checkpoint(&mut self, ctx: &HookCtx<'_, Task>, path: &Path) -> ssl_core::Result<()> {
        assert!(path.is_dir(), "{} is written", path.display());
        self.checkpoints.push((ctx.step, path.to_path_buf()));
        Ok(())
    }

    fn at_end(&mut self, ctx: &HookCtx<'_, Task>, report: &TrainReport) -> ssl_core::Result<()> {
        assert_eq!(report.step, ctx.step);
        self.ends.push(ctx.step);
        Ok(())
    }
}

fn logged(dir: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).unwrap()[key].as_f64())
        .collect()
}

fn run(dir: &Path, hook: &mut Recorder) -> ssl_core::Result<TrainReport> {
    let (ex, _) = waves(48, 1);
    let mut cfg = quick_train(10);
    cfg.checkpoint_every_steps = 4;
    let (_, task) = masked_task(3, 0.1);
    LoopTrainer::new(cfg, Some(dir.to_path_buf()))?.fit_with_hooks(
        &task,
        &mut source(ex, 16, true),
        None,
        &mut [hook],
    )
}

#[test]
fn hooks_are_called_after_every_step_at_every_checkpoint_and_once_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut hook = Recorder::default();
    let report = run(dir.path(), &mut hook).unwrap();
    assert_eq!(hook.steps, (1..=10).collect::<Vec<_>>());
    let ckpt = |s: u64| dir.path().join(format!("checkpoints/step-{s:08}"));
    assert_eq!(
        hook.checkpoints,
        vec![(4, ckpt(4)), (8, ckpt(8)), (10, ckpt(10))]
    );
    assert_eq!(hook.ends, vec![10]);
    assert_eq!(report.last_checkpoint, Some(ckpt(10)));
    // What the hook added is logged with its step.
    assert_eq!(
        logged(dir.path(), "hook_step_twice"),
        (1..=10).map(|s| 2.0 * s as f64).collect::<Vec<_>>()
    );

    // A hook that leaves the random stream alone leaves the training as it is without one.
    let (ex, _) = waves(48, 1);
    let mut cfg = quick_train(10);
    cfg.checkpoint_every_steps = 4;
    let (_, task) = masked_task(3, 0.1);
    let plain = LoopTrainer::new(cfg, None)
        .unwrap()
        .fit(&task, &mut source(ex, 16, true), None)
        .unwrap();
    let bits =
        |r: &TrainReport| -> Vec<u64> { r.losses.iter().map(|(_, l)| l.to_bits()).collect() };
    assert_eq!(bits(&report), bits(&plain));
}

#[test]
fn a_hook_error_stops_the_run_with_that_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut hook = Recorder {
        fail_at: Some(3),
        ..Default::default()
    };
    let err = run(dir.path(), &mut hook).unwrap_err();
    assert!(
        matches!(&err, CoreError::Config(m) if m == "hook failed at 3"),
        "{err}"
    );
    assert_eq!(hook.steps, vec![1, 2, 3]);
    assert!(hook.checkpoints.is_empty() && hook.ends.is_empty());
    assert!(
        !dir.path().join("checkpoints").exists(),
        "no checkpoint after the error"
    );
}

#[test]
fn a_hook_can_stop_the_run_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let mut hook = Recorder {
        stop_at: Some(6),
        ..Default::default()
    };
    let report = run(dir.path(), &mut hook).unwrap();
    assert!(report.interrupted);
    assert_eq!(report.step, 6);
    assert_eq!(hook.steps, (1..=6).collect::<Vec<_>>());
    let steps: Vec<u64> = hook.checkpoints.iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, vec![4, 6]);
    assert_eq!(hook.ends, vec![6]);
}
