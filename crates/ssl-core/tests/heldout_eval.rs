//! Held-out evaluation during training (`HeldoutEval`), the best checkpoint and early
//! stopping: figures logged with an `eval_` prefix at the right steps, `checkpoints/best`
//! equal to the arg-best step's checkpoint, early stopping after its patience, and both kept
//! across `--resume`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use serde_json::Value;
use ssl_core::best::BestMode;
use ssl_core::checkpoint::read_state;
use ssl_core::seq::{MaskedFeatureTask, SeqTransformerEncoder};
use ssl_core::{
    BatchSource, Ctx, EvalFigures, HeldoutEval, HookCtx, LoopTrainer, PretextTask, SslRng,
    TrainConfig, TrainReport,
};

type Task = MaskedFeatureTask<SeqTransformerEncoder>;

/// The records of `metrics.jsonl` holding `key`: (step, value).
fn logged(dir: &Path, key: &str) -> Vec<(u64, f64)> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            Some((v["step"].as_u64()?, v[key].as_f64()?))
        })
        .collect()
}

/// Trains the tiny masked task for `cfg` into `dir`, evaluating with `eval`.
fn train(
    cfg: TrainConfig,
    dir: &Path,
    resume: bool,
    eval: impl FnMut(&HookCtx<'_, Task>) -> ssl_core::Result<EvalFigures>,
) -> TrainReport {
    let (ex, _) = waves(48, 1);
    let (_, task) = masked_task(3, 0.1);
    let mut hook = HeldoutEval::new(&cfg, eval);
    LoopTrainer::new(cfg, Some(dir.to_path_buf()))
        .unwrap()
        .resume(resume)
        .fit_with_hooks(&task, &mut source(ex, 16, true), None, &mut [&mut hook])
        .unwrap()
}

/// An evaluation returning `loss = values[step]` (steps not listed: 10.0).
fn scripted(
    values: &[(u64, f64)],
) -> impl FnMut(&HookCtx<'_, Task>) -> ssl_core::Result<EvalFigures> {
    let values: BTreeMap<u64, f64> = values.iter().copied().collect();
    move |ctx| {
        let v = values.get(&ctx.step).copied().unwrap_or(10.0);
        Ok(EvalFigures::from([("loss".to_string(), v)]))
    }
}

#[test]
fn heldout_loss_is_logged_every_eval_every_steps_and_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let (ex, _) = waves(64, 9);
    let held = source(ex, 16, false).next_batch().unwrap();
    let mut cfg = quick_train(10);
    cfg.eval_every_steps = 3;
    let r = train(cfg.clone(), dir.path(), false, |ctx| {
        let mut rng = SslRng::new(5);
        let out = ctx.task.forward(&held, &mut Ctx::inference(&mut rng))?;
        let loss = out.loss.to_scalar::<f32>()? as f64;
        Ok(EvalFigures::from([("loss".to_string(), loss)]))
    });
    assert_eq!(r.step, 10);
    let evals = logged(dir.path(), "eval_loss");
    let steps: Vec<u64> = evals.iter().map(|e| e.0).collect();
    assert_eq!(steps, [3, 6, 9, 10]);
    assert!(evals.iter().all(|e| e.1.is_finite() && e.1 > 0.0));
    // Every step still has its training record, the evaluations ride on theirs.
    assert_eq!(logged(dir.path(), "loss").len(), 10);

    // eval_every_steps = 0: at the checkpoint interval and the last step.
    let dir = tempfile::tempdir().unwrap();
    cfg.eval_every_steps = 0;
    cfg.checkpoint_every_steps = 4;
    train(cfg, dir.path(), false, scripted(&[]));
    let steps: Vec<u64> = logged(dir.path(), "eval_loss")
        .iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(steps, [4, 8, 10]);
}

#[test]
fn best_checkpoint_is_the_arg_best_step() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = quick_train(10);
    cfg.eval_every_steps = 2;
    cfg.checkpoint_every_steps = 2;
    cfg.keep_checkpoints = 10;
    let values = [(2, 5.0), (4, 3.0), (6, 4.0), (8, 3.5), (10, 3.2)];
    let r = train(cfg.clone(), dir.path(), false, scripted(&values));
    let best = dir.path().join("checkpoints/best");
    assert_eq!(read_state(&best).unwrap().step, 4);
    let (state, path) = r.best.clone().unwrap();
    assert_eq!((state.step, state.value), (4, 3.0));
    assert_eq!(path.as_deref(), Some(best.as_path()));
    // The same weights as the step-4 checkpoint of the rotation, which keeps its own.
    let bytes = |p: &Path| std::fs::read(p.join("model.safetensors")).unwrap();
    assert_eq!(
        bytes(&best),
        bytes(&dir.path().join("checkpoints/step-00000004"))
    );
    assert_ne!(
        bytes(&best),
        bytes(&dir.path().join("checkpoints/step-00000010"))
    );
    // `best` is not part of the rotation: a run directory still resolves to the newest step.
    let latest = ssl_core::checkpoint::resolve_checkpoint(dir.path()).unwrap();
    assert!(latest.ends_with("step-00000010"));
    assert!(!r.early_stopped);

    // Larger is better: the arg-max.
    let dir = tempfile::tempdir().unwrap();
    cfg.best_mode = BestMode::Max;
    cfg.keep_checkpoints = 1;
    train(cfg, dir.path(), false, scripted(&values));
    assert_eq!(
        read_state(&dir.path().join("checkpoints/best"))
            .unwrap()
            .step,
        2
    );
}

#[test]
fn early_stopping_fires_after_its_patience() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = quick_train(20);
    cfg.eval_every_steps = 2;
    cfg.early_stop_patience = 2;
    // 4: best; 6, 8: not better than 3.0 -> stop after step 8.
    let values = [(2, 5.0), (4, 3.0), (6, 4.0), (8, 3.1), (10, 1.0)];
    let r = train(cfg.clone(), dir.path(), false, scripted(&values));
    assert!(r.early_stopped && !r.interrupted);
    assert_eq!(r.step, 8);
    assert_eq!(r.best.unwrap().0.step, 4);
    assert_eq!(
        read_state(&dir.path().join("checkpoints/best"))
            .unwrap()
            .step,
        4
    );
    // The final checkpoint is the step it stopped at.
    let latest = ssl_core::checkpoint::resolve_checkpoint(dir.path()).unwrap();
    assert_eq!(read_state(&latest).unwrap().step, 8);

    // A minimum improvement: 4.5 and 4.2 are better than 5.0 but not by more than 1.0.
    let dir = tempfile::tempdir().unwrap();
    cfg.early_stop_min_delta = 1.0;
    let values = [(2, 5.0), (4, 4.5), (6, 4.2), (8, 1.0)];
    let r = train(cfg.clone(), dir.path(), false, scripted(&values));
    assert!(r.early_stopped);
    assert_eq!(r.step, 6);
    // `best` follows any improvement: 4.2 at step 6.
    assert_eq!(r.best.unwrap().0.step, 6);

    // Patience 0: never.
    let dir = tempfile::tempdir().unwrap();
    cfg.early_stop_patience = 0;
    let r = train(cfg, dir.path(), false, scripted(&values));
    assert!(!r.early_stopped);
    assert_eq!(r.step, 20);
}

#[test]
fn resume_keeps_best_and_early_stopping_state() {
    let mut cfg = quick_train(20);
    cfg.eval_every_steps = 1;
    cfg.early_stop_patience = 3;
    let values = [(1, 5.0), (2, 3.0), (3, 4.0), (4, 4.5), (5, 4.2), (6, 2.0)];

    // Uninterrupted: best at 2, stale at 3, 4, 5 -> stop after step 5.
    let whole = tempfile::tempdir().unwrap();
    let r = train(cfg.clone(), whole.path(), false, scripted(&values));
    assert_eq!((r.step, r.early_stopped), (5, true));

    // Interrupted after step 4 (a checkpoint is written there), then resumed.
    let dir = tempfile::tempdir().unwrap();
    let mut first = scripted(&values);
    let r = train(cfg.clone(), dir.path(), false, move |ctx| {
        if ctx.step == 4 {
            ctx.stop.request();
        }
        first(ctx)
    });
    assert_eq!((r.step, r.interrupted, r.early_stopped), (4, true, false));
    let r = train(cfg.clone(), dir.path(), true, scripted(&values));
    // Without the stored state the resumed run would call step 5's 4.2 its best and go on.
    assert_eq!((r.step, r.early_stopped), (5, true));
    let (best, _) = r.best.unwrap();
    assert_eq!((best.step, best.value, best.stale_evals), (2, 3.0, 3));
    assert_eq!(
        read_state(&dir.path().join("checkpoints/best"))
            .unwrap()
            .step,
        2
    );
    let evals: Vec<u64> = logged(dir.path(), "eval_loss")
        .iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(evals, [1, 2, 3, 4, 5]);

    // Resuming a run that stopped early stops again at once.
    let r = train(cfg, dir.path(), true, scripted(&values));
    assert_eq!((r.step, r.early_stopped), (5, true));
}
