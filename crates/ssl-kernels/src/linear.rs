//! `x W^T` as one CPU op with its own backward: the linear layers outside the fused stack. In
//! f32 it replaces candle's matmul of `x` by a transposed view of `W`, whose backward takes two
//! more graph nodes (the transpose, then a strided add into `W`'s gradient); in bf16 (under
//! `ssl_core::nn::MatmulPrecision::Bf16`) the forward and backward products take the bf16
//! path: BERT's tied MLM decoder, 8000 words wide.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor};

use super::gemm::{product, MatRef, Op};

/// The op: `x` (m, k) times `w` (n, k) transposed gives (m, n); with `bf16`, products in
/// bf16 with f32 sums where [`crate::linear_takes_bf16`] says so, f32 otherwise.
#[derive(Debug, Clone, Copy)]
pub struct MatmulT {
    /// Whether the products (forward and backward) may take the bf16 path.
    pub bf16: bool,
}

fn matrix<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<(&'a [f32], usize, usize)> {
    let (r, c) = l.shape().dims2()?;
    Ok((super::f32_slice(s, l, "linear", what)?, r, c))
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
        candle_core::bail!("linear: input ({m}, {k}) against weight ({n}, {k2})");
    }
    Ok((MatRef::dense(x, m, k), MatRef::dense(w, n, k)))
}

/// The gradients of `y = x W^T` (`x` (m, k), `w` (n, k)) for the output gradient `g` (m, n):
/// `dx = g W` (m, k) and `dW = g^T x` (n, k), products in bf16 when `bf16` and
/// [`crate::linear_takes_bf16`]'s size rule allows.
pub(crate) fn input_and_weight_grads(
    g: MatRef,
    x: MatRef,
    w: MatRef,
    bf16: bool,
) -> (Vec<f32>, Vec<f32>) {
    (product(g, Op::N, w, Op::N, bf16), weight_grad(g, x, bf16))
}

/// `dW = g^T x` (n, k) of `y = x W^T` for the output gradient `g` (m, n) and `x` (m, k).
fn weight_grad(g: MatRef, x: MatRef, bf16: bool) -> Vec<f32> {
    product(g, Op::T, x, Op::N, bf16)
}

impl CustomOp2 for MatmulT {
    fn name(&self) -> &'static str {
        if self.bf16 {
            "bf16-matmul-t"
        } else {
            "matmul-t"
        }
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = operands(xs, xl, ws, wl)?;
        let y = product(x, Op::N, w, Op::T, self.bf16);
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
            candle_core::bail!("linear: inputs left the CPU");
        };
        let (xm, wm) = operands(xc, xl, wc, wl)?;
        let (gv, m, n) = matrix(gc, gl, "the gradient")?;
        if (m, n) != (xm.rows, wm.rows) {
            candle_core::bail!(
                "linear: gradient ({m}, {n}) for output ({}, {})",
                xm.rows,
                wm.rows
            );
        }
        let k = xm.cols;
        let g = MatRef::dense(gv, m, n);
        // An operand outside the graph (pixels, a detached or frozen weight) needs no
        // gradient.
        let dx = x
            .track_op()
            .then(|| product(g, Op::N, wm, Op::N, self.bf16));
        let dw = w.track_op().then(|| weight_grad(g, xm, self.bf16));
        drop((xs, ws, gs));
        Ok((
            dx.map(|dx| Tensor::from_vec(dx, (m, k), x.device()))
                .transpose()?,
            dw.map(|dw| Tensor::from_vec(dw, (n, k), w.device()))
                .transpose()?,
        ))
    }
}
