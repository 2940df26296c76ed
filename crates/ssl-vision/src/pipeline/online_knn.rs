//! The online k-NN accuracy of held-out images while pretraining (`eval_knn_accuracy`, see
//! [`ssl_core::probe::KnnLabels`]): a fixed bank of labelled training images and the held-out
//! images, embedded with the live encoder in inference mode at each evaluation.

use candle_core::Device;
use ssl_core::nn::MatmulPrecision;
use ssl_core::probe::{knn_bank_rows, KnnLabels};

use super::embed::embed_image_batches;
use super::task::VisionTask;
use crate::{ImageSet, Pooling};

/// The bank and the queries of the online k-NN accuracy, chosen once per run.
pub struct OnlineKnn {
    bank: ImageSet,
    queries: ImageSet,
    labels: KnnLabels,
    pooling: Pooling,
    batch: usize,
}

impl OnlineKnn {
    /// A bank of the training images `train` ([`knn_bank_rows`] with `seed`) and the
    /// held-out images `held` as queries, with their labels (class ids). `None`, with a note
    /// on stderr, when a label is negative; `None` when either side is empty.
    pub fn new(
        train: &ImageSet,
        train_y: &[i64],
        held: ImageSet,
        held_y: &[i64],
        seed: u64,
        pooling: Pooling,
        batch: usize,
    ) -> Option<Self> {
        let ids = |l: &[i64]| -> Option<Vec<usize>> {
            l.iter().map(|&v| usize::try_from(v).ok()).collect()
        };
        let (Some(all_y), Some(query_y)) = (ids(train_y), ids(held_y)) else {
            eprintln!("note: a negative label: no held-out k-NN accuracy");
            return None;
        };
        if all_y.is_empty() || query_y.is_empty() {
            return None;
        }
        let idx = knn_bank_rows(all_y.len(), seed);
        let bank_y: Vec<usize> = idx.iter().map(|&i| all_y[i]).collect();
        Some(OnlineKnn {
            bank: train.select(&idx),
            queries: held,
            labels: KnnLabels::from_ids(bank_y, query_y),
            pooling,
            batch: batch.max(1),
        })
    }

    /// The k-NN accuracy of the queries against the bank, both embedded with `task`'s
    /// encoder in inference mode, quietly (the training progress line is showing).
    pub fn accuracy(
        &self,
        task: &dyn VisionTask,
        device: &Device,
        precision: MatmulPrecision,
    ) -> ssl_core::Result<f64> {
        let embed = |images: &ImageSet| {
            embed_image_batches(
                task,
                images,
                self.pooling,
                self.batch,
                device,
                precision,
                false,
            )
        };
        let (bank, dim) = embed(&self.bank)?;
        let (queries, _) = embed(&self.queries)?;
        Ok(self.labels.accuracy(&bank, &queries, dim)?)
    }
}
