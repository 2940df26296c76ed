//! Patchify and unpatchify, as MAE's `patchify` / `unpatchify`.
//!
//! An image `(B, C, H, W)` with patch size `p` becomes `(B, L, p*p*C)` with `L = (H/p)(W/p)`
//! patches in row-major grid order; each patch is laid out `(p, q, c)` (row within the patch,
//! column within the patch, channel), exactly MAE's `nchpwq -> nhwpqc`.

use candle_core::Tensor;

use crate::{Result, VisionError};

/// The patch grid `(H/p, W/p)` of an image, or an error when `p` does not divide both sides.
pub fn grid_size(height: usize, width: usize, patch: usize) -> Result<(usize, usize)> {
    if patch == 0
        || !height.is_multiple_of(patch)
        || !width.is_multiple_of(patch)
        || height == 0
        || width == 0
    {
        return Err(VisionError::Config(format!(
            "patch size {patch} must divide the image size {height}x{width}"
        )));
    }
    Ok((height / patch, width / patch))
}

/// `(B, C, H, W) -> (B, L, p*p*C)` in MAE's `(p, q, c)` patch layout.
pub fn patchify(images: &Tensor, patch: usize) -> Result<Tensor> {
    let (b, c, h, w) = images.dims4()?;
    let (gh, gw) = grid_size(h, w, patch)?;
    let x = images.reshape(vec![b, c, gh, patch, gw, patch])?;
    // (b, c, gh, p, gw, q) -> (b, gh, gw, p, q, c)
    let x = x.permute(vec![0, 2, 4, 3, 5, 1])?.contiguous()?;
    Ok(x.reshape((b, gh * gw, patch * patch * c))?)
}

/// Inverse of [`patchify`]: `(B, L, p*p*C) -> (B, C, H, W)` for a `grid = (H/p, W/p)`.
pub fn unpatchify(
    patches: &Tensor,
    patch: usize,
    channels: usize,
    grid: (usize, usize),
) -> Result<Tensor> {
    let (b, l, d) = patches.dims3()?;
    let (gh, gw) = grid;
    if l != gh * gw || d != patch * patch * channels {
        return Err(VisionError::InvalidInput(format!(
            "unpatchify: got {l} patches of {d} values, expected {} of {}",
            gh * gw,
            patch * patch * channels
        )));
    }
    let x = patches.reshape(vec![b, gh, gw, patch, patch, channels])?;
    let x = x.permute(vec![0, 5, 1, 3, 2, 4])?.contiguous()?;
    Ok(x.reshape((b, channels, gh * patch, gw * patch))?)
}

/// `(B, C, H, W) -> (B, L, C*p*p)` in the `(c, p, q)` layout of a convolution kernel
/// `(D, C, p, p)`, so a stride-`p` convolution is one matrix product with the flattened kernel.
pub fn patches_for_conv(images: &Tensor, patch: usize) -> Result<Tensor> {
    let (b, c, h, w) = images.dims4()?;
    let (gh, gw) = grid_size(h, w, patch)?;
    let x = images.reshape(vec![b, c, gh, patch, gw, patch])?;
    let x = x.permute(vec![0, 2, 4, 1, 3, 5])?.contiguous()?;
    Ok(x.reshape((b, gh * gw, c * patch * patch))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn round_trip_and_layout() {
        let dev = Device::Cpu;
        let (b, c, h, w, p) = (2, 3, 4, 6, 2);
        let v: Vec<f32> = (0..b * c * h * w).map(|i| i as f32).collect();
        let img = Tensor::from_vec(v, (b, c, h, w), &dev).unwrap();
        let x = patchify(&img, p).unwrap();
        assert_eq!(x.dims(), [b, 6, p * p * c]);
        // Patch (row 0, col 1) of image 0: pixel (0, 2) channel 0 first, then channel 1.
        let row = x.get(0).unwrap().get(1).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(row[0], 2.0);
        assert_eq!(row[1], (h * w + 2) as f32);
        assert_eq!(row[3], 3.0); // (p=0, q=1, c=0): pixel (0, 3)
        let back = unpatchify(&x, p, c, (2, 3)).unwrap();
        let d = (back - &img).unwrap().abs().unwrap().sum_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        let conv = patches_for_conv(&img, p).unwrap();
        let r = conv
            .get(0)
            .unwrap()
            .get(1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(&r[..4], &[2.0, 3.0, 8.0, 9.0]);
        assert!(patchify(&img, 4).is_err());
    }
}
