//! Writes a synthetic image-caption set of any size for scale runs of
//! `ssl pretrain multimodal`: `N` toy pairs (coloured shapes, 32x32 PNG, captions such as
//! "a red circle", `shape` / `color` label columns, see `ssl_multimodal::toy`) in files of
//! 10,000 rows with row groups of 1,000, generated file by file so memory stays bounded.
//!
//! ```sh
//! cargo run --release -p ssl-multimodal --example make_toy_pairs -- 50000 /tmp/pairs50k
//! ```

use std::path::PathBuf;

use ssl_multimodal::toy;

const PER_FILE: usize = 10_000;
const ROWS_PER_GROUP: usize = 1_000;
const SIDE: usize = 32;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [n, dir] = args.as_slice() else {
        return Err("usage: make_toy_pairs N OUT_DIR".into());
    };
    let n: usize = n.parse()?;
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir)?;
    let mut written = 0;
    let mut file = 0;
    while written < n {
        let rows = PER_FILE.min(n - written);
        let pairs = toy::toy_pairs(rows, SIDE, file as u64)?;
        let path = dir.join(format!("pairs-{file:04}.parquet"));
        toy::write_parquet(&pairs, &path, ROWS_PER_GROUP)?;
        written += rows;
        file += 1;
        eprintln!("{written}/{n} pairs written ({})", path.display());
    }
    Ok(())
}
