//! Every column kind decoded into batch buffers, and `read_all`.

mod common;

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryArray, FixedSizeListBuilder, Float32Builder, Float64Builder, Int32Array,
    LargeBinaryArray, LargeStringArray, ListBuilder, StringArray, StructArray, UInt16Array,
    UInt8Builder,
};
use arrow::datatypes::{DataType, Field};
use ssl_data::{read_all, ColorMode, ColumnSpec, ReadOptions, SeriesLength};

fn opts() -> ReadOptions {
    ReadOptions::default()
}

#[test]
fn text_from_utf8_and_large_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let a: ArrayRef = Arc::new(StringArray::from(vec!["hello", "wörld"]));
    let b: ArrayRef = Arc::new(LargeStringArray::from(vec!["large"]));
    common::write(&dir.path().join("a.parquet"), vec![("text", a)], 10);
    common::write(&dir.path().join("b.parquet"), vec![("text", b)], 10);
    let t = read_all(&[dir.path()], &[ColumnSpec::text("text")], &opts()).unwrap();
    assert_eq!(t.batch.text("text").unwrap(), ["hello", "wörld", "large"]);
    assert_eq!(t.batch.ids(), ["a:0", "a:1", "b:0"]);
}

#[test]
fn png_images_in_binary_and_hugging_face_struct_columns() {
    let dir = tempfile::tempdir().unwrap();
    let pngs: Vec<Vec<u8>> = (0..3).map(|i| common::grey_png(4, 3, i * 10)).collect();
    let plain: ArrayRef = Arc::new(BinaryArray::from_iter_values(pngs.iter()));
    common::write(&dir.path().join("plain.parquet"), vec![("image", plain)], 2);
    let bytes: ArrayRef = Arc::new(LargeBinaryArray::from_iter_values(pngs.iter()));
    let paths: ArrayRef = Arc::new(StringArray::from(vec!["0.png", "1.png", "2.png"]));
    let hf: ArrayRef = Arc::new(StructArray::from(vec![
        (
            Arc::new(Field::new("bytes", DataType::LargeBinary, true)),
            bytes,
        ),
        (Arc::new(Field::new("path", DataType::Utf8, true)), paths),
    ]));
    common::write(&dir.path().join("hf.parquet"), vec![("image", hf)], 2);
    for file in ["plain.parquet", "hf.parquet"] {
        let path = dir.path().join(file);
        let t = read_all(
            &[&path],
            &[ColumnSpec::image("image", ColorMode::Grey, None)],
            &opts(),
        )
        .unwrap();
        let img = t.batch.image("image").unwrap();
        assert_eq!(img.shape, [3, 1, 3, 4]);
        // Pixel (x=1, y=2) of image 2 is 20 + 3.
        assert_eq!(img.data[2 * 12 + 2 * 4 + 1], 23.0 / 255.0);
        let rgb = read_all(
            &[&path],
            &[ColumnSpec::image("image", ColorMode::Rgb, Some([6, 8]))],
            &opts(),
        )
        .unwrap();
        assert_eq!(rgb.batch.image("image").unwrap().shape, [3, 3, 6, 8]);
    }
}

#[test]
fn jpeg_images_decode_to_rgb() {
    let dir = tempfile::tempdir().unwrap();
    let jpg: ArrayRef = Arc::new(BinaryArray::from_iter_values([common::rgb_jpeg(16, 8)]));
    let p = common::write(&dir.path().join("j.parquet"), vec![("img", jpg)], 10);
    let t = read_all(
        &[p],
        &[ColumnSpec::image("img", ColorMode::Rgb, None)],
        &opts(),
    )
    .unwrap();
    let img = t.batch.image("img").unwrap();
    assert_eq!(img.shape, [1, 3, 8, 16]);
    // Blue plane is 128 everywhere (JPEG is lossy: allow a little).
    assert!(img.data[2 * 128..]
        .iter()
        .all(|&v| (v - 128.0 / 255.0).abs() < 0.05));
}

#[test]
fn raw_pixels_with_a_given_shape() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = ListBuilder::new(UInt8Builder::new());
    for i in 0..2u8 {
        b.values().append_slice(&[i, 255, 0, 51, 102, 153]);
        b.append(true);
    }
    let p = common::write(
        &dir.path().join("raw.parquet"),
        vec![("px", Arc::new(b.finish()) as ArrayRef)],
        10,
    );
    let t = read_all(&[p], &[ColumnSpec::raw_pixels("px", [1, 2, 3])], &opts()).unwrap();
    let img = t.batch.image("px").unwrap();
    assert_eq!(img.shape, [2, 1, 2, 3]);
    assert_eq!(img.data[1], 1.0);
    assert!((img.data[10] - 0.4).abs() < 1e-6);
}

#[test]
fn ragged_series_are_padded_with_masks_and_nan_masked() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = ListBuilder::new(Float64Builder::new());
    b.values().append_slice(&[1.0, 2.0, 3.0]);
    b.append(true);
    b.values().append_slice(&[4.0, f64::NAN]);
    b.append(true);
    let p = common::write(
        &dir.path().join("s.parquet"),
        vec![("x", Arc::new(b.finish()) as ArrayRef)],
        10,
    );
    let t = read_all(&[&p], &[ColumnSpec::series("x")], &opts()).unwrap();
    let s = t.batch.series("x").unwrap();
    assert_eq!(s.shape(), [2, 1, 3]);
    assert_eq!(s.values, vec![1.0, 2.0, 3.0, 4.0, 0.0, 0.0]);
    assert_eq!(s.mask, vec![1, 1, 1, 1, 0, 0]);
    assert_eq!(s.lengths, vec![3, 2]);
    let fixed = read_all(
        &[&p],
        &[ColumnSpec::series_with("x", SeriesLength::Fixed(2), None)],
        &opts(),
    )
    .unwrap();
    let s = fixed.batch.series("x").unwrap();
    assert_eq!(
        (s.values.clone(), s.lengths.clone()),
        (vec![1.0, 2.0, 4.0, 0.0], vec![2, 2])
    );
}

#[test]
fn multichannel_series_from_list_of_lists() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = ListBuilder::new(ListBuilder::new(Float32Builder::new()));
    // Row 0: 2 channels x 3; row 1: 2 channels x 1 and 2 (ragged within the row).
    for row in [
        vec![vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]],
        vec![vec![7.0], vec![8.0, 9.0]],
    ] {
        for ch in row {
            b.values().values().append_slice(&ch);
            b.values().append(true);
        }
        b.append(true);
    }
    let labels: ArrayRef = Arc::new(StringArray::from(vec!["walk", "run"]));
    let p = common::write(
        &dir.path().join("m.parquet"),
        vec![("x", Arc::new(b.finish()) as ArrayRef), ("label", labels)],
        10,
    );
    let cols = [
        ColumnSpec::series_with("x", SeriesLength::PadToBatchMax, Some(2)),
        ColumnSpec::label("label"),
    ];
    let t = read_all(&[p], &cols, &opts()).unwrap();
    let s = t.batch.series("x").unwrap();
    assert_eq!(s.shape(), [2, 2, 3]);
    assert_eq!(s.values[6..], [7.0, 0.0, 0.0, 8.0, 9.0, 0.0]);
    assert_eq!(s.mask[6..], [1, 0, 0, 1, 1, 0]);
    assert_eq!(s.lengths, vec![3, 2]);
    // Sorted class names: run = 0, walk = 1.
    assert_eq!(t.batch.labels("label").unwrap(), [1, 0]);
    let classes = t
        .batch
        .label_column("label")
        .unwrap()
        .classes
        .clone()
        .unwrap();
    assert_eq!(&*classes, ["run", "walk"]);
}

#[test]
fn fixed_size_list_series() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = FixedSizeListBuilder::new(Float32Builder::new(), 2);
    b.values().append_slice(&[0.5, 1.5]);
    b.append(true);
    let p = common::write(
        &dir.path().join("f.parquet"),
        vec![("x", Arc::new(b.finish()) as ArrayRef)],
        10,
    );
    let t = read_all(
        &[p],
        &[ColumnSpec::series_with(
            "x",
            SeriesLength::Exact(2),
            Some(1),
        )],
        &opts(),
    )
    .unwrap();
    assert_eq!(t.batch.series("x").unwrap().values, vec![0.5, 1.5]);
}

#[test]
fn string_labels_agree_across_files_with_a_fixed_class_list() {
    let dir = tempfile::tempdir().unwrap();
    let train: ArrayRef = Arc::new(StringArray::from(vec!["cat", "dog", "bird"]));
    let test: ArrayRef = Arc::new(StringArray::from(vec!["dog"]));
    let tr = common::write(&dir.path().join("train.parquet"), vec![("y", train)], 10);
    let te = common::write(&dir.path().join("test.parquet"), vec![("y", test)], 10);
    let t = read_all(&[&tr], &[ColumnSpec::label("y")], &opts()).unwrap();
    let classes = t.class_names[0].1.clone().unwrap();
    assert_eq!(classes, ["bird", "cat", "dog"]);
    assert_eq!(t.batch.labels("y").unwrap(), [1, 2, 0]);
    // The test file alone would give dog = 0; the train class list keeps dog = 2.
    let t = read_all(
        &[&te],
        &[ColumnSpec::label_with_classes("y", classes)],
        &opts(),
    )
    .unwrap();
    assert_eq!(t.batch.labels("y").unwrap(), [2]);
}

#[test]
fn integer_labels_and_integer_ids() {
    let dir = tempfile::tempdir().unwrap();
    let y: ArrayRef = Arc::new(UInt16Array::from(vec![3u16, 0, 7]));
    let id: ArrayRef = Arc::new(Int32Array::from(vec![100, 101, 102]));
    let p = common::write(&dir.path().join("i.parquet"), vec![("y", y), ("id", id)], 2);
    let t = read_all(
        &[p],
        &[ColumnSpec::label("y"), ColumnSpec::id("id")],
        &opts(),
    )
    .unwrap();
    assert_eq!(t.batch.labels("y").unwrap(), [3, 0, 7]);
    assert_eq!(t.batch.ids(), ["100", "101", "102"]);
    assert!(t.batch.label_column("y").unwrap().classes.is_none());
    // The id column is not repeated among the columns.
    assert_eq!(t.batch.columns().len(), 1);
    let err = t.batch.text("y").unwrap_err().to_string();
    assert!(
        err.contains("no text column 'y'") && err.contains("y (label)"),
        "{err}"
    );
}
