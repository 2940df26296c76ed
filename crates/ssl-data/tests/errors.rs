//! Bad input: every error names the file, column, row, what was expected and what was found.

mod common;

use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, Float32Builder, Int64Array, ListBuilder, StringArray};
use ssl_data::{
    read_all, ColorMode, ColumnSpec, DataError, DataLoader, LoaderConfig, ParquetSource,
    ReadOptions, SeriesLength,
};

fn skip() -> ReadOptions {
    ReadOptions {
        skip_bad_rows: true,
        ..ReadOptions::default()
    }
}

#[test]
fn missing_file_and_empty_glob() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.parquet");
    let err = ParquetSource::open(&[&missing]).unwrap_err();
    assert!(matches!(err, DataError::FileNotFound { .. }));
    assert!(err.to_string().contains("nope.parquet"), "{err}");
    let err = ParquetSource::open(&[dir.path().join("*.parquet")]).unwrap_err();
    assert!(err.to_string().contains("no data files found"), "{err}");
    let err = ParquetSource::open(&[dir.path()]).unwrap_err();
    assert!(matches!(err, DataError::NoFiles { .. }), "{err}");
}

#[test]
fn a_file_that_is_not_parquet() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fake.parquet");
    std::fs::write(&p, b"this is not parquet at all").unwrap();
    let err = ParquetSource::open(&[&p]).unwrap_err();
    assert!(matches!(err, DataError::Parquet { .. }));
    assert!(err.to_string().contains("fake.parquet"), "{err}");
}

#[test]
fn missing_column_lists_the_columns_that_exist() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::id_file(dir.path(), "f", 3, 10);
    let err = read_all(&[&p], &[ColumnSpec::text("txt")], &ReadOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::MissingColumn { .. }));
    assert!(
        msg.contains("'txt'") && msg.contains("f.parquet") && msg.contains("id, value"),
        "{msg}"
    );
}

#[test]
fn wrong_column_type_says_expected_and_found() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::id_file(dir.path(), "f", 3, 10);
    let err = read_all(&[&p], &[ColumnSpec::text("value")], &ReadOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::WrongColumnType { .. }));
    assert!(
        msg.contains("Int64")
            && msg.contains("Utf8")
            && msg.contains("'value'")
            && msg.contains("f.parquet"),
        "{msg}"
    );
    let err = read_all(&[&p], &[ColumnSpec::series("id")], &ReadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("List<Float32"), "{err}");
}

#[test]
fn empty_data_set() {
    let dir = tempfile::tempdir().unwrap();
    let p = common::id_file(dir.path(), "empty", 0, 10);
    let err = ParquetSource::open(&[&p]).unwrap_err();
    assert!(matches!(err, DataError::EmptyDataset { .. }));
    assert!(err.to_string().contains("empty.parquet"), "{err}");
}

fn images_with_corrupt_row(dir: &std::path::Path) -> std::path::PathBuf {
    let mut rows: Vec<Option<Vec<u8>>> = (0..6).map(|i| Some(common::grey_png(4, 4, i))).collect();
    rows[3] = Some(b"\x89PNG garbage".to_vec());
    rows[4] = None;
    let arr: ArrayRef = Arc::new(BinaryArray::from_iter(rows));
    let labels: ArrayRef = Arc::new(Int64Array::from_iter_values(0..6));
    common::write(
        &dir.join("img.parquet"),
        vec![("image", arr), ("label", labels)],
        2,
    )
}

#[test]
fn corrupt_image_is_an_error_naming_file_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let p = images_with_corrupt_row(dir.path());
    let cols = [ColumnSpec::image("image", ColorMode::Grey, None)];
    let err = read_all(&[&p], &cols, &ReadOptions::default()).unwrap_err();
    match &err {
        DataError::BadRow {
            row,
            column,
            reason,
            path,
        } => {
            assert_eq!((*row, column.as_str()), (3, "image"));
            assert!(reason.contains("cannot decode image"), "{reason}");
            assert!(path.ends_with("img.parquet"));
        }
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("skip_bad_rows"));
}

#[test]
fn skipped_rows_are_counted_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let p = images_with_corrupt_row(dir.path());
    let cols = [
        ColumnSpec::image("image", ColorMode::Grey, None),
        ColumnSpec::label("label"),
    ];
    let t = read_all(&[&p], &cols, &skip()).unwrap();
    assert_eq!(t.batch.labels("label").unwrap(), [0, 1, 2, 5]);
    assert_eq!(t.bad_rows.count, 2);
    let rows: Vec<usize> = t.bad_rows.examples.iter().map(|b| b.row).collect();
    assert_eq!(rows, [3, 4]);
    assert!(t.bad_rows.examples[1].reason.contains("null"));
    assert!(t
        .bad_rows
        .to_string()
        .contains("img.parquet row 3 column 'image'"));

    // The streaming loader reports the same.
    let src = ParquetSource::open(&[&p]).unwrap();
    let cfg = LoaderConfig {
        skip_bad_rows: true,
        batch_size: 2,
        ..LoaderConfig::new(cols.to_vec())
    };
    let mut loader = DataLoader::new(&src, cfg).unwrap();
    let mut n = 0;
    while let Some(b) = loader.next_batch().unwrap() {
        n += b.len();
    }
    assert_eq!((n, loader.bad_rows().count), (4, 2));
}

#[test]
fn every_row_bad_is_an_empty_data_set() {
    let dir = tempfile::tempdir().unwrap();
    let arr: ArrayRef = Arc::new(BinaryArray::from_iter_values([b"x", b"y"]));
    let p = common::write(&dir.path().join("bad.parquet"), vec![("image", arr)], 10);
    let err = read_all(
        &[&p],
        &[ColumnSpec::image("image", ColorMode::Grey, None)],
        &skip(),
    )
    .unwrap_err();
    assert!(matches!(err, DataError::EmptyDataset { .. }), "{err}");
}

#[test]
fn images_of_different_sizes_need_resize() {
    let dir = tempfile::tempdir().unwrap();
    let arr: ArrayRef = Arc::new(BinaryArray::from_iter_values([
        common::grey_png(4, 4, 0),
        common::grey_png(5, 4, 0),
    ]));
    let p = common::write(&dir.path().join("sizes.parquet"), vec![("image", arr)], 10);
    let err = read_all(
        &[&p],
        &[ColumnSpec::image("image", ColorMode::Grey, None)],
        &ReadOptions::default(),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("row 1") && err.to_string().contains("resize"),
        "{err}"
    );
    let ok = read_all(
        &[&p],
        &[ColumnSpec::image("image", ColorMode::Grey, Some([4, 4]))],
        &ReadOptions::default(),
    )
    .unwrap();
    assert_eq!(ok.batch.image("image").unwrap().shape, [2, 1, 4, 4]);
}

#[test]
fn wrong_series_length_and_null_series() {
    let dir = tempfile::tempdir().unwrap();
    let mut b = ListBuilder::new(Float32Builder::new());
    b.values().append_slice(&[1.0, 2.0, 3.0]);
    b.append(true);
    b.values().append_slice(&[1.0, 2.0]);
    b.append(true);
    b.append(false);
    let p = common::write(
        &dir.path().join("series.parquet"),
        vec![("x", Arc::new(b.finish()) as ArrayRef)],
        10,
    );
    let exact = [ColumnSpec::series_with("x", SeriesLength::Exact(3), None)];
    let err = read_all(&[&p], &exact, &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("row 1") && err.contains("expected series length 3, found 2"),
        "{err}"
    );
    let t = read_all(&[&p], &exact, &skip()).unwrap();
    assert_eq!(t.batch.len(), 1);
    assert_eq!(t.bad_rows.count, 2);
    assert!(
        t.bad_rows.examples[1].reason.contains("null"),
        "{}",
        t.bad_rows
    );
}

#[test]
fn label_outside_the_class_list() {
    let dir = tempfile::tempdir().unwrap();
    let y: ArrayRef = Arc::new(StringArray::from(vec!["cat", "wolf"]));
    let p = common::write(&dir.path().join("y.parquet"), vec![("y", y)], 10);
    let cols = [ColumnSpec::label_with_classes(
        "y",
        vec!["cat".into(), "dog".into()],
    )];
    let err = read_all(&[&p], &cols, &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("row 1") && err.contains("'wolf' is not in the class list"),
        "{err}"
    );
}

#[test]
fn oversized_images_are_refused_from_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let rows = vec![
        Some(common::grey_png(4, 4, 1)),
        Some(common::png_header(20_000, 20_000)),
        Some(common::png_header(20_000, 20_000)),
    ];
    let arr: ArrayRef = Arc::new(BinaryArray::from_iter(rows));
    let p = common::write(&dir.path().join("big.parquet"), vec![("image", arr)], 3);
    let start = std::time::Instant::now();
    // Even with skip_bad_rows the limit is an error, not a skipped row.
    let cols = [ColumnSpec::image("image", ColorMode::Rgb, None)];
    let err = read_all(&[&p], &cols, &skip()).unwrap_err();
    assert!(start.elapsed().as_secs() < 5);
    match &err {
        DataError::ImageTooLarge {
            row,
            column,
            width,
            height,
            limit,
            ..
        } => {
            assert_eq!((*row, column.as_str()), (1, "image"));
            assert_eq!((*width, *height), (20_000, 20_000));
            assert_eq!(*limit, ssl_data::DEFAULT_MAX_IMAGE_PIXELS);
        }
        other => panic!("unexpected {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("big.parquet") && msg.contains("max_image_pixels"),
        "{msg}"
    );
    // A raised limit lets the first image through and stops at the header-only one, which
    // then fails to decode as a bad row.
    let cols = [ColumnSpec::image("image", ColorMode::Rgb, None).with_max_pixels(16)];
    let t = read_all(&[&p], &cols, &skip());
    assert!(matches!(t, Err(DataError::ImageTooLarge { row: 1, .. })));
    let cols = [ColumnSpec::image("image", ColorMode::Rgb, None).with_max_pixels(15)];
    let err = read_all(&[&p], &cols, &skip()).unwrap_err();
    assert!(
        matches!(err, DataError::ImageTooLarge { row: 0, .. }),
        "{err}"
    );
}

#[test]
fn a_resize_over_the_pixel_limit_is_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let p = images_with_corrupt_row(dir.path());
    let cols = [ColumnSpec::image(
        "image",
        ColorMode::Grey,
        Some([100_000, 100_000]),
    )];
    let err = read_all(&[&p], &cols, &ReadOptions::default()).unwrap_err();
    assert!(matches!(err, DataError::ResizeTooLarge { .. }), "{err}");
    assert!(err.to_string().contains("max_image_pixels"), "{err}");
    let cols = [ColumnSpec::image("image", ColorMode::Grey, Some([8, 8])).with_max_pixels(64)];
    assert!(read_all(&[&p], &cols, &skip()).is_ok());
}
