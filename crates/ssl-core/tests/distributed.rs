//! Data-parallel training: ranks as threads ([`ThreadGroup`], the MPI backend's semantics in one
//! process). Two ranks must end bit-identical, and equal (to float tolerance) to one process
//! trained on the combined batch; skipping the gradient all-reduce must break both.

mod common;

use common::*;
use ssl_core::seq::SeqExample;
use ssl_core::{Collective, LoopTrainer, ThreadGroup, Trainer};

/// A [`ThreadGroup`] rank that forgets to all-reduce gradients (every other collective works).
struct SkipsAllReduce(ThreadGroup);

impl Collective for SkipsAllReduce {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> ssl_core::Result<()> {
        Ok(())
    }
    fn all_gather(&self, local: &[f32]) -> ssl_core::Result<Vec<f32>> {
        self.0.all_gather(local)
    }
    fn broadcast(&self, buf: &mut [f32], root: usize) -> ssl_core::Result<()> {
        self.0.broadcast(buf, root)
    }
    fn barrier(&self) -> ssl_core::Result<()> {
        self.0.barrier()
    }
}

/// Trains two ranks in threads; rank 1 starts from other weights, so the run depends on the
/// broadcast too. Returns each rank's final parameter bits.
fn two_ranks(
    ex: &[SeqExample],
    wrap: fn(ThreadGroup) -> Box<dyn Collective>,
    cfg: ssl_core::TrainConfig,
) -> Vec<Vec<(String, Vec<u32>)>> {
    std::thread::scope(|s| {
        let handles: Vec<_> = ThreadGroup::new(2)
            .into_iter()
            .map(|c| {
                let data = shard(ex, c.rank(), 2);
                let cfg = cfg.clone();
                s.spawn(move || {
                    let task = regression(c.rank() as u64 * 100);
                    LoopTrainer::new(cfg, None)
                        .unwrap()
                        .collective(wrap(c))
                        .fit(&task, &mut source(data, BATCH, false), None)
                        .unwrap();
                    param_bits(&task.store)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn two_ranks_are_bit_identical_and_equal_one_process_on_the_combined_batch() {
    let (ex, _) = waves(64, 11);
    let ranks = two_ranks(&ex, |c| Box::new(c), train_cfg());
    assert_eq!(ranks[0], ranks[1], "ranks ended with different parameters");
    let single = one_process(&ex);
    let start = param_bits(&regression(0).store);
    let (a, b, s0) = (floats(&ranks[0]), floats(&single), floats(&start));
    let moved = max_rel_diff(&s0, &b);
    let diff = max_rel_diff(&a, &b);
    eprintln!("parameters moved {moved:.3e}; two ranks vs one process {diff:.3e} (relative)");
    assert!(
        moved > 1e-3,
        "training did not move the parameters ({moved})"
    );
    assert!(
        diff < 1e-6,
        "two ranks vs one process: max relative diff {diff}"
    );
}

#[test]
fn skipping_the_gradient_all_reduce_is_caught() {
    let (ex, _) = waves(64, 11);
    let ranks = two_ranks(&ex, |c| Box::new(SkipsAllReduce(c)), train_cfg());
    assert_ne!(ranks[0], ranks[1], "ranks agree without an all-reduce?");
    let diff = max_rel_diff(&floats(&ranks[0]), &floats(&one_process(&ex)));
    eprintln!("without the all-reduce: rank 0 vs one process {diff:.3e} (relative)");
    assert!(
        diff > 1e-4,
        "rank 0 matches the combined batch without all-reduce ({diff})"
    );
}

#[test]
fn ranks_with_dropout_and_random_masks_stay_bit_identical() {
    // Each rank draws its own masks and dropout; the all-reduced update keeps them equal.
    let (ex, _) = waves(64, 12);
    let bits: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = ThreadGroup::new(2)
            .into_iter()
            .map(|c| {
                let data = shard(&ex, c.rank(), 2);
                s.spawn(move || {
                    let (store, task) = masked_task(c.rank() as u64, 0.1);
                    LoopTrainer::new(train_cfg(), None)
                        .unwrap()
                        .collective(Box::new(c))
                        .fit(&task, &mut source(data, BATCH, true), None)
                        .unwrap();
                    param_bits(&store)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(bits[0], bits[1]);
}

#[test]
fn bucketed_all_reduce_gives_the_same_bits_as_one_bucket() {
    // Buckets of 1 KiB (256 floats) split the gradients into many exchanges; sums are
    // element-wise, so the result must not change by a bit.
    let (ex, _) = waves(64, 13);
    let one = two_ranks(&ex, |c| Box::new(c), train_cfg());
    let small = ssl_core::TrainConfig {
        allreduce_bucket_mb: 1.0 / 1024.0,
        ..train_cfg()
    };
    let many = two_ranks(&ex, |c| Box::new(c), small);
    assert_eq!(one[0], many[0]);
    assert_eq!(many[0], many[1]);
}

/// `metrics.jsonl` of a run (rank 0 writes it): each step's `key`.
fn logged(dir: &std::path::Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()[key]
                .as_f64()
                .unwrap()
        })
        .collect()
}

#[test]
fn logged_loss_and_task_metrics_are_those_of_the_combined_batch() {
    let (ex, _) = waves(64, 11);
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let task = regression(0);
    LoopTrainer::new(train_cfg(), Some(one.clone()))
        .unwrap()
        .fit(&task, &mut source(ex.to_vec(), 2 * BATCH, false), None)
        .unwrap();
    std::thread::scope(|s| {
        for c in ThreadGroup::new(2) {
            let (data, dir) = (shard(&ex, c.rank(), 2), two.clone());
            s.spawn(move || {
                let task = regression(c.rank() as u64 * 100);
                LoopTrainer::new(train_cfg(), Some(dir))
                    .unwrap()
                    .collective(Box::new(c))
                    .fit(&task, &mut source(data, BATCH, false), None)
                    .unwrap();
            });
        }
    });
    for key in ["loss", "pred_mean"] {
        let (a, b) = (logged(&one, key), logged(&two, key));
        assert_eq!(a.len(), DP_STEPS as usize);
        assert_eq!(a.len(), b.len());
        for (step, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1e-3),
                "{key} at step {}: one process {x}, two ranks {y}",
                step + 1
            );
        }
    }
}

#[test]
fn gathered_nt_xent_is_the_combined_batch_loss_with_its_gradients() {
    use candle_core::{Device, Tensor, Var};
    use ssl_core::loss::{nt_xent, nt_xent_across};
    let dev = Device::Cpu;
    let mut rng = ssl_core::SslRng::new(9);
    let (n, d) = (8, 5);
    let mut randn = |len: usize| (0..len).map(|_| rng.normal()).collect::<Vec<f32>>();
    let a = Tensor::from_vec(randn(n * d), (n, d), &dev).unwrap();
    let b = Tensor::from_vec(randn(n * d), (n, d), &dev).unwrap();
    let grads_of = |va: &Var, vb: &Var, loss: &Tensor| {
        let g = loss.backward().unwrap();
        let get = |v: &Var| g.get(v.as_tensor()).unwrap().flatten_all().unwrap();
        (
            get(va).to_vec1::<f32>().unwrap(),
            get(vb).to_vec1::<f32>().unwrap(),
        )
    };
    let (va, vb) = (Var::from_tensor(&a).unwrap(), Var::from_tensor(&b).unwrap());
    let (full, full_acc) = nt_xent(va.as_tensor(), vb.as_tensor(), 0.5).unwrap();
    let (ga, gb) = grads_of(&va, &vb, &full);
    let full = full.to_scalar::<f32>().unwrap();
    let per = n / 2;
    let ranks: Vec<(f32, f64, Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
        let hs: Vec<_> = ThreadGroup::new(2)
            .into_iter()
            .map(|c| {
                let (a, b) = (&a, &b);
                s.spawn(move || {
                    let part = |x: &Tensor| x.narrow(0, c.rank() * per, per).unwrap();
                    let (va, vb) = (
                        Var::from_tensor(&part(a)).unwrap(),
                        Var::from_tensor(&part(b)).unwrap(),
                    );
                    let (loss, acc) =
                        nt_xent_across(va.as_tensor(), vb.as_tensor(), 0.5, Some(&c)).unwrap();
                    let (ga, gb) = grads_of(&va, &vb, &loss);
                    (loss.to_scalar::<f32>().unwrap(), acc, ga, gb)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (r, (loss, acc, ra, rb)) in ranks.iter().enumerate() {
        assert!((loss - full).abs() < 1e-5, "rank {r}: {loss} vs {full}");
        assert_eq!(*acc, full_acc, "rank {r}: alignment accuracy");
        let rows = r * per * d..(r + 1) * per * d;
        let diff = ra
            .iter()
            .zip(&ga[rows.clone()])
            .chain(rb.iter().zip(&gb[rows]))
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff < 1e-6, "rank {r}: gradient differs by {diff}");
    }
    // Without the gather a rank's loss is another number: the test above can fail.
    let half = nt_xent(
        &a.narrow(0, 0, per).unwrap(),
        &b.narrow(0, 0, per).unwrap(),
        0.5,
    )
    .unwrap()
    .0
    .to_scalar::<f32>()
    .unwrap();
    assert!((half - full).abs() > 1e-2, "{half} vs {full}");
}
