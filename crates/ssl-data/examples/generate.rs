//! Writes realistic synthetic Parquet at a chosen size, for the scale benchmark (`bench/scale`).
//!
//! ```text
//! cargo run --release -p ssl-data --example generate -- KIND --out FILE (--rows N | --bytes B)
//!     [--row-group R] [--seed S] [--source linux_doc.parquet]
//! ```
//!
//! Kinds (one row per example, zstd, seeded: the same arguments give the same file):
//! * `text`: column `text`, documents of the lengths of the `--source` corpus's documents (a
//!   Parquet file with a `text` column, e.g. the shared `linux_doc.parquet`), each made of that
//!   corpus's paragraphs drawn at random, so no two documents repeat; default row groups of
//!   1,000 documents.
//! * `images`: column `image`, 28 x 28 grey PNG bytes of 1 to 3 random shapes (disc, box, bar,
//!   ring) over a gradient with noise; default row groups of 2,048.
//! * `series`: column `x` as `list<f32>`, one series per row of 256 to 768 steps (a trend, one to
//!   three seasonal sines and AR(1) noise, each with its own scale); default row groups of 1,024.
//! * `pairs`: columns `image` (32 x 32 RGB PNG of one or two coloured shapes over a coloured
//!   background) and `caption` (a sentence naming the shapes, colours and places); default row
//!   groups of 2,048.
//!
//! `--bytes` stops after the first row group that takes the file to at least that many bytes;
//! `--rows` writes exactly that many rows. The last line on stdout is a JSON summary (rows, row
//! groups, bytes).

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, Float32Builder, ListBuilder, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

type Error = Box<dyn std::error::Error>;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Text,
    Images,
    Series,
    Pairs,
}

struct Args {
    kind: Kind,
    out: PathBuf,
    rows: Option<u64>,
    bytes: Option<u64>,
    row_group: usize,
    seed: u64,
    source: Option<PathBuf>,
}

const USAGE: &str = "usage: generate text|images|series|pairs --out FILE (--rows N | --bytes B) \
                     [--row-group R] [--seed S] [--source linux_doc.parquet]";

fn parse_size(s: &str) -> Result<u64, Error> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let mult = match s[i..].to_ascii_uppercase().as_str() {
                "K" | "KB" => 1e3,
                "M" | "MB" => 1e6,
                "G" | "GB" => 1e9,
                other => return Err(format!("unknown size suffix '{other}' in '{s}'").into()),
            };
            (&s[..i], mult)
        }
        None => (s, 1.0),
    };
    let v: f64 = num
        .parse()
        .map_err(|e| format!("bad number '{num}': {e}"))?;
    Ok((v * mult).round() as u64)
}

fn parse_args() -> Result<Args, Error> {
    let mut it = std::env::args().skip(1);
    let kind = match it.next().as_deref() {
        Some("text") => Kind::Text,
        Some("images") => Kind::Images,
        Some("series") => Kind::Series,
        Some("pairs") => Kind::Pairs,
        _ => return Err(USAGE.into()),
    };
    let (mut out, mut rows, mut bytes, mut row_group, mut seed, mut source) =
        (None, None, None, None, 0u64, None);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--out" => out = Some(PathBuf::from(value)),
            "--rows" => rows = Some(parse_size(&value)?),
            "--bytes" => bytes = Some(parse_size(&value)?),
            "--row-group" => row_group = Some(value.parse()?),
            "--seed" => seed = value.parse()?,
            "--source" => source = Some(PathBuf::from(value)),
            _ => return Err(format!("unknown argument {flag}\n{USAGE}").into()),
        }
    }
    if rows.is_some() == bytes.is_some() {
        return Err(format!("give exactly one of --rows and --bytes\n{USAGE}").into());
    }
    let row_group = row_group.unwrap_or(match kind {
        Kind::Text => 1000,
        Kind::Series => 1024,
        Kind::Images | Kind::Pairs => 2048,
    });
    if row_group == 0 {
        return Err("--row-group must be positive".into());
    }
    if kind == Kind::Text && source.is_none() {
        return Err("text needs --source (a Parquet file with a `text` column)".into());
    }
    Ok(Args {
        kind,
        out: out.ok_or_else(|| format!("--out is required\n{USAGE}"))?,
        rows,
        bytes,
        row_group,
        seed,
        source,
    })
}

/// The source corpus: its paragraphs and its documents' lengths in bytes.
struct Corpus {
    paragraphs: Vec<String>,
    doc_lengths: Vec<usize>,
}

fn read_corpus(path: &PathBuf) -> Result<Corpus, Error> {
    let file = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    let (mut paragraphs, mut doc_lengths) = (Vec::new(), Vec::new());
    for batch in reader {
        let batch = batch?;
        let col = batch
            .column_by_name("text")
            .ok_or_else(|| format!("{} has no `text` column", path.display()))?;
        let texts = col
            .as_any()
            .downcast_ref::<StringArray>()
            .ok_or_else(|| format!("{}: `text` is not a Utf8 column", path.display()))?;
        for t in texts.iter().flatten() {
            if t.trim().is_empty() {
                continue;
            }
            doc_lengths.push(t.len());
            paragraphs.extend(
                t.split("\n\n")
                    .filter(|p| !p.trim().is_empty())
                    .map(|p| p.to_string()),
            );
        }
    }
    if paragraphs.is_empty() {
        return Err(format!("{} has no text", path.display()).into());
    }
    Ok(Corpus {
        paragraphs,
        doc_lengths,
    })
}

fn text_batch(corpus: &Corpus, rng: &mut ChaCha8Rng, n: usize) -> Vec<ArrayRef> {
    let docs = (0..n).map(|_| {
        let target = corpus.doc_lengths[rng.random_range(0..corpus.doc_lengths.len())];
        let mut doc = String::with_capacity(target + 256);
        while doc.len() < target {
            if !doc.is_empty() {
                doc.push_str("\n\n");
            }
            doc.push_str(&corpus.paragraphs[rng.random_range(0..corpus.paragraphs.len())]);
        }
        doc
    });
    vec![Arc::new(StringArray::from_iter_values(docs))]
}

/// Pixels of 1 to 3 random shapes over a gradient with noise, `channels` of 1 or 3; returns the
/// pixels and, for captions, the shapes drawn as (shape name, colour name, place name).
fn shapes(rng: &mut ChaCha8Rng, size: u32, channels: usize) -> (Vec<u8>, Vec<[&'static str; 3]>) {
    const SHAPES: [&str; 4] = ["disc", "box", "bar", "ring"];
    const COLOURS: [(&str, [f32; 3]); 8] = [
        ("red", [220.0, 40.0, 40.0]),
        ("green", [40.0, 180.0, 60.0]),
        ("blue", [40.0, 70.0, 220.0]),
        ("yellow", [230.0, 210.0, 40.0]),
        ("white", [245.0, 245.0, 245.0]),
        ("black", [15.0, 15.0, 15.0]),
        ("purple", [140.0, 50.0, 170.0]),
        ("orange", [240.0, 140.0, 30.0]),
    ];
    let s = size as f32;
    let n = size as usize;
    let mut px = vec![0f32; n * n * 3];
    // Background: a linear gradient between two colours in a random direction.
    let (c0, c1) = (
        COLOURS[rng.random_range(0..COLOURS.len())].1,
        COLOURS[rng.random_range(0..COLOURS.len())].1,
    );
    let angle: f32 = rng.random_range(0.0..std::f32::consts::TAU);
    let (dx, dy) = (angle.cos(), angle.sin());
    for y in 0..n {
        for x in 0..n {
            let t = (((x as f32 / s - 0.5) * dx + (y as f32 / s - 0.5) * dy) + 0.71) / 1.42;
            for c in 0..3 {
                px[(y * n + x) * 3 + c] = 0.35 * (c0[c] * (1.0 - t) + c1[c] * t);
            }
        }
    }
    let mut drawn = Vec::new();
    for _ in 0..rng.random_range(1..=3) {
        let shape = rng.random_range(0..SHAPES.len());
        let (cname, colour) = COLOURS[rng.random_range(0..COLOURS.len())];
        let (cx, cy) = (
            rng.random_range(0.2..0.8) * s,
            rng.random_range(0.2..0.8) * s,
        );
        let r = rng.random_range(0.12..0.3) * s;
        let (bw, bh) = (
            rng.random_range(0.1..0.35) * s,
            rng.random_range(0.1..0.35) * s,
        );
        let slope: f32 = rng.random_range(-1.0..1.0);
        for y in 0..n {
            for x in 0..n {
                let (fx, fy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                let d = (fx * fx + fy * fy).sqrt();
                let inside = match shape {
                    0 => d <= r,
                    1 => fx.abs() <= bw && fy.abs() <= bh,
                    2 => (fy - slope * fx).abs() <= 0.08 * s && fx.abs() <= 0.4 * s,
                    _ => (d - r).abs() <= 0.06 * s + 0.5,
                };
                if inside {
                    px[(y * n + x) * 3..(y * n + x) * 3 + 3].copy_from_slice(&colour);
                }
            }
        }
        let place = match (cx < s / 2.0, cy < s / 2.0) {
            (true, true) => "top left",
            (false, true) => "top right",
            (true, false) => "bottom left",
            (false, false) => "bottom right",
        };
        drawn.push([SHAPES[shape], cname, place]);
    }
    let noise: f32 = rng.random_range(0.0..12.0);
    let out = (0..n * n)
        .flat_map(|i| {
            let p = [px[i * 3], px[i * 3 + 1], px[i * 3 + 2]];
            if channels == 1 {
                vec![0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]]
            } else {
                p.to_vec()
            }
        })
        .map(|v| (v + noise * (rng.random::<f32>() - 0.5)).clamp(0.0, 255.0) as u8)
        .collect();
    (out, drawn)
}

fn png(pixels: Vec<u8>, size: u32, channels: usize) -> Result<Vec<u8>, Error> {
    let mut out = std::io::Cursor::new(Vec::new());
    if channels == 1 {
        image::GrayImage::from_raw(size, size, pixels)
            .ok_or("pixel buffer of the wrong size")?
            .write_to(&mut out, image::ImageFormat::Png)?;
    } else {
        image::RgbImage::from_raw(size, size, pixels)
            .ok_or("pixel buffer of the wrong size")?
            .write_to(&mut out, image::ImageFormat::Png)?;
    }
    Ok(out.into_inner())
}

fn image_batch(rng: &mut ChaCha8Rng, n: usize) -> Result<Vec<ArrayRef>, Error> {
    let pngs = (0..n)
        .map(|_| png(shapes(rng, 28, 1).0, 28, 1))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(vec![Arc::new(BinaryArray::from_iter_values(pngs))])
}

fn pair_batch(rng: &mut ChaCha8Rng, n: usize) -> Result<Vec<ArrayRef>, Error> {
    let (mut pngs, mut captions) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let (pixels, drawn) = shapes(rng, 32, 3);
        pngs.push(png(pixels, 32, 3)?);
        let parts: Vec<String> = drawn
            .iter()
            .map(|[shape, colour, place]| format!("a {colour} {shape} at the {place}"))
            .collect();
        let lead =
            ["a picture of", "an icon with", "a drawing of", "clip art:"][rng.random_range(0..4)];
        captions.push(format!("{lead} {}", parts.join(" and ")));
    }
    Ok(vec![
        Arc::new(BinaryArray::from_iter_values(pngs)),
        Arc::new(StringArray::from_iter_values(captions)),
    ])
}

fn series_batch(rng: &mut ChaCha8Rng, n: usize) -> Vec<ArrayRef> {
    let mut b = ListBuilder::new(Float32Builder::new()).with_field(Arc::new(Field::new(
        "item",
        DataType::Float32,
        true,
    )));
    for _ in 0..n {
        let len = rng.random_range(256..=768);
        let level: f32 = rng.random_range(-5.0..5.0);
        let trend: f32 = rng.random_range(-0.01..0.01);
        let waves: Vec<(f32, f32, f32)> = (0..rng.random_range(1..=3))
            .map(|_| {
                (
                    rng.random_range(0.2..2.0),
                    rng.random_range(4.0..96.0),
                    rng.random_range(0.0..std::f32::consts::TAU),
                )
            })
            .collect();
        let (phi, sigma): (f32, f32) = (rng.random_range(0.0..0.9), rng.random_range(0.05..0.5));
        let mut ar = 0f32;
        for t in 0..len {
            let tf = t as f32;
            ar = phi * ar + sigma * (rng.random::<f32>() - 0.5) * 3.46;
            let season: f32 = waves
                .iter()
                .map(|(a, p, ph)| a * (std::f32::consts::TAU * tf / p + ph).sin())
                .sum();
            b.values().append_value(level + trend * tf + season + ar);
        }
        b.append(true);
    }
    vec![Arc::new(b.finish())]
}

fn main() -> Result<(), Error> {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let corpus = match (&args.source, args.kind) {
        (Some(p), Kind::Text) => Some(read_corpus(p)?),
        _ => None,
    };
    let fields = match args.kind {
        Kind::Text => vec![Field::new("text", DataType::Utf8, false)],
        Kind::Images => vec![Field::new("image", DataType::Binary, false)],
        Kind::Series => vec![Field::new(
            "x",
            DataType::List(Arc::new(Field::new("item", DataType::Float32, true))),
            false,
        )],
        Kind::Pairs => vec![
            Field::new("image", DataType::Binary, false),
            Field::new("caption", DataType::Utf8, false),
        ],
    };
    let schema = Arc::new(Schema::new(fields));
    // zstd like most data sets written by pyarrow / datasets; long documents and PNG bytes
    // are not dictionary-encoded (nothing repeats).
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1)?))
        .set_max_row_group_row_count(Some(args.row_group))
        .set_column_dictionary_enabled(ColumnPath::from("text"), false)
        .set_column_dictionary_enabled(ColumnPath::from("image"), false)
        .build();
    if let Some(dir) = args.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = args.out.with_extension("parquet.partial");
    let file = File::create(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(props))?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let (mut rows, mut groups) = (0u64, 0u64);
    let started = std::time::Instant::now();
    let mut last_note = started;
    loop {
        let n = match args.rows {
            Some(total) if rows >= total => break,
            Some(total) => (total - rows).min(args.row_group as u64) as usize,
            None => args.row_group,
        };
        let columns = match args.kind {
            Kind::Text => text_batch(corpus.as_ref().ok_or("no corpus")?, &mut rng, n),
            Kind::Images => image_batch(&mut rng, n)?,
            Kind::Series => series_batch(&mut rng, n),
            Kind::Pairs => pair_batch(&mut rng, n)?,
        };
        writer.write(&RecordBatch::try_new(schema.clone(), columns)?)?;
        writer.flush()?;
        rows += n as u64;
        groups += 1;
        if last_note.elapsed().as_secs_f64() >= 5.0 {
            last_note = std::time::Instant::now();
            eprintln!(
                "generate: {rows} rows, {:.0} MB, {:.0} s",
                writer.bytes_written() as f64 / 1e6,
                started.elapsed().as_secs_f64()
            );
        }
        if args
            .bytes
            .is_some_and(|b| writer.bytes_written() as u64 >= b)
        {
            break;
        }
    }
    writer.close()?;
    std::fs::rename(&tmp, &args.out)?;
    let bytes = std::fs::metadata(&args.out)?.len();
    println!(
        "{{\"file\": {:?}, \"rows\": {rows}, \"row_groups\": {groups}, \"bytes\": {bytes}, \"seconds\": {:.1}}}",
        args.out.display().to_string(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
