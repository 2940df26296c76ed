//! The online k-NN accuracy of held-out series while pretraining (`eval_knn_accuracy`,
//! solo-learn style), for one-series-per-row data with a label column: at each held-out
//! evaluation a fixed sample of the labelled training series (the bank) and the held-out
//! series (the queries) are embedded with the live encoder in inference mode, and each query
//! is classified by its neighbours in the bank.

use candle_core::Device;
use ssl_core::probe::{knn_accuracy, ClassIds, KnnConfig};
use ssl_core::seq::{SeqBatch, SeqExample};
use ssl_core::{CoreError, EvalFigures, Parallel, PretextTask, SslRng};
use ssl_data::ParquetSource;

use super::common::{embed_examples, ExtraEval, Loaded};
use crate::{Result, TsError};

/// At most this many training series form the bank.
pub const MAX_BANK: usize = 2000;

/// The label column to read for the online k-NN accuracy: `label_column` when rows are held
/// out (`heldout_fraction > 0`) and the data's first file has that column.
pub(crate) fn knn_label_column(
    data: &[String],
    label_column: &str,
    heldout_fraction: f64,
) -> Result<Option<String>> {
    if heldout_fraction <= 0.0 || label_column.is_empty() {
        return Ok(None);
    }
    let schema = ParquetSource::open(data)?.schema();
    Ok(schema
        .iter()
        .any(|(n, _)| n == label_column)
        .then(|| label_column.to_string()))
}

/// The online k-NN accuracy as a further held-out figure (`knn_accuracy`), when `loaded` has
/// labels for its training and held-out examples: a bank of at most [`MAX_BANK`] training
/// examples (chosen with `seed`) against the held-out ones, embedded `batch` at a time on
/// `device`. In one process only (each rank holds a share): `None`, with a note, with several
/// ranks; `None` too without labels or when either side is empty.
pub(crate) fn online_knn<'a, T: PretextTask<Batch = SeqBatch> + 'a>(
    loaded: &Loaded,
    par: &Parallel,
    seed: u64,
    batch: usize,
    device: &Device,
) -> Option<ExtraEval<'a, T>> {
    let (Some(train_y), Some(held_y)) = (&loaded.labels, &loaded.heldout_labels) else {
        return None;
    };
    if par.world > 1 {
        if par.is_main() {
            eprintln!(
                "note: the held-out k-NN accuracy is computed in one process only; not with {} ranks",
                par.world
            );
        }
        return None;
    }
    if loaded.examples.is_empty() || loaded.heldout.is_empty() {
        return None;
    }
    let mut idx: Vec<usize> = (0..loaded.examples.len().min(train_y.len())).collect();
    if idx.len() > MAX_BANK {
        SslRng::derived(seed, "online-knn-bank").shuffle(&mut idx);
        idx.truncate(MAX_BANK);
        idx.sort_unstable();
    }
    let bank: Vec<SeqExample> = idx.iter().map(|&i| loaded.examples[i].clone()).collect();
    let bank_labels: Vec<String> = idx.iter().map(|&i| train_y[i].clone()).collect();
    let classes = ClassIds::new(&bank_labels, Some(held_y));
    let bank_y = classes.ids(&bank_labels);
    let query_y = classes.ids(held_y);
    let n_classes = classes.classes.len();
    let device = device.clone();
    Some(Box::new(move |_par, task: &T, held: &[SeqExample]| {
        if held.len() != query_y.len() {
            return Err(CoreError::InvalidInput(format!(
                "online k-NN: {} held-out examples but {} labels",
                held.len(),
                query_y.len()
            )));
        }
        let (b, dim) = embed_examples(task, &bank, batch, &device, false).map_err(core_error)?;
        let (q, _) = embed_examples(task, held, batch, &device, false).map_err(core_error)?;
        let acc = knn_accuracy(
            &b,
            &bank_y,
            &q,
            &query_y,
            dim,
            n_classes,
            &KnnConfig::default(),
        )?;
        Ok(EvalFigures::from([("knn_accuracy".to_string(), acc)]))
    }))
}

/// A pipeline error as the trainer's error type (the hook's closure returns one).
fn core_error(e: TsError) -> CoreError {
    match e {
        TsError::Core(e) => e,
        TsError::Candle(e) => CoreError::Candle(e),
        other => CoreError::InvalidInput(other.to_string()),
    }
}
