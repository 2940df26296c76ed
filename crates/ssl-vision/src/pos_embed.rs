//! Fixed 2-D sin-cos position embeddings, as MAE's `get_2d_sincos_pos_embed`.

use crate::{Result, VisionError};

/// 1-D sin-cos embedding of positions `pos` into `dim` values each: the first half sines,
/// the second half cosines of `pos * omega_k`, `omega_k = 1 / 10000^(k / (dim/2))`.
fn sincos_1d(dim: usize, pos: &[f64]) -> Vec<Vec<f64>> {
    let half = dim / 2;
    pos.iter()
        .map(|&p| {
            let mut row = vec![0.0; dim];
            for k in 0..half {
                let omega = 1.0 / 10000f64.powf(k as f64 / half as f64);
                row[k] = (p * omega).sin();
                row[half + k] = (p * omega).cos();
            }
            row
        })
        .collect()
}

/// Position embeddings `(grid_h * grid_w, dim)`, row-major over the patch grid.
///
/// As MAE (which builds its grid with `np.meshgrid(grid_w, grid_h)`), the first `dim/2`
/// values encode the patch's column and the last `dim/2` its row. `dim` must be a multiple of 4.
/// With `cls_token`, a row of zeros comes first.
pub fn sincos_2d(dim: usize, grid_h: usize, grid_w: usize, cls_token: bool) -> Result<Vec<f32>> {
    if dim == 0 || !dim.is_multiple_of(4) {
        return Err(VisionError::Config(format!(
            "2-D sin-cos position embeddings need a width divisible by 4, got {dim}"
        )));
    }
    let n = grid_h * grid_w;
    let cols: Vec<f64> = (0..n).map(|m| (m % grid_w) as f64).collect();
    let rows: Vec<f64> = (0..n).map(|m| (m / grid_w) as f64).collect();
    let ec = sincos_1d(dim / 2, &cols);
    let er = sincos_1d(dim / 2, &rows);
    let mut out = Vec::with_capacity((n + usize::from(cls_token)) * dim);
    if cls_token {
        out.extend(std::iter::repeat_n(0f32, dim));
    }
    for m in 0..n {
        out.extend(ec[m].iter().map(|v| *v as f32));
        out.extend(er[m].iter().map(|v| *v as f32));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_mae_reference_values() {
        // numpy, MAE's util/pos_embed.py: get_2d_sincos_pos_embed(8, 2, cls_token=True)
        // row 3 (the patch at grid row 1, column 0): emb_h from grid[0] = column 0,
        // emb_w from grid[1] = row 1.
        let e = sincos_2d(8, 2, 2, true).unwrap();
        assert!(e[..8].iter().all(|v| *v == 0.0));
        let row = &e[3 * 8..4 * 8];
        let expect = [
            0.0,
            0.0,
            1.0,
            1.0,
            1f64.sin(),
            0.01f64.sin(),
            1f64.cos(),
            0.01f64.cos(),
        ];
        for (a, b) in row.iter().zip(expect) {
            assert!((f64::from(*a) - b).abs() < 1e-6, "{row:?}");
        }
        assert!(sincos_2d(6, 2, 2, false).is_err());
        assert_eq!(sincos_2d(8, 2, 3, false).unwrap().len(), 6 * 8);
    }
}
