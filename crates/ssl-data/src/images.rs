//! A folder of image files read as a data set, one image per row.
//!
//! The files are found when the source is opened (recursively, sorted by path) and read later,
//! a *unit* of at most [`UNIT_IMAGES`] images or [`UNIT_IMAGE_BYTES`] bytes at a time (the
//! loader deals, shuffles and resumes by unit as it does by Parquet row group). The columns:
//! `image` (the file's bytes, `Binary`), `path` (relative to the folder, `/`-separated,
//! `Utf8`) and, when every image sits in a subfolder, `label` (the name of the folder holding
//! the image, `Utf8`: the folder-per-class layout of torchvision's `ImageFolder`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryBuilder, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

use crate::error::DataError;
use crate::lines::RowProblem;

/// Images per unit at most.
pub(crate) const UNIT_IMAGES: usize = 128;
/// Bytes of image files per unit at most (a unit always holds at least one image).
pub(crate) const UNIT_IMAGE_BYTES: u64 = 16 << 20;

/// The extensions (lower case) of the files taken as images. Only PNG and JPEG are decoded;
/// any other is a bad row naming the file.
pub(crate) const IMAGE_EXTENSIONS: &[&str] =
    &["png", "jpg", "jpeg", "bmp", "gif", "webp", "tif", "tiff"];

/// Whether `path` names an image file by its extension.
pub(crate) fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// The images of one folder (or a list of image files), with their units.
#[derive(Debug)]
pub(crate) struct ImageSet {
    /// The folder the relative paths start from (empty for a list of files).
    root: PathBuf,
    /// Each image's path relative to `root`, sorted.
    files: Vec<Box<str>>,
    /// Whether every image sits in a subfolder (then the `label` column exists).
    labelled: bool,
    /// `[start, end)` image ranges.
    units: Vec<(usize, usize)>,
    schema: SchemaRef,
}

impl ImageSet {
    /// The images found under `root` (paths and sizes, sorted by path).
    pub(crate) fn new(root: PathBuf, images: Vec<(PathBuf, u64)>) -> Self {
        let mut files = Vec::with_capacity(images.len());
        let mut units = Vec::new();
        let (mut start, mut bytes) = (0usize, 0u64);
        for (i, (path, size)) in images.iter().enumerate() {
            let rel = match path.strip_prefix(&root) {
                Ok(rel) if !root.as_os_str().is_empty() => rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/"),
                _ => path.to_string_lossy().into_owned(),
            };
            files.push(rel.into_boxed_str());
            bytes += size;
            if i + 1 - start >= UNIT_IMAGES || bytes >= UNIT_IMAGE_BYTES {
                units.push((start, i + 1));
                (start, bytes) = (i + 1, 0);
            }
        }
        if start < files.len() {
            units.push((start, files.len()));
        }
        let labelled = !root.as_os_str().is_empty() && files.iter().all(|f| f.contains('/'));
        let mut fields = vec![
            Field::new("image", DataType::Binary, true),
            Field::new("path", DataType::Utf8, true),
        ];
        if labelled {
            fields.push(Field::new("label", DataType::Utf8, true));
        }
        ImageSet {
            root,
            files,
            labelled,
            units,
            schema: Arc::new(Schema::new(fields)),
        }
    }

    /// The columns: `image`, `path` and (in class subfolders) `label`.
    pub(crate) fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Images of each unit.
    pub(crate) fn unit_rows(&self) -> Vec<usize> {
        self.units.iter().map(|(s, e)| e - s).collect()
    }

    /// The file of image `index` (global within the set).
    pub(crate) fn file(&self, index: usize) -> PathBuf {
        self.root.join(self.files[index].as_ref())
    }

    /// Image `index`'s path relative to the folder, for messages.
    pub(crate) fn relative(&self, index: usize) -> &str {
        &self.files[index]
    }

    /// The first image of unit `unit`.
    pub(crate) fn unit_start(&self, unit: usize) -> usize {
        self.units[unit].0
    }

    /// Reads the columns `roots` (schema indices) of unit `unit`; an image file that cannot
    /// be read is a problem of its row.
    pub(crate) fn read_unit(
        &self,
        unit: usize,
        roots: &[usize],
    ) -> Result<(Vec<ArrayRef>, Vec<RowProblem>), DataError> {
        let &(start, end) = self
            .units
            .get(unit)
            .ok_or_else(|| DataError::InvalidConfig {
                reason: format!(
                    "unit {unit} is out of range: {} has {} units",
                    self.root.display(),
                    self.units.len()
                ),
            })?;
        let mut problems = Vec::new();
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(roots.len());
        for (k, &root) in roots.iter().enumerate() {
            match self.schema.field(root).name().as_str() {
                "image" => {
                    let mut b = BinaryBuilder::new();
                    for i in start..end {
                        match std::fs::read(self.file(i)) {
                            Ok(bytes) => b.append_value(bytes),
                            Err(e) => {
                                b.append_null();
                                problems.push(RowProblem {
                                    row: i - start,
                                    column: Some(k),
                                    reason: format!("image {}: cannot read it: {e}", self.files[i]),
                                });
                            }
                        }
                    }
                    arrays.push(Arc::new(b.finish()));
                }
                name => {
                    let label = name == "label" && self.labelled;
                    let mut b = StringBuilder::new();
                    for f in &self.files[start..end] {
                        if label {
                            let parent = f.rsplit('/').nth(1).unwrap_or_default();
                            b.append_value(parent);
                        } else {
                            b.append_value(f);
                        }
                    }
                    arrays.push(Arc::new(b.finish()));
                }
            }
        }
        Ok((arrays, problems))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::AsArray;

    #[test]
    fn class_folders_give_labels_and_units_split() {
        let root = PathBuf::from("/d");
        let images: Vec<(PathBuf, u64)> = (0..UNIT_IMAGES + 3)
            .map(|i| {
                let class = if i % 2 == 0 { "cat" } else { "dog/sub" };
                (root.join(format!("{class}/{i:04}.png")), 10)
            })
            .collect();
        let set = ImageSet::new(root.clone(), images);
        assert_eq!(set.unit_rows(), [UNIT_IMAGES, 3]);
        let (arrays, problems) = set.read_unit(1, &[2, 1]).unwrap();
        assert!(problems.is_empty());
        let labels = arrays[0].as_string::<i32>();
        // Image UNIT_IMAGES is even-numbered when UNIT_IMAGES is even: a "cat"; odd ones sit
        // in dog/sub, whose label is the folder holding them.
        let want = if UNIT_IMAGES.is_multiple_of(2) {
            "cat"
        } else {
            "sub"
        };
        assert_eq!(labels.value(0), want);
        assert_eq!(
            arrays[1].as_string::<i32>().value(0),
            set.relative(UNIT_IMAGES)
        );
        let flat = ImageSet::new(root, vec![(PathBuf::from("/d/a.png"), 1)]);
        assert_eq!(flat.schema().fields().len(), 2);
        // Sizes close units too.
        let big = ImageSet::new(
            PathBuf::from("/e"),
            vec![
                (PathBuf::from("/e/a.png"), UNIT_IMAGE_BYTES),
                (PathBuf::from("/e/b.png"), 1),
            ],
        );
        assert_eq!(big.unit_rows(), [1, 1]);
    }
}
