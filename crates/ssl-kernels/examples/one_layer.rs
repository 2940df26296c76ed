//! One post-norm transformer layer through the fused stack op, forward and backward, and a
//! bf16 product against candle's f32 one. Runs in about a second:
//! `cargo run --release -p ssl-kernels --example one_layer`.

use candle_core::{Device, Tensor, Var};
use ssl_kernels::{Act, BufferPool, FusedSpec, MatmulT, NormPlacement, StackOp};

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    let (b, t, d) = (4, 32, 64);
    let spec = FusedSpec {
        depth: 1,
        dim: d,
        mlp: 4 * d,
        heads: 4,
        norm: NormPlacement::Post,
        act: Act::GeluErf,
        dropout: 0.0,
        attn_dropout: 0.0,
        eps: 1e-12,
        causal: false,
        bf16: false,
    };
    // One layer's parameters, flat in the op's layout: small random weights, norms at 1.
    let o = spec.offsets();
    let mut flat = Tensor::randn(0f32, 0.02, o.len, &dev)?.to_vec1::<f32>()?;
    flat[o.ln1w..o.ln1w + d].fill(1.0);
    flat[o.ln2w..o.ln2w + d].fill(1.0);
    flat[o.ln1b..o.ln1b + d].fill(0.0);
    flat[o.ln2b..o.ln2b + d].fill(0.0);
    let params = Var::from_vec(flat, o.len, &dev)?;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, d), &dev)?)?;
    let mask = Tensor::ones((b, t), candle_core::DType::F32, &dev)?;

    // train = false (no dropout), keep = true (a backward follows), seed unused.
    let op = StackOp::new(spec, false, false, true, 0, BufferPool::default());
    let y = x.apply_op3(&params, &mask, op)?.squeeze(0)?;
    // Post-norm with unit weights: every output row has mean 0 and variance 1.
    let mean = y.mean_keepdim(2)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let var = y.sqr()?.mean_keepdim(2)?;
    let var_err = (var - 1.0)?.abs()?.max_all()?.to_scalar::<f32>()?;
    println!(
        "layer output {:?}: |row mean| <= {mean:.1e}, |row var - 1| <= {var_err:.1e}",
        y.dims()
    );
    assert!(mean < 1e-5 && var_err < 1e-3);

    // A random projection of the output as the loss (its sum and square sum are constant).
    let r = Tensor::randn(0f32, 1.0, (b, t, d), &dev)?;
    let grads = (&y * &r)?.sum_all()?.backward()?;
    let gx = grads.get(&x).expect("x has a gradient");
    let gp = grads.get(&params).expect("the parameters have a gradient");
    println!(
        "gradients: |dx| {:.3}, |dparams| {:.3}",
        gx.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?,
        gp.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?
    );

    // x W^T with bf16 operands and f32 sums (AVX-512 BF16 CPUs) against candle's f32 product.
    let (m, k, n) = (256, 256, 512);
    let a = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
    let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
    let ours = a.apply_op2(&w, MatmulT { bf16: true })?;
    let f32_ref = a.matmul(&w.t()?)?;
    let rel = ((ours - &f32_ref)?.abs()?.max_all()? / f32_ref.abs()?.max_all()?)?;
    let rel = rel.to_scalar::<f32>()?;
    let path = if ssl_kernels::bf16_available() && ssl_kernels::linear_takes_bf16(m, n, k) {
        "bf16"
    } else {
        "f32 (no AVX-512 BF16 here)"
    };
    println!("x W^T ({m}x{k} by {k}x{n}) on the {path} path: max error {rel:.1e} of max |y|");
    assert!(rel < 2e-2);
    Ok(())
}
