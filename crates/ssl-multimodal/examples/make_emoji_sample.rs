//! Builds the embedded sample of `ssl pretrain multimodal`
//! (`crates/ssl-cli/data/emoji_sample.parquet`): 400 pairs drawn with a fixed seed from the
//! Noto emoji set (`emoji_google.parquet`: 1,911 PNG images 64x64 RGBA with their names,
//! Unicode category and subcategory), decoded to RGB as ssl-data does (alpha dropped), downscaled to
//! 32x32 and re-encoded as PNG.
//!
//! ```sh
//! cargo run --release -p ssl-multimodal --example make_emoji_sample -- \
//!     ../shared/data/multimodal/emoji_google.parquet crates/ssl-cli/data/emoji_sample.parquet
//! ```

use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use ssl_core::SslRng;
use ssl_multimodal::{read_pairs, PairColumns};

const N: usize = 400;
const SIDE: usize = 32;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [input, output] = args.as_slice() else {
        return Err("usage: make_emoji_sample INPUT.parquet OUTPUT.parquet".into());
    };
    let cols = PairColumns {
        labels: vec!["category".into(), "subcategory".into()],
        resize: vec![SIDE, SIDE],
        ..PairColumns::default()
    };
    let (set, _) = read_pairs(std::slice::from_ref(input), &cols)?;
    let mut idx: Vec<usize> = (0..set.len()).collect();
    SslRng::new(7).shuffle(&mut idx);
    idx.truncate(N.min(set.len()));
    idx.sort_unstable();
    let sample = set.select(&idx);
    let plane = SIDE * SIDE;
    let mut pngs = Vec::with_capacity(sample.len());
    for i in 0..sample.len() {
        let px = &sample.images.data[i * 3 * plane..(i + 1) * 3 * plane];
        let mut rgb = vec![0u8; 3 * plane];
        for p in 0..plane {
            for c in 0..3 {
                rgb[3 * p + c] = (px[c * plane + p] * 255.0).round().clamp(0.0, 255.0) as u8;
            }
        }
        let img = image::RgbImage::from_raw(SIDE as u32, SIDE as u32, rgb)
            .ok_or("pixel buffer does not fill the image")?;
        let mut bytes = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )?;
        pngs.push(bytes);
    }
    let schema = Arc::new(Schema::new(vec![
        Field::new("image", DataType::Binary, false),
        Field::new("caption", DataType::Utf8, false),
        Field::new("category", DataType::Utf8, false),
        Field::new("subcategory", DataType::Utf8, false),
    ]));
    let label = |name: &str| -> Result<ArrayRef, Box<dyn std::error::Error>> {
        Ok(Arc::new(StringArray::from(
            sample.label_column(name)?.to_vec(),
        )))
    };
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(BinaryArray::from_vec(
                pngs.iter().map(|b| b.as_slice()).collect(),
            )),
            Arc::new(StringArray::from(sample.captions.clone())),
            label("category")?,
            label("subcategory")?,
        ],
    )?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(9)?))
        .build();
    let file = std::fs::File::create(output)?;
    let mut writer = ArrowWriter::try_new(file, schema, Some(props))?;
    writer.write(&batch)?;
    writer.close()?;
    println!(
        "wrote {} pairs to {output} ({} bytes)",
        sample.len(),
        std::fs::metadata(output)?.len()
    );
    Ok(())
}
