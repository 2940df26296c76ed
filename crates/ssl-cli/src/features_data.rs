//! Parquet input and output of the `features` modality, through `ssl-data`: sequences from a
//! list column (features x length), labels and ids in; embeddings out.

use std::collections::BTreeMap;
use std::path::Path;

use ssl_core::seq::SeqExample;
use ssl_data::{read_all, ColumnSpec, EmbeddingWriter, ReadOptions};

use crate::features::DataConfig;
use crate::CliError;

/// Sequences, ids and (optionally) labels read from Parquet.
pub struct SeriesTable {
    /// One example per row (steps x features); masked values (gaps) are NaN.
    pub series: Vec<SeqExample>,
    /// Row ids (the id column, or `file_stem:row`).
    pub ids: Vec<String>,
    /// Labels as strings (class names, or integers formatted), when a label column was asked for.
    pub labels: Option<Vec<String>>,
}

/// Reads the sequence column (and label / id columns) of every file, directory or glob.
pub fn read_series(
    paths: &[String],
    cfg: &DataConfig,
    label_column: Option<&str>,
) -> Result<SeriesTable, CliError> {
    let mut columns = vec![ColumnSpec::series(cfg.column.as_str())];
    if let Some(l) = label_column {
        columns.push(ColumnSpec::label(l));
    }
    if !cfg.id_column.is_empty() {
        columns.push(ColumnSpec::id(cfg.id_column.as_str()));
    }
    let table = read_all(
        paths,
        &columns,
        &ReadOptions {
            skip_bad_rows: cfg.skip_bad_rows,
            ..Default::default()
        },
    )?;
    if table.bad_rows.count > 0 {
        eprintln!(
            "skipped {} bad rows: {}",
            table.bad_rows.count, table.bad_rows
        );
    }
    let batch = &table.batch;
    let s = batch.series(&cfg.column)?;
    let (b, c, l) = (batch.len(), s.channels, s.length);
    let mut series = Vec::with_capacity(b);
    for i in 0..b {
        let steps = s.lengths[i];
        let mut values = vec![f32::NAN; steps * c];
        for ch in 0..c {
            for t in 0..steps {
                let k = (i * c + ch) * l + t;
                if s.mask[k] != 0 {
                    values[t * c + ch] = s.values[k];
                }
            }
        }
        series.push(SeqExample::new(values, steps, c)?);
    }
    let labels = match label_column {
        None => None,
        Some(name) => {
            let lb = batch.label_column(name)?;
            Some(
                lb.ids
                    .iter()
                    .map(|&id| match &lb.classes {
                        Some(names) => names
                            .get(id as usize)
                            .cloned()
                            .unwrap_or_else(|| id.to_string()),
                        None => id.to_string(),
                    })
                    .collect(),
            )
        }
    };
    Ok(SeriesTable {
        series,
        ids: batch.ids().to_vec(),
        labels,
    })
}

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
