//! Anomaly heat-maps: patch scores upsampled over the image, drawn next to it.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::{Result, VisionError};

/// A blue-cyan-yellow-red colour map of `t` in `[0, 1]`.
pub fn colormap(t: f32) -> [u8; 3] {
    let t = t.clamp(0.0, 1.0);
    let stops = [
        (0.0, [0.0, 0.0, 0.5]),
        (0.25, [0.0, 0.4, 1.0]),
        (0.5, [0.0, 0.9, 0.9]),
        (0.75, [1.0, 0.9, 0.0]),
        (1.0, [0.9, 0.0, 0.0]),
    ];
    for w in stops.windows(2) {
        let ((t0, c0), (t1, c1)) = (w[0], w[1]);
        if t <= t1 {
            let f = (t - t0) / (t1 - t0);
            let mix = |k: usize| ((c0[k] + (c1[k] - c0[k]) * f) * 255.0).round() as u8;
            return [mix(0), mix(1), mix(2)];
        }
    }
    [230, 0, 0]
}

/// Bilinear upsampling of a `gh x gw` patch-score grid to `h x w` pixels (patch centres).
pub fn upsample(grid: &[f32], gh: usize, gw: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0f32; h * w];
    for y in 0..h {
        let gy = ((y as f32 + 0.5) * gh as f32 / h as f32 - 0.5).clamp(0.0, (gh - 1) as f32);
        let y0 = gy.floor() as usize;
        let y1 = (y0 + 1).min(gh - 1);
        let fy = gy - y0 as f32;
        for x in 0..w {
            let gx = ((x as f32 + 0.5) * gw as f32 / w as f32 - 0.5).clamp(0.0, (gw - 1) as f32);
            let x0 = gx.floor() as usize;
            let x1 = (x0 + 1).min(gw - 1);
            let fx = gx - x0 as f32;
            let at = |r: usize, c: usize| grid[r * gw + c];
            out[y * w + x] = (1.0 - fy) * ((1.0 - fx) * at(y0, x0) + fx * at(y0, x1))
                + fy * ((1.0 - fx) * at(y1, x0) + fx * at(y1, x1));
        }
    }
    out
}

/// Writes `image | heat-map overlay` as PNG, through a temporary file beside `path` and a
/// rename (see [`ssl_data::output::write_output`]). `pixels` are `[0, 1]`, `(C, H, W)`; `scores`
/// the `gh x gw` patch scores, mapped to colours linearly from `lo` (blue) to `hi` (red).
#[allow(clippy::too_many_arguments)]
pub fn save_heatmap(
    path: &Path,
    pixels: &[f32],
    channels: usize,
    h: usize,
    w: usize,
    scores: &[f32],
    grid: (usize, usize),
    range: (f32, f32),
) -> Result<()> {
    let heat = upsample(scores, grid.0, grid.1, h, w);
    let mut img = RgbImage::new(2 * w as u32 + 2, h as u32);
    let hw = h * w;
    let span = (range.1 - range.0).max(1e-6);
    for y in 0..h {
        for x in 0..w {
            let px = |c: usize| {
                pixels[(if channels >= 3 { c } else { 0 }) * hw + y * w + x].clamp(0.0, 1.0)
            };
            let rgb = [px(0), px(1), px(2)];
            let to8 = |v: f32| (v * 255.0).round() as u8;
            img.put_pixel(
                x as u32,
                y as u32,
                Rgb([to8(rgb[0]), to8(rgb[1]), to8(rgb[2])]),
            );
            let c = colormap((heat[y * w + x] - range.0) / span);
            let grey = (rgb[0] + rgb[1] + rgb[2]) / 3.0;
            let blend = |k: usize| to8(0.45 * grey + 0.55 * f32::from(c[k]) / 255.0);
            img.put_pixel(
                w as u32 + 2 + x as u32,
                y as u32,
                Rgb([blend(0), blend(1), blend(2)]),
            );
        }
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| VisionError::io(dir, e))?;
    }
    // Encoded in memory, then written through a fresh temporary file renamed into place: an
    // existing link, device or directory at `path` is refused, and an interrupted write
    // leaves no partial image.
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| VisionError::io(path, e))?;
    ssl_data::output::write_output(path, &png)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsample_is_exact_at_patch_centres_and_colours_order() {
        let g = [0.0, 1.0, 2.0, 3.0];
        let u = upsample(&g, 2, 2, 4, 4);
        assert_eq!(u[0], 0.0);
        assert_eq!(u[15], 3.0);
        assert!(u[5] > 0.0 && u[5] < 3.0);
        assert_eq!(colormap(0.0), [0, 0, 128]);
        assert_eq!(colormap(1.0), [230, 0, 0]);
    }

    #[test]
    fn heatmaps_are_written_through_a_temporary_file_and_never_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("maps").join("a.png");
        let (pixels, scores) = (vec![0.5f32; 3 * 4 * 4], [0.0f32, 1.0, 2.0, 3.0]);
        save_heatmap(&path, &pixels, 3, 4, 4, &scores, (2, 2), (0.0, 3.0)).unwrap();
        let img = image::open(&path).unwrap();
        assert_eq!((img.width(), img.height()), (10, 4));
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["a.png"], "no temporary file is left");
        // A symbolic link at the path is refused, its target untouched.
        #[cfg(unix)]
        {
            let target = dir.path().join("target.txt");
            std::fs::write(&target, "keep").unwrap();
            let link = dir.path().join("maps").join("b.png");
            std::os::unix::fs::symlink(&target, &link).unwrap();
            let e = save_heatmap(&link, &pixels, 3, 4, 4, &scores, (2, 2), (0.0, 3.0))
                .unwrap_err()
                .to_string();
            assert!(e.contains("symbolic link"), "{e}");
            assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        }
    }
}
