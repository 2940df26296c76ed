//! Parquet in S3-compatible object storage, against a real server on loopback: moto's server
//! mode, which `.ci/run` starts and names in `SSL_TEST_S3_ENDPOINT`. Files are uploaded with the
//! `object_store` client itself and read back through `ParquetSource`, `read_all`, `DataLoader`
//! and `read_numeric_column`, and compared with the same files read locally.
//!
//! Without `SSL_TEST_S3_ENDPOINT` the tests print a loud skip line and pass, unless `CI` is set:
//! then they fail, so CI cannot skip them silently. By hand:
//! `pip install 'moto[server]' && python3 -m moto.server -H 127.0.0.1 -p 5123 &` and
//! `SSL_TEST_S3_ENDPOINT=http://127.0.0.1:5123 cargo test -p ssl-data --test s3`.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Once};

use arrow::array::{ArrayRef, Int64Array, StringArray};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as KeyPath;
use object_store::{ObjectStoreExt, PutPayload};
use parquet::arrow::arrow_reader::{RowSelection, RowSelector};
use ssl_data::{
    heldout_label_column, read_all, read_numeric_column, ColumnSpec, DataError, DataLoader,
    LoaderConfig, ParquetSource, ReadOptions,
};

/// The server's endpoint, with the client's environment pointed at it; `None` (after a loud
/// line) when no server was given outside CI.
fn endpoint() -> Option<String> {
    let endpoint = std::env::var("SSL_TEST_S3_ENDPOINT").unwrap_or_default();
    if endpoint.is_empty() {
        assert!(
            std::env::var_os("CI").is_none(),
            "SSL_TEST_S3_ENDPOINT is not set but CI is: .ci/run must start the S3-compatible \
             server (moto) and export its endpoint, these tests may not be skipped in CI"
        );
        // Straight to stderr: the test harness captures eprintln! of passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "\n!!! SKIPPED: the S3 tests need an S3-compatible server: \
             `python3 -m moto.server -H 127.0.0.1 -p 5123 &` and \
             SSL_TEST_S3_ENDPOINT=http://127.0.0.1:5123 (CI runs them) !!!\n"
        );
        return None;
    }
    // Every test of this binary sets the same values, once, before any of them reads them.
    static ENV: Once = Once::new();
    ENV.call_once(|| {
        std::env::set_var("AWS_ENDPOINT_URL", &endpoint);
        std::env::set_var("AWS_ACCESS_KEY_ID", "testing");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "testing");
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_ALLOW_HTTP", "true");
        // This test's own object_store client (the uploads) needs rustls's crypto provider,
        // which ssl-data installs only when it first opens a URL.
        #[allow(deprecated)]
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
    Some(endpoint)
}

/// Creates `bucket` by a plain HTTP PUT (object_store has no bucket API; moto takes the request
/// unsigned).
fn create_bucket(endpoint: &str, bucket: &str) {
    let host = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let mut conn = std::net::TcpStream::connect(host).expect("connect to the S3 server");
    write!(
        conn,
        "PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "create bucket {bucket}: {answer}"
    );
}

/// A bucket name of its own for each test and process (moto keeps buckets while it runs).
fn bucket_name(test: &str) -> String {
    format!("ssl-data-{test}-{}", std::process::id())
}

/// Uploads local files to `bucket` under the given keys, through object_store.
fn upload(bucket: &str, files: &[(&str, &Path)]) {
    let store = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (key, path) in files {
        let bytes = std::fs::read(path).unwrap();
        rt.block_on(store.put(&KeyPath::from(*key), PutPayload::from(bytes)))
            .unwrap();
    }
}

/// `n` rows: `id` ("{name}-{i}"), `value` (i), `text` (a kilobyte or so, different per row).
fn text_file(dir: &Path, name: &str, n: usize, rows_per_group: usize) -> PathBuf {
    let ids: ArrayRef = Arc::new(StringArray::from_iter_values(
        (0..n).map(|i| format!("{name}-{i}")),
    ));
    let values: ArrayRef = Arc::new(Int64Array::from_iter_values((0..n as i64).map(|i| i % 3)));
    let text: ArrayRef = Arc::new(StringArray::from_iter_values((0..n).map(|i| {
        (0..60)
            .map(|w| format!("w{}x{}", i * 7919 + w, w * 31))
            .collect::<Vec<_>>()
            .join(" ")
    })));
    common::write(
        &dir.join(format!("{name}.parquet")),
        vec![("id", ids), ("value", values), ("text", text)],
        rows_per_group,
    )
}

fn columns() -> Vec<ColumnSpec> {
    vec![
        ColumnSpec::id("id"),
        ColumnSpec::text("text"),
        ColumnSpec::label("value"),
    ]
}

/// Every batch of a shuffled, multi-worker loader over `source`.
fn stream(source: &ParquetSource) -> Vec<ssl_data::Batch> {
    let config = LoaderConfig {
        batch_size: 7,
        seed: 11,
        shuffle_buffer: 20,
        workers: 3,
        ..LoaderConfig::new(columns())
    };
    let mut loader = DataLoader::new(source, config).unwrap();
    let mut out = Vec::new();
    while let Some(batch) = loader.next_batch().unwrap() {
        out.push(batch);
    }
    out
}

#[test]
fn a_prefix_an_object_and_globs_read_as_the_local_files() {
    let Some(endpoint) = endpoint() else { return };
    let bucket = bucket_name("read");
    create_bucket(&endpoint, &bucket);
    let dir = tempfile::tempdir().unwrap();
    // a: 150 rows of ~1 KB text in row groups of 40 (larger than the 64 KiB footer fetch, so
    // the footer is the tail of the object); b: 9 rows; c (one level down): 25 rows.
    let a = text_file(dir.path(), "a", 150, 40);
    let b = text_file(dir.path(), "b", 9, 4);
    let c = text_file(dir.path(), "c", 25, 10);
    assert!(std::fs::metadata(&a).unwrap().len() > 100_000);
    let readme = dir.path().join("readme.txt");
    std::fs::write(&readme, "not parquet").unwrap();
    upload(
        &bucket,
        &[
            ("data/a.parquet", &a),
            ("data/b.parquet", &b),
            ("data/sub/c.parquet", &c),
            ("data/readme.txt", &readme),
            ("other/a.parquet", &a),
        ],
    );
    let url = |key: &str| format!("s3://{bucket}/{key}");
    let local = [a.clone(), b.clone(), c.clone()];

    // A prefix: every *.parquet object below it, sorted by key (the text object is left out).
    let source = ParquetSource::open(&[url("data/")]).unwrap();
    assert_eq!(
        source.files(),
        [
            url("data/a.parquet"),
            url("data/b.parquet"),
            url("data/sub/c.parquet")
        ]
    );
    let local_source = ParquetSource::open(&local).unwrap();
    assert_eq!(source.num_rows(), 184);
    assert_eq!(source.num_row_groups(), local_source.num_row_groups());
    assert_eq!(source.schema(), local_source.schema());
    // Without the trailing slash the key names no object, so it is read as a prefix too.
    let no_slash = ParquetSource::open(&[url("data")]).unwrap();
    assert_eq!(no_slash.files(), source.files());
    // One object.
    let one = ParquetSource::open(&[url("data/b.parquet")]).unwrap();
    assert_eq!(one.files(), [url("data/b.parquet")]);
    assert_eq!(one.num_rows(), 9);
    // Globs: `*` stays within a path segment, `**` crosses them.
    let glob = ParquetSource::open(&[url("data/*.parquet")]).unwrap();
    assert_eq!(glob.files(), [url("data/a.parquet"), url("data/b.parquet")]);
    let deep = ParquetSource::open(&[url("data/**/?.parquet")]).unwrap();
    assert_eq!(deep.files(), source.files());
    // Local paths and URLs mix, in the order given.
    let mixed = ParquetSource::open(&[url("data/b.parquet"), a.display().to_string()]).unwrap();
    assert_eq!(
        mixed.files(),
        [url("data/b.parquet"), a.display().to_string()]
    );

    // Every value equal to the local read: the whole table, and a shuffled multi-worker
    // stream batch for batch (the stream is a function of the row-group layout and config).
    let remote_table = read_all(&[url("data/")], &columns(), &ReadOptions::default()).unwrap();
    let local_table = read_all(&local, &columns(), &ReadOptions::default()).unwrap();
    assert_eq!(remote_table.batch.len(), 184);
    assert_eq!(remote_table, local_table);
    let remote_batches = stream(&source);
    assert_eq!(remote_batches, stream(&local_source));
    assert_eq!(remote_batches.iter().map(|b| b.len()).sum::<usize>(), 184);
    // One rank's share reads only its row groups.
    let share = read_all(
        &[url("data/")],
        &columns(),
        &ReadOptions::for_rank(1, 2, false),
    )
    .unwrap();
    let local_share = read_all(&local, &columns(), &ReadOptions::for_rank(1, 2, false)).unwrap();
    assert_eq!(share, local_share);

    // The parquet crate's reader over chosen row groups and columns, with a row selection.
    let values = |source: &ParquetSource| -> Vec<i64> {
        let column = source.file_schema(0).unwrap().index_of("value").unwrap();
        let selection = RowSelection::from(vec![
            RowSelector::skip(5),
            RowSelector::select(50),
            RowSelector::skip(25),
        ]);
        let reader = source
            .reader_builder(0, &[1, 2], &[column])
            .unwrap()
            .with_row_selection(selection)
            .build()
            .unwrap();
        reader
            .flat_map(|b| {
                let b = b.unwrap();
                let v = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                v.values().to_vec()
            })
            .collect()
    };
    assert_eq!(source.row_group_rows(0), [40, 40, 40, 30]);
    let remote_values = values(&source);
    assert_eq!(remote_values.len(), 50);
    assert_eq!(remote_values, values(&local_source));

    // The readers that open sources themselves.
    assert_eq!(
        read_numeric_column(&[url("data/")], "value").unwrap(),
        read_numeric_column(&local, "value").unwrap()
    );
    assert_eq!(
        heldout_label_column(&[url("data/")], "value", 0.1).unwrap(),
        Some("value".to_string())
    );
}

#[test]
fn a_footer_larger_than_the_first_fetch_is_read_whole() {
    let Some(endpoint) = endpoint() else { return };
    let bucket = bucket_name("footer");
    create_bucket(&endpoint, &bucket);
    let dir = tempfile::tempdir().unwrap();
    // 1,200 row groups of one row: the metadata alone is well over the 64 KiB fetched first.
    let n = 1200;
    let ids: ArrayRef = Arc::new(StringArray::from_iter_values(
        (0..n).map(|i| format!("row-{i}")),
    ));
    let values: ArrayRef = Arc::new(Int64Array::from_iter_values(0..n as i64));
    let path = common::write(
        &dir.path().join("many.parquet"),
        vec![("id", ids), ("value", values)],
        1,
    );
    assert!(std::fs::metadata(&path).unwrap().len() > 200_000);
    upload(&bucket, &[("many.parquet", &path)]);
    let url = format!("s3://{bucket}/many.parquet");
    let source = ParquetSource::open(&[&url]).unwrap();
    assert_eq!((source.num_rows(), source.num_row_groups()), (n, n));
    let cols = [ColumnSpec::id("id"), ColumnSpec::label("value")];
    assert_eq!(
        read_all(&[&url], &cols, &ReadOptions::default()).unwrap(),
        read_all(&[&path], &cols, &ReadOptions::default()).unwrap()
    );
}

#[test]
fn missing_buckets_keys_and_prefixes_name_the_url() {
    let Some(endpoint) = endpoint() else { return };
    let bucket = bucket_name("missing");
    create_bucket(&endpoint, &bucket);
    let dir = tempfile::tempdir().unwrap();
    let b = text_file(dir.path(), "b", 5, 5);
    let readme = dir.path().join("readme.txt");
    std::fs::write(&readme, "not parquet at all").unwrap();
    upload(
        &bucket,
        &[("data/b.parquet", &b), ("data/readme.txt", &readme)],
    );

    let error = |url: &str| {
        let e = ParquetSource::open(&[url]).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(url), "{url}: {text}");
        (e, text)
    };
    // No such bucket.
    let (e, text) = error(&format!("s3://no-such-bucket-{}/data/", std::process::id()));
    assert!(matches!(e, DataError::ObjectStore { .. }), "{e:?}");
    assert!(text.contains("cannot list"), "{text}");
    assert!(
        text.contains("the bucket (or container) does not exist"),
        "{text}"
    );
    // No object with that key, and nothing under it.
    let (e, text) = error(&format!("s3://{bucket}/data/nope.parquet"));
    assert!(matches!(e, DataError::ObjectStore { .. }), "{e:?}");
    assert!(text.contains("check the bucket and the key"), "{text}");
    // A prefix or glob with no Parquet object below it.
    let (e, _) = error(&format!("s3://{bucket}/empty/"));
    assert!(matches!(e, DataError::NoFiles { .. }), "{e:?}");
    let (e, _) = error(&format!("s3://{bucket}/data/*.csv"));
    assert!(matches!(e, DataError::NoFiles { .. }), "{e:?}");
    // A text object: the other formats are read from local paths only, said so.
    let (e, text) = error(&format!("s3://{bucket}/data/readme.txt"));
    assert!(matches!(e, DataError::InvalidConfig { .. }), "{e:?}");
    assert!(text.contains("local paths only"), "{text}");
    // A missing column names the object's URL.
    let url = format!("s3://{bucket}/data/b.parquet");
    let e = read_all(
        &[&url],
        &[ColumnSpec::text("nope")],
        &ReadOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains(&url) && e.contains("'nope'"), "{e}");
}
