//! The fused CPU stack against the composite reference: same outputs and gradients for every
//! option (pre/post norm, activations, padding, causality, hidden states), checked against
//! the reference run in f64, itself checked by finite differences; and, with dropout, the
//! fused backward against finite differences of the fused forward.

mod common;

use candle_core::{DType, Device, Tensor};
use ssl_core::nn::{Activation, NormPlacement, StackKernel, TransformerConfig, TransformerStack};
use ssl_core::{Ctx, ParamStore, SslRng};

struct Case {
    norm: NormPlacement,
    activation: Activation,
    causal: bool,
    mask: bool,
    hidden: bool,
}

fn config(c: &Case, dropout: f32) -> TransformerConfig {
    TransformerConfig {
        dim: 8,
        depth: 2,
        heads: 2,
        mlp_dim: 12,
        norm: c.norm,
        activation: c.activation,
        dropout,
        attn_dropout: dropout,
        layer_norm_eps: 1e-5,
        causal: c.causal,
        ..TransformerConfig::default()
    }
}

const B: usize = 2;
const T: usize = 5;
const D: usize = 8;

fn inputs(dtype: DType) -> (Tensor, Tensor, Tensor) {
    let mut rng = SslRng::new(11);
    let x = Tensor::from_vec(rng.normal_vec(B * T * D, 0.0, 1.0), (B, T, D), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let mask = Tensor::new(
        &[[1f32, 1., 1., 1., 1.], [1., 1., 1., 0., 0.]],
        &Device::Cpu,
    )
    .unwrap()
    .to_dtype(dtype)
    .unwrap();
    let w = Tensor::from_vec(rng.normal_vec(B * T * D, 0.0, 1.0), (B, T, D), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    (x, mask, w)
}

/// The scalar `sum(w * last) + 0.5 * sum(w * hidden[1])` (the second term when `hidden`).
fn objective(
    stack: &TransformerStack,
    c: &Case,
    x: &Tensor,
    mask: &Tensor,
    w: &Tensor,
    train: bool,
    seed: u64,
) -> Tensor {
    let mut rng = SslRng::new(seed);
    let mut ctx = if train {
        Ctx::train(&mut rng)
    } else {
        Ctx::eval(&mut rng)
    };
    if c.hidden {
        ctx = ctx.with_hidden_states();
    }
    let out = stack.forward(x, c.mask.then_some(mask), &mut ctx).unwrap();
    let mut loss = (&out.last * w).unwrap().sum_all().unwrap();
    if c.hidden {
        assert_eq!(out.hidden_states.len(), 3);
        let h1 = (&out.hidden_states[1] * w).unwrap().sum_all().unwrap();
        loss = (loss + (h1 * 0.5).unwrap()).unwrap();
    }
    loss
}

/// Gradients of the objective for the input and every parameter, as f64 vectors by name.
fn gradients(
    store: &ParamStore,
    stack: &TransformerStack,
    c: &Case,
    dtype: DType,
) -> (f64, Vec<(String, Vec<f64>)>) {
    let (x, mask, w) = inputs(dtype);
    let xv = candle_core::Var::from_tensor(&x).unwrap();
    let loss = objective(stack, c, xv.as_tensor(), &mask, &w, false, 0);
    common::loss_and_gradients_f64(&loss, &xv, store)
}

fn build(
    c: &Case,
    dtype: DType,
    kernel: StackKernel,
    dropout: f32,
) -> (ParamStore, TransformerStack) {
    common::stack_on_cpu(&config(c, dropout), dtype, kernel, 3)
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            norm: NormPlacement::Pre,
            activation: Activation::GeluErf,
            causal: false,
            mask: true,
            hidden: false,
        },
        Case {
            norm: NormPlacement::Post,
            activation: Activation::GeluErf,
            causal: false,
            mask: true,
            hidden: true,
        },
        Case {
            norm: NormPlacement::Pre,
            activation: Activation::GeluTanh,
            causal: true,
            mask: false,
            hidden: true,
        },
        Case {
            norm: NormPlacement::Post,
            activation: Activation::Relu,
            causal: true,
            mask: true,
            hidden: false,
        },
    ]
}

#[test]
fn fused_gradients_match_the_f64_reference() {
    for (i, c) in cases().iter().enumerate() {
        let (s64, r64) = build(c, DType::F64, StackKernel::Reference, 0.0);
        let (s32, f32k) = build(c, DType::F32, StackKernel::Fused, 0.0);
        let (l_ref, g_ref) = gradients(&s64, &r64, c, DType::F64);
        let (l_fused, g_fused) = gradients(&s32, &f32k, c, DType::F32);
        assert!(
            (l_ref - l_fused).abs() < 1e-4 * (1.0 + l_ref.abs()),
            "case {i}: loss {l_fused} vs reference {l_ref}"
        );
        for ((name, a), (name2, b)) in g_ref.iter().zip(&g_fused) {
            assert_eq!(name, name2);
            let scale = a.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
            let worst = a.iter().zip(b).fold(0f64, |m, (p, q)| m.max((p - q).abs()));
            assert!(
                worst < 2e-5 * scale.max(1.0),
                "case {i}, {name}: max difference {worst:e} (gradient scale {scale:e})"
            );
        }
    }
}

#[test]
fn f32_reference_agrees_with_fused_and_kernels_are_selectable() {
    let c = &cases()[1];
    let (s_a, reference) = build(c, DType::F32, StackKernel::Reference, 0.0);
    let (s_b, fused) = build(c, DType::F32, StackKernel::Auto, 0.0);
    assert_eq!(fused.kernel(), StackKernel::Auto);
    let (la, ga) = gradients(&s_a, &reference, c, DType::F32);
    let (lb, gb) = gradients(&s_b, &fused, c, DType::F32);
    assert!((la - lb).abs() < 1e-4 * (1.0 + la.abs()));
    for ((n, a), (_, b)) in ga.iter().zip(&gb) {
        for (p, q) in a.iter().zip(b) {
            assert!((p - q).abs() < 1e-4 * (1.0 + p.abs()), "{n}: {p} vs {q}");
        }
    }
}

/// Central differences of the f64 reference stack for a few parameters and inputs: the
/// ground truth the fused gradients were compared with is itself right.
#[test]
fn f64_reference_gradients_match_finite_differences() {
    let c = &cases()[1];
    let (store, stack) = build(c, DType::F64, StackKernel::Reference, 0.0);
    let (_, grads) = gradients(&store, &stack, c, DType::F64);
    let (x, mask, w) = inputs(DType::F64);
    let eval = || {
        objective(&stack, c, &x, &mask, &w, false, 0)
            .to_scalar::<f64>()
            .unwrap()
    };
    let h = 1e-6;
    for (name, var) in store.vars().into_iter().step_by(5) {
        let analytic = &grads.iter().find(|(n, _)| *n == name).unwrap().1;
        let base = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for idx in [0, base.len() / 2, base.len() - 1] {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                eval()
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            at(0.0);
            let a = analytic[idx];
            assert!(
                (numeric - a).abs() < 1e-6 * (1.0 + a.abs()),
                "{name}[{idx}]: analytic {a} numeric {numeric}"
            );
        }
    }
}

/// With dropout, fused and reference draw different masks, so the fused backward is checked
/// against finite differences of its own forward (same seed, hence the same masks).
#[test]
fn fused_dropout_backward_matches_its_forward() {
    for c in &cases()[..2] {
        let (store, stack) = build(c, DType::F32, StackKernel::Fused, 0.2);
        let (x, mask, w) = inputs(DType::F32);
        let loss = objective(&stack, c, &x, &mask, &w, true, 5);
        let grads = loss.backward().unwrap();
        let again = objective(&stack, c, &x, &mask, &w, true, 5);
        assert_eq!(
            loss.to_scalar::<f32>().unwrap(),
            again.to_scalar::<f32>().unwrap(),
            "same seed, same masks"
        );
        let other = objective(&stack, c, &x, &mask, &w, true, 6);
        assert_ne!(
            loss.to_scalar::<f32>().unwrap(),
            other.to_scalar::<f32>().unwrap()
        );
        let h = 2e-3f32;
        let mut checked = 0;
        for (name, var) in store.vars().into_iter().step_by(3) {
            let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
            let g = g.to_vec1::<f32>().unwrap();
            let base = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let idx = base.len() / 3;
            let at = |delta: f32| {
                let mut v = base.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                f64::from(
                    objective(&stack, c, &x, &mask, &w, true, 5)
                        .to_scalar::<f32>()
                        .unwrap(),
                )
            };
            let numeric = (at(h) - at(-h)) / (2.0 * f64::from(h));
            at(0.0);
            let a = f64::from(g[idx]);
            assert!(
                (numeric - a).abs() < 2e-2 * (a.abs() + 0.05),
                "{name}[{idx}]: analytic {a} numeric {numeric}"
            );
            checked += 1;
        }
        assert!(checked >= 5);
    }
}

/// `Ctx::inference` (no activations kept) gives exactly the outputs of `Ctx::eval`, hidden
/// states included, for both norm placements and every activation, also after a forward pass
/// that kept them; and a backward pass through its output is a clear error.
#[test]
fn inference_mode_matches_eval_and_refuses_backward() {
    for norm in [NormPlacement::Pre, NormPlacement::Post] {
        for activation in [Activation::GeluErf, Activation::GeluTanh, Activation::Relu] {
            let c = Case {
                norm,
                activation,
                causal: false,
                mask: true,
                hidden: true,
            };
            let (_store, stack) = build(&c, DType::F32, StackKernel::Fused, 0.0);
            let (x, mask, _) = inputs(DType::F32);
            let run = |inference: bool| {
                let mut rng = SslRng::new(0);
                let ctx = if inference {
                    Ctx::inference(&mut rng)
                } else {
                    Ctx::eval(&mut rng)
                };
                let out = stack
                    .forward(&x, Some(&mask), &mut ctx.with_hidden_states())
                    .unwrap();
                let mut all = vec![out.last.flatten_all().unwrap().to_vec1::<f32>().unwrap()];
                for h in &out.hidden_states {
                    all.push(h.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                }
                (all, out.last)
            };
            let (kept, _) = run(false);
            let (lean, last) = run(true);
            assert_eq!(kept, lean, "{norm:?} {activation:?}");
            let err = last.sum_all().unwrap().backward().unwrap_err().to_string();
            assert!(err.contains("kept no activations"), "{err}");
            // With the input in the graph (the parameters then packed outside it), too.
            let xv = candle_core::Var::from_tensor(&x).unwrap();
            let mut rng = SslRng::new(0);
            let out = stack
                .forward(xv.as_tensor(), Some(&mask), &mut Ctx::inference(&mut rng))
                .unwrap();
            let err = out
                .last
                .sum_all()
                .unwrap()
                .backward()
                .unwrap_err()
                .to_string();
            assert!(err.contains("kept no activations"), "{err}");
        }
    }
}

/// `forward_rows` (the last layer at chosen rows, asked out of order) against the full
/// forward gathered at those rows, on the fused and the reference kernels: the same values
/// and the same gradients of a loss that reads them; a repeated row takes the gathering
/// path and still answers.
#[test]
fn forward_rows_equals_the_gathered_full_output() {
    let c = Case {
        norm: NormPlacement::Post,
        activation: Activation::GeluErf,
        causal: false,
        mask: true,
        hidden: false,
    };
    let rows: [u32; 4] = [7, 1, 3, 9];
    let (x, mask, _) = inputs(DType::F32);
    let mut rng = SslRng::new(5);
    let r = Tensor::from_vec(
        rng.normal_vec(rows.len() * D, 0.0, 1.0),
        (rows.len(), D),
        &Device::Cpu,
    )
    .unwrap();
    for kernel in [StackKernel::Fused, StackKernel::Reference] {
        let (store, stack) = build(&c, DType::F32, kernel, 0.0);
        let run = |sparse: bool, rows: &[u32]| {
            let xv = candle_core::Var::from_tensor(&x).unwrap();
            let mut rng = SslRng::new(0);
            let mut ctx = Ctx::eval(&mut rng);
            let picked = if sparse {
                stack
                    .forward_rows(xv.as_tensor(), Some(&mask), rows, &mut ctx)
                    .unwrap()
            } else {
                let out = stack
                    .forward(xv.as_tensor(), Some(&mask), &mut ctx)
                    .unwrap();
                let idx = Tensor::new(rows, &Device::Cpu).unwrap();
                out.last
                    .reshape((B * T, D))
                    .unwrap()
                    .index_select(&idx, 0)
                    .unwrap()
            };
            let values: Vec<f32> = picked.flatten_all().unwrap().to_vec1().unwrap();
            let r = r.narrow(0, 0, rows.len()).unwrap();
            let loss = (&picked * &r).unwrap().sum_all().unwrap();
            (values, common::loss_and_gradients_f64(&loss, &xv, &store).1)
        };
        let (v_full, g_full) = run(false, &rows);
        let (v_rows, g_rows) = run(true, &rows);
        for (a, b) in v_full.iter().zip(&v_rows) {
            assert!((a - b).abs() <= 1e-5, "{kernel:?}: value {a} vs {b}");
        }
        for ((name, a), (_, b)) in g_full.iter().zip(&g_rows) {
            for (p, q) in a.iter().zip(b) {
                assert!(
                    (p - q).abs() <= 1e-4 * (1.0 + p.abs()),
                    "{kernel:?} {name}: {p} vs {q}"
                );
            }
        }
        let repeated = [2u32, 2, 8];
        let (v_full, _) = run(false, &repeated);
        let (v_rows, _) = run(true, &repeated);
        assert_eq!(v_full, v_rows, "{kernel:?}, repeated rows");
    }
}
