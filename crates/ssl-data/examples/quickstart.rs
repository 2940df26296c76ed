//! Writes a small Parquet file of PNG images, labels and captions, streams it in shuffled
//! batches, resumes from a saved position, and writes (toy) embeddings back to Parquet.
//!
//! Run with `cargo run -p ssl-data --example quickstart [-- OUT_DIR]`; with `OUT_DIR` the
//! files are kept there (to open them with pyarrow or pandas), otherwise in a temporary folder.

use std::sync::Arc;

use arrow::array::{ArrayRef, BinaryArray, RecordBatch, StringArray};
use arrow::datatypes::{Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use ssl_data::{
    read_embeddings, ColorMode, ColumnSpec, DataLoader, EmbeddingWriter, LoaderConfig,
    ParquetSource, Position,
};

fn png(seed: u8) -> Vec<u8> {
    let img = image::GrayImage::from_fn(8, 8, |x, y| {
        image::Luma([seed.wrapping_mul(7).wrapping_add((x * y) as u8)])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("encode png");
    out.into_inner()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tmp = tempfile::tempdir()?;
    let dir = match std::env::args().nth(1) {
        Some(d) => {
            std::fs::create_dir_all(&d)?;
            std::path::PathBuf::from(d)
        }
        None => tmp.path().to_path_buf(),
    };
    let path = dir.join("shapes.parquet");

    // 1. A data set: 100 rows in row groups of 16.
    let n = 100u8;
    let images: ArrayRef = Arc::new(BinaryArray::from_iter_values((0..n).map(png)));
    let labels: ArrayRef = Arc::new(StringArray::from_iter_values(
        (0..n).map(|i| ["circle", "square", "star"][i as usize % 3]),
    ));
    let captions: ArrayRef = Arc::new(StringArray::from_iter_values(
        (0..n).map(|i| format!("shape number {i}")),
    ));
    let schema = Arc::new(Schema::new(vec![
        Field::new("image", images.data_type().clone(), false),
        Field::new("label", labels.data_type().clone(), false),
        Field::new("caption", captions.data_type().clone(), false),
    ]));
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(16))
        .build();
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(&path)?, schema.clone(), Some(props))?;
    writer.write(&RecordBatch::try_new(
        schema,
        vec![images, labels, captions],
    )?)?;
    writer.close()?;

    // 2. Stream it: shuffled, 2 epochs, batches of 32.
    let source = ParquetSource::open(&[&path])?;
    println!(
        "{} rows in {} row groups",
        source.num_rows(),
        source.num_row_groups()
    );
    let config = LoaderConfig {
        batch_size: 32,
        seed: 7,
        epochs: Some(2),
        shuffle_buffer: 40,
        ..LoaderConfig::new(vec![
            ColumnSpec::image("image", ColorMode::Grey, None),
            ColumnSpec::label("label"),
            ColumnSpec::text("caption"),
        ])
    };
    let mut loader = DataLoader::new(&source, config.clone())?;
    println!(
        "classes: {:?}",
        loader.class_names("label").unwrap_or_default()
    );
    let first = loader.next_batch()?.ok_or("no batch")?;
    let img = first.image("image")?;
    println!(
        "batch of {}: image shape {:?}, labels {:?}..., first caption {:?}",
        first.len(),
        img.shape,
        &first.labels("label")?[..5],
        first.text("caption")?[0]
    );

    // 3. Save the position (as a checkpoint would), resume, and compare with carrying on.
    let saved = serde_json::to_string(&loader.position())?;
    let carried_on: Vec<_> = loader.by_ref().collect::<Result<_, _>>()?;
    let position: Position = serde_json::from_str(&saved)?;
    let resumed: Vec<_> =
        DataLoader::resume(&source, config, position)?.collect::<Result<_, _>>()?;
    println!(
        "resumed at {saved}: {} batches, identical = {}",
        resumed.len(),
        resumed == carried_on
    );

    // 4. Embeddings out: here simply the mean pixel of each image, dimension 1.
    let out = dir.join("embeddings.parquet");
    let mut writer =
        EmbeddingWriter::create(&out, 1, [("model", "mean-pixel"), ("pooling", "mean")])?;
    for batch in std::iter::once(first).chain(carried_on) {
        let img = batch.image("image")?;
        let per_image = img.shape[1] * img.shape[2] * img.shape[3];
        let means: Vec<f32> = img
            .data
            .chunks(per_image)
            .map(|c| c.iter().sum::<f32>() / per_image as f32)
            .collect();
        writer.write(batch.ids(), &means)?;
    }
    let rows = writer.finish()?;
    let back = read_embeddings(&out)?;
    println!(
        "wrote {rows} embeddings; read back {} with metadata {:?}",
        back.ids.len(),
        back.metadata
    );
    Ok(())
}
