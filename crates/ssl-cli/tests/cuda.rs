//! The transformer stack on a CUDA GPU against the CPU: one training step (forward, loss,
//! backward, AdamW) from the same weights gives the same loss, gradients and updated weights,
//! in f32 and with bf16 products (`MatmulPrecision::Bf16`, cuBLAS), and the GPU's fused softmax
//! and layer norm (candle's kernels in ops of ours) keep their gradients; where no GPU opens,
//! the device setting fails with a clear error. Compiled only with the `cuda` feature; without
//! a GPU the GPU tests are skipped with a line on stderr, unless `SSL_REQUIRE_CUDA=1` (set by
//! `bench/gpu run`), which makes a missing GPU a failure.
//!
//! It lives in ssl-cli, though it tests ssl-core's stack, so that `bench/gpu build` compiles it
//! with the features of the `ssl` binary and the suite: built from ssl-core alone, the feature
//! set differs and candle's CUDA kernels are compiled again (an hour on 2 cores).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var, D};
use ssl_core::nn::ops::{
    layer_norm, layer_norm_composite, softmax_last_dim, softmax_last_dim_composite,
};
use ssl_core::nn::{
    MatmulPrecision, NormPlacement, StackKernel, TransformerConfig, TransformerStack,
};
use ssl_core::optim::{AdamW, AdamWConfig};
use ssl_core::{Ctx, ParamStore, SslRng};

const B: usize = 2;
const T: usize = 24;
const D_MODEL: usize = 64;

/// The first GPU, or `None` (test skipped) when there is none; with `SSL_REQUIRE_CUDA=1` a
/// missing GPU fails the test instead.
fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            fail_if_gpu_required(&e);
            eprintln!("skipped: no CUDA GPU ({e})");
            None
        }
    }
}

/// Fails the test where a GPU must be there (`SSL_REQUIRE_CUDA=1`, set by `bench/gpu run`)
/// but did not open, for `why`.
#[track_caller]
fn fail_if_gpu_required(why: &dyn std::fmt::Display) {
    if std::env::var("SSL_REQUIRE_CUDA").is_ok_and(|v| v == "1") {
        panic!("SSL_REQUIRE_CUDA=1 but no CUDA GPU could be opened: {why}");
    }
}

fn config(norm: NormPlacement, causal: bool) -> TransformerConfig {
    TransformerConfig {
        dim: D_MODEL,
        depth: 2,
        heads: 4,
        mlp_dim: 128,
        norm,
        causal,
        ..TransformerConfig::default()
    }
}

/// What one training step gives: the loss, the gradients of the input and of every parameter
/// (by name), and every parameter after one AdamW step, all as f64.
struct Step {
    loss: f64,
    grads: Vec<(String, Vec<f64>)>,
    updated: Vec<(String, Vec<f64>)>,
}

fn flat(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// One step of the stack of `cfg` on `device` in `dtype`, its weights copied from `weights`
/// (a CPU store of the same configuration): loss `sum(w * last)` over the padded batch.
fn step(
    cfg: &TransformerConfig,
    weights: &ParamStore,
    device: &Device,
    dtype: DType,
    precision: MatmulPrecision,
) -> Step {
    let store = ParamStore::with_dtype(device, dtype);
    let mut stack = TransformerStack::new(cfg, &store.builder(1)).unwrap();
    stack.set_kernel(StackKernel::Reference);
    for (name, var) in store.vars() {
        let src = weights
            .get(&name)
            .unwrap_or_else(|| panic!("{name}: no weight"));
        let v = src.as_tensor().to_dtype(dtype).unwrap();
        var.set(&v.to_device(device).unwrap()).unwrap();
    }
    let mut rng = SslRng::new(21);
    let mut data = |n: usize| {
        Tensor::from_vec(rng.normal_vec(n, 0.0, 1.0), n, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .to_device(device)
            .unwrap()
    };
    let x = data(B * T * D_MODEL).reshape((B, T, D_MODEL)).unwrap();
    let w = data(B * T * D_MODEL).reshape((B, T, D_MODEL)).unwrap();
    let mut keep = vec![1f32; B * T];
    keep[T + 15..].fill(0.0);
    let mask = Tensor::from_vec(keep, (B, T), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .to_device(device)
        .unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    let mut r = SslRng::new(0);
    let mut ctx = Ctx::train(&mut r).with_precision(precision);
    let out = stack
        .forward(xv.as_tensor(), Some(&mask), &mut ctx)
        .unwrap();
    let loss = (&out.last * &w).unwrap().sum_all().unwrap();
    let (loss, grads) = loss_and_gradients_f64(&loss, &xv, &store);
    // The AdamW step from those gradients (input's left out).
    let mut opt = AdamW::new(&store, AdamWConfig::default()).unwrap();
    let by_name: std::collections::HashMap<&str, &Vec<f64>> =
        grads.iter().map(|(n, g)| (n.as_str(), g)).collect();
    let g: Vec<Option<Tensor>> = opt
        .names()
        .zip(opt.vars())
        .map(|(name, v)| {
            let g = by_name[name].clone();
            Some(
                Tensor::from_vec(g, v.shape(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .to_device(device)
                    .unwrap(),
            )
        })
        .collect();
    opt.step(&g, 1e-3).unwrap();
    let updated = store
        .vars()
        .into_iter()
        .map(|(n, v)| (n, flat(v.as_tensor())))
        .collect();
    Step {
        loss,
        grads,
        updated,
    }
}

/// A stack of `cfg` on the CPU in f32 (its weights are what every side copies).
fn stack_on_cpu(cfg: &TransformerConfig) -> (ParamStore, TransformerStack) {
    let store = ParamStore::new(&Device::Cpu);
    let stack = TransformerStack::new(cfg, &store.builder(7)).unwrap();
    (store, stack)
}

/// The loss and the gradients of `x` and of every parameter of `store`, as f64.
fn loss_and_gradients_f64(
    loss: &Tensor,
    x: &Var,
    store: &ParamStore,
) -> (f64, Vec<(String, Vec<f64>)>) {
    let grads = loss.backward().unwrap();
    let mut out = vec![("input".to_string(), flat(grads.get(x.as_tensor()).unwrap()))];
    for (name, var) in store.vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        out.push((name, flat(g)));
    }
    (flat(loss)[0], out)
}

/// `|a - b| / |b|` over a whole tensor.
fn rel(a: &[f64], b: &[f64]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    (diff / norm.max(1e-30)).sqrt()
}

/// Compares `got` against the f64 reference `want`: loss, every gradient (relative error under
/// `tol`; the key bias, whose true gradient is zero, against the key weights' scale) and every
/// updated weight. Returns the widest gradient error seen.
fn compare(what: &str, got: &Step, want: &Step, tol: f64) -> f64 {
    // The loss sums B*T*D outputs of unit size with random unit weights: its error grows as
    // the square root of that count.
    let n = (B * T * D_MODEL) as f64;
    assert!(
        (got.loss - want.loss).abs() < tol * n.sqrt(),
        "{what}: loss {} against {}",
        got.loss,
        want.loss
    );
    let mut widest = 0f64;
    for ((name, g), (wname, r)) in got.grads.iter().zip(&want.grads) {
        assert_eq!(name, wname);
        assert!(
            g.iter().all(|v| v.is_finite()),
            "{what} {name}: non-finite gradient"
        );
        if name.ends_with("key.bias") {
            // A softmax ignores a shift shared by all keys: only rounding is left.
            let kw = name.replace("bias", "weight");
            let (_, wref) = want.grads.iter().find(|(n, _)| *n == kw).unwrap();
            let scale = wref.iter().fold(0f64, |m, v| m.max(v.abs()));
            let worst = g.iter().fold(0f64, |m, v| m.max(v.abs()));
            assert!(
                worst < tol * scale.max(1e-6),
                "{what} {name}: {worst:e} vs {scale:e}"
            );
            continue;
        }
        let e = rel(g, r);
        assert!(e < tol, "{what} {name}: gradient relative error {e:e}");
        widest = widest.max(e);
    }
    for ((name, u), (_, r)) in got.updated.iter().zip(&want.updated) {
        // AdamW's first step moves each weight by about lr * sign(g) (lr = 1e-3): a sign flip
        // on a near-zero gradient shows as 2 lr, anything wider is a wrong update.
        assert!(
            u.iter().all(|v| v.is_finite()),
            "{what} {name}: non-finite weight"
        );
        let worst = u.iter().zip(r).fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= 2.1e-3,
            "{what} {name}: updated weight off by {worst:e}"
        );
    }
    widest
}

/// The three stacks compared: post-norm, pre-norm, pre-norm causal.
const CASES: [(NormPlacement, bool); 3] = [
    (NormPlacement::Post, false),
    (NormPlacement::Pre, false),
    (NormPlacement::Pre, true),
];

#[test]
fn the_cpu_side_of_the_comparison_holds() {
    // Runs without a GPU too: the harness (weights copied, the step, the comparison) on the
    // CPU in f32 against f64, so the GPU test below can only fail for the GPU's sake.
    for (norm, causal) in CASES {
        let cfg = config(norm, causal);
        let (weights, _) = stack_on_cpu(&cfg);
        let reference = step(
            &cfg,
            &weights,
            &Device::Cpu,
            DType::F64,
            MatmulPrecision::F32,
        );
        let cpu = step(
            &cfg,
            &weights,
            &Device::Cpu,
            DType::F32,
            MatmulPrecision::F32,
        );
        let e = compare(
            &format!("{norm:?}, causal {causal}, CPU f32"),
            &cpu,
            &reference,
            1e-4,
        );
        assert!(e > 0.0, "f32 and f64 agree exactly: was the f64 side f64?");
    }
}

#[test]
fn a_training_step_on_the_gpu_matches_the_cpu_in_f32_and_bf16() {
    let Some(gpu) = gpu() else { return };
    for (norm, causal) in CASES {
        let cfg = config(norm, causal);
        let (weights, _) = stack_on_cpu(&cfg);
        let what = format!("{norm:?}, causal {causal}");
        let reference = step(
            &cfg,
            &weights,
            &Device::Cpu,
            DType::F64,
            MatmulPrecision::F32,
        );
        let f32_gpu = step(&cfg, &weights, &gpu, DType::F32, MatmulPrecision::F32);
        let bf16_gpu = step(&cfg, &weights, &gpu, DType::F32, MatmulPrecision::Bf16);
        // cuBLAS f32 (no TF32 unless asked for) and the fused softmax: f32 rounding.
        let e32 = compare(&format!("{what}, GPU f32"), &f32_gpu, &reference, 1e-4);
        // bf16 keeps 8 significant bits: gradients within a few percent, and visibly rounded
        // (the bf16 products ran).
        let e16 = compare(&format!("{what}, GPU bf16"), &bf16_gpu, &reference, 3e-2);
        assert!(
            e16 > 1e-3 && e16 > 10.0 * e32,
            "{what}: bf16 gradients as exact as f32 ({e16:e} vs {e32:e}); did the products run in bf16?"
        );
        eprintln!("{what}: widest gradient error f32 {e32:.1e}, bf16 {e16:.1e}");
    }
}

#[test]
fn the_gpu_softmax_is_fused_and_keeps_its_gradient() {
    let Some(gpu) = gpu() else { return };
    let mut rng = SslRng::new(4);
    let mut v = rng.normal_vec(3 * 5 * 70, 0.0, 3.0);
    v[7] = 90.0;
    let w = Tensor::from_vec(rng.normal_vec(3 * 5 * 70, 0.0, 1.0), (3, 5, 70), &gpu).unwrap();
    let run = |f: fn(&Tensor) -> ssl_core::Result<Tensor>| {
        let x = Var::from_vec(v.clone(), (3, 5, 70), &gpu).unwrap();
        let y = f(x.as_tensor()).unwrap();
        let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .expect("the softmax cut the gradient");
        let sums = flat(&y.sum(D::Minus1).unwrap());
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        (flat(&y), flat(g))
    };
    let (y_fused, g_fused) = run(softmax_last_dim);
    let (y_comp, g_comp) = run(softmax_last_dim_composite);
    assert!(rel(&y_fused, &y_comp) < 1e-6);
    assert!(rel(&g_fused, &g_comp) < 1e-5);
    assert!(g_fused.iter().any(|g| g.abs() > 1e-3));
}

#[test]
fn the_gpu_layer_norm_is_fused_and_keeps_its_gradients() {
    let Some(gpu) = gpu() else { return };
    let mut rng = SslRng::new(5);
    let v = rng.normal_vec(4 * 6 * 96, 0.5, 2.0);
    let c = Tensor::from_vec(rng.normal_vec(4 * 6 * 96, 0.0, 1.0), (4, 6, 96), &gpu).unwrap();
    let w0 = rng.normal_vec(96, 1.0, 0.3);
    let b0 = rng.normal_vec(96, 0.0, 0.3);
    let run = |f: fn(&Tensor, &Tensor, &Tensor, f64) -> ssl_core::Result<Tensor>| {
        let x = Var::from_vec(v.clone(), (4, 6, 96), &gpu).unwrap();
        let w = Var::from_vec(w0.clone(), 96, &gpu).unwrap();
        let b = Var::from_vec(b0.clone(), 96, &gpu).unwrap();
        let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-6).unwrap();
        let grads = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
        let mut out = vec![flat(&y)];
        for var in [&x, &w, &b] {
            let g = grads
                .get(var.as_tensor())
                .expect("the layer norm cut a gradient");
            out.push(flat(g));
        }
        out
    };
    // `layer_norm` on a GPU is the fused op; the composite is the same function in candle ops.
    let (fused, comp) = (run(layer_norm), run(layer_norm_composite));
    for (what, (a, b)) in ["output", "dx", "dw", "db"]
        .iter()
        .zip(fused.iter().zip(&comp))
    {
        let e = rel(a, b);
        assert!(e < 1e-5, "{what}: relative difference {e:e}");
    }
}

/// Where no GPU opens, `train.device = "cuda"` fails with an error that names the setting's
/// value and says what is missing, its cause kept (on a GPU machine: the device opens).
#[test]
fn a_missing_gpu_is_a_clear_error() {
    match ssl_core::parse_device("cuda:0") {
        Ok(d) => assert!(d.is_cuda()),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("`cuda:0`") && msg.contains("no CUDA GPU"),
                "{msg}"
            );
            assert!(std::error::Error::source(&e).is_some(), "the cause is kept");
            fail_if_gpu_required(&msg);
        }
    }
}
