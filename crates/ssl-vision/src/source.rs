//! Images held in memory as an endless, resumable, seeded stream of batches.

use candle_core::Device;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use ssl_core::{BatchSource, CoreError, SslRng};

use crate::vit::Images;
use crate::{Result, VisionError};

/// Images of one shape `(C, H, W)`, stored flat, `[0, 1]` pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    /// `N * C * H * W` values.
    pub data: Vec<f32>,
    /// `[C, H, W]`.
    pub shape: [usize; 3],
}

impl ImageSet {
    /// A set from flat values; errors when they do not fill whole images.
    pub fn new(data: Vec<f32>, shape: [usize; 3]) -> Result<Self> {
        let per = shape.iter().product::<usize>();
        if per == 0 || !data.len().is_multiple_of(per) {
            return Err(VisionError::InvalidInput(format!(
                "{} values do not make whole images of shape {shape:?}",
                data.len()
            )));
        }
        Ok(ImageSet { data, shape })
    }

    /// Values per image.
    pub fn image_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.data.len() / self.image_len().max(1)
    }

    /// True without images.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The images at `idx`, in that order.
    pub fn select(&self, idx: &[usize]) -> ImageSet {
        let per = self.image_len();
        let mut data = Vec::with_capacity(idx.len() * per);
        for &i in idx {
            data.extend_from_slice(&self.data[i * per..(i + 1) * per]);
        }
        ImageSet {
            data,
            shape: self.shape,
        }
    }

    /// Images `start..start + n` as a batch on `device`.
    pub fn batch(&self, start: usize, n: usize, device: &Device) -> Result<Images> {
        let per = self.image_len();
        let end = (start + n).min(self.len());
        let [c, h, w] = self.shape;
        Images::from_vec(
            self.data[start * per..end * per].to_vec(),
            [end - start, c, h, w],
            device,
        )
    }
}

/// Position of an [`InMemoryImageSource`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ImageCursor {
    /// Epoch.
    pub epoch: u64,
    /// Index of the next image in the epoch's order.
    pub offset: usize,
}

/// Endless batches of raw images, reshuffled each epoch from `(seed, epoch)`; a trailing
/// partial batch is dropped (unless the set is smaller than one batch).
pub struct InMemoryImageSource {
    images: ImageSet,
    batch_size: usize,
    seed: u64,
    device: Device,
    cursor: ImageCursor,
    order: Vec<usize>,
}

impl InMemoryImageSource {
    /// A source over `images`.
    pub fn new(images: ImageSet, batch_size: usize, seed: u64, device: &Device) -> Result<Self> {
        if images.is_empty() {
            return Err(VisionError::InvalidInput(
                "the data set has no images".into(),
            ));
        }
        if batch_size == 0 {
            return Err(VisionError::Config("batch size must be at least 1".into()));
        }
        let mut s = InMemoryImageSource {
            images,
            batch_size,
            seed,
            device: device.clone(),
            cursor: ImageCursor::default(),
            order: Vec::new(),
        };
        s.order = s.epoch_order(0);
        Ok(s)
    }

    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.images.len()).collect();
        SslRng::derived(
            self.seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            "image-epoch-order",
        )
        .shuffle(&mut order);
        order
    }
}

impl BatchSource<Images> for InMemoryImageSource {
    fn next_batch(&mut self) -> ssl_core::Result<Images> {
        let bs = self.batch_size.min(self.images.len());
        if self.cursor.offset + bs > self.images.len() {
            self.cursor = ImageCursor {
                epoch: self.cursor.epoch + 1,
                offset: 0,
            };
            self.order = self.epoch_order(self.cursor.epoch);
        }
        let idx = &self.order[self.cursor.offset..self.cursor.offset + bs];
        self.cursor.offset += bs;
        let set = self.images.select(idx);
        Ok(set.batch(0, bs, &self.device)?)
    }

    fn epoch(&self) -> u64 {
        self.cursor.epoch
    }

    fn position(&self) -> Value {
        serde_json::to_value(self.cursor).unwrap_or(Value::Null)
    }

    fn restore(&mut self, position: &Value) -> ssl_core::Result<()> {
        let c: ImageCursor = serde_json::from_value(position.clone()).map_err(|e| {
            CoreError::Config(format!(
                "data position {position} is not an image cursor: {e}"
            ))
        })?;
        self.cursor = c;
        self.order = self.epoch_order(c.epoch);
        Ok(())
    }
}
