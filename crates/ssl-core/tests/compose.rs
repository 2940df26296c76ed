//! Composed tasks: the gradient of a weighted sum of tasks on one shared encoder is the
//! weighted sum of the parts' gradients; a composed run learns; a boxed task trains exactly
//! like the task itself.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use common::*;
use ssl_core::seq::*;
use ssl_core::{
    ComposedTask, Ctx, LoopTrainer, ParamBuilder, ParamStore, PretextTask, SslRng, TaskOutput,
    Trainer,
};

fn masked(pb: &ParamBuilder) -> MaskedFeatureTask<SeqTransformerEncoder> {
    let enc = SeqTransformerEncoder::new(&tiny_encoder_config(0.0), pb).unwrap();
    MaskedFeatureTask::new(
        enc,
        FEATURES,
        MaskedFeatureConfig {
            mask_prob: 0.3,
            span: 1,
        },
        pb,
    )
    .unwrap()
}

fn contrastive(pb: &ParamBuilder) -> ContrastiveTask<SeqTransformerEncoder> {
    // The same builder: the encoder's variables are the masked task's.
    let enc = SeqTransformerEncoder::new(&tiny_encoder_config(0.0), pb).unwrap();
    ContrastiveTask::new(
        enc,
        ContrastiveConfig {
            proj_dim: 16,
            ..Default::default()
        },
        pb,
    )
    .unwrap()
}

const W_MASKED: f64 = 1.0;
const W_CONTRASTIVE: f64 = 0.3;

fn composed(seed: u64) -> (ParamStore, ComposedTask<SeqBatch>) {
    let store = ParamStore::new(&Device::Cpu);
    let pb = store.builder(seed);
    let task = ComposedTask::new("masked", W_MASKED, masked(&pb))
        .unwrap()
        .with("contrastive", W_CONTRASTIVE, contrastive(&pb))
        .unwrap();
    (store, task)
}

fn batch() -> SeqBatch {
    let (ex, _) = waves(12, 5);
    SeqBatch::from_examples(&ex.iter().collect::<Vec<_>>(), &Device::Cpu).unwrap()
}

fn grad_values(store: &ParamStore, grads: &GradStore) -> Vec<(String, Vec<f32>)> {
    store
        .vars()
        .into_iter()
        .map(|(n, v)| {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient reaches {n}"));
            (n, g.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        })
        .collect()
}

fn assert_close(name: &str, got: &[(String, Vec<f32>)], want: &[(String, Vec<f32>)]) {
    assert_eq!(got.len(), want.len());
    // Relative to each tensor's largest entry, with a floor at a thousandth of the largest
    // entry overall: some gradients are zero in exact arithmetic (a key bias cannot change a
    // softmax) and only rounding noise in floats.
    let overall = want
        .iter()
        .flat_map(|(_, b)| b.iter())
        .fold(0f32, |s, x| s.max(x.abs()));
    for ((n, a), (m, b)) in got.iter().zip(want) {
        assert_eq!(n, m);
        let scale = b.iter().fold(1e-3 * overall, |s, x| s.max(x.abs()));
        let diff = a.iter().zip(b).fold(0f32, |d, (x, y)| d.max((x - y).abs()));
        assert!(
            diff <= 1e-4 * scale,
            "{name}: gradient of {n} differs by {diff} (scale {scale})"
        );
    }
}

#[test]
fn composed_gradients_are_the_weighted_sum_of_the_parts() {
    let (store, task) = composed(1);
    let b = batch();
    let units = b.len() as f64;

    // The composed task's own backward.
    let mut rng = SslRng::new(9);
    let (out, grads) = task
        .forward_backward(&b, &mut Ctx::train(&mut rng))
        .unwrap();
    let composed = grad_values(&store, &grads);

    // The parts by hand on the same random stream: one graph of the weighted sum.
    let mut rng = SslRng::new(9);
    let mut ctx = Ctx::train(&mut rng);
    let m = task.part("masked").unwrap().forward(&b, &mut ctx).unwrap();
    let c = task
        .part("contrastive")
        .unwrap()
        .forward(&b, &mut ctx)
        .unwrap();
    let sum = ((&m.loss * W_MASKED).unwrap() + (&c.loss * W_CONTRASTIVE).unwrap()).unwrap();
    let by_hand = grad_values(&store, &(&sum * units).unwrap().backward().unwrap());
    assert_close("forward_backward", &composed, &by_hand);

    // With a caller's gradient sink: the parts run without it, each part's `forward_backward`
    // taking a sink of its own (`Ctx::sinking`) and collecting it before the part is scaled;
    // the caller's stays empty. The same gradients.
    let mut rng = SslRng::new(9);
    let mut ctx = Ctx::train(&mut rng).with_grad_sink(ssl_core::GradSink::new());
    let (_, mut sunk) = task.forward_backward(&b, &mut ctx).unwrap();
    ctx.collect_grads(&mut sunk).unwrap();
    assert_close(
        "forward_backward with a sink",
        &grad_values(&store, &sunk),
        &by_hand,
    );

    // Every variable, the heads of both parts included, and the shared encoder's gradient
    // gets both parts' contributions.
    let alone = ParamStore::new(&Device::Cpu);
    SeqTransformerEncoder::new(&tiny_encoder_config(0.0), &alone.builder(0)).unwrap();
    let heads = ["head.", "projection."];
    let encoder_vars = store
        .vars()
        .iter()
        .filter(|(n, _)| !heads.iter().any(|h| n.starts_with(h)))
        .count();
    assert_eq!(encoder_vars, alone.len(), "the parts share one encoder");
    assert!(composed.iter().any(|(n, _)| n.starts_with("head.")));
    assert!(composed.iter().any(|(n, _)| n.starts_with("projection.")));
    let scalar = |t: &Tensor| f64::from(t.to_scalar::<f32>().unwrap());
    let want_loss = W_MASKED * scalar(&m.loss) + W_CONTRASTIVE * scalar(&c.loss);
    assert!((scalar(&out.loss) - want_loss).abs() < 1e-5 * want_loss.abs().max(1.0));
    assert_eq!(out.weight, units);
    let keys: Vec<&str> = out.metrics.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "masked/loss",
            "masked/masked_mse",
            "contrastive/loss",
            "contrastive/alignment_accuracy"
        ]
    );

    // The composed forward's default backward (one graph) gives the same.
    let mut rng = SslRng::new(9);
    let out = task.forward(&b, &mut Ctx::train(&mut rng)).unwrap();
    let one_graph = grad_values(
        &store,
        &(&out.loss * out.weight).unwrap().backward().unwrap(),
    );
    assert_close("forward", &one_graph, &by_hand);
}

/// Triples its gradients in its own `forward_backward`, knowing nothing of gradient sinks:
/// the loss before `backward` (as a gathered contrastive loss scales by the ranks), or the
/// gradients after it (`after`).
struct Tripled<T> {
    task: T,
    after: bool,
}

impl<T: PretextTask> PretextTask for Tripled<T> {
    type Batch = T::Batch;
    fn params(&self) -> &ParamStore {
        self.task.params()
    }
    fn forward(&self, batch: &T::Batch, ctx: &mut Ctx) -> ssl_core::Result<TaskOutput> {
        self.task.forward(batch, ctx)
    }
    fn forward_backward(
        &self,
        batch: &T::Batch,
        ctx: &mut Ctx,
    ) -> ssl_core::Result<(TaskOutput, GradStore)> {
        let out = self.forward(batch, ctx)?;
        if !self.after {
            let grads = (&out.loss * (out.weight * 3.0))?.backward()?;
            return Ok((out, grads));
        }
        let mut grads = (&out.loss * out.weight)?.backward()?;
        for (_, v) in self.params().vars() {
            if let Some(g) = grads.remove(v.as_tensor()) {
                grads.insert(v.as_tensor(), (g * 3.0)?);
            }
        }
        Ok((out, grads))
    }
    fn embed(&self, batch: &T::Batch, ctx: &mut Ctx) -> ssl_core::Result<Tensor> {
        self.task.embed(batch, ctx)
    }
    fn batch_len(&self, batch: &T::Batch) -> usize {
        self.task.batch_len(batch)
    }
}

#[test]
fn a_part_that_overrides_its_backward_keeps_it() {
    let store = ParamStore::new(&Device::Cpu);
    let pb = store.builder(2);
    let tripled = Tripled {
        task: masked(&pb),
        after: false,
    };
    let task = ComposedTask::new("masked", 0.5, tripled).unwrap();
    let b = batch();
    let mut rng = SslRng::new(3);
    let (_, grads) = task
        .forward_backward(&b, &mut Ctx::train(&mut rng))
        .unwrap();
    let mut rng = SslRng::new(3);
    let out = task
        .part("masked")
        .unwrap()
        .forward(&b, &mut Ctx::train(&mut rng))
        .unwrap();
    let want = (&out.loss * (b.len() as f64 * 0.5 * 3.0))
        .unwrap()
        .backward()
        .unwrap();
    assert_close(
        "tripled",
        &grad_values(&store, &grads),
        &grad_values(&store, &want),
    );
}

#[test]
fn parts_must_share_one_store_and_have_distinct_names() {
    let store = ParamStore::new(&Device::Cpu);
    let pb = store.builder(0);
    let other = ParamStore::new(&Device::Cpu);
    let err = ComposedTask::new("masked", 1.0, masked(&pb))
        .unwrap()
        .with("contrastive", 1.0, contrastive(&other.builder(0)))
        .err()
        .expect("a part with a store of its own is refused");
    assert!(err.to_string().contains("parameter store"), "{err}");
    let err = ComposedTask::new("a", 1.0, masked(&pb))
        .unwrap()
        .with("a", 1.0, contrastive(&pb))
        .err()
        .expect("a repeated name is refused");
    assert!(err.to_string().contains("`a`"), "{err}");
    assert!(ComposedTask::new("a", f64::NAN, masked(&pb)).is_err());
    assert!(ComposedTask::new("a", 1.0, masked(&pb))
        .unwrap()
        .embed_from("b")
        .is_err());
}

#[test]
fn a_composed_run_learns() {
    let (_, task) = composed(3);
    let task = task.embed_from("contrastive").unwrap();
    let (train, _) = waves(96, 10);
    let mut cfg = quick_train(120);
    cfg.lr = 5e-3;
    let report = LoopTrainer::new(cfg, None)
        .unwrap()
        .fit(&task, &mut source(train, 16, true), None)
        .unwrap();
    assert!(
        report.params_without_grad.is_empty(),
        "{:?}",
        report.params_without_grad
    );
    let losses: Vec<f64> = report.losses.iter().map(|(_, l)| *l).collect();
    let first = losses[..10].iter().sum::<f64>() / 10.0;
    let last = losses[losses.len() - 10..].iter().sum::<f64>() / 10.0;
    eprintln!("composed: loss {first:.4} -> {last:.4}");
    assert!(last < first * 0.8, "loss {first:.4} -> {last:.4}");
}

fn losses<T: PretextTask<Batch = SeqBatch>>(task: &T) -> Vec<u64> {
    let (train, _) = waves(48, 10);
    LoopTrainer::new(quick_train(12), None)
        .unwrap()
        .fit(task, &mut source(train, 16, true), None)
        .unwrap()
        .losses
        .iter()
        .map(|(_, l)| l.to_bits())
        .collect()
}

#[test]
fn a_boxed_task_trains_like_the_task() {
    let (store, task) = masked_task(4, 0.1);
    let plain = losses(&task);
    let plain_params = param_bits(&store);

    let (store, task) = masked_task(4, 0.1);
    let boxed: Box<dyn PretextTask<Batch = SeqBatch>> = Box::new(task);
    assert_eq!(losses(&boxed), plain);
    assert_eq!(param_bits(&store), plain_params);

    // A composition of one part with weight 1 is the part itself.
    let (_, task) = masked_task(4, 0.1);
    let one = ComposedTask::new("masked", 1.0, task).unwrap();
    let composed = losses(&one);
    let diff = composed
        .iter()
        .zip(&plain)
        .map(|(a, b)| (f64::from_bits(*a) - f64::from_bits(*b)).abs())
        .fold(0f64, f64::max);
    assert!(diff < 1e-5, "one-part composition drifts by {diff}");
}

/// The trainer's step gives an override the graph's gradients to transform as it likes: the
/// fused stack's parameters included (a gradient sink the override did not ask for would
/// deliver those aside, unscaled).
#[test]
fn an_override_that_scales_its_gradients_gets_them_all_through_the_trainer() {
    let store = ParamStore::new(&Device::Cpu);
    let task = Tripled {
        task: masked(&store.builder(4)),
        after: true,
    };
    let b = batch();
    let vars: Vec<Tensor> = store
        .vars()
        .iter()
        .map(|(_, v)| v.as_tensor().clone())
        .collect();
    let mut rng = SslRng::new(6);
    let acc = ssl_core::accumulate(
        &task,
        &mut ssl_core::RepeatBatch(b.clone()),
        1,
        &vars,
        &mut rng,
        ssl_core::nn::MatmulPrecision::F32,
    )
    .unwrap();
    let mut rng = SslRng::new(6);
    let out = task.task.forward(&b, &mut Ctx::train(&mut rng)).unwrap();
    let want = (&out.loss * (out.weight * 3.0))
        .unwrap()
        .backward()
        .unwrap();
    let names: Vec<String> = store.vars().into_iter().map(|(n, _)| n).collect();
    let got: Vec<(String, Vec<f32>)> = names
        .iter()
        .zip(&acc.grads)
        .map(|(n, g)| {
            let g = g.as_ref().unwrap_or_else(|| panic!("no gradient for {n}"));
            (
                n.clone(),
                g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            )
        })
        .collect();
    assert!(names
        .iter()
        .any(|n| n.contains("stack") || n.contains("layer")));
    assert_close("scaled after backward", &got, &grad_values(&store, &want));
}
