//! Held-out evaluation while a run trains, as a [`TrainHook`]: a modality supplies the
//! evaluation (a closure over the live model) and the hook runs it every
//! `train.eval_every_steps` steps and at the end, logging its figures with an `eval_` prefix
//! into the step's record (so into `metrics.jsonl`, where the trainer's best checkpoint and
//! early stopping watch them).

use std::collections::BTreeMap;
use std::io::Write;

use serde_json::{Map, Value};

use crate::hook::{HookCtx, TrainHook};
use crate::{CoreError, PretextTask, Result, TrainConfig, TrainReport};

/// The figures of one held-out evaluation, by name (logged as `eval_<name>`).
pub type EvalFigures = BTreeMap<String, f64>;

/// A held-out evaluation of the live model (see [`HeldoutEval`]).
pub type EvalFn<'a, T> = dyn FnMut(&HookCtx<'_, T>) -> Result<EvalFigures> + 'a;

/// The prefix of held-out figures in `metrics.jsonl`.
pub const EVAL_PREFIX: &str = "eval_";

/// Runs `eval` on the live model every `every` steps and at the run's last step, adding its
/// figures to the step's record as `eval_<name>`. A run stopped before its last step (a
/// signal) is evaluated once more at the end, and the figures are appended to
/// `metrics.jsonl` as a record of that step.
///
/// The closure runs on every rank (it is given the hook's context: the task, the step, the
/// rank); with several ranks it must return the same figures everywhere (sum over ranks
/// through [`crate::Parallel`]), since the trainer's best checkpoint and early stopping act
/// on them. It should evaluate with [`crate::Ctx::inference`] and an RNG of its own.
pub struct HeldoutEval<'a, T: PretextTask> {
    every: u64,
    eval: Box<EvalFn<'a, T>>,
    last: Option<u64>,
    /// Every evaluation of this session: (step, figures without the prefix).
    pub history: Vec<(u64, EvalFigures)>,
}

impl<'a, T: PretextTask> HeldoutEval<'a, T> {
    /// Evaluates every [`TrainConfig::eval_interval`] steps of `cfg` and at the end.
    pub fn new(
        cfg: &TrainConfig,
        eval: impl FnMut(&HookCtx<'_, T>) -> Result<EvalFigures> + 'a,
    ) -> Self {
        Self::every(cfg.eval_interval(), eval)
    }

    /// Evaluates every `every` steps (0: only at the end).
    pub fn every(
        every: u64,
        eval: impl FnMut(&HookCtx<'_, T>) -> Result<EvalFigures> + 'a,
    ) -> Self {
        HeldoutEval {
            every,
            eval: Box::new(eval),
            last: None,
            history: Vec::new(),
        }
    }

    /// Whether step `step` of a run of `max_steps` is evaluated.
    pub fn due(&self, step: u64, max_steps: u64) -> bool {
        step == max_steps || (self.every > 0 && step.is_multiple_of(self.every))
    }

    fn run(&mut self, ctx: &HookCtx<'_, T>) -> Result<EvalFigures> {
        let figures = (self.eval)(ctx)?;
        self.last = Some(ctx.step);
        self.history.push((ctx.step, figures.clone()));
        Ok(figures)
    }
}

fn insert(figures: &EvalFigures, record: &mut Map<String, Value>) {
    for (k, v) in figures {
        record.insert(format!("{EVAL_PREFIX}{k}"), (*v).into());
    }
}

impl<T: PretextTask> TrainHook<T> for HeldoutEval<'_, T> {
    fn after_step(&mut self, ctx: &HookCtx<'_, T>, metrics: &mut Map<String, Value>) -> Result<()> {
        if self.due(ctx.step, ctx.max_steps) {
            let figures = self.run(ctx)?;
            insert(&figures, metrics);
        }
        Ok(())
    }

    fn at_end(&mut self, ctx: &HookCtx<'_, T>, report: &TrainReport) -> Result<()> {
        // Only a run that stopped between evaluations (a signal) needs one more.
        if self.last == Some(ctx.step) || ctx.step <= report.start_step {
            return Ok(());
        }
        let figures = self.run(ctx)?;
        if let (Some(dir), true) = (ctx.out_dir, ctx.is_main()) {
            let mut record = Map::new();
            record.insert("step".into(), ctx.step.into());
            insert(&figures, &mut record);
            let path = dir.join("metrics.jsonl");
            let line = serde_json::to_string(&record).map_err(|source| CoreError::Json {
                path: path.clone(),
                source,
            })?;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| CoreError::io("opening", &path, e))?;
            writeln!(f, "{line}").map_err(|e| CoreError::io("writing", &path, e))?;
        }
        Ok(())
    }
}

/// The pretext loss of `task` on held-out `batches` (every rank its own; collective: every
/// rank must call it): the mean over all ranks' units (`loss`, weighted by
/// [`crate::TaskOutput::weight`] as training does). In one process the task's own metrics
/// are added, weighted the same way (with several ranks a rank may hold no batch, so only
/// the loss is summed over ranks). Masks and augmentations come from `seed`, the same at
/// every evaluation; forward passes run in inference mode with `precision`.
pub fn heldout_task_loss<T: PretextTask>(
    par: &crate::Parallel,
    task: &T,
    batches: &[T::Batch],
    seed: u64,
    precision: crate::nn::MatmulPrecision,
) -> Result<EvalFigures> {
    let mut rng = crate::SslRng::derived(seed, "heldout-eval");
    let (mut loss, mut weight) = (0.0, 0.0);
    let mut metrics = EvalFigures::new();
    for b in batches {
        let out = task.forward(
            b,
            &mut crate::Ctx::inference(&mut rng).with_precision(precision),
        )?;
        let l = out
            .loss
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        loss += l * out.weight;
        weight += out.weight;
        for (k, v) in out.metrics {
            *metrics.entry(k).or_default() += v * out.weight;
        }
    }
    let sums = par.sum_f64(&[loss, weight])?;
    if sums[1] <= 0.0 {
        return Err(CoreError::Config(
            "held-out evaluation: the held-out split of every rank is empty".into(),
        ));
    }
    let mut figures = EvalFigures::new();
    if par.world == 1 {
        for (k, v) in metrics {
            figures.insert(k, v / weight);
        }
    }
    figures.insert("loss".into(), sums[0] / sums[1]);
    Ok(figures)
}
