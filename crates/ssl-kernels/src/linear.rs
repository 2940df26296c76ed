//! `x W^T` as one CPU op whose forward and backward products take the bf16 path: the large
//! linear layers outside the fused stack (BERT's tied MLM decoder, 8000 words wide) under
//! `ssl_core::nn::MatmulPrecision::Bf16`. Candle's own matmul, with its f32 backward, serves
//! every other case.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor};

use super::gemm::{matmul, threads, MatRef, Op};

/// The op: `x` (m, k) times `w` (n, k) transposed gives (m, n); products in bf16 with f32
/// sums where [`crate::linear_takes_bf16`] says so, f32 otherwise.
pub struct MatmulTBf16;

fn matrix<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<(&'a [f32], usize, usize)> {
    let (r, c) = l.shape().dims2()?;
    Ok((super::f32_slice(s, l, "bf16 linear", what)?, r, c))
}

fn operands<'a>(
    xs: &'a CpuStorage,
    xl: &Layout,
    ws: &'a CpuStorage,
    wl: &Layout,
) -> candle_core::Result<(MatRef<'a>, MatRef<'a>)> {
    let (x, m, k) = matrix(xs, xl, "the input")?;
    let (w, n, k2) = matrix(ws, wl, "the weight")?;
    if k != k2 {
        candle_core::bail!("bf16 linear: input ({m}, {k}) against weight ({n}, {k2})");
    }
    Ok((MatRef::dense(x, m, k), MatRef::dense(w, n, k)))
}

/// The gradients of `y = x W^T` (`x` (m, k), `w` (n, k)) for the output gradient `g` (m, n):
/// `dx = g W` (m, k) and `dW = g^T x` (n, k), products in bf16 when `bf16` and [`matmul`]'s
/// size rule allows.
pub(crate) fn input_and_weight_grads(
    g: MatRef,
    x: MatRef,
    w: MatRef,
    bf16: bool,
) -> (Vec<f32>, Vec<f32>) {
    let (m, n, k) = (g.rows, g.cols, x.cols);
    let mut dx = vec![0f32; m * k];
    matmul(&mut dx, k, g, Op::N, w, Op::N, 1.0, false, threads(), bf16);
    let mut dw = vec![0f32; n * k];
    matmul(&mut dw, k, g, Op::T, x, Op::N, 1.0, false, threads(), bf16);
    (dx, dw)
}

impl CustomOp2 for MatmulTBf16 {
    fn name(&self) -> &'static str {
        "bf16-matmul-t"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = operands(xs, xl, ws, wl)?;
        let mut y = vec![0f32; x.rows * w.rows];
        matmul(
            &mut y,
            w.rows,
            x,
            Op::N,
            w,
            Op::T,
            1.0,
            false,
            threads(),
            true,
        );
        Ok((CpuStorage::F32(y), Shape::from((x.rows, w.rows))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (Storage::Cpu(xc), Storage::Cpu(wc), Storage::Cpu(gc)) = (&*xs, &*ws, &*gs) else {
            candle_core::bail!("bf16 linear: inputs left the CPU");
        };
        let (xm, wm) = operands(xc, xl, wc, wl)?;
        let (gv, m, n) = matrix(gc, gl, "the gradient")?;
        if (m, n) != (xm.rows, wm.rows) {
            candle_core::bail!(
                "bf16 linear: gradient ({m}, {n}) for output ({}, {})",
                xm.rows,
                wm.rows
            );
        }
        let k = xm.cols;
        let (dx, dw) = input_and_weight_grads(MatRef::dense(gv, m, n), xm, wm, true);
        drop((xs, ws, gs));
        Ok((
            Some(Tensor::from_vec(dx, (m, k), x.device())?),
            Some(Tensor::from_vec(dw, (n, k), w.device())?),
        ))
    }
}
