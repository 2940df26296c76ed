//! `x + y` with `y` repeated over `x`'s leading rows (a bias, a position embedding) as one CPU
//! op: candle's broadcast add takes `y`'s gradient as a strided sum over the repeated
//! dimension, measured at 1.3 ms a step for MAE's (32, 64, 192) position embedding and 8 ms for
//! BERT's (307, 8000) decoder bias; here it is a parallel column sum.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::{col_sums_par, f32_slice, simd};

const OP: &str = "row-broadcast add";

/// The op: `x` (any shape, `rows * width` elements) plus `y` (`width` elements) on every
/// row; the output has `x`'s shape.
pub struct RowBroadcastAdd;

impl CustomOp2 for RowBroadcastAdd {
    fn name(&self) -> &'static str {
        "row-broadcast-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, OP, "the input")?;
        let y = f32_slice(s2, l2, OP, "the added tensor")?;
        let w = y.len();
        if w == 0 || x.len() % w != 0 {
            candle_core::bail!("{OP}: {} elements do not split into rows of {w}", x.len());
        }
        let rows = x.len() / w;
        let per = super::block_rows(rows);
        let mut out = x.to_vec();
        out.par_chunks_mut(per * w)
            .for_each(|c| simd::add_bias(c, y));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let (gs, gl) = g.storage_and_layout();
        let Storage::Cpu(gc) = &*gs else {
            candle_core::bail!("{OP}: the gradient left the CPU");
        };
        let gv = f32_slice(gc, gl, OP, "the gradient")?;
        let mut dy = vec![0f32; y.elem_count()];
        col_sums_par(&mut dy, gv, None);
        drop(gs);
        Ok((
            Some(g.clone()),
            Some(Tensor::from_vec(dy, y.shape(), y.device())?),
        ))
    }
}
