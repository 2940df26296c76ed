//! The embeddings writer: schema, metadata, row groups, atomic rename.

use std::collections::BTreeMap;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{DataType, Float32Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use ssl_data::{read_embeddings, DataError, EmbeddingWriter, EmbeddingWriterOptions};

fn metadata() -> BTreeMap<String, String> {
    [
        ("model", "vit-tiny"),
        ("checkpoint", "runs/a/step-100"),
        ("pooling", "cls"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

#[test]
fn written_file_reads_back_with_the_parquet_crate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("emb.parquet");
    let options = EmbeddingWriterOptions {
        rows_per_group: 4,
        ..EmbeddingWriterOptions::default()
    };
    let mut w = EmbeddingWriter::create_with_options(&path, 3, metadata(), options).unwrap();
    for chunk in 0..3 {
        let ids: Vec<String> = (0..3).map(|i| format!("row-{}", chunk * 3 + i)).collect();
        let values: Vec<f32> = (0..9).map(|i| (chunk * 9 + i) as f32).collect();
        w.write(&ids, &values).unwrap();
    }
    assert!(!path.exists(), "final file must not exist before finish");
    assert!(dir.path().join("emb.parquet.tmp").exists());
    assert_eq!(w.finish().unwrap(), 9);
    assert!(path.exists() && !dir.path().join("emb.parquet.tmp").exists());

    let reader =
        ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&path).unwrap()).unwrap();
    let meta = reader.metadata().clone();
    assert_eq!(meta.num_row_groups(), 3, "4 + 4 + 1 rows");
    let kv: BTreeMap<String, String> = meta
        .file_metadata()
        .key_value_metadata()
        .unwrap()
        .iter()
        .map(|kv| (kv.key.clone(), kv.value.clone().unwrap_or_default()))
        .collect();
    assert_eq!(kv["model"], "vit-tiny");
    assert_eq!(kv["dimension"], "3");
    let schema = reader.schema().clone();
    assert_eq!(schema.field(0).data_type(), &DataType::Utf8);
    assert!(
        matches!(schema.field(1).data_type(), DataType::FixedSizeList(f, 3) if f.data_type() == &DataType::Float32)
    );
    let mut ids = Vec::new();
    let mut values = Vec::new();
    for batch in reader.build().unwrap() {
        let batch = batch.unwrap();
        ids.extend(
            batch
                .column(0)
                .as_string::<i32>()
                .iter()
                .map(|s| s.unwrap().to_string()),
        );
        let emb = batch.column(1).as_fixed_size_list();
        let v = emb.values().as_primitive::<Float32Type>();
        values.extend_from_slice(&v.values()[emb.offset() * 3..(emb.offset() + emb.len()) * 3]);
    }
    assert_eq!(ids[8], "row-8");
    assert_eq!(values, (0..27).map(|i| i as f32).collect::<Vec<_>>());

    let back = read_embeddings(&path).unwrap();
    assert_eq!((back.ids, back.values, back.dim), (ids, values, 3));
    assert_eq!(back.metadata["pooling"], "cls");
}

#[test]
fn dropping_without_finish_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("emb.parquet");
    let mut w = EmbeddingWriter::create(&path, 2, metadata()).unwrap();
    w.write(&["a"], &[1.0, 2.0]).unwrap();
    drop(w);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn wrong_shapes_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("emb.parquet");
    let mut w = EmbeddingWriter::create(&path, 4, metadata()).unwrap();
    let err = w.write(&["a", "b"], &[0.0; 7]).unwrap_err();
    assert!(
        err.to_string()
            .contains("expected 2 x 4 = 8 embedding values for 2 ids, found 7"),
        "{err}"
    );
    let err =
        EmbeddingWriter::create(dir.path().join("x.parquet"), 4, [("dimension", "5")]).unwrap_err();
    assert!(matches!(err, DataError::Write { .. }));
    assert!(matches!(
        read_embeddings(dir.path().join("none.parquet")),
        Err(DataError::FileNotFound { .. })
    ));
}
