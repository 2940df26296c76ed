//! Forward + backward of the shared transformer stack alone, fused kernel against the
//! composite reference (the fused one with f32 and, where the CPU has AVX-512 BF16, bf16
//! products), on BERT-mini's shape (16 x 128 tokens, width 256, 4 layers, 4 heads,
//! MLP 1024); prints median milliseconds and achieved GFLOP/s.
//!
//! ```text
//! cargo bench -p ssl-core --bench stack [-- STEPS [pre|post] [fused|reference]]
//! cargo bench -p ssl-core --bench stack -- gemm     # GFLOP/s of the products alone, f32 and bf16
//! ```

use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use ssl_core::nn::{
    bf16_matmul_available, bf16_product_seconds, MatmulPrecision, NormPlacement, StackKernel,
    TransformerConfig, TransformerStack,
};
use ssl_core::{Ctx, ParamStore, SslRng};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    ssl_core::keep_freed_memory();
    ssl_core::candle_ops_on_caller();
    // As the `ssl` binary: the work runs on a compute thread (`ssl_core::on_compute_threads`).
    ssl_core::on_compute_threads(|| run().map_err(|e| e.to_string()))?;
    Ok(())
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.first().map(String::as_str) == Some("gemm") {
        gemm_rates();
        return Ok(());
    }
    let steps: usize = args.first().and_then(|s| s.parse().ok()).unwrap_or(10);
    let norm = match args.get(1).map(String::as_str) {
        Some("pre") => NormPlacement::Pre,
        _ => NormPlacement::Post,
    };
    let fused = [
        (StackKernel::Fused, MatmulPrecision::F32),
        (StackKernel::Fused, MatmulPrecision::Bf16),
    ];
    let reference = [(StackKernel::Reference, MatmulPrecision::F32)];
    let kernels: Vec<(StackKernel, MatmulPrecision)> = match args.get(2).map(String::as_str) {
        Some("fused") => fused.to_vec(),
        Some("reference") => reference.to_vec(),
        _ => fused.iter().chain(&reference).copied().collect(),
    };
    let (b, t, d, depth, heads, mlp) = (16, 128, 256, 4, 4, 1024);
    let cfg = TransformerConfig {
        dim: d,
        depth,
        heads,
        mlp_dim: mlp,
        norm,
        ..TransformerConfig::default()
    };
    // Matrix-product FLOPs of one forward: QKV, output, MLP, and the two attention products.
    let n = (b * t) as f64;
    let fwd = depth as f64
        * (2.0 * n * (4.0 * (d * d) as f64 + 2.0 * (d * mlp) as f64)
            + 4.0 * (b * t * t * d) as f64);
    let store = ParamStore::new(&Device::Cpu);
    let mut stack = TransformerStack::new(&cfg, &store.builder(0))?;
    let mut rng = SslRng::new(0);
    let x = Var::from_vec(rng.normal_vec(b * t * d, 0.0, 1.0), (b, t, d), &Device::Cpu)?;
    let mask = Tensor::ones((b, t), candle_core::DType::F32, &Device::Cpu)?;
    for (kernel, precision) in kernels {
        if precision == MatmulPrecision::Bf16 && !bf16_matmul_available() {
            eprintln!("bf16 skipped: this CPU has no AVX-512 BF16");
            continue;
        }
        stack.set_kernel(kernel);
        let mut fwd_ms = Vec::new();
        let mut total_ms = Vec::new();
        for step in 0..steps + 2 {
            let t0 = Instant::now();
            let out = stack.forward(
                x.as_tensor(),
                Some(&mask),
                &mut Ctx::train(&mut rng).with_precision(precision),
            )?;
            let loss = out.last.sqr()?.mean_all()?;
            let t1 = Instant::now();
            let grads = loss.backward()?;
            let t2 = Instant::now();
            drop(grads);
            if step >= 2 {
                fwd_ms.push((t1 - t0).as_secs_f64() * 1e3);
                total_ms.push((t2 - t0).as_secs_f64() * 1e3);
            }
        }
        fwd_ms.sort_by(f64::total_cmp);
        total_ms.sort_by(f64::total_cmp);
        let (f, tot) = (fwd_ms[fwd_ms.len() / 2], total_ms[total_ms.len() / 2]);
        println!(
            "{{\"kernel\": \"{kernel:?}\", \"precision\": \"{precision:?}\", \"norm\": \"{norm:?}\", \"forward_ms\": {f:.1}, \"forward_backward_ms\": {tot:.1}, \"gflops\": {:.0}}}",
            3.0 * fwd / (tot * 1e6)
        );
    }
    Ok(())
}

/// Times `gemm` on the products of one BERT-mini layer (2048 tokens), each in the orientation
/// the fused stack uses, with both threads.
fn gemm_rates() {
    let threads = rayon::current_num_threads();
    let par = gemm::Parallelism::Rayon(threads);
    // (name, m, n, k, lhs transposed, rhs transposed): the stack's products at BERT-mini's
    // shape, and the MLM decoder's (307 masked positions, vocab 8000).
    let shapes = [
        ("x W^T (qkv)", 2048, 768, 256, false, true),
        ("x W^T (fc1)", 2048, 1024, 256, false, true),
        ("g W^T (fc2)", 2048, 256, 1024, false, true),
        ("dy W (dx fc1)", 2048, 256, 1024, false, false),
        ("dy^T x (dW fc1)", 1024, 256, 2048, true, false),
        ("dy^T x (dW qkv)", 768, 256, 2048, true, false),
        ("h E^T (mlm logits)", 307, 8000, 256, false, true),
        ("g E (mlm dh)", 307, 256, 8000, false, false),
        ("g^T h (mlm dE)", 8000, 256, 307, true, false),
        ("square 1024", 1024, 1024, 1024, false, false),
    ];
    println!("{threads} threads; GFLOP/s of f32 (gemm crate) and bf16 (ours, operands converted while packed)");
    for (name, m, n, k, ta, tb) in shapes {
        let a = vec![0.5f32; m * k];
        let b = vec![0.25f32; k * n];
        let mut c = vec![0f32; m * n];
        // Row-major storage; a transposed operand is read with swapped strides.
        let (a_rs, a_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
        let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
        let mut times = Vec::new();
        for _ in 0..12 {
            let t0 = Instant::now();
            // SAFETY: every view lies inside its vector.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    c.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    a.as_ptr(),
                    a_cs,
                    a_rs,
                    b.as_ptr(),
                    b_cs,
                    b_rs,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    par,
                );
            }
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        let t = times[times.len() / 2];
        let flops = 2.0 * (m * n * k) as f64;
        let bf16 = match bf16_product_seconds((m, n, k), (ta, tb), threads, 12) {
            Some(t16) => format!("bf16 {:.2} ms {:.0} GFLOP/s", t16 * 1e3, flops / t16 / 1e9),
            None => "bf16 n/a".into(),
        };
        println!(
            "{name:>20}: {m}x{n}x{k} f32 {:.2} ms {:.0} GFLOP/s, {bf16}",
            t * 1e3,
            flops / t / 1e9
        );
    }
}
