//! JSON Lines, CSV, TSV, text files and image folders read through the same source, loader
//! and bad-row policy as Parquet: the tests write small files and compare with Parquet.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, StringArray};
use ssl_data::{
    read_all, ColorMode, ColumnSpec, DataError, DataLoader, LoaderConfig, ParquetSource,
    ReadOptions,
};

/// Documents with quotes, commas and a label, as every format writes them.
fn docs(n: usize) -> Vec<(String, i64)> {
    (0..n)
        .map(|i| {
            (
                format!("doc {i}, with \"quotes\" and words {}", i * 7),
                (i % 3) as i64,
            )
        })
        .collect()
}

fn write_jsonl(path: &Path, docs: &[(String, i64)]) -> PathBuf {
    let mut s = String::new();
    for (i, (t, l)) in docs.iter().enumerate() {
        s.push_str(&serde_json::json!({"text": t, "label": l}).to_string());
        s.push('\n');
        if i == 2 {
            s.push('\n'); // blank lines are not records
        }
    }
    std::fs::write(path, s).unwrap();
    path.to_path_buf()
}

fn write_csv(path: &Path, docs: &[(String, i64)]) -> PathBuf {
    let mut s = String::from("text,label\r\n");
    for (t, l) in docs {
        s.push_str(&format!("\"{}\",{l}\r\n", t.replace('"', "\"\"")));
    }
    std::fs::write(path, s).unwrap();
    path.to_path_buf()
}

fn write_parquet(path: &Path, docs: &[(String, i64)]) -> PathBuf {
    let text: ArrayRef = Arc::new(StringArray::from_iter_values(docs.iter().map(|d| &d.0)));
    let label: ArrayRef = Arc::new(Int64Array::from_iter_values(docs.iter().map(|d| d.1)));
    common::write(path, vec![("text", text), ("label", label)], 64)
}

fn texts_and_labels(paths: &[PathBuf]) -> (Vec<String>, Vec<i64>) {
    let cols = [ColumnSpec::text("text"), ColumnSpec::label("label")];
    let t = read_all(paths, &cols, &ReadOptions::default()).unwrap();
    (
        t.batch.text("text").unwrap().to_vec(),
        t.batch.labels("label").unwrap().to_vec(),
    )
}

#[test]
fn jsonl_csv_and_txt_give_the_parquet_documents() {
    let dir = tempfile::tempdir().unwrap();
    let d = docs(50);
    let want = texts_and_labels(&[write_parquet(&dir.path().join("d.parquet"), &d)]);
    assert_eq!(want.0.len(), 50);
    let jsonl = write_jsonl(&dir.path().join("d.jsonl"), &d);
    assert_eq!(texts_and_labels(&[jsonl]), want);
    let csv = write_csv(&dir.path().join("d.csv"), &d);
    assert_eq!(texts_and_labels(&[csv]), want);
    let txt = dir.path().join("d.txt");
    let lines: Vec<&str> = d.iter().map(|x| x.0.as_str()).collect();
    std::fs::write(&txt, format!("{}\n\n   \n", lines.join("\n"))).unwrap();
    let t = read_all(
        &[&txt],
        &[ColumnSpec::text("text")],
        &ReadOptions::default(),
    )
    .unwrap();
    assert_eq!(t.batch.text("text").unwrap(), want.0.as_slice());
    let source = ParquetSource::open(&[&txt]).unwrap();
    assert_eq!(source.format(0), Some("text"));
    assert_eq!(source.num_rows(), 50);
}

#[test]
fn a_large_jsonl_is_split_into_units_that_shard_shuffle_and_resume() {
    let dir = tempfile::tempdir().unwrap();
    // Enough records for two units of 2,048.
    let d = docs(2500);
    let jsonl = write_jsonl(&dir.path().join("big.jsonl"), &d);
    let source = ParquetSource::open(&[&jsonl]).unwrap();
    assert_eq!(source.num_row_groups(), 2);
    assert_eq!(source.num_rows(), 2500);
    let config = |rank| LoaderConfig {
        batch_size: 100,
        seed: 3,
        shuffle_buffer: 10,
        rank,
        world_size: 2,
        ..LoaderConfig::new(vec![ColumnSpec::text("text")])
    };
    let mut seen = Vec::new();
    for rank in 0..2 {
        let mut loader = DataLoader::new(&source, config(rank)).unwrap();
        while let Some(b) = loader.next_batch().unwrap() {
            seen.extend(b.text("text").unwrap().iter().cloned());
        }
    }
    let mut want: Vec<String> = d.iter().map(|x| x.0.clone()).collect();
    assert_ne!(seen, want, "shuffled");
    seen.sort();
    want.sort();
    assert_eq!(seen, want, "the ranks together read every document once");
    // Resume from a position mid-stream gives the same batches.
    let mut loader = DataLoader::new(&source, config(0)).unwrap();
    loader.next_batch().unwrap();
    let at = loader.position();
    let rest: Vec<Vec<String>> = loader
        .map(|b| b.unwrap().text("text").unwrap().to_vec())
        .collect();
    let resumed: Vec<Vec<String>> = DataLoader::resume(&source, config(0), at)
        .unwrap()
        .map(|b| b.unwrap().text("text").unwrap().to_vec())
        .collect();
    assert_eq!(rest, resumed);
}

#[test]
fn a_malformed_line_names_the_file_and_line_and_is_skipped_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("corpus.jsonl");
    let mut lines: Vec<String> = (0..20)
        .map(|i| serde_json::json!({ "text": format!("doc {i}") }).to_string())
        .collect();
    lines[16] = "{\"text\": \"unterminated".into();
    std::fs::write(&path, lines.join("\n")).unwrap();
    let cols = [ColumnSpec::text("text")];
    let err = read_all(&[&path], &cols, &ReadOptions::default()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::BadRow { row: 16, .. }), "{msg}");
    assert!(
        msg.contains("corpus.jsonl") && msg.contains("line 17: malformed JSON"),
        "{msg}"
    );
    let opts = ReadOptions {
        skip_bad_rows: true,
        ..ReadOptions::default()
    };
    let t = read_all(&[&path], &cols, &opts).unwrap();
    assert_eq!(t.batch.len(), 19);
    assert_eq!(t.bad_rows.count, 1);
    assert!(t.bad_rows.examples[0].reason.starts_with("line 17"));
    // A CSV row with a field too many, and past the first 1,000 records (which typed the
    // label column as integers) a label that is not an integer.
    let csv = dir.path().join("bad.csv");
    let filler = "d,0\n".repeat(999);
    std::fs::write(&csv, format!("text,label\na,1\nb,2,3\n{filler}c,x\n")).unwrap();
    let err = read_all(
        &[&csv],
        &[ColumnSpec::text("text")],
        &ReadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("bad.csv") && err.contains("line 3: 3 fields where the header has 2"),
        "{err}"
    );
    let cols = [ColumnSpec::text("text"), ColumnSpec::label("label")];
    let t = read_all(&[&csv], &cols, &opts).unwrap();
    assert_eq!(t.batch.len(), 1000);
    assert_eq!(t.batch.text("text").unwrap()[0], "a");
    let reasons: Vec<&str> = t
        .bad_rows
        .examples
        .iter()
        .map(|b| b.reason.as_str())
        .collect();
    assert!(
        reasons[1].starts_with(
            "line 1003: column 'label': 'x' where the column's first rows made it an integer"
        ),
        "{reasons:?}"
    );
    // A JSON array is not JSON Lines: said when opening.
    let arr = dir.path().join("array.json");
    std::fs::write(&arr, "[{\"text\": \"a\"}]\n").unwrap();
    let err = ParquetSource::open(&[&arr]).unwrap_err().to_string();
    assert!(
        err.contains("array.json, line 1") && err.contains("jq"),
        "{err}"
    );
}

fn png(value: u8) -> Vec<u8> {
    let img = image::GrayImage::from_pixel(4, 4, image::Luma([value]));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

#[test]
fn an_image_folder_has_image_path_and_class_folder_labels() {
    let dir = tempfile::tempdir().unwrap();
    for (class, value) in [("cat", 10u8), ("dog", 200)] {
        std::fs::create_dir_all(dir.path().join(class)).unwrap();
        for i in 0..3 {
            std::fs::write(dir.path().join(format!("{class}/{i}.png")), png(value)).unwrap();
        }
    }
    std::fs::write(dir.path().join("notes.md"), "not an image").unwrap();
    let source = ParquetSource::open(&[dir.path()]).unwrap();
    assert_eq!(source.format(0), Some("image folder"));
    let names: Vec<String> = source.schema().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["image", "path", "label"]);
    let cols = [
        ColumnSpec::image("image", ColorMode::Grey, None),
        ColumnSpec::label("label"),
        ColumnSpec::id("path"),
    ];
    let t = read_all(&[dir.path()], &cols, &ReadOptions::default()).unwrap();
    assert_eq!(
        t.batch.ids(),
        [
            "cat/0.png",
            "cat/1.png",
            "cat/2.png",
            "dog/0.png",
            "dog/1.png",
            "dog/2.png"
        ]
    );
    let labels = t.batch.label_column("label").unwrap();
    assert_eq!(labels.strings(), ["cat", "cat", "cat", "dog", "dog", "dog"]);
    let images = t.batch.image("image").unwrap();
    assert_eq!(images.shape, [6, 1, 4, 4]);
    assert!((images.data[0] - 10.0 / 255.0).abs() < 1e-6);
    assert!((images.data[16 * 5] - 200.0 / 255.0).abs() < 1e-6);
    // A broken image is a bad row naming the image.
    std::fs::write(dir.path().join("dog/3.png"), b"not a png").unwrap();
    let err = read_all(&[dir.path()], &cols, &ReadOptions::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("image dog/3.png: cannot decode"), "{err}");
    // Images named one by one (or by a glob) form one set, without labels.
    let glob = format!("{}/cat/*.png", dir.path().display());
    let source = ParquetSource::open(&[glob]).unwrap();
    assert_eq!((source.num_files(), source.num_rows()), (1, 3));
    assert!(!source.has_column("label"));
}

#[test]
fn series_csv_as_json_array_cells_or_ucr_rows() {
    let dir = tempfile::tempdir().unwrap();
    let cells = dir.path().join("cells.csv");
    std::fs::write(&cells, "x,label\n\"[1, 2, 3]\",a\n\"[4.5, null]\",b\n").unwrap();
    let ucr = dir.path().join("ucr.tsv");
    std::fs::write(&ucr, "1\t1\t2\t3\n2\t4.5\tNaN\n").unwrap();
    let multi = dir.path().join("multi.jsonl");
    std::fs::write(&multi, "{\"x\": [[1, 2], [3, 4]], \"label\": \"a\"}\n").unwrap();
    for path in [&cells, &ucr] {
        let cols = [ColumnSpec::series("x"), ColumnSpec::label("label")];
        let t = read_all(&[path], &cols, &ReadOptions::default()).unwrap();
        let s = t.batch.series("x").unwrap();
        assert_eq!(s.shape(), [2, 1, 3], "{}", path.display());
        assert_eq!(&s.values[..3], [1.0, 2.0, 3.0]);
        assert_eq!(s.values[3], 4.5);
        assert_eq!(&s.mask[3..], [1, 0, 0], "null and NaN are masked");
        assert_eq!(t.batch.label_column("label").unwrap().ids.len(), 2);
    }
    let t = read_all(
        &[&multi],
        &[ColumnSpec::series("x")],
        &ReadOptions::default(),
    )
    .unwrap();
    assert_eq!(t.batch.series("x").unwrap().shape(), [1, 2, 2]);
}

#[test]
fn a_directory_of_jsonl_files_and_an_unknown_extension() {
    let dir = tempfile::tempdir().unwrap();
    let d = docs(6);
    write_jsonl(&dir.path().join("a.jsonl"), &d[..3]);
    write_jsonl(&dir.path().join("b.ndjson"), &d[3..]);
    let (texts, _) = texts_and_labels(&[dir.path().to_path_buf()]);
    assert_eq!(texts, d.iter().map(|x| x.0.clone()).collect::<Vec<_>>());
    // Beside Parquet files, a README.txt is not data.
    let pq = tempfile::tempdir().unwrap();
    write_parquet(&pq.path().join("d.parquet"), &d);
    std::fs::write(pq.path().join("README.txt"), "about the data\n").unwrap();
    let source = ParquetSource::open(&[pq.path()]).unwrap();
    assert_eq!((source.num_files(), source.format(0)), (1, Some("Parquet")));
    let odd = dir.path().join("data.bin");
    std::fs::write(&odd, b"hello").unwrap();
    let err = ParquetSource::open(&[&odd]).unwrap_err();
    assert!(matches!(err, DataError::UnknownFormat { .. }), "{err}");
}
