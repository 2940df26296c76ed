//! MAE's decoder input as one CPU op: the embedded visible tokens and the mask token put back
//! in patch order, positions added. The composite (narrow, broadcast, two concatenations, a
//! gather and a broadcast add) is eight graph nodes of the decoder's full size, each paying
//! candle's gradient bookkeeping; this is one.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

/// `x` (B, 1 + K, D) (class token first, then the K visible tokens in shuffled order) and the
/// mask token (1, 1, D) to (B, 1 + L, D): row 0 is `x`'s class token, row `1 + p` is the
/// visible token of patch `p` or the mask token when `p` is masked; plus `pos` (1 + L, D).
pub(crate) struct DecoderInputOp {
    /// `ids_restore`, flattened: `restore[b * L + p]` is patch `p`'s position in the shuffled
    /// order (visible when below K).
    pub restore: Vec<u32>,
    /// Patches per image L.
    pub patches: usize,
    /// The positions (1 + L, D), row-major.
    pub pos: Vec<f32>,
}

impl DecoderInputOp {
    /// The source of output row `1 + p` of image `b`: `Some(row of x)` or `None` (the mask
    /// token), for `k` visible tokens.
    fn source(&self, b: usize, p: usize, k: usize) -> Option<usize> {
        let j = self.restore[b * self.patches + p] as usize;
        (j < k).then_some(1 + j)
    }

    /// Checks the shapes: `x` (B, 1 + K, D), the token (D values), the restore table and the
    /// positions; returns (B, 1 + K, D).
    fn dims(&self, x: &Shape, token_len: usize) -> candle_core::Result<(usize, usize, usize)> {
        let (b, n, d) = x.dims3()?;
        let l = self.patches;
        if n == 0 || n > l + 1 || token_len != d || self.restore.len() != b * l {
            candle_core::bail!(
                "MAE decoder input: tokens {:?}, mask token of {token_len}, {} restore ids for \
                 {l} patches do not fit",
                x.dims(),
                self.restore.len()
            );
        }
        if let Some(bad) = self.restore.iter().find(|&&j| j as usize >= l) {
            candle_core::bail!("MAE decoder input: restore id {bad} for {l} patches");
        }
        if self.pos.len() != (l + 1) * d {
            candle_core::bail!("MAE decoder input: positions do not fit ({l} + 1, {d})");
        }
        Ok((b, n, d))
    }
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("MAE decoder input: {what} must be f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("MAE decoder input: {what} must be contiguous"),
    }
}

impl CustomOp2 for DecoderInputOp {
    fn name(&self) -> &'static str {
        "mae-decoder-input"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ts: &CpuStorage,
        tl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, token) = (slice(xs, xl, "tokens")?, slice(ts, tl, "the mask token")?);
        let (b, n, d) = self.dims(xl.shape(), token.len())?;
        let l = self.patches;
        let mut out = Vec::with_capacity(b * (l + 1) * d);
        for i in 0..b {
            let xi = &x[i * n * d..(i + 1) * n * d];
            for r in 0..=l {
                let src = if r == 0 {
                    &xi[..d]
                } else {
                    match self.source(i, r - 1, n - 1) {
                        Some(j) => &xi[j * d..(j + 1) * d],
                        None => token,
                    }
                };
                let pos = &self.pos[r * d..(r + 1) * d];
                out.extend(src.iter().zip(pos).map(|(a, p)| a + p));
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, l + 1, d))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        token: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, n, d) = self.dims(x.shape(), token.elem_count())?;
        let l = self.patches;
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; b * n * d];
        let mut dt = vec![0f32; d];
        for i in 0..b {
            let gi = &g[i * (l + 1) * d..(i + 1) * (l + 1) * d];
            let dxi = &mut dx[i * n * d..(i + 1) * n * d];
            dxi[..d].copy_from_slice(&gi[..d]);
            for p in 0..l {
                let row = &gi[(1 + p) * d..(2 + p) * d];
                match self.source(i, p, n - 1) {
                    // Added, not copied: right even if two patches named one token.
                    Some(j) => dxi[j * d..(j + 1) * d]
                        .iter_mut()
                        .zip(row)
                        .for_each(|(a, v)| *a += v),
                    None => dt.iter_mut().zip(row).for_each(|(a, v)| *a += v),
                }
            }
        }
        Ok((
            Some(Tensor::from_vec(dx, (b, n, d), x.device())?),
            Some(Tensor::from_vec(dt, token.shape(), token.device())?),
        ))
    }
}
