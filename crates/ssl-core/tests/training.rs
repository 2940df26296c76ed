//! Behaviour of the training loop: resume, accumulation, guards, divergence, outputs.

mod common;

use std::cell::Cell;

use candle_core::{Device, Tensor};
use common::*;
use ssl_core::checkpoint::{read_state, resolve_checkpoint};
use ssl_core::seq::{InMemorySeqSource, SeqBatch};
use ssl_core::{
    accumulate, scale_grads, BatchSource, Ctx, LoopTrainer, ParamStore, PretextTask, StopFlag,
    TaskOutput, Trainer,
};

/// A source that runs `before` ahead of each of `inner`'s batches (a stop request after some
/// batches, as a signal would; a sleep, as a starved input pipeline would).
struct Hooked<F: FnMut()> {
    inner: InMemorySeqSource,
    before: F,
}

impl<F: FnMut()> BatchSource<SeqBatch> for Hooked<F> {
    fn next_batch(&mut self) -> ssl_core::Result<SeqBatch> {
        (self.before)();
        self.inner.next_batch()
    }
    fn epoch(&self) -> u64 {
        self.inner.epoch()
    }
    fn position(&self) -> serde_json::Value {
        self.inner.position()
    }
    fn restore(&mut self, p: &serde_json::Value) -> ssl_core::Result<()> {
        self.inner.restore(p)
    }
}

#[test]
fn resume_after_stop_is_bit_identical_to_an_uninterrupted_run() {
    let (ex, _) = waves(60, 1);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = quick_train(12);
    cfg.checkpoint_every_steps = 4;

    // Uninterrupted: 12 steps (dropout on, so the RNG state matters).
    let (store_a, task_a) = masked_task(3, 0.1);
    LoopTrainer::new(cfg.clone(), Some(dir.path().join("a")))
        .unwrap()
        .fit(&task_a, &mut source(ex.clone(), 16, true), None)
        .unwrap();

    // Interrupted after 6 steps (between checkpoints), then resumed in a fresh process state.
    let stop = StopFlag::new();
    let (_, task_b) = masked_task(3, 0.1);
    let (flag, mut served) = (stop.clone(), 0);
    let mut src = Hooked {
        inner: source(ex.clone(), 16, true),
        before: move || {
            served += 1;
            if served == 6 {
                flag.request();
            }
        },
    };
    let r = LoopTrainer::new(cfg.clone(), Some(dir.path().join("b")))
        .unwrap()
        .stop_flag(stop)
        .fit(&task_b, &mut src, None)
        .unwrap();
    assert!(r.interrupted);
    assert_eq!(r.step, 6);
    assert_eq!(
        read_state(&resolve_checkpoint(&dir.path().join("b")).unwrap())
            .unwrap()
            .step,
        6
    );

    let (store_c, task_c) = masked_task(99, 0.1); // different init: resume must overwrite it
    let r = LoopTrainer::new(cfg, Some(dir.path().join("b")))
        .unwrap()
        .resume(true)
        .fit(&task_c, &mut source(ex, 16, true), None)
        .unwrap();
    assert_eq!((r.start_step, r.step), (6, 12));
    assert_eq!(param_bits(&store_a), param_bits(&store_c));

    // A fresh (non-resume) run into a directory with checkpoints refuses to mix them.
    let (_, task_d) = masked_task(3, 0.1);
    let err = LoopTrainer::new(quick_train(3), Some(dir.path().join("b")))
        .unwrap()
        .fit(&task_d, &mut source(waves(20, 1).0, 16, true), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already holds checkpoints"), "{err}");

    let lines = std::fs::read_to_string(dir.path().join("b/metrics.jsonl")).unwrap();
    let steps: Vec<u64> = lines
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(steps, (1..=12).collect::<Vec<_>>());
}

#[test]
fn accumulating_four_micro_batches_equals_one_big_batch() {
    let (ex, _) = waves(64, 2);
    // No dropout: masks are drawn row by row, so both runs see the same masks.
    let (store, task) = masked_task(5, 0.0);
    let vars: Vec<Tensor> = store
        .vars()
        .into_iter()
        .map(|(_, v)| v.as_tensor().clone())
        .collect();
    let grads = |batch: usize, micro: usize| {
        let mut rng = ssl_core::SslRng::new(9);
        let acc = accumulate(
            &task,
            &mut source(ex.clone(), batch, false),
            micro,
            &vars,
            &mut rng,
            ssl_core::nn::MatmulPrecision::F32,
        )
        .unwrap();
        let loss = acc.loss_sum / acc.weight_sum;
        let g = scale_grads(acc.grads, 1.0 / acc.weight_sum).unwrap();
        (loss, g)
    };
    let (loss_big, big) = grads(32, 1);
    let (loss_acc, acc) = grads(8, 4);
    assert!(
        (loss_big - loss_acc).abs() < 1e-6 * loss_big.abs(),
        "{loss_big} vs {loss_acc}"
    );
    for ((name, _), (a, b)) in store.vars().iter().zip(big.iter().zip(&acc)) {
        let a = a
            .as_ref()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = b
            .as_ref()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-3);
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-4 * scale, "{name}: {x} vs {y}");
        }
    }
}

/// Wraps a task and corrupts the loss at chosen calls.
struct Sabotage<T> {
    inner: T,
    calls: Cell<u64>,
    nan_at: Vec<u64>,
    spike_at: Vec<u64>,
}

impl<T: PretextTask<Batch = SeqBatch>> PretextTask for Sabotage<T> {
    type Batch = SeqBatch;
    fn params(&self) -> &ParamStore {
        self.inner.params()
    }
    fn forward(&self, batch: &SeqBatch, ctx: &mut Ctx) -> ssl_core::Result<TaskOutput> {
        let call = self.calls.get() + 1;
        self.calls.set(call);
        let mut out = self.inner.forward(batch, ctx)?;
        if self.nan_at.contains(&call) {
            out.loss = (out.loss * f64::NAN)?;
        }
        if self.spike_at.contains(&call) {
            out.loss = (out.loss * 1000.0)?;
        }
        Ok(out)
    }
    fn embed(&self, batch: &SeqBatch, ctx: &mut Ctx) -> ssl_core::Result<Tensor> {
        self.inner.embed(batch, ctx)
    }
    fn batch_len(&self, batch: &SeqBatch) -> usize {
        batch.len()
    }
}

#[test]
fn non_finite_steps_are_skipped_and_too_many_stop_with_a_clear_error() {
    let (ex, _) = waves(48, 3);
    let (store, inner) = masked_task(1, 0.0);
    let task = Sabotage {
        inner,
        calls: Cell::new(0),
        nan_at: vec![3, 4],
        spike_at: vec![],
    };
    let dir = tempfile::tempdir().unwrap();
    let r = LoopTrainer::new(quick_train(8), Some(dir.path().to_path_buf()))
        .unwrap()
        .fit(&task, &mut source(ex.clone(), 16, true), None)
        .unwrap();
    assert_eq!(r.step, 8);
    assert_eq!(r.skipped_steps, 2);
    assert!(
        store.first_non_finite().unwrap().is_none(),
        "a NaN step must not touch the parameters"
    );
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(log.matches("skipped_non_finite").count(), 2);

    let (_, inner) = masked_task(1, 0.0);
    let task = Sabotage {
        inner,
        calls: Cell::new(0),
        nan_at: (2..100).collect(),
        spike_at: vec![],
    };
    let mut cfg = quick_train(50);
    cfg.max_nonfinite_in_a_row = 4;
    let err = LoopTrainer::new(cfg, None)
        .unwrap()
        .fit(&task, &mut source(ex, 16, true), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("4 steps in a row") && err.contains("non-finite"),
        "{err}"
    );
}

#[test]
fn a_run_whose_every_step_was_skipped_fails_without_a_checkpoint() {
    let (ex, _) = waves(48, 3);
    let (_, inner) = masked_task(1, 0.0);
    // Fewer steps than `max_nonfinite_in_a_row`: the in-a-row guard never fires.
    let task = Sabotage {
        inner,
        calls: Cell::new(0),
        nan_at: (1..100).collect(),
        spike_at: vec![],
    };
    let dir = tempfile::tempdir().unwrap();
    let err = LoopTrainer::new(quick_train(3), Some(dir.path().to_path_buf()))
        .unwrap()
        .fit(&task, &mut source(ex, 16, true), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no update was applied") && err.contains("all 3 steps"),
        "{err}"
    );
    assert!(
        !dir.path().join("checkpoints").exists()
            || std::fs::read_dir(dir.path().join("checkpoints"))
                .unwrap()
                .next()
                .is_none(),
        "no checkpoint of an untrained model"
    );
}

#[test]
fn divergence_rolls_back_to_the_last_checkpoint_with_a_lower_learning_rate() {
    let (ex, _) = waves(48, 4);
    let (_, inner) = masked_task(2, 0.0);
    let task = Sabotage {
        inner,
        calls: Cell::new(0),
        nan_at: vec![],
        spike_at: vec![14],
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = quick_train(20);
    cfg.checkpoint_every_steps = 5;
    cfg.divergence_warmup_steps = 5;
    cfg.rollback_on_divergence = true;
    let r = LoopTrainer::new(cfg, Some(dir.path().to_path_buf()))
        .unwrap()
        .fit(&task, &mut source(ex, 16, true), None)
        .unwrap();
    assert_eq!(r.divergences, 1);
    assert_eq!(r.rollbacks, 1);
    assert_eq!(r.step, 20);
    let state = read_state(&resolve_checkpoint(dir.path()).unwrap()).unwrap();
    assert_eq!(state.lr_scale, 0.5);
    assert_eq!(state.rollbacks, 1);
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert!(log.contains("divergence"));
}

#[test]
fn outputs_metrics_health_plot_and_checkpoints() {
    let (ex, _) = waves(48, 5);
    let (_, task) = masked_task(0, 0.0);
    let heldout =
        SeqBatch::from_examples(&ex.iter().take(24).collect::<Vec<_>>(), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = quick_train(10);
    cfg.health_every = 5;
    cfg.checkpoint_every_steps = 4;
    cfg.keep_checkpoints = 2;
    let r = LoopTrainer::new(cfg, Some(dir.path().to_path_buf()))
        .unwrap()
        .fit(&task, &mut source(ex, 16, true), Some(&heldout))
        .unwrap();
    assert!(
        r.params_without_grad.is_empty(),
        "{:?}",
        r.params_without_grad
    );
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let recs: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 10);
    for k in [
        "step",
        "epoch",
        "loss",
        "lr",
        "grad_norm",
        "samples_per_s",
        "masked_mse",
    ] {
        assert!(recs[0].get(k).is_some(), "missing {k}");
    }
    assert!(recs[4]["emb_effective_rank"].as_f64().unwrap() > 1.0);
    assert!(recs[4]["emb_std"].as_f64().unwrap() > 0.0);
    let png = std::fs::read(dir.path().join("loss.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    let names: Vec<String> = std::fs::read_dir(dir.path().join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(names, ["step-00000008", "step-00000010"]);
}

/// Each step's record says how long it waited for its batches (`data_wait_s`): at least the
/// source's sleep per micro-batch, and no more than the step took.
#[test]
fn the_record_counts_the_wait_for_data() {
    let (ex, _) = waves(32, 1);
    let (_, task) = masked_task(0, 0.0);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = quick_train(3);
    cfg.accum_steps = 2;
    let sleep = std::time::Duration::from_millis(30);
    let mut src = Hooked {
        inner: source(ex, 8, true),
        before: || std::thread::sleep(sleep),
    };
    LoopTrainer::new(cfg, Some(dir.path().to_path_buf()))
        .unwrap()
        .fit(&task, &mut src, None)
        .unwrap();
    let log = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3);
    for line in log.lines() {
        let rec: serde_json::Value = serde_json::from_str(line).unwrap();
        let wait = rec["data_wait_s"].as_f64().unwrap();
        let step = rec["step_time_s"].as_f64().unwrap();
        assert!(wait >= 2.0 * sleep.as_secs_f64(), "{rec}");
        assert!(wait <= step, "{rec}");
    }
}

/// `train.matmul_precision = bf16` becomes bf16 only where the CPU has the kernels and (with
/// `train.bf16_check`) they are at least as fast as f32; the checkpoint records the choice and
/// a resume keeps it whatever the configuration now says.
#[test]
fn the_run_records_its_precision_and_a_resume_keeps_it() {
    use ssl_core::nn::{bf16_matmul_available, MatmulPrecision};
    let (ex, _) = waves(40, 1);
    let recorded = |dir: &std::path::Path| {
        read_state(&resolve_checkpoint(dir).unwrap())
            .unwrap()
            .matmul_precision
    };
    for check in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = quick_train(2);
        cfg.checkpoint_every_steps = 2;
        cfg.matmul_precision = MatmulPrecision::Bf16;
        cfg.bf16_check = check;
        let (_, task) = masked_task(3, 0.0);
        LoopTrainer::new(cfg.clone(), Some(dir.path().to_path_buf()))
            .unwrap()
            .fit(&task, &mut source(ex.clone(), 16, true), None)
            .unwrap();
        let faster = !check || ssl_kernels::bf16_check().is_some_and(|c| c.bf16_faster());
        let expected = if bf16_matmul_available() && faster {
            MatmulPrecision::Bf16
        } else {
            MatmulPrecision::F32
        };
        assert_eq!(recorded(dir.path()), Some(expected), "bf16_check = {check}");

        cfg.max_steps = 4;
        cfg.matmul_precision = MatmulPrecision::F32;
        LoopTrainer::new(cfg, Some(dir.path().to_path_buf()))
            .unwrap()
            .resume(true)
            .fit(&task, &mut source(ex.clone(), 16, true), None)
            .unwrap();
        assert_eq!(recorded(dir.path()), Some(expected), "after the resume");
    }
}
