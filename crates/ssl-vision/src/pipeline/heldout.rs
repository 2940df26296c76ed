//! The held-out images of a streamed run (`data.heldout_fraction`), read in bounded memory:
//! a pass in row order over this rank's row groups that keeps held-out rows only and stops
//! once its share of the cap is found.

use ssl_core::monitor::Progress;
use ssl_core::Parallel;
use ssl_data::{LoaderConfig, StreamPosition};

use super::stream::{check_example_shape, ImageReader, Split};
use crate::{ImageSet, Result, VisionError};

/// Pixels of held-out images kept at most, whatever `data.heldout_max_images` says.
pub(crate) const HELDOUT_BYTES: usize = 256 << 20;

/// Held-out images of `shape` (and labels, when the reader reads a label column): this rank's
/// first `ceil(cap / ranks)` in row order, with `cap = min(max_images, HELDOUT_BYTES / image
/// bytes)`. Shows progress on rank 0 (a scan for rare held-out rows reads far ahead).
pub(crate) fn read_heldout(
    reader: &ImageReader,
    shape: [usize; 3],
    max_images: usize,
    par: &Parallel,
) -> Result<(ImageSet, Option<Vec<i64>>)> {
    let per = shape.iter().product::<usize>();
    let cap = max_images.min(HELDOUT_BYTES / (per * 4).max(1)).max(1);
    let want = cap.div_ceil(par.world.max(1));
    let loader = LoaderConfig {
        rank: par.rank,
        world_size: par.world,
        ..reader.loader(256, false, Some(1))
    };
    let mut stream = reader.stream(loader, Split::Heldout, StreamPosition::default(), false)?;
    let progress = par
        .is_main()
        .then(|| Progress::task("held-out images", want as u64, "images"));
    let (mut data, mut labels) = (Vec::new(), Vec::new());
    let mut n = 0;
    while n < want {
        let got = stream.take((want - n).min(256))?;
        if got.is_empty() {
            break;
        }
        for e in &got {
            check_example_shape(e, shape)?;
            data.extend_from_slice(&e.pixels);
            labels.extend(e.label);
        }
        n += got.len();
        if let Some(p) = &progress {
            p.set_position(n as u64);
        }
    }
    if let Some(p) = progress {
        p.finish();
    }
    if cap < max_images && par.is_main() {
        eprintln!(
            "note: held-out images capped at {cap} ({} MiB of pixels; data.heldout_max_images = {max_images})",
            HELDOUT_BYTES >> 20
        );
    }
    let labels = (labels.len() == n && n > 0).then_some(labels);
    let set = ImageSet::new(data, shape).map_err(|e| VisionError::Config(e.to_string()))?;
    Ok((set, labels))
}
