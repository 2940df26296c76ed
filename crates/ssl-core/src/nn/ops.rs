//! Differentiable building-block operations.
//!
//! candle's fused `softmax_last_dim`, `layer_norm` and `rms_norm` silently cut gradients
//! (DESIGN.md), so the stack is built from these composite versions, whose backward is
//! candle's ordinary autograd. On a GPU [`softmax_last_dim`] runs candle's fused softmax
//! kernel inside an op of ours that has a backward.

use candle_core::{CpuStorage, DType, Layout, Storage, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::nn::MatmulPrecision;
use crate::{CoreError, GradSink, Result, SslRng};

/// The f32 elements of a contiguous CPU tensor's storage view, read in place; `None` for any
/// other device, dtype or layout.
pub(crate) fn cpu_f32_view<'a>(storage: &'a Storage, layout: &Layout) -> Option<&'a [f32]> {
    match (storage, layout.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Some(&v[a..b]),
        _ => None,
    }
}

/// True when `t` is on the CPU and it and every tensor of `also` are f32: when the one-op CPU
/// kernels below apply.
fn on_cpu_f32(t: &Tensor, also: &[&Tensor]) -> bool {
    matches!(t.device(), candle_core::Device::Cpu)
        && t.dtype() == DType::F32
        && also.iter().all(|a| a.dtype() == DType::F32)
}

/// Softmax over the last dimension, shifted by the (gradient-free) row maximum for stability.
///
/// On a CUDA device it is one op ([`softmax_last_dim_fused`]: candle's softmax kernel forward,
/// `y * (g - sum(g * y))` backward); elsewhere [`softmax_last_dim_composite`].
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cuda() {
        return softmax_last_dim_fused(x);
    }
    softmax_last_dim_composite(x)
}

/// [`softmax_last_dim`] from candle ops (max, subtract, exp, sum, divide) on every device.
pub fn softmax_last_dim_composite(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// [`softmax_last_dim`] as one op with a backward, on any device: the forward is one pass
/// per row (on a GPU candle's fused softmax kernel, whose own wrapper
/// `candle_nn::ops::softmax_last_dim` cuts gradients), the backward `y * (g - sum(g * y))`
/// from the saved output `y`. f32, f64, bf16 and f16 on a GPU; f32 and f64 on the CPU.
pub fn softmax_last_dim_fused(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(ssl_kernels::SoftmaxLastDimOp)?)
}

/// Log-softmax over the last dimension.
pub fn log_softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// `x + y` broadcast, for the common case of `y` repeated over `x`'s leading dimensions (a
/// bias, a position embedding): `y`'s shape, leading 1s dropped, a suffix of `x`'s.
///
/// f32 tensors on the CPU in that case go through one op whose backward takes `y`'s gradient
/// as a parallel column sum (candle's broadcast add sums over the repeated dimension with a
/// strided reduction: 1.3 ms a step for MAE's position embedding); every other case is
/// candle's `broadcast_add`.
pub fn add_broadcast(x: &Tensor, y: &Tensor) -> Result<Tensor> {
    let yd = y.dims();
    let lead = yd.iter().take_while(|&&n| n == 1).count();
    let suffix = &yd[lead..];
    let xd = x.dims();
    if on_cpu_f32(x, &[y]) && !suffix.is_empty() && xd.len() >= yd.len() && xd.ends_with(suffix) {
        return Ok(x
            .contiguous()?
            .apply_op2(&y.contiguous()?, ssl_kernels::RowBroadcastAdd)?);
    }
    Ok(x.broadcast_add(y)?)
}

/// Layer normalisation over the last dimension: `(x - mean) / sqrt(var + eps) * w + b`.
///
/// f32 tensors on the CPU go through one fused op (one pass forward, a few backward); on a
/// GPU through [`layer_norm_fused`] (candle's layer-norm kernel forward); other devices and
/// dtypes through [`layer_norm_composite`], which both are tested against.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if on_cpu_f32(x, &[weight, bias]) && x.rank() >= 1 {
        return Ok(x.contiguous()?.apply_op3(
            &weight.contiguous()?,
            &bias.contiguous()?,
            ssl_kernels::LayerNormOp { eps: eps as f32 },
        )?);
    }
    if x.device().is_cuda() && x.rank() >= 1 {
        return layer_norm_fused(x, weight, bias, eps);
    }
    layer_norm_composite(x, weight, bias, eps)
}

/// [`layer_norm`] as one op with a backward, on any device: the forward one pass per row (on
/// a GPU candle's layer-norm kernel, whose own wrapper `candle_nn::ops::layer_norm` cuts
/// gradients), the backward from the input, recomputing the row statistics:
/// `dx = rstd * (g w - mean(g w) - x^ mean(g w x^))`, `dw = sum(g x^)`, `db = sum(g)` over the
/// rows. f32, bf16 and f16 on a GPU; f32 and f64 on the CPU.
pub fn layer_norm_fused(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if weight.dims() != [d] || bias.dims() != [d] {
        return Err(crate::CoreError::InvalidInput(format!(
            "layer norm of width {d}: weight {:?} and bias {:?}",
            weight.dims(),
            bias.dims()
        )));
    }
    Ok(x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        ssl_kernels::LayerNormFusedOp { eps },
    )?)
}

/// [`layer_norm`] from candle ops (any device and dtype).
pub fn layer_norm_composite(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(xn.broadcast_mul(weight)?.broadcast_add(bias)?)
}

/// The activation of a feed-forward block.
#[derive(
    schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// GELU with the exact error function (BERT's `gelu`, ViT).
    #[default]
    GeluErf,
    /// GELU with the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// ReLU.
    Relu,
}

impl Activation {
    /// Applies the activation.
    pub fn forward(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::GeluErf => x.gelu_erf()?,
            Activation::GeluTanh => x.gelu()?,
            Activation::Relu => x.relu()?,
        })
    }
}

/// Inverted dropout with a mask drawn from `rng`: zeroes each element with probability `p`
/// and scales the rest by `1 / (1 - p)`. Identity when not training or `p == 0`.
pub fn dropout(x: &Tensor, p: f32, train: bool, rng: &mut SslRng) -> Result<Tensor> {
    if !train || p <= 0.0 {
        return Ok(x.clone());
    }
    if p >= 1.0 {
        return Ok(x.zeros_like()?);
    }
    let keep = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.uniform() < p { 0.0 } else { keep })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * mask)?)
}

/// BERT's input embedding: `word[ids] + position[0..T] + token_type[types]`, (B, T, D) for
/// `ids` and `types` (B, T). f32 tables on the CPU take one parallel op
/// ([`ssl_kernels::EmbeddingSumOp`], its backward scattering into each table's gradient);
/// otherwise candle's lookups and adds, which it is tested against.
///
/// With a `sink` (a training context's [`crate::Ctx::grad_sink`]) the op's backward adds each
/// table variable's rows to the sink's cell for it ([`GradSink::cell`]), which the sink's
/// drain hands to the variable: a table tied to [`linear_cross_entropy`]'s weight in the same
/// sink gets one gradient buffer instead of candle's zero fill and two dense adds.
pub fn embedding_sum(
    word: &Tensor,
    position: &Tensor,
    token_type: &Tensor,
    ids: &Tensor,
    types: &Tensor,
    sink: Option<&GradSink>,
) -> Result<Tensor> {
    let b = ids.dims2()?.0;
    if types.dims() != ids.dims() {
        return Err(CoreError::InvalidInput(format!(
            "token types of shape {:?} for ids of shape {:?}",
            types.dims(),
            ids.dims()
        )));
    }
    if on_cpu_f32(word, &[position, token_type]) {
        let flat = |x: &Tensor| -> Result<Vec<u32>> {
            Ok(x.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?)
        };
        let (word, position, token_type) = (
            word.contiguous()?,
            position.contiguous()?,
            token_type.contiguous()?,
        );
        let cell = |t: &Tensor| sink.and_then(|s| s.cell(t));
        let op = ssl_kernels::EmbeddingSumOp {
            ids: flat(ids)?,
            types: flat(types)?,
            batch: b,
            grads: [cell(&word), cell(&position), cell(&token_type)],
        };
        return Ok(word.apply_op3(&position, &token_type, op)?);
    }
    embedding_sum_composite(word, position, token_type, ids, types)
}

/// [`embedding_sum`] in candle's lookups and adds (any device; the CPU op's reference).
pub fn embedding_sum_composite(
    word: &Tensor,
    position: &Tensor,
    token_type: &Tensor,
    ids: &Tensor,
    types: &Tensor,
) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let d = word.dim(1)?;
    let w = word
        .index_select(&ids.flatten_all()?, 0)?
        .reshape((b, t, d))?;
    let p = position.narrow(0, 0, t)?.unsqueeze(0)?;
    let tt = token_type
        .index_select(&types.flatten_all()?, 0)?
        .reshape((b, t, d))?;
    Ok(add_broadcast(&w, &p)?.add(&tt)?)
}

/// Mean of `x` (B, T, D) over the timesteps where `mask` (B, T) is 1; plain mean without mask.
///
/// f32 on the CPU with a constant mask (one that is not differentiated) runs as one op (one
/// parallel pass each way); otherwise candle's broadcast multiply and sum, which it is tested
/// against.
pub fn masked_mean(x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    match mask {
        None => Ok(x.mean(1)?),
        Some(m) if on_cpu_f32(x, &[]) && x.rank() == 3 && !m.track_op() => {
            let m = m.to_dtype(DType::F32)?.contiguous()?;
            Ok(x.contiguous()?.apply_op2(&m, ssl_kernels::MaskedMeanOp)?)
        }
        Some(m) => {
            let m = m.to_dtype(x.dtype())?.unsqueeze(2)?;
            let sum = x.broadcast_mul(&m)?.sum(1)?;
            let count = m.sum(1)?.clamp(1.0, f64::INFINITY)?;
            Ok(sum.broadcast_div(&count)?)
        }
    }
}

/// Rows `rows` of `x` seen as a matrix over its last dimension (the leading dimensions
/// flattened: index `i` is row `i` of `x.reshape(((), last))`), as (rows, last), in that
/// order.
pub fn select_rows(x: &Tensor, rows: &[u32]) -> Result<Tensor> {
    let last = x.dim(D::Minus1)?;
    let idx = Tensor::from_vec(rows.to_vec(), rows.len(), x.device())?;
    Ok(x.reshape(((), last))?.index_select(&idx, 0)?)
}

/// L2-normalises the rows of a (N, D) tensor.
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .clamp(1e-24, f64::INFINITY)?
        .sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// Cross-entropy of (N, C) logits against class indices, averaged over rows.
///
/// f32 logits on the CPU go through one fused op (one pass forward, one backward); other
/// devices and dtypes through the composite log-softmax below, which it is tested against.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if on_cpu_f32(logits, &[]) && logits.rank() == 2 {
        let t = targets.to_dtype(DType::U32)?.contiguous()?;
        return Ok(logits
            .contiguous()?
            .apply_op2(&t, ssl_kernels::CrossEntropyOp)?);
    }
    cross_entropy_composite(logits, targets)
}

/// `x W^T` for `x` (m, k) and `w` (n, k): a linear layer's product.
///
/// With f32 operands on a CPU, one op computes it and its two backward products
/// ([`ssl_kernels::MatmulT`]: one graph node, where candle's matmul by a transposed view takes
/// three); under [`MatmulPrecision::Bf16`], on a CPU that has the bf16 kernels, its products
/// take bf16 operands and f32 sums (where the product reaches the fused stack's size rule, at
/// least 16 M multiply-adds). With f32 operands on a GPU under bf16, cuBLAS multiplies them
/// rounded to bf16 with f32 sums (every size, as [`matmul`]); otherwise it is candle's matmul.
pub fn matmul_t(x: &Tensor, w: &Tensor, precision: MatmulPrecision) -> Result<Tensor> {
    if gpu_bf16(x, &[w], precision) {
        let (x, w) = (x.to_dtype(DType::BF16)?, w.to_dtype(DType::BF16)?);
        return Ok(x.matmul(&w.t()?)?.to_dtype(DType::F32)?);
    }
    if on_cpu_f32(x, &[w]) && x.rank() == 2 && w.rank() == 2 {
        let bf16 = precision == MatmulPrecision::Bf16
            && crate::nn::bf16_matmul_available()
            && ssl_kernels::linear_takes_bf16(x.dim(0)?, w.dim(0)?, x.dim(1)?);
        return Ok(x
            .contiguous()?
            .apply_op2(&w.contiguous()?, ssl_kernels::MatmulT { bf16 })?);
    }
    Ok(x.matmul(&w.t()?)?)
}

/// `a.matmul(b)` (batched as candle's), in `precision`: under [`MatmulPrecision::Bf16`] f32
/// operands on a GPU are rounded to bf16 and multiplied by cuBLAS with f32 sums, the product
/// returned in f32 (PyTorch's CUDA autocast); otherwise candle's matmul in the operands' dtype.
/// The attention products of the transformer stack's composite path.
pub fn matmul(a: &Tensor, b: &Tensor, precision: MatmulPrecision) -> Result<Tensor> {
    if gpu_bf16(a, &[b], precision) {
        return bf16_product(a, b);
    }
    Ok(a.matmul(b)?)
}

/// True when `precision` is bf16 and `t` and every tensor of `also` are f32 on a GPU: the
/// products then take bf16 operands (cuBLAS bf16 with f32 sums).
fn gpu_bf16(t: &Tensor, also: &[&Tensor], precision: MatmulPrecision) -> bool {
    precision == MatmulPrecision::Bf16
        && t.device().is_cuda()
        && t.dtype() == DType::F32
        && also.iter().all(|a| a.dtype() == DType::F32)
}

/// `a.matmul(b)` with both operands cast to bf16 and the product cast back to f32; the casts
/// are differentiable (the gradients come back in f32, the backward products in bf16).
fn bf16_product(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.to_dtype(DType::BF16)?
        .matmul(&b.to_dtype(DType::BF16)?)?
        .to_dtype(DType::F32)?)
}

/// The cross-entropy of a linear layer's logits `x W^T + b` (`x` (n, k), `w` (c, k), `b`
/// (c)) against class indices, averaged over rows, and each row's arg-max class (the
/// prediction, for accuracy).
///
/// With f32 operands on the CPU it is one op, products in `precision` as [`matmul_t`], whose
/// (n, c) logits never become a tensor of the graph: for a wide vocabulary (BERT's MLM head)
/// that saves the bias broadcast's backward and the gradient bookkeeping of the logits. Its
/// forward keeps the softmax's exponentials, which its backward turns into the logits'
/// gradient in place, so that path allows one backward per forward (a second is an error).
/// Elsewhere it is [`matmul_t`], a broadcast add and [`cross_entropy`], which it is tested
/// against.
///
/// With a `sink` the one-op path adds the weight variable's gradient to the sink's cell for it
/// ([`GradSink::cell`]; see [`embedding_sum`] for the tied word table).
pub fn linear_cross_entropy(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    targets: &Tensor,
    precision: MatmulPrecision,
    sink: Option<&GradSink>,
) -> Result<(Tensor, Vec<u32>)> {
    let cpu_f32 = on_cpu_f32(x, &[w])
        && b.is_none_or(|b| b.dtype() == DType::F32)
        && x.rank() == 2
        && w.rank() == 2;
    if !cpu_f32 {
        let mut logits = matmul_t(x, w, precision)?;
        if let Some(b) = b {
            logits = logits.broadcast_add(b)?;
        }
        let argmax = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        return Ok((cross_entropy(&logits, targets)?, argmax));
    }
    let bias = match b {
        Some(b) => b.contiguous()?,
        None => Tensor::zeros(w.dim(0)?, DType::F32, w.device())?,
    };
    let bf16 = precision == MatmulPrecision::Bf16 && crate::nn::bf16_matmul_available();
    let mut op = ssl_kernels::LinearCrossEntropyOp::new(
        targets
            .to_dtype(DType::U32)?
            .flatten_all()?
            .to_vec1::<u32>()?,
        bf16,
    );
    let w = w.contiguous()?;
    if let Some(cell) = sink.and_then(|s| s.cell(&w)) {
        op = op.weight_grad_to(cell);
    }
    let argmax = op.argmax_cell();
    let loss = x.contiguous()?.apply_op3(&w, &bias, op)?;
    let argmax = std::mem::take(
        &mut *argmax
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    Ok((loss, argmax))
}

/// [`cross_entropy`] from candle ops (any device and dtype).
pub fn cross_entropy_composite(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = log_softmax_last_dim(logits)?;
    let picked = logp.gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
    Ok(picked.neg()?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn finite_diff_check(f: impl Fn(&Tensor) -> Result<Tensor>, x0: Vec<f64>, shape: &[usize]) {
        let dev = Device::Cpu;
        let x = Var::from_vec(x0.clone(), shape, &dev).unwrap();
        let y = f(x.as_tensor()).unwrap();
        // Weighted sum so every output element matters.
        let w: Vec<f64> = (0..y.elem_count())
            .map(|i| ((i * 7 % 11) as f64) / 5.0 - 1.0)
            .collect();
        let w = Tensor::from_vec(w, y.shape(), &dev).unwrap();
        let loss = (y * &w).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let g = grads
            .get(x.as_tensor())
            .expect("no gradient")
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let h = 1e-6;
        for i in 0..x0.len() {
            let eval = |d: f64| {
                let mut xs = x0.clone();
                xs[i] += d;
                let t = Tensor::from_vec(xs, shape, &dev).unwrap();
                (f(&t).unwrap() * &w)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let num = (eval(h) - eval(-h)) / (2.0 * h);
            assert!(
                (num - g[i]).abs() < 1e-6 * (1.0 + num.abs()),
                "element {i}: analytic {} numeric {num}",
                g[i]
            );
        }
    }

    fn data(n: usize) -> Vec<f64> {
        (0..n).map(|i| ((i * 37 % 17) as f64) / 7.0 - 1.1).collect()
    }

    #[test]
    fn softmax_gradient_matches_finite_differences() {
        finite_diff_check(softmax_last_dim, data(12), &[3, 4]);
        finite_diff_check(softmax_last_dim_fused, data(12), &[3, 4]);
        finite_diff_check(log_softmax_last_dim, data(12), &[3, 4]);
    }

    #[test]
    fn gpu_layer_norm_op_matches_the_composite_and_finite_differences() {
        // The op the GPU path takes (its CPU forward here): gradients of input, weight and
        // bias against finite differences in f64, and values and gradients against the
        // composite in f32.
        let dev = Device::Cpu;
        let w = Tensor::from_vec(vec![1.5f64, -0.5, 2.0, 0.7], 4, &dev).unwrap();
        let b = Tensor::from_vec(vec![0.1f64, 0.2, -0.3, 0.0], 4, &dev).unwrap();
        finite_diff_check(|x| layer_norm_fused(x, &w, &b, 1e-5), data(12), &[3, 4]);
        let x = Tensor::from_vec(data(12), (3, 4), &dev).unwrap();
        finite_diff_check(
            |w| layer_norm_fused(&x, w, &b, 1e-5),
            vec![1.5, -0.5, 2.0, 0.7],
            &[4],
        );
        finite_diff_check(
            |b| layer_norm_fused(&x, &w, b, 1e-5),
            vec![0.1, 0.2, -0.3, 0.0],
            &[4],
        );
        let v: Vec<f32> = data(2 * 3 * 8)
            .iter()
            .map(|&x| x as f32 * 2.0 + 0.5)
            .collect();
        let run = |f: fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>| {
            let x = Var::from_vec(v.clone(), (2, 3, 8), &dev).unwrap();
            let w = Var::from_vec((0..8).map(|i| 1.0 + i as f32 * 0.1).collect(), 8, &dev).unwrap();
            let b = Var::from_vec((0..8).map(|i| i as f32 * -0.05).collect(), 8, &dev).unwrap();
            let y = f(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-6).unwrap();
            let c: Vec<f32> = (0..48).map(|i| ((i * 7 % 11) as f32) / 5.0 - 1.0).collect();
            let c = Tensor::from_vec(c, (2, 3, 8), &dev).unwrap();
            let grads = (&y * &c).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let mut out = flat(&y);
            for var in [&x, &w, &b] {
                out.extend(flat(grads.get(var.as_tensor()).expect("no gradient")));
            }
            out
        };
        let (a, f) = (run(layer_norm_composite), run(layer_norm_fused));
        for (p, q) in a.iter().zip(&f) {
            assert!(
                (p - q).abs() < 1e-5 * (1.0 + p.abs()),
                "composite {p} fused {q}"
            );
        }
    }

    #[test]
    fn fused_softmax_matches_the_composite_in_value_and_gradient() {
        // The op the GPU path takes (its CPU forward here), against the composite, f32 and a
        // row of large values; the gradient through a weighted sum of the outputs.
        let dev = Device::Cpu;
        let mut v: Vec<f32> = data(40).iter().map(|&x| x as f32 * 3.0).collect();
        v[5] = 80.0;
        v[6] = 79.5;
        for f in [softmax_last_dim_composite, softmax_last_dim_fused] {
            let x = Var::from_vec(v.clone(), (2, 4, 5), &dev).unwrap();
            let y = f(x.as_tensor()).unwrap();
            let sums = y.sum(D::Minus1).unwrap().flatten_all().unwrap();
            for s in sums.to_vec1::<f32>().unwrap() {
                assert!((s - 1.0).abs() < 1e-6, "row sums to {s}");
            }
        }
        let run = |f: fn(&Tensor) -> Result<Tensor>| {
            let x = Var::from_vec(v.clone(), (2, 4, 5), &dev).unwrap();
            let y = f(x.as_tensor()).unwrap();
            let w: Vec<f32> = (0..40).map(|i| ((i * 7 % 11) as f32) / 5.0 - 1.0).collect();
            let w = Tensor::from_vec(w, (2, 4, 5), &dev).unwrap();
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let g = g.get(x.as_tensor()).expect("no gradient").clone();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (flat(&y), flat(&g))
        };
        let (y0, g0) = run(softmax_last_dim_composite);
        let (y1, g1) = run(softmax_last_dim_fused);
        for (a, b) in y0.iter().zip(&y1).chain(g0.iter().zip(&g1)) {
            assert!((a - b).abs() < 1e-6, "composite {a} fused {b}");
        }
        assert!(g1.iter().any(|g| g.abs() > 1e-3), "the gradient is cut");
    }

    #[test]
    fn layer_norm_gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let w = Tensor::from_vec(vec![1.5f64, -0.5, 2.0, 0.7], 4, &dev).unwrap();
        let b = Tensor::from_vec(vec![0.1f64, 0.2, -0.3, 0.0], 4, &dev).unwrap();
        finite_diff_check(|x| layer_norm(x, &w, &b, 1e-5), data(12), &[3, 4]);
    }

    /// The fused f32 layer norm against the composite one in f64: output and the gradients of
    /// input, weight and bias, over widths that are and are not multiples of the vector width
    /// and more rows than one parallel task takes (so the column sums are reduced across tasks).
    #[test]
    fn fused_layer_norm_matches_the_composite_in_f64() {
        let dev = Device::Cpu;
        for (rows, d) in [(6, 37), (500, 300), (4, 16)] {
            let mut rng = SslRng::new(d as u64);
            let xv: Vec<f32> = (0..rows * d).map(|_| rng.normal() * 2.0 + 0.5).collect();
            let wv: Vec<f32> = (0..d).map(|_| 1.0 + 0.3 * rng.normal()).collect();
            let bv: Vec<f32> = (0..d).map(|_| 0.1 * rng.normal()).collect();
            let gv: Vec<f32> = (0..rows * d).map(|_| rng.normal()).collect();
            let run = |dtype: DType, fused: bool| -> Vec<Vec<f64>> {
                let v = |data: &[f32], shape: &[usize]| {
                    candle_core::Var::from_tensor(
                        &Tensor::from_vec(data.to_vec(), shape, &dev)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap(),
                    )
                    .unwrap()
                };
                let (x, w, b) = (v(&xv, &[2, rows / 2, d]), v(&wv, &[d]), v(&bv, &[d]));
                let g = Tensor::from_vec(gv.clone(), (2, rows / 2, d), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let y = if fused {
                    layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap()
                } else {
                    layer_norm_composite(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-5).unwrap()
                };
                let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let flat = |t: &Tensor| -> Vec<f64> {
                    t.flatten_all()
                        .unwrap()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                };
                vec![
                    flat(&y),
                    flat(grads.get(x.as_tensor()).unwrap()),
                    flat(grads.get(w.as_tensor()).unwrap()),
                    flat(grads.get(b.as_tensor()).unwrap()),
                ]
            };
            let fused = run(DType::F32, true);
            let reference = run(DType::F64, false);
            for (name, (a, r)) in ["y", "dx", "dw", "db"]
                .iter()
                .zip(fused.iter().zip(&reference))
            {
                let scale = r.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
                let err = a.iter().zip(r).fold(0f64, |m, (p, q)| m.max((p - q).abs()));
                assert!(
                    err < 1e-5 * scale * (rows as f64).sqrt(),
                    "({rows}, {d}) {name}: max error {err}, scale {scale}"
                );
            }
        }
    }

    #[test]
    fn activations_gradients_match_finite_differences() {
        for a in [Activation::GeluErf, Activation::GeluTanh] {
            finite_diff_check(|x| a.forward(x), data(10), &[10]);
        }
    }

    #[test]
    fn softmax_rows_sum_to_one_and_handle_large_values() {
        let x = Tensor::new(&[[1000f32, 1001., 999.], [-5., 0., 5.]], &Device::Cpu).unwrap();
        let s = softmax_last_dim(&x)
            .unwrap()
            .sum(1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for v in s {
            assert!((v - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn dropout_rate_and_scale() {
        let mut rng = SslRng::new(0);
        let x = Tensor::ones(10_000, DType::F32, &Device::Cpu).unwrap();
        let y = dropout(&x, 0.25, true, &mut rng)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let zeros = y.iter().filter(|v| **v == 0.0).count() as f64 / 10_000.0;
        assert!((zeros - 0.25).abs() < 0.02, "{zeros}");
        let mean = y.iter().sum::<f32>() / 10_000.0;
        assert!((mean - 1.0).abs() < 0.03, "{mean}");
        let same = dropout(&x, 0.25, false, &mut rng).unwrap();
        assert_eq!(same.to_vec1::<f32>().unwrap(), vec![1.0; 10_000]);
    }

    /// The gradients of `sum(y * w)` (a loss that weighs every output differently).
    fn weighted_grads(y: Tensor, w: &Tensor) -> candle_core::backprop::GradStore {
        (y * w).unwrap().sum_all().unwrap().backward().unwrap()
    }

    /// The largest absolute difference between `a` and `b` (same shape).
    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
        d.max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// The gradients of `3 * l32` (f32) and `3 * l64` (f64) agree within `tol` for each
    /// (f32 variable, f64 variable, name).
    fn assert_grads_close(l32: &Tensor, l64: &Tensor, vars: &[(&Var, &Var, &str)], tol: f64) {
        let g32 = (l32 * 3.0).unwrap().backward().unwrap();
        let g64 = (l64 * 3.0).unwrap().backward().unwrap();
        for (v32, v64, what) in vars {
            let p = g32.get(v32.as_tensor()).unwrap().flatten_all().unwrap();
            let q = g64.get(v64.as_tensor()).unwrap().flatten_all().unwrap();
            let (p, q) = (p.to_vec1::<f32>().unwrap(), q.to_vec1::<f64>().unwrap());
            for (p, q) in p.iter().zip(q) {
                assert!((f64::from(*p) - q).abs() < tol, "d{what}: {p} vs {q}");
            }
        }
    }

    #[test]
    fn fused_cross_entropy_matches_the_f64_composite() {
        let dev = Device::Cpu;
        let (n, c) = (7, 11);
        let mut rng = SslRng::new(4);
        let x32 = Var::from_vec(rng.normal_vec(n * c, 0.0, 3.0), (n, c), &dev).unwrap();
        let t = Tensor::new(&[0u32, 10, 3, 3, 5, 9, 1], &dev).unwrap();
        let x64 = Var::from_tensor(&x32.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
        let l32 = cross_entropy(x32.as_tensor(), &t).unwrap();
        let l64 = cross_entropy(x64.as_tensor(), &t).unwrap();
        let (a, b) = (
            f64::from(l32.to_scalar::<f32>().unwrap()),
            l64.to_scalar::<f64>().unwrap(),
        );
        assert!((a - b).abs() < 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
        assert_grads_close(&l32, &l64, &[(&x32, &x64, "x")], 1e-6);
        let bad = Tensor::new(&[0u32, 11, 0, 0, 0, 0, 0], &dev).unwrap();
        let err = cross_entropy(x32.as_tensor(), &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("target 11 in row 1"), "{err}");
    }

    #[test]
    fn fused_linear_cross_entropy_matches_the_f64_composite() {
        let dev = Device::Cpu;
        // More rows than one parallel task, classes not a multiple of the vector width.
        let (n, k, c) = (37, 9, 23);
        let mut rng = SslRng::new(5);
        let x32 = Var::from_vec(rng.normal_vec(n * k, 0.0, 1.0), (n, k), &dev).unwrap();
        let w32 = Var::from_vec(rng.normal_vec(c * k, 0.0, 1.0), (c, k), &dev).unwrap();
        let b32 = Var::from_vec(rng.normal_vec(c, 0.0, 1.0), c, &dev).unwrap();
        let t: Vec<u32> = (0..n).map(|i| (i * 7 % c) as u32).collect();
        let t = Tensor::new(t.as_slice(), &dev).unwrap();
        let to64 =
            |v: &Var| Var::from_tensor(&v.as_tensor().to_dtype(DType::F64).unwrap()).unwrap();
        let (x64, w64, b64) = (to64(&x32), to64(&w32), to64(&b32));
        let f32_run = linear_cross_entropy(
            x32.as_tensor(),
            w32.as_tensor(),
            Some(b32.as_tensor()),
            &t,
            MatmulPrecision::F32,
            None,
        )
        .unwrap();
        let f64_run = linear_cross_entropy(
            x64.as_tensor(),
            w64.as_tensor(),
            Some(b64.as_tensor()),
            &t,
            MatmulPrecision::F32,
            None,
        )
        .unwrap();
        assert_eq!(f32_run.1, f64_run.1, "arg-max classes");
        let (a, b) = (
            f64::from(f32_run.0.to_scalar::<f32>().unwrap()),
            f64_run.0.to_scalar::<f64>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "{a} vs {b}");
        let pairs = [(&x32, &x64, "x"), (&w32, &w64, "w"), (&b32, &b64, "b")];
        assert_grads_close(&f32_run.0, &f64_run.0, &pairs, 1e-5);
        // The saved exponentials became the logits' gradient: a second backward is refused,
        // saying why.
        let again = f32_run.0.backward().unwrap_err().to_string();
        assert!(again.contains("second backward"), "{again}");
        // Without a bias, and a target out of range.
        let (nb, _) = linear_cross_entropy(
            x32.as_tensor(),
            w32.as_tensor(),
            None,
            &t,
            MatmulPrecision::F32,
            None,
        )
        .unwrap();
        let logits = x32
            .as_tensor()
            .matmul(&w32.as_tensor().t().unwrap())
            .unwrap();
        let want = cross_entropy(&logits, &t)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((nb.to_scalar::<f32>().unwrap() - want).abs() < 1e-5);
        let bad: Vec<u32> = (0..n as u32)
            .map(|i| if i == 4 { c as u32 } else { 0 })
            .collect();
        let bad = Tensor::new(bad.as_slice(), &dev).unwrap();
        let err = linear_cross_entropy(
            x32.as_tensor(),
            w32.as_tensor(),
            None,
            &bad,
            MatmulPrecision::F32,
            None,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("target 23 in row 4"), "{err}");
    }

    /// The f32 CPU linear product (one op) against candle's matmul by the transposed weight:
    /// the same values and gradients, with the input a variable, and with it outside the
    /// graph (the op then skips the input's gradient; the weight's is still right); an empty
    /// batch too; and a weight outside the graph gets none while the input's is right.
    #[test]
    fn matmul_t_matches_candle_in_value_and_gradient() {
        let dev = Device::Cpu;
        let mut rng = SslRng::new(4);
        {
            let x = Var::from_vec(rng.normal_vec(6, 0.0, 1.0), (2, 3), &dev).unwrap();
            let w = Tensor::from_vec(rng.normal_vec(12, 0.0, 1.0), (4, 3), &dev).unwrap();
            let y = matmul_t(x.as_tensor(), &w, MatmulPrecision::F32).unwrap();
            let g = y.sum_all().unwrap().backward().unwrap();
            assert!(
                g.get(&w).is_none(),
                "a weight outside the graph got a gradient"
            );
            let want = w
                .sum(0)
                .unwrap()
                .unsqueeze(0)
                .unwrap()
                .repeat((2, 1))
                .unwrap();
            let d = (g.get(x.as_tensor()).unwrap() - want)
                .unwrap()
                .abs()
                .unwrap();
            let d = d
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-6, "input gradient with a frozen weight: {d}");
        }
        for (m, n, k, x_var) in [(37, 19, 23, true), (37, 19, 23, false), (0, 5, 3, true)] {
            let xv = rng.normal_vec(m * k, 0.0, 1.0);
            let x = Var::from_vec(xv.clone(), (m, k), &dev).unwrap();
            let x_plain = Tensor::from_vec(xv, (m, k), &dev).unwrap();
            let w = Var::from_vec(rng.normal_vec(n * k, 0.0, 1.0), (n, k), &dev).unwrap();
            let g = Tensor::from_vec(rng.normal_vec(m * n, 0.0, 1.0), (m, n), &dev).unwrap();
            let xin = if x_var { x.as_tensor() } else { &x_plain };
            let ours = matmul_t(xin, w.as_tensor(), MatmulPrecision::F32).unwrap();
            let theirs = xin.matmul(&w.as_tensor().t().unwrap()).unwrap();
            assert_eq!(ours.dims(), [m, n]);
            let close = |a: &Tensor, b: &Tensor, what: &str| {
                assert_eq!(a.dims(), b.dims(), "{what}");
                if a.elem_count() > 0 {
                    let d = max_abs_diff(a, b);
                    assert!(d < 1e-5, "{what} ({m}, {n}, {k}): {d}");
                }
            };
            close(&ours, &theirs, "values");
            let g1 = weighted_grads(ours, &g);
            let g2 = weighted_grads(theirs, &g);
            close(
                g1.get(w.as_tensor()).unwrap(),
                g2.get(w.as_tensor()).unwrap(),
                "weight gradient",
            );
            if x_var {
                close(
                    g1.get(x.as_tensor()).unwrap(),
                    g2.get(x.as_tensor()).unwrap(),
                    "input gradient",
                );
            }
        }
    }

    /// The one-op embedding sum against candle's lookups and adds: the same values and the
    /// same gradients of the three tables, repeated ids included; a bad id is refused.
    #[test]
    fn embedding_sum_matches_candle_in_value_and_gradient() {
        let dev = Device::Cpu;
        let mut rng = SslRng::new(8);
        let (v, p, s, d, b, t) = (11, 9, 2, 5, 3, 4);
        let word = Var::from_vec(rng.normal_vec(v * d, 0.0, 1.0), (v, d), &dev).unwrap();
        let pos = Var::from_vec(rng.normal_vec(p * d, 0.0, 1.0), (p, d), &dev).unwrap();
        let tt = Var::from_vec(rng.normal_vec(s * d, 0.0, 1.0), (s, d), &dev).unwrap();
        let ids = Tensor::new(&[[1u32, 3, 3, 10], [0, 1, 1, 1], [7, 7, 2, 0]], &dev).unwrap();
        let types = Tensor::new(&[[0u32, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 1]], &dev).unwrap();
        let g = Tensor::from_vec(rng.normal_vec(b * t * d, 0.0, 1.0), (b, t, d), &dev).unwrap();
        let ours = embedding_sum(&word, &pos, &tt, &ids, &types, None).unwrap();
        let theirs = embedding_sum_composite(&word, &pos, &tt, &ids, &types).unwrap();
        // The same sums in the same order: (word + position) + token type.
        assert_eq!(max_abs_diff(&ours, &theirs), 0.0);
        let g1 = weighted_grads(ours, &g);
        let g2 = weighted_grads(theirs, &g);
        for table in [&word, &pos, &tt] {
            let (a, b) = (g1.get(table).unwrap(), g2.get(table).unwrap());
            assert!(max_abs_diff(a, b) < 1e-5, "{:?}", table.dims());
        }
        let bad = Tensor::new(&[[11u32, 0, 0, 0]], &dev).unwrap();
        let types1 = Tensor::new(&[[0u32, 0, 0, 0]], &dev).unwrap();
        let err = embedding_sum(&word, &pos, &tt, &bad, &types1, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("word id 11"), "{err}");
    }

    /// A word table that the embedding and the fused loss both read (BERT's tied decoder):
    /// with a sink its gradient, and the other tables', wait in the sink's cells, outside
    /// candle's store, until the drain hands them over equal to the graph's; a second drain
    /// adds nothing.
    #[test]
    fn a_sink_gathers_a_tied_tables_gradient_in_one_cell() {
        let dev = Device::Cpu;
        let mut rng = SslRng::new(10);
        let (v, p, s, d, b, t) = (11, 9, 2, 5, 3, 4);
        let mut var = |dims: (usize, usize)| {
            Var::from_vec(rng.normal_vec(dims.0 * dims.1, 0.0, 1.0), dims, &dev).unwrap()
        };
        let (word, pos, tt, proj) = (var((v, d)), var((p, d)), var((s, d)), var((d, d)));
        let ids = Tensor::new(&[[1u32, 3, 3, 10], [0, 1, 1, 1], [7, 7, 2, 0]], &dev).unwrap();
        let types = Tensor::new(&[[0u32, 0, 1, 1], [1, 1, 1, 1], [0, 1, 0, 1]], &dev).unwrap();
        let targets: Vec<u32> = (0..b * t).map(|i| (i * 5 % v) as u32).collect();
        let targets = Tensor::new(targets.as_slice(), &dev).unwrap();
        let loss = |sink: Option<&GradSink>| {
            let e = embedding_sum(&word, &pos, &tt, &ids, &types, sink).unwrap();
            let h = e.reshape((b * t, d)).unwrap().matmul(&proj).unwrap();
            let h = h.tanh().unwrap();
            let f32 = MatmulPrecision::F32;
            linear_cross_entropy(&h, &word, None, &targets, f32, sink)
                .unwrap()
                .0
        };
        let plain = loss(None).backward().unwrap();
        let sink = GradSink::new();
        let mut sunk = loss(Some(&sink)).backward().unwrap();
        for table in [&word, &pos, &tt] {
            assert!(
                sunk.get(table).is_none(),
                "{:?} not in the sink",
                table.dims()
            );
        }
        assert!(sunk.get(&proj).is_some());
        let vars = [
            (&word, "word"),
            (&pos, "position"),
            (&tt, "type"),
            (&proj, "proj"),
        ];
        for _drain in 0..2 {
            sink.drain_into(&mut sunk).unwrap();
            for (var, name) in vars {
                let (a, b) = (plain.get(var).unwrap(), sunk.get(var).unwrap());
                assert!(max_abs_diff(a, b) < 1e-6, "{name}");
            }
        }
        // One cell holds both of the word table's shares, the loss's and the embedding's.
        let sink = GradSink::new();
        loss(Some(&sink)).backward().unwrap();
        let cell = sink.cell(&word).unwrap().take().unwrap();
        let want = plain.get(&word).unwrap().flatten_all().unwrap();
        let want = want.to_vec1::<f32>().unwrap();
        assert_eq!(cell.len(), want.len());
        assert!(cell.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6));
    }

    #[test]
    fn add_broadcast_matches_candle_in_value_and_gradient() {
        let dev = Device::Cpu;
        let mut rng = SslRng::new(9);
        // Suffix shapes with and without leading 1s, a plain bias, and a shape candle must
        // handle itself (a middle dimension broadcast).
        for (xs, ys) in [
            (vec![3usize, 5, 7], vec![1usize, 5, 7]),
            (vec![3, 5, 7], vec![7]),
            (vec![70, 9], vec![9]),
            (vec![3, 5, 7], vec![3, 1, 7]),
        ] {
            let nx: usize = xs.iter().product();
            let ny: usize = ys.iter().product();
            let x = Var::from_vec(rng.normal_vec(nx, 0.0, 1.0), xs.as_slice(), &dev).unwrap();
            let y = Var::from_vec(rng.normal_vec(ny, 0.0, 1.0), ys.as_slice(), &dev).unwrap();
            let w = Tensor::from_vec(rng.normal_vec(nx, 0.0, 1.0), xs.as_slice(), &dev).unwrap();
            let ours = add_broadcast(x.as_tensor(), y.as_tensor()).unwrap();
            let theirs = x.as_tensor().broadcast_add(y.as_tensor()).unwrap();
            assert_eq!(max_abs_diff(&ours, &theirs), 0.0, "{xs:?} + {ys:?}");
            let g1 = weighted_grads(ours, &w);
            let g2 = weighted_grads(theirs, &w);
            for v in [&x, &y] {
                let a = g1.get(v.as_tensor()).unwrap();
                let b = g2.get(v.as_tensor()).unwrap();
                assert!(max_abs_diff(a, b) < 1e-5, "{xs:?} + {ys:?}");
            }
        }
    }

    #[test]
    fn fused_masked_mean_matches_candle_in_value_and_gradient() {
        let dev = Device::Cpu;
        let mut rng = SslRng::new(11);
        let (b, t, d) = (3, 5, 19);
        let x = Var::from_vec(rng.normal_vec(b * t * d, 0.0, 1.0), (b, t, d), &dev).unwrap();
        // A full row, a partial one and an empty one (zeros out, zero gradient).
        let m = Tensor::new(
            &[
                [1f32, 1., 1., 1., 1.],
                [1., 0., 1., 0., 0.],
                [0., 0., 0., 0., 0.],
            ],
            &dev,
        )
        .unwrap();
        let w = Tensor::from_vec(rng.normal_vec(b * d, 0.0, 1.0), (b, d), &dev).unwrap();
        let ours = masked_mean(x.as_tensor(), Some(&m)).unwrap();
        let mm = m.unsqueeze(2).unwrap();
        let theirs = x
            .as_tensor()
            .broadcast_mul(&mm)
            .unwrap()
            .sum(1)
            .unwrap()
            .broadcast_div(&mm.sum(1).unwrap().clamp(1.0, f64::INFINITY).unwrap())
            .unwrap();
        assert!(max_abs_diff(&ours, &theirs) < 1e-6);
        let g1 = weighted_grads(ours, &w);
        let g2 = weighted_grads(theirs, &w);
        let (a, c) = (
            g1.get(x.as_tensor()).unwrap(),
            g2.get(x.as_tensor()).unwrap(),
        );
        assert!(max_abs_diff(a, c) < 1e-6);
    }

    #[test]
    fn cross_entropy_matches_hand_computation() {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[2f32, 0., -1.], [0., 0., 0.]], &dev).unwrap();
        let t = Tensor::new(&[0u32, 2], &dev).unwrap();
        let ce = cross_entropy(&logits, &t)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let l0 = -(2f32.exp() / (2f32.exp() + 1.0 + (-1f32).exp())).ln();
        let l1 = 3f32.ln();
        assert!((ce - (l0 + l1) / 2.0).abs() < 1e-5);
    }
}
