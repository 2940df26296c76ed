//! The online k-NN accuracy of held-out images while pretraining (`eval_knn_accuracy`,
//! solo-learn style): at each held-out evaluation a fixed sample of the labelled training
//! images (the bank) and the held-out images (the queries) are embedded with the live encoder
//! in inference mode, and each query is classified by its neighbours in the bank.

use candle_core::{DType, Device};
use ssl_core::nn::MatmulPrecision;
use ssl_core::probe::{knn_accuracy, KnnConfig};
use ssl_core::{CoreError, SslRng};

use super::task::VisionTask;
use crate::{ImageSet, Pooling, VisionError};

/// At most this many training images form the bank.
pub const MAX_BANK: usize = 2000;

/// The bank and the queries of the online k-NN accuracy, chosen once per run.
pub struct OnlineKnn {
    bank: ImageSet,
    bank_y: Vec<usize>,
    queries: ImageSet,
    query_y: Vec<usize>,
    n_classes: usize,
    pooling: Pooling,
    batch: usize,
}

impl OnlineKnn {
    /// A bank of at most [`MAX_BANK`] of the training images `train` (chosen with `seed`)
    /// and the held-out images `held` as queries, with their labels (class ids). `None`, with
    /// a note on stderr, when a label is negative or either side is empty.
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
        let mut idx: Vec<usize> = (0..all_y.len()).collect();
        if idx.len() > MAX_BANK {
            SslRng::derived(seed, "online-knn-bank").shuffle(&mut idx);
            idx.truncate(MAX_BANK);
            idx.sort_unstable();
        }
        let bank_y: Vec<usize> = idx.iter().map(|&i| all_y[i]).collect();
        let n_classes = bank_y.iter().chain(&query_y).max().map_or(0, |m| m + 1);
        Some(OnlineKnn {
            bank: train.select(&idx),
            bank_y,
            queries: held,
            query_y,
            n_classes,
            pooling,
            batch: batch.max(1),
        })
    }

    /// The k-NN accuracy ([`KnnConfig::default`]) of the queries against the bank, both
    /// embedded with `task`'s encoder in inference mode.
    pub fn accuracy(
        &self,
        task: &dyn VisionTask,
        device: &Device,
        precision: MatmulPrecision,
    ) -> ssl_core::Result<f64> {
        let (bank, dim) = self.embed(task, &self.bank, device, precision)?;
        let (queries, _) = self.embed(task, &self.queries, device, precision)?;
        Ok(knn_accuracy(
            &bank,
            &self.bank_y,
            &queries,
            &self.query_y,
            dim,
            self.n_classes,
            &KnnConfig::default(),
        )?)
    }

    /// Pooled embeddings of `images`, quietly (the training progress line is showing).
    fn embed(
        &self,
        task: &dyn VisionTask,
        images: &ImageSet,
        device: &Device,
        precision: MatmulPrecision,
    ) -> ssl_core::Result<(Vec<f32>, usize)> {
        let mut out = Vec::new();
        let mut dim = 0;
        for start in (0..images.len()).step_by(self.batch) {
            let b = images
                .batch(start, self.batch.min(images.len() - start), device)
                .map_err(core_error)?;
            let e = task
                .embed_with(&b, self.pooling, precision)
                .map_err(core_error)?;
            dim = e.dim(1)?;
            out.extend(e.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok((out, dim))
    }
}

/// A vision error as the trainer's error type (the hook's closure returns one).
fn core_error(e: VisionError) -> CoreError {
    match e {
        VisionError::Core(e) => e,
        VisionError::Candle(e) => CoreError::Candle(e),
        other => CoreError::InvalidInput(other.to_string()),
    }
}
