//! The online k-NN accuracy of held-out series while pretraining (`eval_knn_accuracy`, see
//! [`ssl_core::probe::KnnLabels`]), for one-series-per-row data with a label column: a fixed
//! bank of labelled training series and the held-out series, embedded with the live encoder
//! in inference mode at each evaluation.

use candle_core::Device;
use ssl_core::probe::{knn_bank_rows, KnnLabels};
use ssl_core::seq::{SeqBatch, SeqExample};
use ssl_core::{CoreError, EvalFigures, Parallel, PretextTask};

use super::common::{embed_examples, ExtraEval, Loaded};

/// The online k-NN accuracy as a further held-out figure (`knn_accuracy`), when `loaded` has
/// labels for its training and held-out examples: a bank of training examples
/// ([`knn_bank_rows`] with `seed`) against the held-out ones, embedded `batch` at a time on
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
    let idx = knn_bank_rows(loaded.examples.len().min(train_y.len()), seed);
    let bank: Vec<SeqExample> = idx.iter().map(|&i| loaded.examples[i].clone()).collect();
    let bank_labels: Vec<String> = idx.iter().map(|&i| train_y[i].clone()).collect();
    let labels = KnnLabels::from_labels(&bank_labels, held_y);
    let device = device.clone();
    Some(Box::new(move |_par, task: &T, held: &[SeqExample]| {
        if held.len() != labels.n_queries() {
            return Err(CoreError::InvalidInput(format!(
                "online k-NN: {} held-out examples but {} labels",
                held.len(),
                labels.n_queries()
            )));
        }
        let (b, dim) = embed_examples(task, &bank, batch, &device, false)?;
        let (q, _) = embed_examples(task, held, batch, &device, false)?;
        let acc = labels.accuracy(&b, &q, dim)?;
        Ok(EvalFigures::from([("knn_accuracy".to_string(), acc)]))
    }))
}
