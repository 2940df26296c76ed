//! TS2Vec across ranks (ranks as threads): the gathered hierarchical loss equals one process's
//! loss on the combined batch, with the same gradients for each rank's rows, and the task pads
//! ranks' batches of different lengths to one crop layout.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use ssl_core::seq::{SeqBatch, SeqExample};
use ssl_core::{Collective, Ctx, ParamStore, PretextTask, SharedCollective, SslRng, ThreadGroup};
use ssl_timeseries::*;

fn randn(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = SslRng::new(seed);
    (0..n).map(|_| rng.normal()).collect()
}

#[test]
fn gathered_loss_and_gradients_equal_one_process_on_the_combined_batch() {
    let dev = Device::Cpu;
    let (b, t, d) = (6, 12, 5);
    let z1 = Tensor::from_vec(randn(b * t * d, 1), (b, t, d), &dev).unwrap();
    let z2 = Tensor::from_vec(randn(b * t * d, 2), (b, t, d), &dev).unwrap();
    // Some unobserved steps, different per series.
    let valid: Vec<f32> = (0..b * t)
        .map(|k| if k % 7 == 3 { 0.0 } else { 1.0 })
        .collect();
    let valid = Tensor::from_vec(valid, (b, t), &dev).unwrap();
    let (alpha, unit) = (0.5, 0);

    let one = |z1: &Tensor, z2: &Tensor| {
        let (v1, v2) = (Var::from_tensor(z1).unwrap(), Var::from_tensor(z2).unwrap());
        let loss =
            hierarchical_contrastive_loss(v1.as_tensor(), v2.as_tensor(), &valid, alpha, unit)
                .unwrap();
        let g = loss.backward().unwrap();
        let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
        (loss.to_scalar::<f32>().unwrap(), get(&v1), get(&v2))
    };
    let (want, g1, g2) = one(&z1, &z2);

    for world in [2usize, 3] {
        let per = b / world;
        let results: Vec<(f32, Tensor, Tensor)> = std::thread::scope(|sc| {
            let hs: Vec<_> = ThreadGroup::new(world)
                .into_iter()
                .map(|c| {
                    let (z1, z2, valid) = (&z1, &z2, &valid);
                    sc.spawn(move || {
                        let r = c.rank();
                        let part = |x: &Tensor| x.narrow(0, r * per, per).unwrap();
                        let v1 = Var::from_tensor(&part(z1)).unwrap();
                        let v2 = Var::from_tensor(&part(z2)).unwrap();
                        let loss = hierarchical_contrastive_loss_across(
                            v1.as_tensor(),
                            v2.as_tensor(),
                            &part(valid),
                            alpha,
                            unit,
                            Some(&c as &dyn Collective),
                        )
                        .unwrap();
                        let g = loss.backward().unwrap();
                        let get = |v: &Var| g.get(v.as_tensor()).unwrap().clone();
                        (loss.to_scalar::<f32>().unwrap(), get(&v1), get(&v2))
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (r, (loss, r1, r2)) in results.iter().enumerate() {
            assert!(
                (loss - want).abs() < 1e-5 * want.abs().max(1.0),
                "world {world} rank {r}: loss {loss} vs one process {want}"
            );
            let max_diff = |a: &Tensor, full: &Tensor| {
                let w = full.narrow(0, r * per, per).unwrap();
                (a - w)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            let (d1, d2) = (max_diff(r1, &g1), max_diff(r2, &g2));
            assert!(d1 < 1e-6 && d2 < 1e-6, "world {world} rank {r}: {d1} {d2}");
        }
    }
}

#[test]
fn local_loss_alone_differs_from_the_combined_batch() {
    // The property above is not vacuous: without the gather, a rank's loss is another number.
    let dev = Device::Cpu;
    let (b, t, d) = (4, 8, 5);
    let z1 = Tensor::from_vec(randn(b * t * d, 3), (b, t, d), &dev).unwrap();
    let z2 = Tensor::from_vec(randn(b * t * d, 4), (b, t, d), &dev).unwrap();
    let ones = Tensor::ones((b, t), DType::F32, &dev).unwrap();
    let all = hierarchical_contrastive_loss(&z1, &z2, &ones, 0.5, 0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let half = |x: &Tensor| x.narrow(0, 0, 2).unwrap();
    let local = hierarchical_contrastive_loss(&half(&z1), &half(&z2), &half(&ones), 0.5, 0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((all - local).abs() > 1e-2, "{all} vs {local}");
}

#[test]
fn task_across_ranks_pads_to_one_layout_and_agrees_on_the_loss() {
    let cfg = EncoderConfig {
        kind: EncoderKind::Tcn,
        tcn: TcnConfig {
            hidden: 8,
            output: 8,
            depth: 2,
            dropout: 0.0,
            ..TcnConfig::default()
        },
        ..EncoderConfig::default()
    };
    // Rank 0's series are 24 steps long, rank 1's 17.
    let outs: Vec<(f64, f64, f64)> = std::thread::scope(|sc| {
        let hs: Vec<_> = ThreadGroup::new(2)
            .into_iter()
            .map(|c| {
                let cfg = cfg.clone();
                sc.spawn(move || {
                    let r = c.rank();
                    let len = if r == 0 { 24 } else { 17 };
                    let store = ParamStore::new(&Device::Cpu);
                    let enc = SeriesEncoder::new(&cfg, 1, &store.builder(5)).unwrap();
                    let mut task = Ts2VecTask::new(enc, Ts2VecConfig::default(), &store).unwrap();
                    let shared: SharedCollective = Arc::new(c);
                    task.gather_across(shared);
                    let ex: Vec<SeqExample> = (0..3)
                        .map(|i| {
                            SeqExample::new(randn(len, 10 + i + 7 * r as u64), len, 1).unwrap()
                        })
                        .collect();
                    let batch =
                        SeqBatch::from_examples(&ex.iter().collect::<Vec<_>>(), &Device::Cpu)
                            .unwrap();
                    let mut rng = SslRng::new(100 + r as u64); // ranks draw differently
                    let (out, grads) = task
                        .forward_backward(&batch, &mut Ctx::train(&mut rng))
                        .unwrap();
                    let crop = out
                        .metrics
                        .iter()
                        .find(|(k, _)| k == "crop_len")
                        .map(|(_, v)| *v)
                        .unwrap();
                    let gnorm: f64 = store
                        .vars()
                        .iter()
                        .filter_map(|(_, v)| grads.get(v.as_tensor()))
                        .map(|g| {
                            g.sqr()
                                .unwrap()
                                .sum_all()
                                .unwrap()
                                .to_dtype(DType::F64)
                                .unwrap()
                                .to_scalar::<f64>()
                                .unwrap()
                        })
                        .sum();
                    (
                        out.loss
                            .to_dtype(DType::F64)
                            .unwrap()
                            .to_scalar::<f64>()
                            .unwrap(),
                        crop,
                        gnorm,
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(outs[0].0, outs[1].0, "both ranks report the combined loss");
    assert_eq!(outs[0].1, outs[1].1, "both ranks crop the same window");
    assert!(
        outs.iter().all(|o| o.0.is_finite() && o.2 > 0.0),
        "{outs:?}"
    );
}
