//! Photometric image operations for SimCLR's views: colour jitter (brightness, contrast,
//! saturation, hue), grey-scale and Gaussian blur.
//!
//! Each is a pure function of one image in `[0, 1]`, stored planar (`C x H x W`, channel by
//! channel), and follows torchvision's functional op on float tensors
//! (`torchvision.transforms.functional.adjust_brightness` etc.): the same formulas, the same
//! clamping to `[0, 1]`, the same ITU-R 601 luma weights. Saturation, hue and grey-scale
//! need colour and leave anything but 3 channels unchanged. The random choices (which op,
//! which factor) live with the task that draws them: [`crate::SimClrConfig`].

/// ITU-R 601 luma weights for red, green and blue, as torchvision's `rgb_to_grayscale`.
pub const LUMA: [f32; 3] = [0.2989, 0.587, 0.114];

fn blend(a: f32, b: f32, ratio: f32) -> f32 {
    (ratio * a + (1.0 - ratio) * b).clamp(0.0, 1.0)
}

/// The luma plane (`H x W`) of a `channels x hw` image: [`LUMA`] for 3 channels, the first
/// channel otherwise.
pub fn luma(img: &[f32], channels: usize, hw: usize) -> Vec<f32> {
    if channels == 3 {
        (0..hw)
            .map(|i| LUMA[0] * img[i] + LUMA[1] * img[hw + i] + LUMA[2] * img[2 * hw + i])
            .collect()
    } else {
        img[..hw].to_vec()
    }
}

/// `adjust_brightness`: every value times `factor`, clamped to `[0, 1]`.
pub fn adjust_brightness(img: &mut [f32], factor: f32) {
    for v in img {
        *v = blend(*v, 0.0, factor);
    }
}

/// `adjust_contrast`: a blend with the image's mean luma (the mean of all values for anything
/// but 3 channels), `factor * x + (1 - factor) * mean`, clamped to `[0, 1]`.
pub fn adjust_contrast(img: &mut [f32], channels: usize, hw: usize, factor: f32) {
    let mean = if channels == 3 {
        let l = luma(img, channels, hw);
        l.iter().map(|&v| f64::from(v)).sum::<f64>() / hw.max(1) as f64
    } else {
        img.iter().map(|&v| f64::from(v)).sum::<f64>() / img.len().max(1) as f64
    } as f32;
    for v in img {
        *v = blend(*v, mean, factor);
    }
}

/// `adjust_saturation`: a blend of each pixel with its luma, clamped to `[0, 1]` (3 channels
/// only; otherwise unchanged).
pub fn adjust_saturation(img: &mut [f32], channels: usize, hw: usize, factor: f32) {
    if channels != 3 {
        return;
    }
    let l = luma(img, channels, hw);
    for c in 0..3 {
        for (v, &g) in img[c * hw..(c + 1) * hw].iter_mut().zip(&l) {
            *v = blend(*v, g, factor);
        }
    }
}

/// torchvision's `_rgb2hsv` for one pixel: `(h, s, v)`, each in `[0, 1]`.
pub fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let eqc = maxc == minc;
    let cr = maxc - minc;
    let s = cr / if eqc { 1.0 } else { maxc };
    let div = if eqc { 1.0 } else { cr };
    let (rc, gc, bc) = ((maxc - r) / div, (maxc - g) / div, (maxc - b) / div);
    let h = if maxc == r {
        bc - gc
    } else if maxc == g {
        2.0 + rc - bc
    } else {
        4.0 + gc - rc
    };
    // torch.fmod((h / 6 + 1), 1): h / 6 + 1 is positive here, so `%` agrees.
    let h = (h / 6.0 + 1.0) % 1.0;
    (h, s, maxc)
}

/// torchvision's `_hsv2rgb` for one pixel.
pub fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let i = (h * 6.0).floor();
    let f = h * 6.0 - i;
    let p = (v * (1.0 - s)).clamp(0.0, 1.0);
    let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
    let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
    match (i as i64).rem_euclid(6) {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// `adjust_hue`: the hue of every pixel shifted by `shift` turns (`[-0.5, 0.5]`), modulo 1,
/// through HSV (3 channels only; otherwise unchanged).
pub fn adjust_hue(img: &mut [f32], channels: usize, hw: usize, shift: f32) {
    if channels != 3 {
        return;
    }
    for i in 0..hw {
        let (h, s, v) = rgb_to_hsv(img[i], img[hw + i], img[2 * hw + i]);
        // Python's `%` (torch's remainder): the result has the divisor's sign.
        let h = (h + shift).rem_euclid(1.0);
        let (r, g, b) = hsv_to_rgb(h, s, v);
        (img[i], img[hw + i], img[2 * hw + i]) = (r, g, b);
    }
}

/// `rgb_to_grayscale` with as many output channels as input: every channel of a 3-channel
/// image becomes its [`LUMA`] (otherwise unchanged).
pub fn grayscale(img: &mut [f32], channels: usize, hw: usize) {
    if channels != 3 {
        return;
    }
    let l = luma(img, channels, hw);
    for c in 0..3 {
        img[c * hw..(c + 1) * hw].copy_from_slice(&l);
    }
}

/// The normalised 1-D Gaussian of `2 * radius + 1` taps at the integer offsets
/// `-radius..=radius` (torchvision's `_get_gaussian_kernel1d`).
pub fn gaussian_kernel(radius: usize, sigma: f32) -> Vec<f32> {
    let r = radius as f32;
    let k: Vec<f32> = (0..=2 * radius)
        .map(|i| (-0.5 * ((i as f32 - r) / sigma).powi(2)).exp())
        .collect();
    let sum: f32 = k.iter().sum();
    k.into_iter().map(|v| v / sum).collect()
}

/// Index `i` (which may run up to `n - 1` past either end) reflected into `0..n` without
/// repeating the edge (`reflect` padding: -1 -> 1, n -> n - 2).
fn reflect(i: isize, n: usize) -> usize {
    let n = n as isize;
    let i = if i < 0 { -i } else { i };
    let i = if i >= n { 2 * (n - 1) - i } else { i };
    i.clamp(0, n - 1) as usize
}

/// torchvision's `gaussian_blur` on a `channels x height x width` image: the 2-D kernel
/// `k(dy) k(dx)` of [`gaussian_kernel`] (`2 * radius + 1` square), with `reflect` padding
/// (the edge pixel is not repeated), applied per channel as two 1-D passes. `radius` must be
/// below both sides (reflect padding's rule); a larger one is reduced to fit.
pub fn gaussian_blur(
    img: &mut [f32],
    channels: usize,
    height: usize,
    width: usize,
    radius: usize,
    sigma: f32,
) {
    let radius = radius
        .min(height.saturating_sub(1))
        .min(width.saturating_sub(1));
    if radius == 0 {
        return;
    }
    let k = gaussian_kernel(radius, sigma);
    let r = radius as isize;
    let hw = height * width;
    let mut tmp = vec![0f32; hw];
    for c in 0..channels {
        let plane = &mut img[c * hw..(c + 1) * hw];
        // Along rows (x), then along columns (y).
        for y in 0..height {
            for x in 0..width {
                let mut acc = 0f32;
                for (j, &w) in k.iter().enumerate() {
                    acc += w * plane[y * width + reflect(x as isize + j as isize - r, width)];
                }
                tmp[y * width + x] = acc;
            }
        }
        for y in 0..height {
            for x in 0..width {
                let mut acc = 0f32;
                for (j, &w) in k.iter().enumerate() {
                    acc += w * tmp[reflect(y as isize + j as isize - r, height) * width + x];
                }
                plane[y * width + x] = acc;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= tol, "at {i}: {x} vs {y}\n{a:?}\n{b:?}");
        }
    }

    #[test]
    fn brightness_and_contrast_follow_torchvision() {
        let mut img = vec![0.2f32, 0.6, 0.9];
        adjust_brightness(&mut img, 1.5);
        close(&img, &[0.3, 0.9, 1.0], 1e-6);
        // Grey: the mean of all values (0.5).
        let mut grey = vec![0.0f32, 0.5, 1.0, 0.5];
        adjust_contrast(&mut grey, 1, 4, 0.5);
        close(&grey, &[0.25, 0.5, 0.75, 0.5], 1e-6);
        // RGB: the mean luma of two pixels (1, 0, 0) and (0, 0, 1): (0.2989 + 0.114) / 2.
        let mut rgb = vec![1.0f32, 0.0, 0.0, 0.0, 0.0, 1.0];
        let m = (0.2989 + 0.114) / 2.0;
        adjust_contrast(&mut rgb, 3, 2, 2.0);
        let f = |x: f32| (2.0 * x - m).clamp(0.0, 1.0);
        close(
            &rgb,
            &[f(1.0), f(0.0), f(0.0), f(0.0), f(0.0), f(1.0)],
            1e-6,
        );
    }

    #[test]
    fn saturation_and_grayscale_use_the_601_luma() {
        let px = [0.6f32, 0.4, 0.2];
        let g = 0.2989 * 0.6 + 0.587 * 0.4 + 0.114 * 0.2;
        let mut img = px.to_vec();
        adjust_saturation(&mut img, 3, 1, 2.0);
        close(&img, &[2.0 * 0.6 - g, 2.0 * 0.4 - g, 0.0], 1e-6);
        let mut img = px.to_vec();
        adjust_saturation(&mut img, 3, 1, 0.0);
        close(&img, &[g, g, g], 1e-6);
        let mut img = px.to_vec();
        grayscale(&mut img, 3, 1);
        close(&img, &[g, g, g], 1e-6);
        // One channel: saturation, hue and grey-scale leave it alone.
        let mut one = vec![0.3f32, 0.7];
        adjust_saturation(&mut one, 1, 2, 0.0);
        adjust_hue(&mut one, 1, 2, 0.3);
        grayscale(&mut one, 1, 2);
        assert_eq!(one, vec![0.3, 0.7]);
    }

    #[test]
    fn hue_rotates_through_hsv() {
        // Planar 3 x 4: red, (0.6, 0.4, 0.2), grey, (0.2, 0.9, 0.5).
        let pixels = [
            [1.0f32, 0.0, 0.0],
            [0.6, 0.4, 0.2],
            [0.5, 0.5, 0.5],
            [0.2, 0.9, 0.5],
        ];
        let planar = |px: &[[f32; 3]]| -> Vec<f32> {
            (0..3).flat_map(|c| px.iter().map(move |p| p[c])).collect()
        };
        let mut img = planar(&pixels);
        adjust_hue(&mut img, 3, 4, 1.0 / 3.0);
        // Red -> green; (0.6, 0.4, 0.2) is h = 1/12, s = 2/3, v = 0.6 -> h = 5/12:
        // (0.2, 0.6, 0.4); grey stays; a half turn of the last and back is checked below.
        let want = planar(&[
            [0.0, 1.0, 0.0],
            [0.2, 0.6, 0.4],
            [0.5, 0.5, 0.5],
            [0.5, 0.2, 0.9],
        ]);
        close(&img, &want, 1e-5);
        let mut img = planar(&pixels);
        adjust_hue(&mut img, 3, 4, -1.0 / 3.0);
        close(
            &img,
            &planar(&[
                [0.0, 0.0, 1.0],
                [0.4, 0.2, 0.6],
                [0.5, 0.5, 0.5],
                [0.9, 0.5, 0.2],
            ]),
            1e-5,
        );
        let mut img = planar(&pixels);
        adjust_hue(&mut img, 3, 4, 0.0);
        close(&img, &planar(&pixels), 1e-6);
        let (h, s, v) = rgb_to_hsv(0.6, 0.4, 0.2);
        close(&[h, s, v], &[1.0 / 12.0, 2.0 / 3.0, 0.6], 1e-6);
    }

    /// The blur against a direct 2-D convolution with the 2-D Gaussian
    /// `exp(-(dx^2 + dy^2) / (2 sigma^2))`, normalised, and reflect padding written out.
    #[test]
    fn blur_is_a_direct_2d_gaussian_with_reflect_padding() {
        let (c, h, w) = (2usize, 5usize, 7usize);
        let img: Vec<f32> = (0..c * h * w)
            .map(|i| ((i * 37) % 11) as f32 / 10.0)
            .collect();
        for (radius, sigma) in [(1usize, 0.7f32), (3, 1.6), (2, 0.1)] {
            let mut got = img.clone();
            gaussian_blur(&mut got, c, h, w, radius, sigma);
            let r = radius as isize;
            let mut k2 = Vec::new();
            for dy in -r..=r {
                for dx in -r..=r {
                    k2.push((-((dx * dx + dy * dy) as f32) / (2.0 * sigma * sigma)).exp());
                }
            }
            let sum: f32 = k2.iter().sum();
            let refl = |i: isize, n: usize| -> usize {
                let n = n as isize;
                (if i < 0 {
                    -i
                } else if i >= n {
                    2 * n - 2 - i
                } else {
                    i
                }) as usize
            };
            let mut want = vec![0f32; img.len()];
            for ch in 0..c {
                for y in 0..h as isize {
                    for x in 0..w as isize {
                        let mut acc = 0f32;
                        let mut t = 0;
                        for dy in -r..=r {
                            for dx in -r..=r {
                                let (yy, xx) = (refl(y + dy, h), refl(x + dx, w));
                                acc += k2[t] / sum * img[ch * h * w + yy * w + xx];
                                t += 1;
                            }
                        }
                        want[ch * h * w + y as usize * w + x as usize] = acc;
                    }
                }
            }
            close(&got, &want, 1e-5);
        }
        // A centred impulse on 3 x 3, radius 1, sigma 1: the centre keeps w0^2.
        let mut delta = vec![0f32; 9];
        delta[4] = 1.0;
        gaussian_blur(&mut delta, 1, 3, 3, 1, 1.0);
        let w0 = 1.0 / (1.0 + 2.0 * (-0.5f32).exp());
        assert!((delta[4] - w0 * w0).abs() < 1e-6, "{}", delta[4]);
        // A constant image stays constant.
        let mut flat = vec![0.4f32; 16];
        gaussian_blur(&mut flat, 1, 4, 4, 3, 2.0);
        close(&flat, &[0.4; 16], 1e-6);
    }
}
