//! The online k-NN accuracy of held-out series while pretraining (`eval_knn_accuracy`, see
//! [`ssl_core::probe::KnnLabels`]), for one-series-per-row data with a label column: a fixed
//! bank of labelled training series (the first [`ssl_core::probe::KNN_BANK_MAX`] in file order,
//! read before training) and the held-out series, embedded with the live encoder in inference
//! mode at each evaluation.

use candle_core::Device;
use ssl_core::probe::KnnLabels;
use ssl_core::seq::{SeqBatch, SeqExample};
use ssl_core::{CoreError, EvalFigures, Parallel, PretextTask};

use super::common::{embed_examples, ExtraEval};

/// The online k-NN accuracy as a further held-out figure (`knn_accuracy`), given `knn`: the
/// bank's examples, their labels and the held-out examples' labels (see
/// `common::Prepared::knn`), embedded `batch` at a time on `device`. In one process only (each
/// rank holds a share): `None`, with a note when `labelled`, with several ranks; `None` too
/// without labels or when either side is empty.
pub(crate) fn online_knn<'a, T: PretextTask<Batch = SeqBatch> + 'a>(
    knn: Option<(Vec<SeqExample>, Vec<String>, Vec<String>)>,
    labelled: bool,
    par: &Parallel,
    batch: usize,
    device: &Device,
) -> Option<ExtraEval<'a, T>> {
    if par.world > 1 {
        if labelled && par.is_main() {
            eprintln!(
                "note: the held-out k-NN accuracy is computed in one process only; not with {} ranks",
                par.world
            );
        }
        return None;
    }
    let (bank, bank_labels, held_y) = knn?;
    if bank.is_empty() || held_y.is_empty() {
        return None;
    }
    let labels = KnnLabels::from_labels(&bank_labels, &held_y);
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
