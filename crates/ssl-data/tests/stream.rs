//! `ExampleStream`: examples made from loader batches, resumed exactly from any position.

mod common;

use ssl_data::{ColumnSpec, DataError, ExampleStream, LoaderConfig, ParquetSource, StreamPosition};

fn config(batch: usize, rank: usize, world: usize) -> LoaderConfig {
    LoaderConfig {
        columns: vec![ColumnSpec::id("id"), ColumnSpec::label("value")],
        batch_size: batch,
        seed: 5,
        shuffle_buffer: 16,
        epochs: None,
        rank,
        world_size: world,
        ..LoaderConfig::default()
    }
}

/// Drops rows whose global index is a multiple of 3 and makes two examples of the others, so
/// chunks have varying sizes (some none).
fn transform(b: ssl_data::Batch) -> Result<Vec<(usize, u8)>, DataError> {
    Ok(b.rows()
        .iter()
        .filter(|&&r| r % 3 != 0)
        .flat_map(|&r| [(r, 0u8), (r, 1u8)])
        .collect())
}

fn open(dir: &std::path::Path, groups: usize) -> ParquetSource {
    common::id_file(dir, "a", 30, 30 / groups);
    common::id_file(dir, "b", 20, 20 / groups);
    ParquetSource::open(&[dir.join("a.parquet"), dir.join("b.parquet")]).unwrap()
}

#[test]
fn resumes_exactly_from_any_position() {
    let dir = tempfile::tempdir().unwrap();
    let source = open(dir.path(), 5);
    let mut s = ExampleStream::new(
        &source,
        config(7, 0, 1),
        StreamPosition::default(),
        2,
        transform,
    )
    .unwrap();
    let mut seen = Vec::new();
    let mut positions = Vec::new();
    for n in [5usize, 1, 9, 13, 2, 40, 3, 11] {
        positions.push((s.position(), seen.len()));
        seen.extend(s.take(n).unwrap());
    }
    // Two epochs' worth at least, every row but multiples of 3 twice per epoch.
    assert!(seen.len() >= 84);
    let first: Vec<usize> = seen.iter().take(66).map(|e| e.0).collect();
    let mut sorted = first.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, (0..50).filter(|r| r % 3 != 0).collect::<Vec<_>>());
    for (pos, at) in positions {
        let mut r = ExampleStream::new(&source, config(7, 0, 1), pos, 2, transform).unwrap();
        let rest = r.take(seen.len() - at).unwrap();
        assert_eq!(rest, seen[at..], "resumed from {pos:?}");
    }
}

#[test]
fn position_round_trips_through_json() {
    let p = StreamPosition {
        loader: ssl_data::Position {
            epoch: 2,
            row_group: 3,
            offset: 4,
        },
        skip: 9,
    };
    let v = serde_json::to_value(p).unwrap();
    assert_eq!(serde_json::from_value::<StreamPosition>(v).unwrap(), p);
}

#[test]
fn ranks_share_rows_when_row_groups_are_few() {
    let dir = tempfile::tempdir().unwrap();
    // One row group per file: two row groups for three ranks.
    let source = open(dir.path(), 1);
    let mut all = Vec::new();
    for rank in 0..3 {
        let mut cfg = config(4, rank, 3);
        cfg.epochs = Some(1);
        let mut s =
            ExampleStream::new(&source, cfg, StreamPosition::default(), 1, transform).unwrap();
        let got = s.take(1000).unwrap();
        assert!(got.iter().all(|e| e.0 % 3 == rank));
        all.extend(got.into_iter().map(|e| e.0));
        assert!(s.take(1).unwrap().is_empty(), "one epoch only");
    }
    all.sort();
    all.dedup();
    assert_eq!(all, (0..50).filter(|r| r % 3 != 0).collect::<Vec<_>>());
}

#[test]
fn transform_errors_reach_the_consumer() {
    let dir = tempfile::tempdir().unwrap();
    let source = open(dir.path(), 5);
    let mut s = ExampleStream::<u8, DataError>::new(
        &source,
        config(7, 0, 1),
        StreamPosition::default(),
        2,
        |_| {
            Err(DataError::InvalidConfig {
                reason: "boom".into(),
            })
        },
    )
    .unwrap();
    let e = s.take(3).unwrap_err();
    assert!(e.to_string().contains("boom"), "{e}");
}

#[test]
fn rows_the_loader_skips_are_counted() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let ids: arrow::array::ArrayRef = Arc::new(arrow::array::StringArray::from_iter_values(
        (0..12).map(|i| format!("r{i}")),
    ));
    let values: arrow::array::ArrayRef = Arc::new(arrow::array::Int64Array::from_iter(
        (0..12).map(|i| (i != 7).then_some(i as i64)),
    ));
    let path = common::write(
        &dir.path().join("bad.parquet"),
        vec![("id", ids), ("value", values)],
        4,
    );
    let source = ParquetSource::open(&[path]).unwrap();
    let mut cfg = config(5, 0, 1);
    cfg.epochs = Some(1);
    cfg.skip_bad_rows = true;
    let mut s = ExampleStream::new(&source, cfg, StreamPosition::default(), 1, |b| {
        Ok::<_, DataError>(b.rows().to_vec())
    })
    .unwrap();
    let mut rows = s.take(100).unwrap();
    rows.sort();
    assert_eq!(rows, (0..12).filter(|&r| r != 7).collect::<Vec<_>>());
    assert_eq!(s.bad_rows().count, 1);
}
