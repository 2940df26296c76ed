//! Shared helpers for the behaviour tests: a synthetic data set with known classes and tiny
//! models.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, D};
use ssl_core::nn::{Linear, StackKernel, TransformerConfig, TransformerStack};
use ssl_core::seq::*;
use ssl_core::{
    Ctx, Encoder, Init, LoopTrainer, ParamBuilder, ParamStore, PretextTask, SslRng, TaskOutput,
    TrainConfig, Trainer,
};

pub const STEPS: usize = 24;
pub const FEATURES: usize = 2;

/// Three classes of noisy two-channel series (sine and cosine) with periods of 12, 6 and 4
/// steps, each with a random phase and amplitude. Returns (examples, labels).
pub fn waves(n: usize, seed: u64) -> (Vec<SeqExample>, Vec<usize>) {
    let mut rng = SslRng::new(seed);
    let mut ex = Vec::new();
    let mut labels = Vec::new();
    for i in 0..n {
        let class = i % 3;
        let phase = rng.uniform() * std::f32::consts::TAU;
        let amp = 0.5 + rng.uniform();
        let mut v = Vec::with_capacity(STEPS * FEATURES);
        for t in 0..STEPS {
            let period = [12.0, 6.0, 4.0][class];
            let a = t as f32 / period * std::f32::consts::TAU + phase;
            v.push(amp * a.sin() + 0.1 * rng.normal());
            v.push(amp * a.cos() + 0.1 * rng.normal());
        }
        let mut e = SeqExample::new(v, STEPS, FEATURES).unwrap();
        e.normalize_instance();
        ex.push(e);
        labels.push(class);
    }
    (ex, labels)
}

pub fn tiny_encoder_config(dropout: f32) -> SeqEncoderConfig {
    SeqEncoderConfig {
        features: FEATURES,
        transformer: TransformerConfig {
            dim: 16,
            depth: 1,
            heads: 2,
            mlp_dim: 32,
            dropout,
            ..Default::default()
        },
    }
}

pub fn masked_task(
    seed: u64,
    dropout: f32,
) -> (ParamStore, MaskedFeatureTask<SeqTransformerEncoder>) {
    let store = ParamStore::new(&Device::Cpu);
    let pb: ParamBuilder = store.builder(seed);
    let enc = SeqTransformerEncoder::new(&tiny_encoder_config(dropout), &pb).unwrap();
    let task = MaskedFeatureTask::new(
        enc,
        FEATURES,
        MaskedFeatureConfig {
            mask_prob: 0.3,
            span: 1,
        },
        &pb,
    )
    .unwrap();
    (store, task)
}

pub fn quick_train(max_steps: u64) -> TrainConfig {
    TrainConfig {
        max_steps,
        batch_size: 16,
        lr: 3e-3,
        warmup_steps: 5,
        checkpoint_every_steps: 0,
        checkpoint_every_minutes: 0.0,
        health_every: 0,
        ..Default::default()
    }
}

pub fn source(examples: Vec<SeqExample>, batch: usize, shuffle: bool) -> InMemorySeqSource {
    InMemorySeqSource::new(examples, batch, 7, shuffle, &Device::Cpu).unwrap()
}

pub fn param_bits(store: &ParamStore) -> Vec<(String, Vec<u32>)> {
    store
        .vars()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            )
        })
        .collect()
}

// Data-parallel tests (distributed.rs with threads, mpi.rs under mpirun).

/// A task without randomness (no masks, no dropout): regress each series' mean square from the
/// pooled encoding. One process on a batch and two ranks on its halves see the same maths.
pub struct Regression {
    encoder: SeqTransformerEncoder,
    head: Linear,
    pub store: ParamStore,
}

pub fn regression(seed: u64) -> Regression {
    let store = ParamStore::new(&Device::Cpu);
    let pb = store.builder(seed);
    let encoder = SeqTransformerEncoder::new(&tiny_encoder_config(0.0), &pb).unwrap();
    let head = Linear::new(16, 1, true, Init::XavierUniform, &pb.pp("head")).unwrap();
    Regression {
        encoder,
        head,
        store,
    }
}

impl PretextTask for Regression {
    type Batch = SeqBatch;
    fn params(&self) -> &ParamStore {
        &self.store
    }
    fn forward(&self, batch: &SeqBatch, ctx: &mut Ctx) -> ssl_core::Result<TaskOutput> {
        let pooled = self.encoder.encode(batch, ctx)?.pooled;
        let pred = self.head.forward(&pooled)?.squeeze(D::Minus1)?;
        let pred_mean = f64::from(pred.mean_all()?.to_scalar::<f32>()?);
        let target = batch.x.sqr()?.flatten_from(1)?.mean(D::Minus1)?;
        let loss = (pred - target)?.sqr()?.mean_all()?;
        Ok(TaskOutput {
            loss,
            weight: batch.len() as f64,
            metrics: vec![("pred_mean".into(), pred_mean)],
        })
    }
    fn embed(&self, batch: &SeqBatch, ctx: &mut Ctx) -> ssl_core::Result<Tensor> {
        Ok(self.encoder.encode(batch, ctx)?.pooled)
    }
    fn batch_len(&self, batch: &SeqBatch) -> usize {
        batch.len()
    }
}

pub const BATCH: usize = 16;
pub const DP_STEPS: u64 = 8;

/// Adam's `g / (sqrt(v) + eps)` turns a gradient entry near zero into a full-size step of
/// either sign, so rounding differences between the two summation orders would decide the
/// direction; a large `eps` makes the update proportional to the gradient, and the comparison
/// then measures the gradients, which is what data parallelism must get right.
pub fn train_cfg() -> ssl_core::TrainConfig {
    ssl_core::TrainConfig {
        eps: 1.0,
        lr: 0.05,
        ..quick_train(DP_STEPS)
    }
}

pub fn floats(bits: &[(String, Vec<u32>)]) -> Vec<f32> {
    bits.iter()
        .flat_map(|(_, b)| b.iter().map(|x| f32::from_bits(*x)))
        .collect()
}

/// Rank `r` of `world` gets the `r`-th slice of every combined batch of `world * BATCH`.
pub fn shard(ex: &[SeqExample], rank: usize, world: usize) -> Vec<SeqExample> {
    ex.iter()
        .enumerate()
        .filter(|(i, _)| (i % (world * BATCH)) / BATCH == rank)
        .map(|(_, e)| e.clone())
        .collect()
}

pub fn one_process(ex: &[SeqExample]) -> Vec<(String, Vec<u32>)> {
    let task = regression(0);
    LoopTrainer::new(train_cfg(), None)
        .unwrap()
        .fit(&task, &mut source(ex.to_vec(), 2 * BATCH, false), None)
        .unwrap();
    param_bits(&task.store)
}

pub fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// The loss and the gradients of `loss` for the input `x` (named `input`) and every parameter
/// of `store` (by name), all as f64. Panics naming a parameter without gradient.
pub fn loss_and_gradients_f64(
    loss: &Tensor,
    x: &candle_core::Var,
    store: &ParamStore,
) -> (f64, Vec<(String, Vec<f64>)>) {
    let grads = loss.backward().unwrap();
    let as_f64 = |t: &Tensor| {
        t.flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let mut out = vec![(
        "input".to_string(),
        as_f64(grads.get(x.as_tensor()).unwrap()),
    )];
    for (name, var) in store.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        out.push((name, as_f64(g)));
    }
    let l = loss
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (l, out)
}

/// A transformer stack of `cfg` with `dtype` parameters (drawn from `seed`) on the CPU, running
/// `kernel`, and its parameter store.
pub fn stack_on_cpu(
    cfg: &TransformerConfig,
    dtype: DType,
    kernel: StackKernel,
    seed: u64,
) -> (ParamStore, TransformerStack) {
    let store = ParamStore::with_dtype(&Device::Cpu, dtype);
    let mut stack = TransformerStack::new(cfg, &store.builder(seed)).unwrap();
    stack.set_kernel(kernel);
    (store, stack)
}
