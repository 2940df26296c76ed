//! Throughput of ssl-data on the shared evaluation data, with pyarrow as the reference.
//!
//! `cargo bench -p ssl-data` (or `cargo bench -p ssl-data --bench throughput`). The data folder
//! defaults to `../shared/data` next to the workspace; set `SSL_DATA_DIR` to use another.
//! pyarrow is looked for in `SSL_DATA_PYTHON`, then `.venv-data/bin/python` at the workspace
//! root, then `python3`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use ssl_data::{ColorMode, ColumnSpec, DataLoader, LoaderConfig, ParquetSource};

// The allocator a binary of the toolkit uses (glibc malloc returns every large buffer to the
// kernel, which costs page faults on every row group).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const REPEATS: usize = 3;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn data_dir() -> PathBuf {
    std::env::var_os("SSL_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("../shared/data"))
}

fn best_of(mut f: impl FnMut() -> usize) -> (usize, f64) {
    let mut best = f64::INFINITY;
    let mut rows = 0;
    for _ in 0..REPEATS {
        let t = Instant::now();
        rows = f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    (rows, best)
}

/// Rows per second of the loader over one epoch.
fn loader_rate(paths: &[PathBuf], columns: Vec<ColumnSpec>, shuffle: bool, workers: usize) -> f64 {
    let source = ParquetSource::open(paths).expect("open source");
    let (rows, secs) = best_of(|| {
        let config = LoaderConfig {
            batch_size: 256,
            shuffle,
            workers,
            ..LoaderConfig::new(columns.clone())
        };
        let mut n = 0;
        for batch in DataLoader::new(&source, config).expect("loader") {
            n += batch.expect("batch").len();
        }
        n
    });
    rows as f64 / secs
}

/// Rows per second of a plain single-threaded Arrow read of `columns` with the parquet crate.
fn parquet_rate(paths: &[PathBuf], columns: &[&str]) -> f64 {
    let (rows, secs) = best_of(|| {
        let mut n = 0;
        for p in paths {
            let file = std::fs::File::open(p).expect("open");
            let builder = ParquetRecordBatchReaderBuilder::try_new(file).expect("parquet");
            let roots: Vec<usize> = columns
                .iter()
                .map(|c| builder.schema().index_of(c).expect("column"))
                .collect();
            let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
            for b in builder.with_projection(mask).build().expect("reader") {
                n += b.expect("batch").num_rows();
            }
        }
        n
    });
    rows as f64 / secs
}

struct Case {
    name: &'static str,
    paths: Vec<PathBuf>,
    columns: Vec<&'static str>,
}

fn python() -> String {
    if let Ok(p) = std::env::var("SSL_DATA_PYTHON") {
        return p;
    }
    let venv = workspace().join(".venv-data/bin/python");
    if venv.exists() {
        return venv.display().to_string();
    }
    "python3".into()
}

/// Runs the pyarrow reference script; `None` (after saying why) when pyarrow is missing.
fn pyarrow_rates(cases: &[Case]) -> Option<serde_json::Value> {
    let spec: Vec<serde_json::Value> = cases
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.name,
                "paths": c.paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                "columns": c.columns,
            })
        })
        .collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/pyarrow_reference.py");
    let py = python();
    let hint = "install it with `python3 -m venv .venv-data && .venv-data/bin/pip install pyarrow` at the workspace root, or set SSL_DATA_PYTHON";
    let out = match Command::new(&py)
        .arg(&script)
        .arg(serde_json::Value::Array(spec).to_string())
        .arg(REPEATS.to_string())
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            println!("pyarrow reference skipped: cannot run {py}: {e}; {hint}");
            return None;
        }
    };
    let v: serde_json::Value = match serde_json::from_slice(&out.stdout) {
        Ok(v) => v,
        Err(_) => {
            println!(
                "pyarrow reference skipped: {py} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
    };
    if v.get("error").is_some() {
        println!("pyarrow reference skipped: pyarrow is missing for {py}; {hint}");
        return None;
    }
    Some(v)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // `cargo bench -p ssl-data -- text` runs only the sections whose name contains "text"
    // (sections: fashion, text, ucr).
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let want =
        |section: &str| filter.is_empty() || filter.iter().any(|f| section.contains(f.as_str()));
    let data = data_dir();
    let fashion = data.join("images/fashion_mnist_train.parquet");
    let linux = data.join("text/linux_doc.parquet");
    let ucr: Vec<PathBuf> = ["GunPoint", "BasicMotions", "JapaneseVowels", "ACSF1"]
        .iter()
        .flat_map(|n| {
            ["TRAIN", "TEST"].map(|s| data.join(format!("timeseries/ucr/{n}_{s}.parquet")))
        })
        .collect();
    if !fashion.exists() || !linux.exists() || ucr.iter().any(|p| !p.exists()) {
        println!(
            "ssl-data bench: data not found under {} (set SSL_DATA_DIR); nothing measured",
            data.display()
        );
        return;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("ssl-data throughput ({cores} cores, best of {REPEATS}, batches of 256, one epoch)\n");

    let cases = vec![
        Case {
            name: "fashion_image_bytes",
            paths: vec![fashion.clone()],
            columns: vec!["image", "label"],
        },
        Case {
            name: "linux_doc_text",
            paths: vec![linux.clone()],
            columns: vec!["text"],
        },
        Case {
            name: "ucr_series",
            paths: ucr.clone(),
            columns: vec!["x", "label"],
        },
    ];
    let py = pyarrow_rates(&cases);
    let py_rate = |name: &str| {
        py.as_ref()
            .and_then(|v| v.get(name))
            .and_then(|r| r.as_f64())
    };

    let mut table: Vec<(String, f64, Option<f64>)> = Vec::new();
    let mut row = |what: String, rate: f64, reference: Option<f64>| {
        let ratio = reference.map_or("-".to_string(), |r| format!("{:.2}x", r / rate));
        let r = reference.map_or("-".to_string(), |r| format!("{r:.0}"));
        println!("{what:<62} {rate:>12.0} {r:>12} {ratio:>9}");
        table.push((what, rate, reference));
    };
    println!(
        "{:<62} {:>12} {:>12} {:>9}",
        "read", "rows/s", "pyarrow", "time ratio"
    );

    // Fashion-MNIST: PNG bytes read plainly, then decoded and batched.
    let fashion_cols = || {
        vec![
            ColumnSpec::image("image", ColorMode::Grey, None),
            ColumnSpec::label("label"),
        ]
    };
    if want("fashion") {
        row(
            "fashion-mnist image+label bytes, parquet crate (1 thread)".into(),
            parquet_rate(std::slice::from_ref(&fashion), &["image", "label"]),
            py_rate("fashion_image_bytes"),
        );
        row(
            "fashion-mnist PNG decode + batch (B,1,28,28), 1 worker".into(),
            loader_rate(std::slice::from_ref(&fashion), fashion_cols(), true, 1),
            None,
        );
        row(
            format!(
                "fashion-mnist PNG decode + batch (B,1,28,28), {} workers",
                cores.min(4)
            ),
            loader_rate(std::slice::from_ref(&fashion), fashion_cols(), true, 0),
            None,
        );
    }
    // Linux docs: the text column.
    if want("text") {
        row(
            "linux_doc text, parquet crate (1 thread)".into(),
            parquet_rate(std::slice::from_ref(&linux), &["text"]),
            py_rate("linux_doc_text"),
        );
        row(
            format!(
                "linux_doc text -> Vec<String> batches, loader, {} workers",
                cores.min(4)
            ),
            loader_rate(
                std::slice::from_ref(&linux),
                vec![ColumnSpec::text("text")],
                false,
                0,
            ),
            py_rate("linux_doc_text"),
        );
    }
    // UCR: each data set on its own (channel counts differ between sets).
    if want("ucr") {
        let mut ucr_rows = 0usize;
        let mut ucr_secs = 0.0f64;
        for pair in ucr.chunks(2) {
            let source = ParquetSource::open(pair).expect("ucr");
            let rate = loader_rate(
                pair,
                vec![ColumnSpec::series("x"), ColumnSpec::label("label")],
                false,
                0,
            );
            ucr_rows += source.num_rows();
            ucr_secs += source.num_rows() as f64 / rate;
        }
        row(
            "ucr x,label, parquet crate (1 thread)".into(),
            parquet_rate(&ucr, &["x", "label"]),
            py_rate("ucr_series"),
        );
        row(
            "ucr series -> padded (B,C,L) + mask + class ids, loader".into(),
            ucr_rows as f64 / ucr_secs,
            py_rate("ucr_series"),
        );
    }
    if let Some(v) = py.as_ref().and_then(|v| v.get("pyarrow_version")) {
        println!("\npyarrow {v}: time ratio = our time / pyarrow's time (pyarrow.parquet.read_table, columns only; lower is better)");
    }
}
