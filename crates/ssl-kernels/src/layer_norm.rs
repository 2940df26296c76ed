//! Layer normalisation over the last dimension as one CPU op (f32): one vectorised pass
//! forward; backward recomputes the row statistics and takes one pass for the input gradient
//! plus two column sums for the weight and bias, instead of the twenty-odd allocating passes of
//! the composite op's autograd (11.7 ms against 0.6 ms forward for 16 x 128 x 256 on 2
//! threads).

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::simd;

/// The op over `(x, weight, bias)`, `x` of any rank with the normalised features last.
pub struct LayerNormOp {
    /// Added to the variance.
    pub eps: f32,
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    super::f32_slice(s, l, "fused layer norm", what)
}

/// Rows per parallel task for rows of width `d`: about 64 k elements, at least one row.
fn rows_per_task(d: usize) -> usize {
    (65536 / d.max(1)).max(1)
}

/// `y`, `xhat` (empty unless `keep_xhat`) and `rstd` of every row of `x` (rows of width
/// `w.len()`), in parallel.
fn forward(
    x: &[f32],
    w: &[f32],
    b: &[f32],
    eps: f32,
    keep_xhat: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let d = w.len();
    let rows = x.len() / d.max(1);
    let xhat_len = if keep_xhat { x.len() } else { 0 };
    let (mut y, mut xhat, mut rstd) = (vec![0f32; x.len()], vec![0f32; xhat_len], vec![0f32; rows]);
    let per = rows_per_task(d);
    let xhat_blocks = super::row_blocks(&mut xhat, per * d, rows.div_ceil(per));
    y.par_chunks_mut(per * d)
        .zip(xhat_blocks)
        .zip(rstd.par_chunks_mut(per))
        .zip(x.par_chunks(per * d))
        .for_each(|(((yc, hc), rc), xc)| simd::layer_norm(xc, w, b, eps, yc, hc, rc));
    (y, xhat, rstd)
}

fn check(d: usize, xl: &Layout, wl: &Layout, bl: &Layout) -> candle_core::Result<()> {
    let last = xl.shape().dims().last().copied().unwrap_or(0);
    if last != d || wl.shape().elem_count() != d || bl.shape().elem_count() != d {
        candle_core::bail!(
            "layer norm: input {:?} against weight {:?} and bias {:?}",
            xl.shape(),
            wl.shape(),
            bl.shape()
        );
    }
    Ok(())
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            slice(xs, xl, "the input")?,
            slice(ws, wl, "the weight")?,
            slice(bs, bl, "the bias")?,
        );
        check(w.len(), xl, wl, bl)?;
        let (y, _, _) = forward(x, w, b, self.eps, false);
        Ok((CpuStorage::F32(y), xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (Storage::Cpu(xc), Storage::Cpu(wc), Storage::Cpu(bc), Storage::Cpu(gc)) =
            (&*xs, &*ws, &*bs, &*gs)
        else {
            candle_core::bail!("fused layer norm: inputs left the CPU");
        };
        let (xv, wv, bv, dy) = (
            slice(xc, xl, "the input")?,
            slice(wc, wl, "the weight")?,
            slice(bc, bl, "the bias")?,
            slice(gc, gl, "the gradient")?,
        );
        let d = wv.len();
        check(d, xl, wl, bl)?;
        if dy.len() != xv.len() {
            candle_core::bail!(
                "fused layer norm: gradient of {} for {} inputs",
                dy.len(),
                xv.len()
            );
        }
        let (_, xhat, rstd) = forward(xv, wv, bv, self.eps, true);
        let per = rows_per_task(d);
        let mut dx = vec![0f32; xv.len()];
        dx.par_chunks_mut(per * d)
            .zip(dy.par_chunks(per * d))
            .zip(xhat.par_chunks(per * d))
            .zip(rstd.par_chunks(per))
            .for_each(|(((dxc, dyc), hc), rc)| {
                simd::layer_norm_backward(dyc, hc, rc, wv, dxc, false)
            });
        // Weight and bias gradients: column sums of dy * xhat and of dy.
        let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
        super::col_sums_par(&mut db, dy, Some((&mut dw, &xhat)));
        let dev = x.device().clone();
        let (xshape, wshape, bshape) = (x.shape().clone(), w.shape().clone(), b.shape().clone());
        drop((xs, ws, bs, gs));
        Ok((
            Some(Tensor::from_vec(dx, xshape, &dev)?),
            Some(Tensor::from_vec(dw, wshape, &dev)?),
            Some(Tensor::from_vec(db, bshape, &dev)?),
        ))
    }
}
