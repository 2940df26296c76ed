//! Decoding encoded images (PNG, JPEG) into `f32` planes in `[0, 1]`.

use std::io::Cursor;

use image::imageops::FilterType;
use image::{DynamicImage, ImageReader, Limits};

use crate::column::ColorMode;

/// A decoded image: `channels x height x width` values in `[0, 1]`, channel-major.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Pixels {
    pub(crate) channels: usize,
    pub(crate) height: usize,
    pub(crate) width: usize,
    pub(crate) data: Vec<f32>,
}

/// `v as f32 / 255.0` for every byte: exact and faster than a multiply per pixel.
const UNIT: [f32; 256] = {
    let mut t = [0.0f32; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = i as f32 / 255.0;
        i += 1;
    }
    t
};

/// `(width, height)` as the image's header declares them, reading nothing else; `None` when
/// the header cannot be read (decoding then reports why).
pub(crate) fn header_size(bytes: &[u8]) -> Option<(u32, u32)> {
    // A PNG's size is in its first chunk (IHDR); the `png` decoder would read on to the
    // first data chunk.
    if bytes.len() >= 24 && bytes.starts_with(b"\x89PNG\r\n\x1a\n") && &bytes[12..16] == b"IHDR" {
        let be = |at: usize| {
            u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        return Some((be(16), be(20)));
    }
    ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()?
        .into_dimensions()
        .ok()
}

/// Decodes PNG or JPEG bytes, converts to `color` and resizes to `resize = [h, w]` (bilinear)
/// when given and different. The decoder refuses an image of more than `max_pixels` pixels
/// (the caller checks [`header_size`] first for a typed error). The error string says what
/// went wrong.
pub(crate) fn decode_image(
    bytes: &[u8],
    color: ColorMode,
    resize: Option<[usize; 2]>,
    max_pixels: u64,
) -> Result<Pixels, String> {
    if bytes.is_empty() {
        return Err("empty image bytes".into());
    }
    let decoded = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(image::ImageError::IoError)
        .and_then(|mut reader| {
            let mut limits = Limits::default();
            let side = u32::try_from(max_pixels).unwrap_or(u32::MAX);
            limits.max_image_width = Some(side);
            limits.max_image_height = Some(side);
            // Room for the decoded buffer at 4 bytes per channel and 4 channels.
            limits.max_alloc = Some(max_pixels.saturating_mul(16).max(1 << 20));
            reader.limits(limits);
            reader.decode()
        });
    let img = decoded.map_err(|e| {
        let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
        format!(
            "cannot decode image ({} bytes starting {}): {e}; expected PNG or JPEG",
            bytes.len(),
            head.join(" ")
        )
    })?;
    match color {
        ColorMode::Grey => {
            let mut buf = match img {
                DynamicImage::ImageLuma8(b) => b,
                other => other.into_luma8(),
            };
            if let Some([h, w]) = resize {
                if (buf.height() as usize, buf.width() as usize) != (h, w) {
                    buf = image::imageops::resize(&buf, w as u32, h as u32, FilterType::Triangle);
                }
            }
            let (width, height) = (buf.width() as usize, buf.height() as usize);
            let data = buf.as_raw().iter().map(|&v| UNIT[usize::from(v)]).collect();
            Ok(Pixels {
                channels: 1,
                height,
                width,
                data,
            })
        }
        ColorMode::Rgb => {
            let mut buf = match img {
                DynamicImage::ImageRgb8(b) => b,
                other => other.into_rgb8(),
            };
            if let Some([h, w]) = resize {
                if (buf.height() as usize, buf.width() as usize) != (h, w) {
                    buf = image::imageops::resize(&buf, w as u32, h as u32, FilterType::Triangle);
                }
            }
            let (width, height) = (buf.width() as usize, buf.height() as usize);
            let plane = width * height;
            let mut data = vec![0.0f32; 3 * plane];
            for (i, px) in buf.as_raw().chunks_exact(3).enumerate() {
                data[i] = UNIT[usize::from(px[0])];
                data[plane + i] = UNIT[usize::from(px[1])];
                data[2 * plane + i] = UNIT[usize::from(px[2])];
            }
            Ok(Pixels {
                channels: 3,
                height,
                width,
                data,
            })
        }
    }
}

/// Raw `u8` pixels of shape `[c, h, w]` to `[0, 1]`; errors when the length does not match.
pub(crate) fn raw_pixels(values: &[u8], shape: [usize; 3]) -> Result<Pixels, String> {
    let [channels, height, width] = shape;
    let want = channels * height * width;
    if values.len() != want {
        return Err(format!(
            "expected {want} pixel values (shape {channels}x{height}x{width}), found {}",
            values.len()
        ));
    }
    Ok(Pixels {
        channels,
        height,
        width,
        data: values.iter().map(|&v| UNIT[usize::from(v)]).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = crate::DEFAULT_MAX_IMAGE_PIXELS;

    fn png(w: u32, h: u32, rgb: bool) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        if rgb {
            let img = image::RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([x as u8 * 10, y as u8 * 10, 255])
            });
            img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        } else {
            let img = image::GrayImage::from_fn(w, h, |x, _| image::Luma([x as u8 * 50]));
            img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        }
        out.into_inner()
    }

    #[test]
    fn grey_png_decodes_to_unit_range() {
        let p = decode_image(&png(3, 2, false), ColorMode::Grey, None, M).unwrap();
        assert_eq!((p.channels, p.height, p.width), (1, 2, 3));
        assert_eq!(p.data[..3], [0.0, 50.0 / 255.0, 100.0 / 255.0]);
    }

    #[test]
    fn rgb_is_channel_major_and_resizes() {
        let p = decode_image(&png(2, 2, true), ColorMode::Rgb, None, M).unwrap();
        assert_eq!(p.data.len(), 12);
        assert_eq!(p.data[8..12], [1.0; 4]);
        let r = decode_image(&png(4, 4, true), ColorMode::Rgb, Some([2, 3]), M).unwrap();
        assert_eq!((r.channels, r.height, r.width), (3, 2, 3));
        let g = decode_image(&png(2, 2, true), ColorMode::Grey, None, M).unwrap();
        assert_eq!(g.channels, 1);
    }

    #[test]
    fn header_size_reads_only_the_header() {
        let bytes = png(5, 3, false);
        assert_eq!(header_size(&bytes), Some((5, 3)));
        // The first 24 bytes (signature and the start of IHDR) are enough.
        assert_eq!(header_size(&bytes[..24]), Some((5, 3)));
        let mut jpeg = std::io::Cursor::new(Vec::new());
        image::RgbImage::new(7, 2)
            .write_to(&mut jpeg, image::ImageFormat::Jpeg)
            .unwrap();
        assert_eq!(header_size(jpeg.get_ref()), Some((7, 2)));
        assert_eq!(header_size(b"not an image"), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let e = decode_image(b"not an image", ColorMode::Grey, None, M).unwrap_err();
        assert!(e.contains("cannot decode image"), "{e}");
        assert!(decode_image(&[], ColorMode::Grey, None, M).is_err());
        assert!(raw_pixels(&[1, 2, 3], [1, 2, 2]).is_err());
        assert_eq!(raw_pixels(&[255; 4], [1, 2, 2]).unwrap().data, vec![1.0; 4]);
    }
}
