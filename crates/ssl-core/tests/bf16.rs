//! bf16 products in the fused CPU stack (`MatmulPrecision::Bf16`): outputs and gradients stay
//! within bf16's rounding of the f64 reference, they really differ from the f32 path (so the
//! bf16 kernels ran), and a model trained with them learns as the f32 one does. Skipped, with
//! a line on stderr, on CPUs without AVX-512 BF16.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use ssl_core::nn::{
    bf16_matmul_available, MatmulPrecision, NormPlacement, StackKernel, TransformerConfig,
    TransformerStack,
};
use ssl_core::optim::{AdamW, AdamWConfig};
use ssl_core::{Ctx, ParamStore, SslRng};

const B: usize = 2;
const T: usize = 64;
const D: usize = 256;

fn config(norm: NormPlacement, depth: usize) -> TransformerConfig {
    // Large enough for bf16 to be chosen (see `BF16_MIN_DIM` in ssl-kernels' gemm.rs): the QKV
    // and MLP products (128 x 768 x 256, 128 x 1024 x 256, and their backward products) and
    // the per-head attention products (64 x 64 x 128) run in bf16; the output projection
    // (128 x 256 x 256, under 16 M multiply-adds) stays f32 in backward, and in the forward
    // on the bf16 kernels. On Intel CPUs with AVX-512 FP16 and no AMX the reduced precision is
    // fp16: every forward product of these widths (weights of 256 x 256 and more), the
    // backward's by the same 16 M rule, the heads in f32.
    TransformerConfig {
        dim: D,
        depth,
        heads: 2,
        mlp_dim: 1024,
        norm,
        ..TransformerConfig::default()
    }
}

fn build(norm: NormPlacement, dtype: DType, kernel: StackKernel) -> (ParamStore, TransformerStack) {
    build_deep(norm, dtype, kernel, 2)
}

fn build_deep(
    norm: NormPlacement,
    dtype: DType,
    kernel: StackKernel,
    depth: usize,
) -> (ParamStore, TransformerStack) {
    common::stack_on_cpu(&config(norm, depth), dtype, kernel, 5)
}

fn skip() -> bool {
    if !bf16_matmul_available() {
        eprintln!("skipped: this CPU has no AVX-512 BF16");
        return true;
    }
    false
}

/// Loss `sum(w * last)` and the gradients of the input and every parameter, as f64.
fn gradients(
    store: &ParamStore,
    stack: &TransformerStack,
    dtype: DType,
    precision: MatmulPrecision,
) -> (f64, Vec<(String, Vec<f64>)>) {
    let mut rng = SslRng::new(21);
    let x = Tensor::from_vec(rng.normal_vec(B * T * D, 0.0, 1.0), (B, T, D), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let w = Tensor::from_vec(rng.normal_vec(B * T * D, 0.0, 1.0), (B, T, D), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let mut lens = vec![1f32; B * T];
    lens[T + 40..].fill(0.0);
    let mask = Tensor::from_vec(lens, (B, T), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let xv = Var::from_tensor(&x).unwrap();
    let mut r = SslRng::new(0);
    let mut ctx = Ctx::eval(&mut r).with_precision(precision);
    let out = stack
        .forward(xv.as_tensor(), Some(&mask), &mut ctx)
        .unwrap();
    let loss = (&out.last * &w).unwrap().sum_all().unwrap();
    common::loss_and_gradients_f64(&loss, &xv, store)
}

/// `|a - b| / |b|` over a whole tensor.
fn rel(a: &[f64], b: &[f64]) -> f64 {
    let diff: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f64 = b.iter().map(|y| y * y).sum();
    (diff / norm.max(1e-30)).sqrt()
}

#[test]
fn bf16_gradients_stay_within_rounding_of_the_f64_reference() {
    if skip() {
        return;
    }
    for norm in [NormPlacement::Post, NormPlacement::Pre] {
        let (s64, r64) = build(norm, DType::F64, StackKernel::Reference);
        let (s32, f32k) = build(norm, DType::F32, StackKernel::Fused);
        let (l_ref, g_ref) = gradients(&s64, &r64, DType::F64, MatmulPrecision::F32);
        let (l_f32, g_f32) = gradients(&s32, &f32k, DType::F32, MatmulPrecision::F32);
        let (l_bf, g_bf) = gradients(&s32, &f32k, DType::F32, MatmulPrecision::Bf16);
        // bf16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); the outputs (about
        // unit size after the norm) err by well under 1%, and the loss sums B*T*D of them
        // with random unit weights, so its error grows as the square root of that count.
        let n = (B * T * D) as f64;
        assert!(
            (l_bf - l_ref).abs() < 1e-2 * n.sqrt(),
            "{norm:?}: loss {l_bf} vs {l_ref}"
        );
        assert!((l_f32 - l_ref).abs() < 1e-4 * (1.0 + l_ref.abs()));
        let mut widest = 0f64;
        for (((name, r), (_, f)), (_, b)) in g_ref.iter().zip(&g_f32).zip(&g_bf) {
            if name.ends_with("key.bias") {
                // Its true gradient is zero (a softmax ignores a shift shared by all keys):
                // only rounding is left, which no relative error can measure. It must stay
                // small against the key weights' gradient, a sum of the same terms.
                let wname = name.replace("bias", "weight");
                let (_, wref) = g_ref.iter().find(|(n, _)| *n == wname).unwrap();
                let scale = wref.iter().fold(0f64, |m, v| m.max(v.abs()));
                let worst = b.iter().fold(0f64, |m, v| m.max(v.abs()));
                assert!(
                    worst < 3e-2 * scale,
                    "{norm:?} {name}: {worst:e} vs {scale:e}"
                );
                continue;
            }
            let (e32, e16) = (rel(f, r), rel(b, r));
            assert!(e32 < 1e-4, "{norm:?} {name}: f32 relative error {e32:e}");
            assert!(e16 < 3e-2, "{norm:?} {name}: bf16 relative error {e16:e}");
            widest = widest.max(e16);
        }
        // The bf16 kernels ran: their rounding shows, far above f32's.
        assert!(
            widest > 1e-3,
            "{norm:?}: bf16 gradients are as exact as f32 ({widest:e}); were they computed in bf16?"
        );
    }
}

#[test]
fn the_reference_path_ignores_bf16() {
    // The composite path (and the GPU) has no bf16 products: it must give the f32 result.
    let (store, stack) = build(NormPlacement::Post, DType::F32, StackKernel::Reference);
    let (la, ga) = gradients(&store, &stack, DType::F32, MatmulPrecision::F32);
    let (lb, gb) = gradients(&store, &stack, DType::F32, MatmulPrecision::Bf16);
    assert_eq!(la, lb);
    assert_eq!(ga, gb);
}

/// Fits the stack to map random inputs to a fixed random linear map of themselves, and
/// returns the loss at the start and after `steps` AdamW steps.
fn fit(precision: MatmulPrecision, steps: usize) -> (f64, f64) {
    let (store, stack) = build_deep(NormPlacement::Pre, DType::F32, StackKernel::Fused, 1);
    let mut rng = SslRng::new(3);
    let x = Tensor::from_vec(rng.normal_vec(B * T * D, 0.0, 1.0), (B, T, D), &Device::Cpu).unwrap();
    let m = Tensor::from_vec(rng.normal_vec(D * D, 0.0, 0.2), (D, D), &Device::Cpu).unwrap();
    let target = x.broadcast_matmul(&m).unwrap();
    let mut opt = AdamW::new(&store, AdamWConfig::default()).unwrap();
    let vars: Vec<Tensor> = opt.vars().map(|v| v.as_tensor().clone()).collect();
    let mut losses = Vec::new();
    for _ in 0..=steps {
        let mut r = SslRng::new(0);
        let mut ctx = Ctx::train(&mut r).with_precision(precision);
        let out = stack.forward(&x, None, &mut ctx).unwrap();
        let loss = (&out.last - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        losses.push(loss.to_scalar::<f32>().unwrap() as f64);
        let grads = loss.backward().unwrap();
        let g: Vec<Option<Tensor>> = vars.iter().map(|v| grads.get(v).cloned()).collect();
        opt.step(&g, 3e-3).unwrap();
    }
    (losses[0], losses[steps])
}

#[test]
fn training_with_bf16_products_learns_as_f32_does() {
    if skip() {
        return;
    }
    let (start32, end32) = fit(MatmulPrecision::F32, 30);
    let (start16, end16) = fit(MatmulPrecision::Bf16, 30);
    assert!((start16 - start32).abs() < 2e-2 * start32);
    assert!(end32 < 0.5 * start32, "f32: {start32} -> {end32}");
    assert!(end16 < 0.5 * start16, "bf16: {start16} -> {end16}");
    // Same trajectory up to rounding noise.
    assert!(
        (end16 - end32).abs() < 0.1 * end32,
        "bf16 ends at {end16}, f32 at {end32}"
    );
}

/// `matmul_t` (the linear layers outside the stack, e.g. BERT's MLM decoder): with bf16 the
/// output and both gradients stay within bf16 rounding of the f64 product, and differ from
/// f32 (so the bf16 op ran); with f32 it is exactly candle's matmul; a product under the size
/// rule stays exactly f32 even when bf16 is asked for.
#[test]
fn matmul_t_in_bf16_stays_within_rounding_of_f64() {
    if skip() {
        return;
    }
    use ssl_core::nn::ops::matmul_t;
    let mut rng = SslRng::new(3);
    // 192 x 1000 x 256 = 49 M multiply-adds, over the 16 M of the size rule, and each
    // product's output wide enough on both sides for the fp16 kernel's rule (the input
    // gradient's 192 x 256).
    let (m, n, k) = (192, 1000, 256);
    let mut draw = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.normal()).collect() };
    let (xv, wv, gv) = (draw(m * k), draw(n * k), draw(m * n));
    let f64s = |v: &[f32]| -> Vec<f64> { v.iter().map(|&a| f64::from(a)).collect() };
    let (x64, w64, g64) = (f64s(&xv), f64s(&wv), f64s(&gv));
    // f64 references: y = x w^T, dx = g w, dw = g^T x.
    let mut y_ref = vec![0f64; m * n];
    let mut dx_ref = vec![0f64; m * k];
    let mut dw_ref = vec![0f64; n * k];
    for i in 0..m {
        for j in 0..n {
            let xw: f64 = (0..k).map(|p| x64[i * k + p] * w64[j * k + p]).sum();
            y_ref[i * n + j] = xw;
            for p in 0..k {
                dx_ref[i * k + p] += g64[i * n + j] * w64[j * k + p];
                dw_ref[j * k + p] += g64[i * n + j] * x64[i * k + p];
            }
        }
    }
    let run = |precision: MatmulPrecision, rows: usize| {
        let x = Var::from_vec(xv[..rows * k].to_vec(), (rows, k), &Device::Cpu).unwrap();
        let w = Var::from_vec(wv.clone(), (n, k), &Device::Cpu).unwrap();
        let g = Tensor::from_vec(gv[..rows * n].to_vec(), (rows, n), &Device::Cpu).unwrap();
        let y = matmul_t(x.as_tensor(), w.as_tensor(), precision).unwrap();
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let v = |t: &Tensor| -> Vec<f64> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|&a| f64::from(a))
                .collect()
        };
        (
            v(&y),
            v(grads.get(x.as_tensor()).unwrap()),
            v(grads.get(w.as_tensor()).unwrap()),
        )
    };
    let (y16, dx16, dw16) = run(MatmulPrecision::Bf16, m);
    for (name, got, want) in [
        ("y", &y16, &y_ref),
        ("dx", &dx16, &dx_ref),
        ("dw", &dw16, &dw_ref),
    ] {
        let e = rel(got, want);
        assert!(e < 0.01, "{name}: bf16 relative error {e} over 1%");
        assert!(
            e > 1e-4,
            "{name}: relative error {e} is f32's: bf16 did not run"
        );
    }
    let (y32, dx32, dw32) = run(MatmulPrecision::F32, m);
    for (name, got, want) in [
        ("y", &y32, &y_ref),
        ("dx", &dx32, &dx_ref),
        ("dw", &dw32, &dw_ref),
    ] {
        let e = rel(got, want);
        assert!(e < 1e-5, "{name}: f32 relative error {e}");
    }
    // 8 x 1000 x 256 = 2 M multiply-adds: under the size rule, so f32 even when bf16 is asked.
    let small16 = run(MatmulPrecision::Bf16, 8);
    let small32 = run(MatmulPrecision::F32, 8);
    assert_eq!(small16, small32);
}

/// Under bf16 products, `Ctx::inference` gives exactly the outputs of `Ctx::eval`: without
/// backward the activation epilogue runs in place and the MLP takes each block of rows
/// through both products; with 4 sequences (256 rows, so the output projection takes bf16
/// too) each sequence goes through the whole layer as one job (on the bf16 kernels; in fp16
/// the batch runs in halves instead); also with a causal mask.
#[test]
fn bf16_inference_matches_eval() {
    if skip() {
        return;
    }
    for (norm, b, causal) in [
        (NormPlacement::Post, B, false),
        (NormPlacement::Pre, B, false),
        (NormPlacement::Post, 2 * B, false),
        (NormPlacement::Pre, 2 * B, false),
        (NormPlacement::Pre, 2 * B, true),
    ] {
        let cfg = TransformerConfig {
            causal,
            ..config(norm, 2)
        };
        let (store, stack) = common::stack_on_cpu(&cfg, DType::F32, StackKernel::Fused, 5);
        let mut rng = SslRng::new(3);
        // Every parameter moved off its initial value (biases start at zero, norms at one),
        // so each one shows in the output.
        for (_, var) in store.vars() {
            let noise = Tensor::from_vec(
                rng.normal_vec(var.elem_count(), 0.0, 0.05),
                var.shape(),
                &Device::Cpu,
            )
            .unwrap();
            var.set(&var.as_tensor().add(&noise).unwrap()).unwrap();
        }
        let x =
            Tensor::from_vec(rng.normal_vec(b * T * D, 0.0, 1.0), (b, T, D), &Device::Cpu).unwrap();
        // The second sequence's last 9 positions are padding.
        let mask: Vec<f32> = (0..b * T)
            .map(|i| {
                if (T..2 * T).contains(&i) && i % T >= T - 9 {
                    0.0
                } else {
                    1.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (b, T), &Device::Cpu).unwrap();
        let run = |inference: bool| {
            let mut r = SslRng::new(0);
            let ctx = if inference {
                Ctx::inference(&mut r)
            } else {
                Ctx::eval(&mut r)
            };
            let mut ctx = ctx.with_precision(MatmulPrecision::Bf16);
            let out = stack.forward(&x, Some(&mask), &mut ctx).unwrap();
            out.last.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert_eq!(
            run(false),
            run(true),
            "{norm:?}, {b} sequences, causal {causal}"
        );
    }
}
