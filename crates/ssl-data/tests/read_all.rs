//! `read_all` by rank: each rank reads only its row groups (or, with fewer row groups than
//! ranks, every row and keeps its share) and reports each row's global index.

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, Float32Builder, Int64Array, ListBuilder, StringArray};
use ssl_data::{read_all, ColorMode, ColumnSpec, DataError, ReadOptions, Share, Table};

fn cols() -> Vec<ColumnSpec> {
    vec![ColumnSpec::id("id"), ColumnSpec::label("value")]
}

fn read(paths: &[PathBuf], rank: usize, world_size: usize) -> Table {
    read_all(
        paths,
        &cols(),
        &ReadOptions {
            rank,
            world_size,
            ..ReadOptions::default()
        },
    )
    .unwrap()
}

/// a: 10 rows in row groups of 3 (4 groups), b: 5 rows in groups of 2 (3 groups): 15 rows,
/// 7 row groups; global row `i` of a is `i`, of b `10 + i`.
fn two_files(dir: &std::path::Path) -> Vec<PathBuf> {
    vec![
        common::id_file(dir, "a", 10, 3),
        common::id_file(dir, "b", 5, 2),
    ]
}

/// The global index of a row from its id (`a-i` or `b-i`).
fn global_of(id: &str) -> usize {
    let (file, i) = id.split_once('-').unwrap();
    let i: usize = i.parse().unwrap();
    if file == "a" {
        i
    } else {
        10 + i
    }
}

#[test]
fn one_rank_reads_everything_with_indices_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let t = read(&two_files(dir.path()), 0, 1);
    assert_eq!(t.share, Share::All);
    assert_eq!(t.row_index, (0..15).collect::<Vec<_>>());
    let default = read_all(&two_files(dir.path()), &cols(), &ReadOptions::default()).unwrap();
    assert_eq!(t, default);
}

#[test]
fn ranks_read_disjoint_row_groups_covering_every_row() {
    let dir = tempfile::tempdir().unwrap();
    let paths = two_files(dir.path());
    // Global row groups: a0 [0,3) a1 [3,6) a2 [6,9) a3 [9,10) b0 [10,12) b1 [12,14) b2 [14,15).
    let starts = [0, 3, 6, 9, 10, 12, 14, 15];
    for world in [2, 3, 7] {
        let mut seen = Vec::new();
        for rank in 0..world {
            let t = read(&paths, rank, world);
            let groups: Vec<usize> = (0..7).filter(|g| g % world == rank).collect();
            assert_eq!(t.share, Share::RowGroups(groups.clone()));
            let want: Vec<usize> = groups
                .iter()
                .flat_map(|&g| starts[g]..starts[g + 1])
                .collect();
            assert_eq!(t.row_index, want, "world {world} rank {rank}");
            // The indices name the rows actually returned.
            let from_ids: Vec<usize> = t.batch.ids().iter().map(|s| global_of(s)).collect();
            assert_eq!(from_ids, want);
            assert_eq!(t.batch.len(), want.len());
            seen.extend(want);
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..15).collect::<Vec<_>>(), "world {world}");
    }
}

#[test]
fn fewer_row_groups_than_ranks_falls_back_to_every_nth_row() {
    let dir = tempfile::tempdir().unwrap();
    let paths = vec![common::id_file(dir.path(), "a", 8, 100)];
    let mut seen = Vec::new();
    for rank in 0..3 {
        let t = read(&paths, rank, 3);
        assert_eq!(t.share, Share::Rows);
        let want: Vec<usize> = (0..8).filter(|i| i % 3 == rank).collect();
        assert_eq!(t.row_index, want);
        let from_ids: Vec<usize> = t.batch.ids().iter().map(|s| global_of(s)).collect();
        assert_eq!(from_ids, want);
        let values: Vec<i64> = want.iter().map(|&i| i as i64).collect();
        assert_eq!(t.batch.labels("value").unwrap(), values);
        seen.extend(want);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..8).collect::<Vec<_>>());
    // More ranks than rows: some rank gets nothing, which is an error.
    let err = read_all(
        &paths,
        &cols(),
        &ReadOptions {
            rank: 9,
            world_size: 10,
            ..ReadOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, DataError::EmptyDataset { what } if what.contains("rank 9 of 10")),
        "{err}"
    );
}

#[test]
fn skipped_bad_rows_keep_the_global_indices_of_the_others() {
    let dir = tempfile::tempdir().unwrap();
    // 9 rows in row groups of 3; rows 1, 4 and 5 have a null text.
    let text: ArrayRef = Arc::new(StringArray::from_iter(
        (0..9).map(|i| (![1, 4, 5].contains(&i)).then(|| format!("doc {i}"))),
    ));
    let values: ArrayRef = Arc::new(Int64Array::from_iter_values(0..9));
    let p = common::write(
        &dir.path().join("t.parquet"),
        vec![("text", text), ("value", values)],
        3,
    );
    let columns = [ColumnSpec::text("text"), ColumnSpec::label("value")];
    let opts = |rank, world_size| ReadOptions {
        skip_bad_rows: true,
        rank,
        world_size,
        ..ReadOptions::default()
    };
    let all = read_all(&[&p], &columns, &opts(0, 1)).unwrap();
    assert_eq!(all.row_index, [0, 2, 3, 6, 7, 8]);
    assert_eq!(all.bad_rows.count, 3);
    let r0 = read_all(&[&p], &columns, &opts(0, 2)).unwrap();
    let r1 = read_all(&[&p], &columns, &opts(1, 2)).unwrap();
    // Rank 0 has row groups 0 and 2, rank 1 row group 1.
    assert_eq!(r0.row_index, [0, 2, 6, 7, 8]);
    assert_eq!(r1.row_index, [3]);
    assert_eq!((r0.bad_rows.count, r1.bad_rows.count), (1, 2));
    for t in [&all, &r0, &r1] {
        let values: Vec<i64> = t.row_index.iter().map(|&i| i as i64).collect();
        assert_eq!(t.batch.labels("value").unwrap(), values);
    }
    // The fallback keeps rows by global index, not by position among the good rows; rank 1
    // (rows 1 and 5, both bad) gets nothing, which is an error.
    let shares: Vec<Option<Vec<usize>>> = (0..4)
        .map(|rank| {
            read_all(&[&p], &columns, &opts(rank, 4))
                .ok()
                .map(|t| t.row_index)
        })
        .collect();
    assert_eq!(
        shares,
        [Some(vec![0, 8]), None, Some(vec![2, 6]), Some(vec![3, 7])]
    );
}

#[test]
fn ranks_outside_the_world_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let paths = two_files(dir.path());
    for (rank, world_size) in [(2, 2), (0, 0)] {
        let err = read_all(
            &paths,
            &cols(),
            &ReadOptions {
                rank,
                world_size,
                ..ReadOptions::default()
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("outside world_size"), "{err}");
    }
}

#[test]
fn old_options_without_rank_still_parse() {
    let o: ReadOptions = serde_json::from_str(r#"{"skip_bad_rows": true}"#).unwrap();
    assert_eq!((o.rank, o.world_size, o.skip_bad_rows), (0, 1, true));
}

#[test]
fn the_fallback_keeps_whole_images_and_series() {
    let dir = tempfile::tempdir().unwrap();
    let n = 5;
    let images: ArrayRef = Arc::new(BinaryArray::from_iter_values(
        (0..n).map(|i| common::grey_png(4, 3, 40 * i as u8)),
    ));
    let mut series = ListBuilder::new(Float32Builder::new());
    for i in 0..n {
        // Ragged: row i has i + 1 steps.
        for t in 0..=i {
            series.values().append_value((10 * i + t) as f32);
        }
        series.append(true);
    }
    let series: ArrayRef = Arc::new(series.finish());
    let p = common::write(
        &dir.path().join("mixed.parquet"),
        vec![("image", images), ("x", series)],
        100,
    );
    let columns = [
        ColumnSpec::image("image", ColorMode::Grey, None),
        ColumnSpec::series("x"),
    ];
    let opts = |rank, world_size| ReadOptions {
        rank,
        world_size,
        ..ReadOptions::default()
    };
    let all = read_all(&[&p], &columns, &opts(0, 1)).unwrap();
    let (img, ser) = (
        all.batch.image("image").unwrap(),
        all.batch.series("x").unwrap(),
    );
    let per_img = 3 * 4;
    let per_ser = ser.channels * ser.length;
    for rank in 0..2 {
        let t = read_all(&[&p], &columns, &opts(rank, 2)).unwrap();
        assert_eq!(t.share, Share::Rows);
        let want: Vec<usize> = (0..n).filter(|i| i % 2 == rank).collect();
        assert_eq!(t.row_index, want);
        let ti = t.batch.image("image").unwrap();
        assert_eq!(ti.shape, [want.len(), 1, 3, 4]);
        let ts = t.batch.series("x").unwrap();
        assert_eq!((ts.channels, ts.length), (ser.channels, ser.length));
        for (k, &i) in want.iter().enumerate() {
            assert_eq!(
                ti.data[k * per_img..(k + 1) * per_img],
                img.data[i * per_img..(i + 1) * per_img]
            );
            assert_eq!(
                ts.values[k * per_ser..(k + 1) * per_ser],
                ser.values[i * per_ser..(i + 1) * per_ser]
            );
            assert_eq!(
                ts.mask[k * per_ser..(k + 1) * per_ser],
                ser.mask[i * per_ser..(i + 1) * per_ser]
            );
            assert_eq!(ts.lengths[k], i + 1);
        }
    }
}
