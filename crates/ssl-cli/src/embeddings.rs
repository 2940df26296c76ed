//! Embeddings out: `(id, embedding)` Parquet through `ssl-data`, for every modality.

use std::collections::BTreeMap;
use std::path::Path;

use ssl_data::EmbeddingWriter;

use crate::CliError;

/// Writes `(id, embedding: FixedSizeList<f32>[dim])` with key-value metadata, atomically.
pub fn write_embeddings(
    out: &Path,
    ids: &[String],
    emb: &[f32],
    dim: usize,
    meta: BTreeMap<String, String>,
) -> Result<(), CliError> {
    let mut writer = EmbeddingWriter::create(out, dim, meta)?;
    writer.write(ids, emb)?;
    writer.finish()?;
    Ok(())
}
