//! Column specifications: which column to read and how to decode it.

use serde::{Deserialize, Serialize};

/// Colour mode of decoded images.
#[derive(
    schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum ColorMode {
    /// One channel (luma). Colour images are converted.
    #[default]
    Grey,
    /// Three channels (red, green, blue). Grey images are replicated, alpha is dropped.
    Rgb,
}

impl ColorMode {
    /// Number of channels this mode produces (1 or 3).
    pub fn channels(self) -> usize {
        match self {
            ColorMode::Grey => 1,
            ColorMode::Rgb => 3,
        }
    }
}

/// How series lengths are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode", content = "length")]
pub enum SeriesLength {
    /// Pad every row to the longest row of the batch (default).
    #[default]
    PadToBatchMax,
    /// Pad or truncate every row to this length.
    Fixed(usize),
    /// Every row must have exactly this length; any other length is a bad row.
    Exact(usize),
}

/// The default limit on the pixels of one decoded image: 8192 x 8192 (64 Mpixel, 256 MB as
/// RGB `f32`).
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 8192 * 8192;

fn default_max_pixels() -> u64 {
    DEFAULT_MAX_IMAGE_PIXELS
}

/// How a column is decoded. Serialised with a `kind` tag, e.g.
/// `{ name = "image", kind = "image", color = "rgb", resize = [224, 224] }` in TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ColumnKind {
    /// Utf8 / LargeUtf8 text, decoded to `Vec<String>`.
    Text,
    /// Encoded images (PNG, JPEG) in a Binary / LargeBinary column or a Hugging Face
    /// `struct {bytes, path}`, decoded to `f32` in `[0, 1]` laid out `(B, C, H, W)`.
    Image {
        /// Grey (1 channel) or RGB (3 channels).
        #[serde(default)]
        color: ColorMode,
        /// Resize every image to `[height, width]` (bilinear). Without it every image of a
        /// batch must have the same size; a different one is a bad row.
        #[serde(default)]
        resize: Option<[usize; 2]>,
        /// The largest image accepted, in pixels (width x height, read from the image's header
        /// before anything is decoded; a larger one is [`crate::DataError::ImageTooLarge`]).
        /// It also bounds `resize`. Default [`DEFAULT_MAX_IMAGE_PIXELS`].
        #[serde(default = "default_max_pixels")]
        max_pixels: u64,
    },
    /// Raw pixels as `list<u8>` of exactly `channels * height * width` values (row-major
    /// `C, H, W`), scaled to `[0, 1]` and delivered like [`ColumnKind::Image`].
    RawPixels {
        /// `[channels, height, width]`.
        shape: [usize; 3],
    },
    /// Numeric series: `list<f32|f64>` (one channel) or `list<list<f32|f64>>` (channels x
    /// length). Delivered as values, mask and lengths `(B, C, L)`; NaN and null values are masked.
    Series {
        /// Length policy (pad to the batch maximum, fixed length, or exact length).
        #[serde(default)]
        length: SeriesLength,
        /// Required number of channels; any other count is a bad row.
        #[serde(default)]
        channels: Option<usize>,
    },
    /// Class labels: any integer type (kept as is) or strings (mapped to class ids by the
    /// sorted list of distinct labels over the whole source, or by `classes`).
    Label {
        /// Fixed class list. For string labels a label outside it is a bad row; for integer
        /// labels it names the classes and an id outside `0..classes.len()` is a bad row.
        #[serde(default)]
        classes: Option<Vec<String>>,
    },
    /// A row identifier (string or integer), carried through as `String` in [`crate::Batch::ids`].
    /// Without an id column the id is `file_stem:row`.
    Id,
}

impl ColumnKind {
    /// Short name of the kind, as used in error messages.
    pub fn name(&self) -> &'static str {
        match self {
            ColumnKind::Text => "text",
            ColumnKind::Image { .. } => "image",
            ColumnKind::RawPixels { .. } => "raw_pixels",
            ColumnKind::Series { .. } => "series",
            ColumnKind::Label { .. } => "label",
            ColumnKind::Id => "id",
        }
    }

    /// The Arrow types this kind accepts, for error messages.
    pub fn expected_types(&self) -> &'static str {
        match self {
            ColumnKind::Text => "Utf8 or LargeUtf8",
            ColumnKind::Image { .. } => {
                "Binary, LargeBinary or Struct {bytes: Binary, path: Utf8} holding PNG/JPEG bytes"
            }
            ColumnKind::RawPixels { .. } => "List<UInt8> (or LargeList / FixedSizeList)",
            ColumnKind::Series { .. } => {
                "List<Float32|Float64> or List<List<Float32|Float64>> (or LargeList / FixedSizeList)"
            }
            ColumnKind::Label { .. } => "an integer type, Utf8 or LargeUtf8",
            ColumnKind::Id => "Utf8, LargeUtf8 or an integer type",
        }
    }
}

/// One column to read: its name in the Parquet files and how to decode it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ColumnSpec {
    /// Column name (a top-level field of the files).
    pub name: String,
    /// How to decode it.
    #[serde(flatten)]
    pub kind: ColumnKind,
}

impl ColumnSpec {
    /// A spec from a name and a kind.
    pub fn new(name: impl Into<String>, kind: ColumnKind) -> Self {
        Self {
            name: name.into(),
            kind,
        }
    }

    /// A text column.
    pub fn text(name: impl Into<String>) -> Self {
        Self::new(name, ColumnKind::Text)
    }

    /// An encoded-image column in the given colour mode, optionally resized to `[h, w]`,
    /// accepting images of up to [`DEFAULT_MAX_IMAGE_PIXELS`] pixels.
    pub fn image(name: impl Into<String>, color: ColorMode, resize: Option<[usize; 2]>) -> Self {
        Self::new(
            name,
            ColumnKind::Image {
                color,
                resize,
                max_pixels: DEFAULT_MAX_IMAGE_PIXELS,
            },
        )
    }

    /// Checks an image column's `resize` target against its `max_pixels` limit (before any
    /// row is read).
    pub(crate) fn check_resize(&self) -> Result<(), crate::DataError> {
        if let ColumnKind::Image {
            resize: Some([h, w]),
            max_pixels,
            ..
        } = self.kind
        {
            if h as u128 * w as u128 > u128::from(max_pixels) {
                return Err(crate::DataError::ResizeTooLarge {
                    column: self.name.clone(),
                    height: h,
                    width: w,
                    limit: max_pixels,
                });
            }
        }
        Ok(())
    }

    /// This image column with another limit on the pixels of one image (checked from the
    /// header before decoding, and against `resize`); no effect on other kinds.
    pub fn with_max_pixels(mut self, limit: u64) -> Self {
        if let ColumnKind::Image { max_pixels, .. } = &mut self.kind {
            *max_pixels = limit;
        }
        self
    }

    /// A raw-pixel column of shape `[channels, height, width]`.
    pub fn raw_pixels(name: impl Into<String>, shape: [usize; 3]) -> Self {
        Self::new(name, ColumnKind::RawPixels { shape })
    }

    /// A series column, padded to the batch maximum, any channel count.
    pub fn series(name: impl Into<String>) -> Self {
        Self::new(
            name,
            ColumnKind::Series {
                length: SeriesLength::PadToBatchMax,
                channels: None,
            },
        )
    }

    /// A series column with a length policy and an optional required channel count.
    pub fn series_with(
        name: impl Into<String>,
        length: SeriesLength,
        channels: Option<usize>,
    ) -> Self {
        Self::new(name, ColumnKind::Series { length, channels })
    }

    /// A label column; class ids from the sorted distinct labels of the whole source.
    pub fn label(name: impl Into<String>) -> Self {
        Self::new(name, ColumnKind::Label { classes: None })
    }

    /// A label column with a fixed class list (so train and test files agree).
    pub fn label_with_classes(name: impl Into<String>, classes: Vec<String>) -> Self {
        Self::new(
            name,
            ColumnKind::Label {
                classes: Some(classes),
            },
        )
    }

    /// The id column.
    pub fn id(name: impl Into<String>) -> Self {
        Self::new(name, ColumnKind::Id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_through_json() {
        let specs = vec![
            ColumnSpec::image("image", ColorMode::Rgb, Some([32, 32])),
            ColumnSpec::series_with("x", SeriesLength::Fixed(100), Some(3)),
            ColumnSpec::label_with_classes("label", vec!["a".into(), "b".into()]),
            ColumnSpec::id("id"),
        ];
        let json = serde_json::to_string(&specs).unwrap();
        let back: Vec<ColumnSpec> = serde_json::from_str(&json).unwrap();
        assert_eq!(specs, back);
        let text: ColumnSpec = serde_json::from_str(r#"{"name":"t","kind":"text"}"#).unwrap();
        assert_eq!(text, ColumnSpec::text("t"));
        let img: ColumnSpec = serde_json::from_str(r#"{"name":"i","kind":"image"}"#).unwrap();
        assert_eq!(img, ColumnSpec::image("i", ColorMode::Grey, None));
    }
}
