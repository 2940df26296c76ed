//! The one training loop: accumulation, clipping, AdamW, schedules, guards, checkpoints,
//! resume, graceful stop, metrics and embedding health. Every pretext task trains through it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::best::{save_best, BestMode, BestState, BEST_DIR};
use crate::checkpoint::{read_state, CheckpointManager, TrainerState, MODEL_FILE, OPTIMIZER_FILE};
use crate::guard::{DivergenceConfig, DivergenceDetector, NonFiniteAction, NonFiniteGuard};
use crate::health::embedding_health;
use crate::hook::{HookCtx, TrainHook};
use crate::monitor::{MetricsLog, Progress};
use crate::nn::MatmulPrecision;
use crate::optim::{clip_scale, AdamW, AdamWConfig, LrSchedule, ScheduleKind};
use crate::run_guard::checkpoint_to_start_from;
use crate::{
    BatchSource, Collective, CoreError, Ctx, PretextTask, Result, SingleProcess, SslRng, StopFlag,
};

/// Training hyper-parameters and machinery settings (`[train]` in the CLI's TOML).
/// Zero disables the settings documented as such.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer steps to run (replaced by the count `max_epochs` gives when that is set; 0
    /// where a pipeline resolves it from the data, as the time-series pipeline's default).
    pub max_steps: u64,
    /// Passes over the training data; 0: off (`max_steps` decides). The pipeline turns it
    /// into `max_steps` from the data's row count ([`TrainConfig::apply_epochs`]), so the
    /// learning-rate schedule knows its length before the first step.
    pub max_epochs: f64,
    /// Examples per micro-batch (read by the data source).
    pub batch_size: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Seed of every random choice (init, data order, masks, augmentation, dropout).
    pub seed: u64,
    /// Learning-rate curve.
    pub schedule: ScheduleKind,
    /// Linear warmup steps.
    pub warmup_steps: u64,
    /// Final learning rate as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// AdamW decoupled weight decay (biases and norm weights are spared).
    pub weight_decay: f64,
    /// AdamW beta1.
    pub beta1: f64,
    /// AdamW beta2.
    pub beta2: f64,
    /// AdamW epsilon.
    pub eps: f64,
    /// Clip gradients to this global L2 norm (0: no clipping; the norm is logged anyway).
    pub grad_clip: f64,
    /// Micro-batches accumulated per optimizer step.
    pub accum_steps: usize,
    /// Data-parallel runs all-reduce the gradients in buckets of at most this many MiB
    /// (PyTorch DDP's default is 25), bounding the memory of the flat exchange buffers.
    pub allreduce_bucket_mb: f64,
    /// Write a checkpoint every N steps (0: off).
    pub checkpoint_every_steps: u64,
    /// Write a checkpoint every T minutes of wall time (0: off).
    pub checkpoint_every_minutes: f64,
    /// Checkpoints kept.
    pub keep_checkpoints: usize,
    /// Held-out evaluation (where the pipeline has a held-out split) every N steps and at the
    /// last step; 0: at every `checkpoint_every_steps`-th step (and the last). Figures are
    /// logged with an `eval_` prefix.
    pub eval_every_steps: u64,
    /// The logged figure that picks `checkpoints/best` (e.g. `eval_loss`,
    /// `eval_masked_accuracy`); empty: no best checkpoint and no early stopping.
    pub best_metric: String,
    /// Whether a smaller (`min`) or larger (`max`) `best_metric` is better.
    pub best_mode: BestMode,
    /// Stop after this many evaluations without `best_metric` improving by more than
    /// `early_stop_min_delta` (0: never stop early).
    pub early_stop_patience: u32,
    /// The smallest change of `best_metric` that counts as an improvement for early stopping.
    pub early_stop_min_delta: f64,
    /// Progress line every N steps (when not on a terminal).
    pub log_every: u64,
    /// Embedding-health figures on the held-out batch every N steps (0: off).
    pub health_every: u64,
    /// Stop after this many consecutive steps with a non-finite loss or gradient.
    pub max_nonfinite_in_a_row: u32,
    /// Report divergence when the loss exceeds this multiple of its moving average (0: off).
    pub divergence_factor: f64,
    /// Steps before divergence is judged.
    pub divergence_warmup_steps: u64,
    /// On divergence, roll back to the last checkpoint and lower the learning rate.
    pub rollback_on_divergence: bool,
    /// Learning-rate multiplier applied at each rollback.
    pub rollback_lr_factor: f64,
    /// Rollbacks allowed before training stops with an error.
    pub max_rollbacks: u32,
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Precision of the transformer stack's products: `f32` (default) or `bf16` (operands
    /// rounded to bf16, sums in f32, f32 master weights; on the CPU the fused stack's large
    /// products, with AVX-512 BF16, f32 on other CPUs; on a GPU every product of the stack,
    /// through cuBLAS). See [`crate::nn::MatmulPrecision`].
    pub matmul_precision: MatmulPrecision,
    /// With `matmul_precision = "bf16"`, first time bf16 and f32 products on this CPU (about
    /// 0.2 s, once per process) and keep f32, saying so, where bf16 is slower (Intel Xeons
    /// whose AMX tiles are absent or not granted); `false` uses bf16 wherever the CPU has it.
    /// A resumed run keeps the precision its checkpoint recorded.
    pub bf16_check: bool,
    /// The memory, in GiB, a run's estimated dominant allocations (batch activations, series)
    /// may take before it is refused at start; 0: what the machine has available
    /// (`MemAvailable`). See [`crate::memory::check_fits`].
    pub max_memory_gb: f64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            max_steps: 1000,
            max_epochs: 0.0,
            batch_size: 32,
            lr: 1e-3,
            seed: 0,
            schedule: ScheduleKind::Cosine,
            warmup_steps: 50,
            min_lr_ratio: 0.0,
            weight_decay: 0.05,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_clip: 1.0,
            accum_steps: 1,
            allreduce_bucket_mb: 25.0,
            checkpoint_every_steps: 500,
            checkpoint_every_minutes: 60.0,
            keep_checkpoints: 3,
            eval_every_steps: 0,
            best_metric: "eval_loss".into(),
            best_mode: BestMode::Min,
            early_stop_patience: 0,
            early_stop_min_delta: 0.0,
            log_every: 10,
            health_every: 100,
            max_nonfinite_in_a_row: 5,
            divergence_factor: 3.0,
            divergence_warmup_steps: 50,
            rollback_on_divergence: false,
            rollback_lr_factor: 0.5,
            max_rollbacks: 3,
            device: "cpu".into(),
            matmul_precision: MatmulPrecision::F32,
            bf16_check: true,
            max_memory_gb: 0.0,
        }
    }
}

impl TrainConfig {
    /// The memory limit `train.max_memory_gb` sets, in bytes, for
    /// [`crate::memory::check_fits`]; `None` (0) means the machine's available memory.
    pub fn memory_limit(&self) -> Option<u64> {
        crate::memory::limit_from_gb(self.max_memory_gb)
    }

    /// Sets `max_steps` from `max_epochs` when that is set: `examples_per_epoch` (over every
    /// rank; from the Parquet footers' row counts, or an estimate where examples are not rows,
    /// as packed text sequences) divided by the examples one optimizer step takes over
    /// `world` ranks (`batch_size x accum_steps x world`), rounded up, times the epochs.
    /// Returns the step count it set, or `None` when `max_epochs` is off.
    pub fn apply_epochs(&mut self, examples_per_epoch: u64, world: usize) -> Option<u64> {
        if self.max_epochs <= 0.0 {
            return None;
        }
        let per_step = (self.batch_size.max(1) * self.accum_steps.max(1) * world.max(1)) as f64;
        let steps_per_epoch = (examples_per_epoch as f64 / per_step).ceil().max(1.0);
        self.max_steps = (steps_per_epoch * self.max_epochs).ceil() as u64;
        Some(self.max_steps)
    }

    /// Checks the values that would make training meaningless.
    pub fn validate(&self) -> Result<()> {
        let bad = |k: &str, v: String, why: &str| {
            Err(CoreError::Config(format!("train.{k} = {v}: {why}")))
        };
        if !(self.max_epochs.is_finite() && self.max_epochs >= 0.0) {
            return bad(
                "max_epochs",
                self.max_epochs.to_string(),
                "must be a number >= 0 (0: max_steps decides)",
            );
        }
        if self.batch_size == 0 {
            return bad("batch_size", "0".into(), "must be at least 1");
        }
        if self.accum_steps == 0 {
            return bad("accum_steps", "0".into(), "must be at least 1");
        }
        if !(self.allreduce_bucket_mb.is_finite() && self.allreduce_bucket_mb > 0.0) {
            return bad(
                "allreduce_bucket_mb",
                self.allreduce_bucket_mb.to_string(),
                "must be a positive number",
            );
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad("lr", self.lr.to_string(), "must be a positive number");
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            return bad(
                "beta1/beta2",
                format!("{}/{}", self.beta1, self.beta2),
                "must be in [0, 1)",
            );
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad(
                "min_lr_ratio",
                self.min_lr_ratio.to_string(),
                "must be in [0, 1]",
            );
        }
        if !(self.early_stop_min_delta.is_finite() && self.early_stop_min_delta >= 0.0) {
            return bad(
                "early_stop_min_delta",
                self.early_stop_min_delta.to_string(),
                "must be a finite number >= 0",
            );
        }
        if self.early_stop_patience > 0 && self.best_metric.is_empty() {
            return bad(
                "early_stop_patience",
                self.early_stop_patience.to_string(),
                "needs train.best_metric (the figure to watch)",
            );
        }
        if !(self.max_memory_gb.is_finite() && self.max_memory_gb >= 0.0) {
            return bad(
                "max_memory_gb",
                self.max_memory_gb.to_string(),
                "must be a finite number >= 0 (0: the machine's available memory)",
            );
        }
        if !(self.rollback_lr_factor > 0.0 && self.rollback_lr_factor <= 1.0) {
            return bad(
                "rollback_lr_factor",
                self.rollback_lr_factor.to_string(),
                "must be in (0, 1]",
            );
        }
        Ok(())
    }

    /// Steps between held-out evaluations: `eval_every_steps`, or `checkpoint_every_steps`
    /// when that is 0 (0: only at the last step).
    pub fn eval_interval(&self) -> u64 {
        if self.eval_every_steps > 0 {
            self.eval_every_steps
        } else {
            self.checkpoint_every_steps
        }
    }

    /// The learning-rate schedule over `max_steps`.
    pub fn schedule(&self) -> LrSchedule {
        LrSchedule {
            kind: self.schedule,
            base_lr: self.lr,
            warmup_steps: self.warmup_steps.min(self.max_steps),
            total_steps: self.max_steps,
            min_lr_ratio: self.min_lr_ratio,
        }
    }

    /// The AdamW settings.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }
}

/// What a finished (or stopped) run reports.
#[derive(Debug, Clone, Default)]
pub struct TrainReport {
    /// The step training started from (non-zero after resume).
    pub start_step: u64,
    /// The step reached.
    pub step: u64,
    /// (step, loss) of every completed step of this process.
    pub losses: Vec<(u64, f64)>,
    /// Steps skipped for non-finite values (whole run, including before resume).
    pub skipped_steps: u64,
    /// Divergence events seen by this process.
    pub divergences: u64,
    /// Rollbacks done (whole run).
    pub rollbacks: u32,
    /// True when a stop was requested (signal) before `max_steps`.
    pub interrupted: bool,
    /// True when early stopping ended the run (`train.early_stop_patience`).
    pub early_stopped: bool,
    /// The watched metric's best value, its step and where `checkpoints/best` is (when a
    /// value of `train.best_metric` was logged).
    pub best: Option<(BestState, Option<PathBuf>)>,
    /// The last checkpoint written or resumed from.
    pub last_checkpoint: Option<PathBuf>,
    /// Parameters that received no gradient in the first step (a model bug when non-empty).
    pub params_without_grad: Vec<String>,
}

/// The training loop, whatever the task.
pub trait Trainer<T: PretextTask> {
    /// Trains `task` on batches from `data` until `max_steps` or a stop request.
    /// `heldout` (if given) is a fixed batch for embedding-health figures.
    fn fit(
        &mut self,
        task: &T,
        data: &mut dyn BatchSource<T::Batch>,
        heldout: Option<&T::Batch>,
    ) -> Result<TrainReport>;
}

/// The standard [`Trainer`]: see the module documentation.
pub struct LoopTrainer {
    cfg: TrainConfig,
    out_dir: Option<PathBuf>,
    run_config: Value,
    resume: bool,
    stop: StopFlag,
    collective: Box<dyn Collective>,
    progress: bool,
}

impl LoopTrainer {
    /// A trainer writing `metrics.jsonl`, `checkpoints/` and `loss.png` under `out_dir`
    /// (`None`: in memory only, no checkpoints).
    pub fn new(cfg: TrainConfig, out_dir: Option<PathBuf>) -> Result<Self> {
        cfg.validate()?;
        Ok(LoopTrainer {
            cfg,
            out_dir,
            run_config: Value::Null,
            resume: false,
            stop: StopFlag::new(),
            collective: Box::new(SingleProcess),
            progress: false,
        })
    }

    /// Continue from the newest checkpoint under `out_dir/checkpoints` when there is one.
    pub fn resume(mut self, resume: bool) -> Self {
        self.resume = resume;
        self
    }

    /// The resolved run configuration, stored in every checkpoint.
    pub fn run_config(mut self, config: Value) -> Self {
        self.run_config = config;
        self
    }

    /// The flag that requests a graceful stop (e.g. [`StopFlag::from_signals`]).
    pub fn stop_flag(mut self, stop: StopFlag) -> Self {
        self.stop = stop;
        self
    }

    /// The communication backend for data-parallel training.
    pub fn collective(mut self, collective: Box<dyn Collective>) -> Self {
        self.collective = collective;
        self
    }

    /// Show progress on stderr.
    pub fn progress(mut self, on: bool) -> Self {
        self.progress = on;
        self
    }

    fn checkpoints(&self) -> Option<CheckpointManager> {
        self.out_dir
            .as_ref()
            .map(|d| CheckpointManager::new(d.join("checkpoints"), self.cfg.keep_checkpoints))
    }

    fn restore(
        &self,
        ckpt: &Path,
        task_params: &crate::ParamStore,
        opt: &mut AdamW,
    ) -> Result<TrainerState> {
        let state = read_state(ckpt)?;
        task_params.load_safetensors(&ckpt.join(MODEL_FILE))?;
        opt.load(&ckpt.join(OPTIMIZER_FILE), state.step)?;
        Ok(state)
    }

    /// Sums gradients, loss and weight over ranks (no-op on one process): the gradients in
    /// name order, flattened into buckets of at most `allreduce_bucket_mb` (a larger tensor is
    /// a bucket of its own), then the scalars.
    fn all_reduce(
        &self,
        grads: &mut [Option<Tensor>],
        shapes: &[Tensor],
        scalars: &mut [f64],
    ) -> Result<()> {
        if self.collective.world_size() == 1 {
            return Ok(());
        }
        let bucket = ((self.cfg.allreduce_bucket_mb * 1024.0 * 1024.0 / 4.0) as usize).max(1);
        let mut start = 0;
        while start < grads.len() {
            let mut end = start;
            let mut elems = 0;
            while end < grads.len() && (end == start || elems + shapes[end].elem_count() <= bucket)
            {
                elems += shapes[end].elem_count();
                end += 1;
            }
            let mut flat = Vec::with_capacity(elems);
            for (g, like) in grads[start..end].iter().zip(&shapes[start..end]) {
                match g {
                    Some(g) => {
                        flat.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
                    }
                    None => flat.extend(std::iter::repeat_n(0f32, like.elem_count())),
                }
            }
            self.collective.all_reduce_sum(&mut flat)?;
            let mut off = 0;
            for (g, like) in grads[start..end].iter_mut().zip(&shapes[start..end]) {
                let n = like.elem_count();
                let t = Tensor::from_vec(flat[off..off + n].to_vec(), like.shape(), like.device())?
                    .to_dtype(like.dtype())?;
                *g = Some(t);
                off += n;
            }
            start = end;
        }
        let mut flat: Vec<f32> = scalars.iter().map(|s| *s as f32).collect();
        self.collective.all_reduce_sum(&mut flat)?;
        for (s, v) in scalars.iter_mut().zip(flat) {
            *s = f64::from(v);
        }
        Ok(())
    }
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Gradients summed over micro-batches, before division by the total weight.
pub struct Accumulated {
    /// Per variable (in `vars` order): the gradient of `sum_i weight_i * loss_i`.
    pub grads: Vec<Option<Tensor>>,
    /// `sum_i weight_i * loss_i`.
    pub loss_sum: f64,
    /// `sum_i weight_i`.
    pub weight_sum: f64,
    /// Examples seen.
    pub samples: u64,
    /// Weighted sums of the task metrics.
    pub metric_sums: BTreeMap<String, f64>,
    /// Seconds spent waiting for the micro-batches (`BatchSource::next_batch`): the part of
    /// a step the input pipeline did not hide behind compute.
    pub data_wait_s: f64,
}

/// Runs `micro_batches` forward/backward passes ([`PretextTask::forward_backward`]) and sums the gradients of each micro-batch's
/// loss times its weight, with the stack's products in `precision`. Dividing by `weight_sum` afterwards gives exactly the gradient of
/// one batch holding all the micro-batches' examples (for losses that are means over units).
pub fn accumulate<T: PretextTask>(
    task: &T,
    data: &mut dyn BatchSource<T::Batch>,
    micro_batches: usize,
    vars: &[Tensor],
    rng: &mut SslRng,
    precision: MatmulPrecision,
) -> Result<Accumulated> {
    let mut acc = Accumulated {
        grads: vec![None; vars.len()],
        loss_sum: 0.0,
        weight_sum: 0.0,
        samples: 0,
        metric_sums: BTreeMap::new(),
        data_wait_s: 0.0,
    };
    for _ in 0..micro_batches {
        let waited = Instant::now();
        let batch = data.next_batch()?;
        acc.data_wait_s += waited.elapsed().as_secs_f64();
        acc.samples += task.batch_len(&batch) as u64;
        // No gradient sink here: the task's `forward_backward` takes one where it knows its
        // gradients are the graph's (`Ctx::sinking`), so an override that scales its
        // gradients after `backward` still gets the graph's.
        let mut ctx = Ctx::train(rng).with_precision(precision);
        let (out, grads) = task.forward_backward(&batch, &mut ctx)?;
        let w = out.weight;
        acc.loss_sum += scalar(&out.loss)? * w;
        acc.weight_sum += w;
        for (k, v) in &out.metrics {
            *acc.metric_sums.entry(k.clone()).or_default() += v * w;
        }
        for (slot, var) in acc.grads.iter_mut().zip(vars) {
            if let Some(g) = grads.get(var) {
                *slot = Some(match slot.take() {
                    Some(a) => (a + g)?,
                    None => g.clone(),
                });
            }
        }
    }
    Ok(acc)
}

/// The newest checkpoint of a run that writes checkpoints.
fn latest_checkpoint(manager: &Option<CheckpointManager>) -> Result<Option<PathBuf>> {
    Ok(manager.as_ref().map(|m| m.latest()).transpose()?.flatten())
}

/// Multiplies every gradient by `factor`.
pub fn scale_grads(grads: Vec<Option<Tensor>>, factor: f64) -> Result<Vec<Option<Tensor>>> {
    grads
        .into_iter()
        .map(|g| g.map(|g| Ok((g * factor)?)).transpose())
        .collect()
}

impl<T: PretextTask> Trainer<T> for LoopTrainer {
    fn fit(
        &mut self,
        task: &T,
        data: &mut dyn BatchSource<T::Batch>,
        heldout: Option<&T::Batch>,
    ) -> Result<TrainReport> {
        self.fit_with_hooks(task, data, heldout, &mut [])
    }
}

impl LoopTrainer {
    /// [`Trainer::fit`] with `hooks` called after every step, at every checkpoint and at the
    /// end of the run (see [`TrainHook`] for when, and what an error does). Hooks that leave
    /// the run's random stream alone leave the training bit-identical to a run without them.
    pub fn fit_with_hooks<T: PretextTask>(
        &mut self,
        task: &T,
        data: &mut dyn BatchSource<T::Batch>,
        heldout: Option<&T::Batch>,
        hooks: &mut [&mut dyn TrainHook<T>],
    ) -> Result<TrainReport> {
        let mut run = Run::start(self, task, data, heldout)?;
        while run.state.step < run.cfg.max_steps {
            let (signal, early) = run.stop_requested()?;
            if signal || early {
                run.report.interrupted = signal;
                run.report.early_stopped = early && !signal;
                break;
            }
            let Some(mut record) = run.step()? else {
                continue; // rolled back
            };
            for hook in hooks.iter_mut() {
                hook.after_step(&run.hook_ctx(), &mut record)?;
            }
            run.watch_best(&record)?;
            run.log_step(&record)?;
            if let Some(path) = run.checkpoint_if_due()? {
                for hook in hooks.iter_mut() {
                    hook.at_checkpoint(&run.hook_ctx(), &path)?;
                }
            }
        }
        run.finish(hooks)
    }
}

/// One step's gradients, reduced over micro-batches and ranks, with the factor that divides
/// them by the total weight and clips them, and the figures logged for it.
struct StepGrads {
    /// The gradients of the summed weighted losses, before division and clipping,
    grads: Vec<Option<Tensor>>,
    /// and the factor that divides and clips them.
    scale: f64,
    loss: f64,
    grad_norm: f64,
    samples: u64,
    /// Task metrics, already divided by the total weight.
    metrics: BTreeMap<String, f64>,
    /// Seconds spent in the all-reduce.
    comm_s: f64,
    /// Seconds spent waiting for the micro-batches, the ranks' mean.
    data_wait_s: f64,
}

/// What the non-finite guard and the divergence detector make of a step.
enum Verdict {
    Apply,
    Skip,
    RolledBack,
}

/// The state of one `fit` call: what the loop's named parts share.
struct Run<'r, T: PretextTask> {
    trainer: &'r LoopTrainer,
    task: &'r T,
    data: &'r mut dyn BatchSource<T::Batch>,
    heldout: Option<&'r T::Batch>,
    cfg: TrainConfig,
    main: bool,
    opt: AdamW,
    vars: Vec<Tensor>,
    names: Vec<String>,
    schedule: LrSchedule,
    manager: Option<CheckpointManager>,
    report: TrainReport,
    state: TrainerState,
    log: Option<MetricsLog>,
    progress: Progress,
    guard: NonFiniteGuard,
    div_cfg: DivergenceConfig,
    detector: DivergenceDetector,
    last_saved_step: Option<u64>,
    last_save_time: Instant,
    first_step: bool,
    /// Early stopping's patience ran out (on this rank's view; ranks agree at the next
    /// stop check).
    early_stop: bool,
    /// The part of each step spent waiting for data, averaged for the progress line.
    data_share: DataShare,
}

/// The share of step time spent waiting for batches from which the progress line shows it
/// (`data 35%`): training that waits this much is bound by its input pipeline.
const INPUT_BOUND_SHARE: f64 = 0.1;

/// The moving average of the part of each step spent waiting for batches (debiased, with
/// the loss curve's smoothing weight), from the run's second step on: the first one also
/// waits for the input pipeline to start.
#[derive(Debug, Default)]
struct DataShare {
    steps: i32,
    avg: f64,
}

impl DataShare {
    /// Takes one step's `data_wait_s` and `step_time_s`; returns the progress line's note
    /// (` | data 35%`) when the average reaches [`INPUT_BOUND_SHARE`].
    fn update(&mut self, wait_s: f64, step_s: f64) -> Option<String> {
        let share = wait_s / step_s;
        self.steps += 1;
        if self.steps == 1 || !share.is_finite() {
            return None;
        }
        let w = crate::plot::run::SMOOTHING;
        self.avg = w * self.avg + (1.0 - w) * share.clamp(0.0, 1.0);
        let debiased = self.avg / (1.0 - w.powi(self.steps - 1));
        (debiased >= INPUT_BOUND_SHARE).then(|| format!(" | data {:.0}%", 100.0 * debiased))
    }
}

impl<'r, T: PretextTask> Run<'r, T> {
    /// Setup: the optimizer, resuming from the newest checkpoint (or refusing to overwrite
    /// one), identical parameters on every rank, the metrics log, progress and guards.
    fn start(
        trainer: &'r LoopTrainer,
        task: &'r T,
        data: &'r mut dyn BatchSource<T::Batch>,
        heldout: Option<&'r T::Batch>,
    ) -> Result<Self> {
        let mut cfg = trainer.cfg.clone();
        let main = trainer.collective.is_main();
        let params = task.params();
        let mut opt = AdamW::new(params, cfg.adamw())?;
        opt.set_lr_scales(|name| task.lr_scale(name))?;
        let vars: Vec<Tensor> = opt.vars().map(|v| v.as_tensor().clone()).collect();
        let names: Vec<String> = opt.names().map(str::to_string).collect();
        let schedule = cfg.schedule();
        let manager = trainer.checkpoints();
        let mut report = TrainReport::default();
        let mut state = TrainerState::new(
            SslRng::derived(cfg.seed, "train"),
            trainer.run_config.clone(),
        );

        if let (Some(m), true) = (&manager, main) {
            for note in m.recover()? {
                eprintln!("{note}");
            }
        }
        // Never a silent fresh start over an earlier run's checkpoints, nor from step 0 on a
        // resume with nothing to resume (which would also cut metrics.jsonl).
        let resumed_from = match (&manager, &trainer.out_dir) {
            (Some(m), Some(dir)) => checkpoint_to_start_from(dir, m, trainer.resume)?,
            _ => None,
        };
        if let Some(ckpt) = &resumed_from {
            state = trainer.restore(ckpt, params, &mut opt)?;
            data.restore(&state.data_position)?;
            report.last_checkpoint = Some(ckpt.clone());
        }
        crate::collective::broadcast_params(trainer.collective.as_ref(), params)?;
        cfg.matmul_precision = resolve_precision(
            &cfg,
            state.matmul_precision,
            params.device().is_cuda(),
            trainer.collective.as_ref(),
        )?;
        state.matmul_precision = Some(cfg.matmul_precision);
        report.start_step = state.step;

        let log = match (&trainer.out_dir, main) {
            (Some(dir), true) => {
                std::fs::create_dir_all(dir).map_err(|e| CoreError::io("creating", dir, e))?;
                Some(MetricsLog::open(
                    &dir.join("metrics.jsonl"),
                    resumed_from.as_ref().map(|_| state.step),
                )?)
            }
            _ => None,
        };
        let progress = Progress::new(
            cfg.max_steps,
            state.step,
            cfg.log_every,
            trainer.progress && main,
        );
        if let Some(ckpt) = &resumed_from {
            progress.println(&format!(
                "resumed from {} (step {})",
                ckpt.display(),
                state.step
            ));
        }
        let guard = NonFiniteGuard::new(cfg.max_nonfinite_in_a_row, state.skipped_steps);
        let div_cfg = DivergenceConfig {
            factor: cfg.divergence_factor,
            warmup_steps: cfg.divergence_warmup_steps,
            ..Default::default()
        };
        let detector = DivergenceDetector::new(div_cfg, state.loss_ema, state.step);
        Ok(Run {
            trainer,
            task,
            data,
            heldout,
            main,
            opt,
            vars,
            names,
            schedule,
            manager,
            report,
            log,
            progress,
            guard,
            div_cfg,
            detector,
            last_saved_step: resumed_from.as_ref().map(|_| state.step),
            last_save_time: Instant::now(),
            data_share: DataShare::default(),
            first_step: true,
            // A resumed run that had already stopped early stops again at once (unless the
            // patience was raised).
            early_stop: state.best.as_ref().is_some_and(|b| {
                b.metric == cfg.best_metric && b.exhausted(cfg.early_stop_patience)
            }),
            state,
            cfg,
        })
    }

    /// What hooks see now.
    fn hook_ctx(&self) -> HookCtx<'_, T> {
        HookCtx {
            task: self.task,
            step: self.state.step,
            max_steps: self.cfg.max_steps,
            heldout: self.heldout,
            out_dir: self.trainer.out_dir.as_deref(),
            rank: self.trainer.collective.rank(),
            world_size: self.trainer.collective.world_size(),
            precision: self.cfg.matmul_precision,
            stop: &self.trainer.stop,
        }
    }

    /// Whether any rank was asked to stop (a signal) or ran out of early stopping's patience.
    /// Ranks stop together: a signal seen by one rank alone would leave the others waiting in
    /// the next all-reduce.
    fn stop_requested(&mut self) -> Result<(bool, bool)> {
        let collective = &self.trainer.collective;
        let flag = |b: bool| if b { 1f32 } else { 0.0 };
        let mut stop = [flag(self.trainer.stop.is_set()), flag(self.early_stop)];
        if collective.world_size() > 1 {
            collective.all_reduce_sum(&mut stop)?;
        }
        Ok((stop[0] > 0.0, stop[1] > 0.0))
    }

    /// The best checkpoint and early stopping: when the step's record holds
    /// `train.best_metric`, a better value than any before writes `checkpoints/best` (rank 0,
    /// runs with an output directory), and `train.early_stop_patience` values in a row
    /// without an improvement of more than `train.early_stop_min_delta` stop the run before
    /// the next step.
    fn watch_best(&mut self, record: &Map<String, Value>) -> Result<()> {
        let cfg = &self.cfg;
        if cfg.best_metric.is_empty() {
            return Ok(());
        }
        let Some(value) = record.get(&cfg.best_metric).and_then(Value::as_f64) else {
            return Ok(());
        };
        let verdict = BestState::observe(
            &mut self.state.best,
            &cfg.best_metric,
            cfg.best_mode,
            self.state.step,
            value,
            cfg.early_stop_patience,
            cfg.early_stop_min_delta,
        );
        if verdict.new_best {
            if let (Some(manager), true) = (&self.manager, self.main) {
                let state = &mut self.state;
                state.data_position = self.data.position();
                state.epoch = self.data.epoch();
                state.skipped_steps = self.guard.skipped;
                state.loss_ema = self.detector.average;
                save_best(manager.dir(), self.task.params(), &self.opt, state)?;
            }
        }
        if verdict.stop {
            self.early_stop = true;
            if let Some(b) = &self.state.best {
                self.progress.println(&format!(
                    "early stopping at step {}: {} has not improved by more than {} for {} evaluations (best {:.6} at step {})",
                    self.state.step,
                    b.metric,
                    cfg.early_stop_min_delta,
                    b.stale_evals,
                    b.value,
                    b.step
                ));
            }
        }
        Ok(())
    }

    /// One optimizer step: gradients, the guards' verdict, the update. Returns the step's
    /// record (not yet logged), or `None` when the step was rolled back.
    fn step(&mut self) -> Result<Option<Map<String, Value>>> {
        let t0 = Instant::now();
        let lr = self.schedule.lr(self.state.step) * self.state.lr_scale;
        let g = self.gradients()?;
        let mut record = Map::new();
        match self.judge(g.loss, g.grad_norm, &mut record)? {
            Verdict::RolledBack => return Ok(None),
            Verdict::Apply => {
                self.opt.step_scaled(&g.grads, lr, g.scale)?;
                self.task.after_step()?;
            }
            Verdict::Skip => {}
        }
        let world = self.trainer.collective.world_size();
        self.state.step += 1;
        self.state.samples_seen += g.samples * world as u64;
        let elapsed = t0.elapsed().as_secs_f64();
        self.report.losses.push((self.state.step, g.loss));

        record.insert("step".into(), self.state.step.into());
        record.insert("epoch".into(), self.data.epoch().into());
        record.insert("loss".into(), g.loss.into());
        record.insert("lr".into(), lr.into());
        record.insert("grad_norm".into(), g.grad_norm.into());
        record.insert(
            "samples_per_s".into(),
            (g.samples as f64 * world as f64 / elapsed.max(1e-9)).into(),
        );
        record.insert("step_time_s".into(), elapsed.into());
        record.insert("data_wait_s".into(), g.data_wait_s.into());
        if world > 1 {
            // Flattening, all-reduce and unflattening of the gradients (rank 0's view).
            record.insert("allreduce_s".into(), g.comm_s.into());
        }
        for (k, v) in g.metrics {
            record.insert(k, v.into());
        }
        self.health(&mut record)?;
        Ok(Some(record))
    }

    /// Forward and backward of the step's micro-batches, the first step's check that every
    /// parameter gets a gradient, the all-reduce over ranks, and the factor of the division by
    /// the total weight and clipping (applied by the update, `AdamW::step_scaled`).
    fn gradients(&mut self) -> Result<StepGrads> {
        let collective = &self.trainer.collective;
        let (rank, world) = (collective.rank(), collective.world_size());
        // With several ranks, each draws its own masks and dropout from a stream derived
        // from the shared one, which advances equally everywhere (so a checkpoint of rank
        // 0's state resumes every rank).
        let mut rank_rng;
        let rng = if world > 1 {
            rank_rng = SslRng::derived(self.state.rng.next_u64(), &format!("rank-{rank}"));
            &mut rank_rng
        } else {
            &mut self.state.rng
        };
        let acc = accumulate(
            self.task,
            &mut *self.data,
            self.cfg.accum_steps,
            &self.vars,
            rng,
            self.cfg.matmul_precision,
        )?;
        let mut grads = acc.grads;
        if self.first_step {
            self.report.params_without_grad = self
                .names
                .iter()
                .zip(&grads)
                .filter(|(n, g)| g.is_none() && self.task.lr_scale(n) != 0.0)
                .map(|(n, _)| n.clone())
                .collect();
            if !self.report.params_without_grad.is_empty() {
                self.progress.println(&format!(
                    "warning: no gradient reaches {:?}",
                    self.report.params_without_grad
                ));
            }
            self.first_step = false;
        }
        // Loss, weight and the task's metric sums are summed over ranks with the
        // gradients (every rank's task reports the same metric names).
        let mut scalars = vec![acc.loss_sum, acc.weight_sum];
        scalars.extend(acc.metric_sums.values());
        // The wait for data too, so the record shows the ranks' mean (last).
        scalars.push(acc.data_wait_s);
        let t_comm = Instant::now();
        self.trainer
            .all_reduce(&mut grads, &self.vars, &mut scalars)?;
        let comm_s = t_comm.elapsed().as_secs_f64();
        let data_wait_s = scalars.pop().unwrap_or_default() / world.max(1) as f64;
        let (loss_sum, weight_sum) = (scalars[0], scalars[1]);
        let inv = 1.0 / weight_sum.max(f64::MIN_POSITIVE);
        let metrics: BTreeMap<String, f64> = acc
            .metric_sums
            .into_keys()
            .zip(scalars[2..].iter().map(|v| v * inv))
            .collect();
        // Division by the weight and clipping are a factor that the update applies as it
        // reads each gradient (`AdamW::step_scaled`).
        let (grad_norm, scale) = clip_scale(&grads, inv, self.cfg.grad_clip)?;
        let loss = loss_sum * inv;
        Ok(StepGrads {
            grads,
            scale,
            loss,
            grad_norm,
            samples: acc.samples,
            metrics,
            comm_s,
            data_wait_s,
        })
    }

    /// The non-finite guard and the divergence detector on the step's loss and gradient
    /// norm: stop with an error, skip the update, roll back, or apply it.
    fn judge(
        &mut self,
        loss: f64,
        grad_norm: f64,
        record: &mut Map<String, Value>,
    ) -> Result<Verdict> {
        match self.guard.check(loss, grad_norm) {
            Some(NonFiniteAction::Stop) => Err(CoreError::NonFinite {
                step: self.state.step,
                count: self.guard.in_a_row(),
                loss,
                grad_norm,
            }),
            Some(NonFiniteAction::Skip) => {
                record.insert("event".into(), "skipped_non_finite".into());
                self.progress.println(&format!(
                    "step {}: non-finite loss {loss} or gradient norm {grad_norm}; update skipped",
                    self.state.step + 1
                ));
                Ok(Verdict::Skip)
            }
            None => {
                let Some(avg) = self.detector.observe(loss) else {
                    return Ok(Verdict::Apply);
                };
                self.report.divergences += 1;
                record.insert("event".into(), "divergence".into());
                self.progress.println(&format!(
                    "step {}: loss {loss:.4e} is over {}x its moving average {avg:.4e}: training may be diverging",
                    self.state.step + 1,
                    self.cfg.divergence_factor
                ));
                if !self.cfg.rollback_on_divergence {
                    return Ok(Verdict::Apply);
                }
                self.roll_back(loss, avg, record)?;
                Ok(Verdict::RolledBack)
            }
        }
    }

    /// Restores the last checkpoint after a divergence and lowers the learning rate; the data
    /// and random streams move on, so the same batches are not replayed.
    fn roll_back(&mut self, loss: f64, avg: f64, record: &mut Map<String, Value>) -> Result<()> {
        let state = &mut self.state;
        if state.rollbacks >= self.cfg.max_rollbacks {
            return Err(CoreError::Diverged {
                step: state.step,
                loss,
                average: avg,
                rollbacks: state.rollbacks,
            });
        }
        let target = latest_checkpoint(&self.manager)?;
        let (rng, position, epoch) = (state.rng.clone(), self.data.position(), self.data.epoch());
        let diverged_at = state.step + 1;
        if let Some(ckpt) = target {
            let restored = self
                .trainer
                .restore(&ckpt, self.task.params(), &mut self.opt)?;
            state.step = restored.step;
            state.loss_ema = restored.loss_ema;
            self.detector = DivergenceDetector::new(self.div_cfg, restored.loss_ema, restored.step);
            self.progress
                .println(&format!("rolled back to {}", ckpt.display()));
        }
        state.rng = rng;
        state.data_position = position;
        state.epoch = epoch;
        state.rollbacks += 1;
        state.lr_scale *= self.cfg.rollback_lr_factor;
        self.progress
            .println(&format!("learning rate scaled to {}x", state.lr_scale));
        if let Some(log) = &mut self.log {
            record.insert("step".into(), diverged_at.into());
            record.insert("loss".into(), loss.into());
            record.insert("loss_average".into(), avg.into());
            record.insert("rolled_back_to".into(), state.step.into());
            record.insert("lr_scale".into(), state.lr_scale.into());
            log.write(record)?;
        }
        Ok(())
    }

    /// Embedding-health figures on the held-out batch, every `health_every` steps and at the
    /// last one.
    fn health(&self, record: &mut Map<String, Value>) -> Result<()> {
        let Some(batch) = self.heldout else {
            return Ok(());
        };
        let (step, every) = (self.state.step, self.cfg.health_every);
        if every == 0 || !(step.is_multiple_of(every) || step == self.cfg.max_steps) {
            return Ok(());
        }
        let mut rng = SslRng::new(0);
        let emb = self.task.embed(
            batch,
            &mut Ctx::inference(&mut rng).with_precision(self.cfg.matmul_precision),
        )?;
        let (rows, dim) = emb.dims2()?;
        let flat = emb.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let h = embedding_health(&flat, rows, dim)?;
        record.insert("emb_std".into(), h.mean_std.into());
        record.insert("emb_std_normalized".into(), h.mean_std_normalized.into());
        record.insert("emb_effective_rank".into(), h.effective_rank.into());
        Ok(())
    }

    /// Writes the step's record to `metrics.jsonl` and draws the progress line.
    fn log_step(&mut self, record: &Map<String, Value>) -> Result<()> {
        if let Some(log) = &mut self.log {
            log.write(record)?;
        }
        let figure = |k: &str| record.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let mut msg = format!(
            "loss {:.4} lr {:.2e} |g| {:.3}",
            figure("loss"),
            figure("lr"),
            figure("grad_norm")
        );
        if let Some(note) = self
            .data_share
            .update(figure("data_wait_s"), figure("step_time_s"))
        {
            msg.push_str(&note);
        }
        self.progress
            .update(self.state.step, self.cfg.max_steps, &msg);
        Ok(())
    }

    /// Writes a checkpoint when one is due (every `checkpoint_every_steps` steps or
    /// `checkpoint_every_minutes` minutes); returns its path.
    fn checkpoint_if_due(&mut self) -> Result<Option<PathBuf>> {
        let cfg = &self.cfg;
        let due_steps = cfg.checkpoint_every_steps > 0
            && self.state.step.is_multiple_of(cfg.checkpoint_every_steps);
        let due_time = cfg.checkpoint_every_minutes > 0.0
            && self.last_save_time.elapsed().as_secs_f64() >= cfg.checkpoint_every_minutes * 60.0;
        if !(due_steps || due_time) {
            return Ok(None);
        }
        let path = self.save()?;
        self.last_save_time = Instant::now();
        Ok(path)
    }

    /// Writes a checkpoint of the current step (when the run has an output directory);
    /// returns its path (on ranks other than the main one, where the main one wrote it).
    fn save(&mut self) -> Result<Option<PathBuf>> {
        self.last_saved_step = Some(self.state.step);
        let Some(manager) = &self.manager else {
            return Ok(None);
        };
        let state = &mut self.state;
        state.data_position = self.data.position();
        state.epoch = self.data.epoch();
        state.skipped_steps = self.guard.skipped;
        state.loss_ema = self.detector.average;
        if self.main {
            let path = manager.save(self.task.params(), &self.opt, state)?;
            self.report.last_checkpoint = Some(path.clone());
            Ok(Some(path))
        } else {
            Ok(Some(manager.path_for(state.step)))
        }
    }

    /// The end of the run: the final checkpoint (unless the last step has one), the report,
    /// the plot, the end hooks, and a barrier so no rank leaves before the others.
    fn finish(mut self, hooks: &mut [&mut dyn TrainHook<T>]) -> Result<TrainReport> {
        // A run whose every step was skipped (this session's and any before a resume) applied
        // no update: its model is the initial one, which no checkpoint should pass off as
        // trained.
        if self.state.step > self.report.start_step && self.guard.skipped >= self.state.step {
            self.progress.finish();
            return Err(CoreError::NoUpdate {
                steps: self.state.step,
            });
        }
        if self.last_saved_step != Some(self.state.step) {
            if let Some(path) = self.save()? {
                for hook in hooks.iter_mut() {
                    hook.at_checkpoint(&self.hook_ctx(), &path)?;
                }
            }
        }
        self.progress.finish();
        if self.report.interrupted {
            self.progress.println(&format!(
                "stopped at step {} on request; checkpoint written",
                self.state.step
            ));
        }
        self.report.step = self.state.step;
        self.report.best = self.state.best.clone().map(|b| {
            let dir = self.manager.as_ref().map(|m| m.dir().join(BEST_DIR));
            (b, dir.filter(|d| d.exists()))
        });
        self.report.skipped_steps = self.guard.skipped;
        self.report.rollbacks = self.state.rollbacks;
        if let (Some(dir), true) = (&self.trainer.out_dir, self.main) {
            plot_run(dir)?;
        }
        for hook in hooks.iter_mut() {
            hook.at_end(&self.hook_ctx(), &self.report)?;
        }
        self.trainer.collective.barrier()?;
        Ok(self.report)
    }
}

/// Writes `loss.png` (raw and smoothed loss with the held-out losses, learning rate, gradient
/// norm against step), and `metrics.png` / `health.png` (task metrics, embedding health) when
/// logged, from `metrics.jsonl` (see [`crate::plot::run`]).
pub fn plot_run(dir: &Path) -> Result<()> {
    crate::plot::run::plot_run_dir(dir)
}

/// What this machine's products take for `cfg.matmul_precision`, decided locally: as asked
/// on a GPU (cuBLAS multiplies bf16 on every GPU candle runs on) or when f32 is asked; f32
/// where bf16 was asked for but the CPU lacks the kernels or, with `train.bf16_check`, they
/// are slower than f32 on it (measured once per process: [`ssl_kernels::bf16_check`], a
/// training step's three products, or with `inference` [`ssl_kernels::bf16_forward_check`],
/// a pass without backward's forward product alone). The second value says why when bf16
/// was asked for and f32 is kept.
fn local_precision(
    cfg: &TrainConfig,
    on_gpu: bool,
    inference: bool,
) -> (MatmulPrecision, Option<String>) {
    if cfg.matmul_precision != MatmulPrecision::Bf16 || on_gpu {
        return (cfg.matmul_precision, None);
    }
    if !crate::nn::bf16_matmul_available() {
        return (
            MatmulPrecision::F32,
            Some(
                "train.matmul_precision = bf16: this CPU has no AVX-512 BF16, so the products stay f32"
                    .into(),
            ),
        );
    }
    if !cfg.bf16_check {
        return (MatmulPrecision::Bf16, None);
    }
    // A pass without backward's forward product (timed alone: a process that only embeds
    // does not time the backward's), or a training step's three products.
    let measured = if inference {
        ssl_kernels::bf16_forward_check().map(|c| {
            (
                c.bf16_faster(),
                c.bf16_seconds,
                c.f32_seconds,
                "a bf16 forward product takes",
                "passes without backward stay f32",
            )
        })
    } else {
        ssl_kernels::bf16_check().map(|c| {
            (
                c.bf16_faster(),
                c.bf16_seconds,
                c.f32_seconds,
                "bf16 products take",
                "the products stay f32",
            )
        })
    };
    let Some((faster, bf16_s, f32_s, timed, kept)) = measured else {
        return (MatmulPrecision::Bf16, None);
    };
    if faster {
        return (MatmulPrecision::Bf16, None);
    }
    (
        MatmulPrecision::F32,
        Some(format!(
            "train.matmul_precision = bf16: {timed} {:.1} ms against {:.1} ms in f32 on this CPU ({}), so {kept} (train.bf16_check = false forces bf16)",
            bf16_s * 1e3,
            f32_s * 1e3,
            ssl_kernels::cpu_name()
        )),
    )
}

/// The precision embedding and evaluation passes of a run take on `device`: the run's
/// `train.matmul_precision`, by the trainer's rule for a pass without backward (bf16 only
/// where this machine's reduced-precision forward product is at least as fast as f32,
/// [`ssl_kernels::bf16_forward_check`], unless `train.bf16_check = false`). A model
/// trained with bf16 products on one CPU is embedded in f32 on a CPU where bf16 is slower.
/// Says why on stderr, once per process, when it keeps f32.
pub fn inference_precision(cfg: &TrainConfig, device: &candle_core::Device) -> MatmulPrecision {
    static SAID: std::sync::Once = std::sync::Once::new();
    let (p, why) = local_precision(cfg, device.is_cuda(), true);
    if let Some(why) = why {
        SAID.call_once(|| eprintln!("{why}"));
    }
    p
}

/// The precision a run's products take: the checkpoint's on a resume; else
/// [`local_precision`]'s rule, decided on every rank together (f32 if any rank's CPU keeps
/// f32: no kernels, or bf16 slower there), so ranks take the same precision. Rank 0 says why
/// when it keeps f32.
fn resolve_precision(
    cfg: &TrainConfig,
    recorded: Option<MatmulPrecision>,
    on_gpu: bool,
    collective: &dyn Collective,
) -> Result<MatmulPrecision> {
    if let Some(p) = recorded {
        return Ok(p);
    }
    let main = collective.is_main();
    let (local, why) = local_precision(cfg, on_gpu, false);
    if cfg.matmul_precision != MatmulPrecision::Bf16 || on_gpu {
        return Ok(local);
    }
    // Every rank votes (a rank that decided alone would leave the others waiting here).
    let slower = local == MatmulPrecision::F32;
    let mut votes = [f32::from(u8::from(slower))];
    collective.all_reduce_sum(&mut votes)?;
    if votes[0] == 0.0 {
        return Ok(MatmulPrecision::Bf16);
    }
    if main {
        match why {
            Some(why) => eprintln!("{why}"),
            None => eprintln!(
                "train.matmul_precision = bf16: another rank's CPU keeps f32 (no AVX-512 BF16 there, or bf16 products slower), so every rank's products stay f32"
            ),
        }
    }
    Ok(MatmulPrecision::F32)
}

#[cfg(test)]
mod data_share_tests {
    use super::DataShare;

    /// The first step is left out; from the second on the average is debiased, so a run
    /// that waits 30% of every step says so at once; one that waits 5% says nothing.
    #[test]
    fn the_progress_note_shows_an_input_bound_run() {
        let mut d = DataShare::default();
        assert_eq!(d.update(0.9, 1.0), None, "the first step is start-up");
        assert_eq!(d.update(0.3, 1.0).as_deref(), Some(" | data 30%"));
        for _ in 0..20 {
            assert_eq!(d.update(0.3, 1.0).as_deref(), Some(" | data 30%"));
        }
        let mut quiet = DataShare::default();
        for _ in 0..20 {
            assert_eq!(quiet.update(0.05, 1.0), None);
        }
        // No step time (or no figure): nothing, and the average is untouched.
        assert_eq!(quiet.update(0.0, 0.0), None);
        assert_eq!(quiet.update(f64::NAN, 1.0), None);
    }
}

#[cfg(test)]
mod epoch_tests {
    use super::TrainConfig;

    #[test]
    fn epochs_become_steps_over_every_rank() {
        let mut c = TrainConfig {
            batch_size: 8,
            accum_steps: 2,
            ..TrainConfig::default()
        };
        assert_eq!(c.apply_epochs(1000, 1), None);
        assert_eq!(c.max_steps, 1000);
        c.max_epochs = 3.0;
        // 1000 / (8 * 2 * 2) = 31.25 -> 32 steps an epoch.
        assert_eq!(c.apply_epochs(1000, 2), Some(96));
        c.max_epochs = 0.5;
        assert_eq!(c.apply_epochs(1000, 2), Some(16));
        c.max_epochs = 1.0;
        assert_eq!(c.apply_epochs(3, 1), Some(1));
        c.max_epochs = -1.0;
        assert!(c.validate().is_err());
    }
}

#[cfg(test)]
mod precision_tests {
    use super::*;

    #[test]
    fn embedding_takes_the_precision_a_training_run_takes_here() {
        let dev = candle_core::Device::Cpu;
        let mut cfg = TrainConfig {
            matmul_precision: MatmulPrecision::F32,
            ..TrainConfig::default()
        };
        assert_eq!(inference_precision(&cfg, &dev), MatmulPrecision::F32);
        cfg.matmul_precision = MatmulPrecision::Bf16;
        // bf16 only where this CPU's bf16 products are at least as fast as its f32 ones: a
        // training step's three, a pass without backward's forward product.
        let infer = ssl_kernels::bf16_forward_check().is_some_and(|c| c.bf16_faster());
        let train = ssl_kernels::bf16_check().is_some_and(|c| c.bf16_faster());
        let pick = |bf16: bool| {
            if bf16 {
                MatmulPrecision::Bf16
            } else {
                MatmulPrecision::F32
            }
        };
        assert_eq!(inference_precision(&cfg, &dev), pick(infer));
        assert_eq!(
            resolve_precision(&cfg, None, false, &SingleProcess).unwrap(),
            pick(train)
        );
        // A resumed run keeps what its checkpoint recorded.
        assert_eq!(
            resolve_precision(&cfg, Some(MatmulPrecision::F32), false, &SingleProcess).unwrap(),
            MatmulPrecision::F32
        );
        // Without the check, bf16 wherever the kernels exist.
        cfg.bf16_check = false;
        let forced = if crate::nn::bf16_matmul_available() {
            MatmulPrecision::Bf16
        } else {
            MatmulPrecision::F32
        };
        assert_eq!(inference_precision(&cfg, &dev), forced);
        assert_eq!(
            resolve_precision(&cfg, None, false, &SingleProcess).unwrap(),
            forced
        );
    }
}
