//! Documents of a text run: the text column of Parquet files with their ids, labels, entity
//! spans and global row indices (what the held-out split and `data.max_docs` count).

use ssl_core::Parallel;
use ssl_data::{read_all, Batch, ColumnSpec, ParquetSource, ReadOptions};

use super::config::DataConfig;
use super::stream::RowFilter;
use crate::{CharSpans, Result, TextError};

/// Documents read from Parquet, one entry per kept row, in source order.
#[derive(Debug, Clone, Default)]
pub struct Docs {
    /// The text of each document.
    pub texts: Vec<String>,
    /// Each document's id (`data.id_column`, or its global row index).
    pub ids: Vec<String>,
    /// Each document's label, when a label column was read.
    pub labels: Option<Vec<String>>,
    /// Entity character spans per document (`data.entity_column`), when read.
    pub entities: Option<Vec<CharSpans>>,
    /// Each document's global row index in the source (files in order, rows in file order).
    pub rows: Vec<usize>,
}

/// Parses one row of `data.entity_column`: JSON `[[start, end], ...]` in characters.
fn parse_spans(cell: &str, column: &str, row: usize) -> Result<CharSpans> {
    if cell.trim().is_empty() {
        return Ok(Vec::new());
    }
    let spans: Vec<(usize, usize)> = serde_json::from_str(cell).map_err(|e| {
        TextError::Pipeline(format!(
            "column {column:?}, row {row}: entity spans must be JSON [[start, end], ...] \
             (character offsets): {e}"
        ))
    })?;
    if let Some((s, e)) = spans.iter().find(|(s, e)| s >= e) {
        return Err(TextError::Pipeline(format!(
            "column {column:?}, row {row}: entity span [{s}, {e}] is empty or reversed"
        )));
    }
    Ok(spans)
}

/// The columns a text run reads: the text column, the id column (`data.id_column`, when set),
/// the `label` column when given and, with `entities`, the entity-span column
/// (`data.entity_column`, when set).
pub fn doc_columns(cfg: &DataConfig, label: Option<&str>, entities: bool) -> Vec<ColumnSpec> {
    let mut cols = vec![ColumnSpec::text(&cfg.column)];
    if !cfg.id_column.is_empty() {
        cols.push(ColumnSpec::text(&cfg.id_column));
    }
    if let Some(l) = label {
        cols.push(ColumnSpec::text(l));
    }
    if entities && !cfg.entity_column.is_empty() {
        cols.push(ColumnSpec::text(&cfg.entity_column));
    }
    cols
}

/// The documents of `batch` (read with [`doc_columns`] of the same arguments) whose global row
/// index (`rows[k]` for the batch's row `k`) satisfies `keep`, in batch order.
pub fn docs_of_batch(
    batch: &Batch,
    rows: &[usize],
    cfg: &DataConfig,
    label: Option<&str>,
    entities: bool,
    keep: impl Fn(usize) -> bool,
) -> Result<Docs> {
    let entities = entities && !cfg.entity_column.is_empty();
    let keep: Vec<usize> = (0..rows.len()).filter(|&k| keep(rows[k])).collect();
    let pick = |v: &[String]| -> Vec<String> { keep.iter().map(|&k| v[k].clone()).collect() };
    let texts = pick(batch.text(&cfg.column)?);
    let kept_rows: Vec<usize> = keep.iter().map(|&k| rows[k]).collect();
    let ids: Vec<String> = if cfg.id_column.is_empty() {
        kept_rows.iter().map(|i| i.to_string()).collect()
    } else {
        pick(batch.text(&cfg.id_column)?)
    };
    let labels = match label {
        Some(l) => Some(pick(batch.text(l)?)),
        None => None,
    };
    let spans = if entities {
        let col = &cfg.entity_column;
        let cells = batch.text(col)?;
        Some(
            keep.iter()
                .map(|&k| parse_spans(&cells[k], col, rows[k]))
                .collect::<Result<Vec<_>>>()?,
        )
    } else {
        None
    };
    Ok(Docs {
        texts,
        ids,
        labels,
        entities: spans,
        rows: kept_rows,
    })
}

/// Reads the text column of `paths` (and the id column, the `label` column when given and,
/// with `entities`, the entity-span column `data.entity_column`), keeping the rows of the
/// `data.max_docs` sample (all when 0; see [`RowFilter`]) drawn with `seed`.
///
/// This holds every document in memory: the pipeline streams instead (pretraining, `embed`
/// and `eval`); it serves small sets (the fertility report of `ssl tokenizer train`, tests).
pub fn read_docs(
    paths: &[String],
    cfg: &DataConfig,
    label: Option<&str>,
    entities: bool,
) -> Result<Docs> {
    read_docs_of(paths, cfg, label, entities, None)
}

/// [`read_docs`] for this rank's share of the rows when `par` is given (every row otherwise).
/// `data.max_docs` samples global row indices (with seed 0, as [`RowFilter::new`] with seed 0
/// does): the documents kept are the same whichever rank reads them.
pub fn read_docs_of(
    paths: &[String],
    cfg: &DataConfig,
    label: Option<&str>,
    entities: bool,
    par: Option<&Parallel>,
) -> Result<Docs> {
    let cols = doc_columns(cfg, label, entities);
    let options = par.map_or_else(
        || ReadOptions {
            skip_bad_rows: cfg.skip_bad_rows,
            ..ReadOptions::default()
        },
        |p| ReadOptions::for_rank(p.rank, p.world, cfg.skip_bad_rows),
    );
    let num_rows = if cfg.max_docs > 0 {
        ParquetSource::open(paths)?.num_rows()
    } else {
        0
    };
    let filter = RowFilter::new(cfg, 0, num_rows);
    let table = read_all(paths, &cols, &options)?;
    if table.bad_rows.count > 0 {
        eprintln!(
            "skipped {} bad rows: {}",
            table.bad_rows.count, table.bad_rows
        );
    }
    if let Some(p) = par {
        table
            .share
            .report(p.rank, p.world, table.row_index.len(), "documents");
    }
    docs_of_batch(&table.batch, &table.row_index, cfg, label, entities, |i| {
        filter.sampled(i)
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use ssl_data::is_heldout;

    use super::*;
    use crate::pipeline::{tokenize, TextConfig};
    use crate::{InputMode, TokenizerConfig};

    fn write_parquet(path: &Path, texts: &[&str], spans: &[&str]) {
        use arrow::array::{ArrayRef, StringArray};
        use arrow::record_batch::RecordBatch;
        use std::sync::Arc;
        let batch = RecordBatch::try_from_iter([
            (
                "text",
                Arc::new(StringArray::from(texts.to_vec())) as ArrayRef,
            ),
            (
                "ents",
                Arc::new(StringArray::from(spans.to_vec())) as ArrayRef,
            ),
        ])
        .unwrap();
        let f = std::fs::File::create(path).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    #[test]
    fn entity_span_column_reaches_the_tokenized_sequences() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ents.parquet");
        let texts = [
            "the kernel module loads firmware",
            "a scheduler runs tasks",
            "nothing here",
        ];
        // "kernel module" = chars 4..17; "scheduler" = 2..11; no spans in row 2.
        write_parquet(&path, &texts, &["[[4, 17]]", "[[2,11]]", ""]);
        let cfg = DataConfig {
            entity_column: "ents".into(),
            ..DataConfig::default()
        };
        let paths = vec![path.to_string_lossy().into_owned()];
        let docs = read_docs(&paths, &cfg, None, true).unwrap();
        let ents = docs.entities.clone().unwrap();
        assert_eq!(ents, vec![vec![(4, 17)], vec![(2, 11)], vec![]]);
        // Without asking for entities the column is not read.
        assert!(read_docs(&paths, &cfg, None, false)
            .unwrap()
            .entities
            .is_none());

        let tok =
            crate::train_from_texts(texts.iter().copied(), &TokenizerConfig::default()).unwrap();
        let mut text_cfg = TextConfig::default();
        text_cfg.input.mode = InputMode::LineByLine;
        let seqs = tokenize(&tok, &docs.texts, Some(&ents), &text_cfg).unwrap();
        // Line by line with one line per document: one sequence each, in order.
        assert_eq!(seqs.len(), 3);
        for (seq, text, spans) in [(&seqs[0], texts[0], (4, 17)), (&seqs[1], texts[1], (2, 11))] {
            assert_eq!(seq.entities.len(), 1, "{text}");
            let words: Vec<String> = seq.entities[0]
                .iter()
                .map(|&p| tok.id_to_token(seq.ids[p]).unwrap_or_default())
                .collect();
            let joined = words.join("").replace(['Ġ', '#'], "");
            let want: String = text
                .chars()
                .skip(spans.0)
                .take(spans.1 - spans.0)
                .filter(|c| !c.is_whitespace())
                .collect();
            assert_eq!(joined, want);
        }
        assert!(seqs[2].entities.is_empty());
    }

    #[test]
    fn malformed_entity_spans_name_the_column_and_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.parquet");
        write_parquet(&path, &["a b", "c d"], &["[[0,1]]", "[[0 1]]"]);
        let cfg = DataConfig {
            entity_column: "ents".into(),
            ..DataConfig::default()
        };
        let paths = vec![path.to_string_lossy().into_owned()];
        let e = read_docs(&paths, &cfg, None, true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("\"ents\"") && e.contains("row 1"), "{e}");
        write_parquet(&path, &["a b"], &["[[3,1]]"]);
        let e = read_docs(&paths, &cfg, None, true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("row 0") && e.contains("reversed"), "{e}");
    }

    /// Writes `texts` as a Parquet file with row groups of `rows_per_group` rows.
    fn write_grouped(path: &Path, texts: &[String], rows_per_group: usize) {
        use arrow::array::{ArrayRef, StringArray};
        use arrow::record_batch::RecordBatch;
        use std::sync::Arc;
        let batch = RecordBatch::try_from_iter([(
            "text",
            Arc::new(StringArray::from(texts.to_vec())) as ArrayRef,
        )])
        .unwrap();
        let props = parquet::file::properties::WriterProperties::builder()
            .set_max_row_group_row_count(Some(rows_per_group))
            .build();
        let f = std::fs::File::create(path).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(f, batch.schema(), Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    #[test]
    fn ranks_read_their_row_groups_and_together_hold_one_process_documents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("docs.parquet");
        let texts: Vec<String> = (0..30).map(|i| format!("document number {i}")).collect();
        write_grouped(&path, &texts, 4);
        let paths = vec![path.to_string_lossy().into_owned()];
        let cfg = DataConfig {
            max_docs: 25,
            ..DataConfig::default()
        };
        let one = read_docs(&paths, &cfg, None, false).unwrap();
        // A seeded sample of about 25 of the 30 rows, by row index.
        let filter = RowFilter::new(&cfg, 0, 30);
        let want: Vec<usize> = (0..30).filter(|&i| filter.sampled(i)).collect();
        assert_eq!(one.rows, want);
        assert!((18..30).contains(&want.len()), "{want:?}");
        let shares = Parallel::on_threads(3, |p| {
            let d = read_docs_of(&paths, &cfg, None, false, Some(&p)).unwrap();
            (p.rank, d.rows, d.texts, d.ids)
        });
        let mut all = Vec::new();
        for (rank, rows, docs, ids) in shares {
            // Row groups of 4 rows dealt round robin: row i is in group i / 4.
            assert!(
                rows.iter()
                    .all(|&i| (i / 4) % 3 == rank && filter.sampled(i)),
                "{rows:?}"
            );
            for ((&i, t), id) in rows.iter().zip(&docs).zip(&ids) {
                assert_eq!(t, &texts[i]);
                assert_eq!(id, &i.to_string());
            }
            all.extend(rows);
        }
        all.sort_unstable();
        assert_eq!(all, one.rows);
        // So the held-out documents of all ranks are one process's.
        let held = |rows: &[usize]| -> Vec<usize> {
            rows.iter()
                .copied()
                .filter(|&i| is_heldout(i, 7, 0.2))
                .collect()
        };
        assert_eq!(held(&all), held(&one.rows));
        assert!(!held(&all).is_empty());
    }
}
