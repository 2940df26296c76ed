//! Numeric feature sequences `(batch, seq, features)`: examples, batches and an in-memory
//! resumable source.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{BatchSource, CoreError, Result, SslRng};

/// One sequence: `steps x features` values, row-major (timestep-major). NaN marks a gap.
#[derive(Debug, Clone, PartialEq)]
pub struct SeqExample {
    /// Values, `steps * features`.
    pub values: Vec<f32>,
    /// Number of timesteps.
    pub steps: usize,
    /// Number of features per timestep.
    pub features: usize,
}

impl SeqExample {
    /// A sequence from `steps x features` values; errors when the length does not match.
    pub fn new(values: Vec<f32>, steps: usize, features: usize) -> Result<Self> {
        if values.len() != steps * features || features == 0 {
            return Err(CoreError::InvalidInput(format!(
                "sequence has {} values, expected {steps} steps x {features} features",
                values.len()
            )));
        }
        Ok(SeqExample {
            values,
            steps,
            features,
        })
    }

    /// Z-normalises each feature over this sequence's finite values (per-instance
    /// normalisation, as UCR and RevIN do). Constant features become 0.
    pub fn normalize_instance(&mut self) {
        let f = self.features;
        for j in 0..f {
            let vals: Vec<f64> = (0..self.steps)
                .map(|t| f64::from(self.values[t * f + j]))
                .filter(|v| v.is_finite())
                .collect();
            if vals.is_empty() {
                continue;
            }
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let std =
                (vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64).sqrt();
            for t in 0..self.steps {
                let v = &mut self.values[t * f + j];
                if v.is_finite() {
                    *v = if std > 1e-8 {
                        ((f64::from(*v) - mean) / std) as f32
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// A padded batch: `x` (B, T, F), `valid` (B, T) with 1 where every feature of a timestep is
/// observed. As in TS2Vec's reference, a step with any feature missing (NaN) is masked as a
/// whole and all its features are 0 in `x`: no missing value is ever fed to a model or used as a
/// target in place of a number, at the cost of the observed features of partial steps.
#[derive(Debug, Clone)]
pub struct SeqBatch {
    /// Values (B, T, F), f32.
    pub x: Tensor,
    /// Validity (B, T), f32 0/1.
    pub valid: Tensor,
}

impl SeqBatch {
    /// Pads `examples` (same feature count) to the longest and builds tensors on `device`.
    pub fn from_examples(examples: &[&SeqExample], device: &Device) -> Result<Self> {
        let first = examples
            .first()
            .ok_or_else(|| CoreError::InvalidInput("empty batch".into()))?;
        let f = first.features;
        let t = examples.iter().map(|e| e.steps).max().unwrap_or(0).max(1);
        let b = examples.len();
        let mut x = vec![0f32; b * t * f];
        let mut valid = vec![0f32; b * t];
        for (i, e) in examples.iter().enumerate() {
            if e.features != f {
                return Err(CoreError::InvalidInput(format!(
                    "sequence {i} of the batch has {} features, the first has {f}",
                    e.features
                )));
            }
            for s in 0..e.steps {
                let step = &e.values[s * f..(s + 1) * f];
                if step.iter().all(|v| v.is_finite()) {
                    x[(i * t + s) * f..(i * t + s + 1) * f].copy_from_slice(step);
                    valid[i * t + s] = 1.0;
                }
            }
        }
        Ok(SeqBatch {
            x: Tensor::from_vec(x, (b, t, f), device)?,
            valid: Tensor::from_vec(valid, (b, t), device)?,
        })
    }

    /// Batch size.
    pub fn len(&self) -> usize {
        self.x.dims().first().copied().unwrap_or(0)
    }

    /// True for an empty batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Position of an [`InMemorySeqSource`] in its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SeqCursor {
    /// Epoch.
    pub epoch: u64,
    /// Index of the next example in the epoch's order.
    pub offset: usize,
}

/// Endless batches over examples held in memory, reshuffled each epoch from `(seed, epoch)`.
///
/// Every batch has `batch_size` examples (a trailing partial batch is dropped, unless the
/// whole set is smaller than one batch).
pub struct InMemorySeqSource {
    examples: Vec<SeqExample>,
    batch_size: usize,
    seed: u64,
    shuffle: bool,
    device: Device,
    cursor: SeqCursor,
    order: Vec<usize>,
}

impl InMemorySeqSource {
    /// A source over `examples`.
    pub fn new(
        examples: Vec<SeqExample>,
        batch_size: usize,
        seed: u64,
        shuffle: bool,
        device: &Device,
    ) -> Result<Self> {
        if examples.is_empty() {
            return Err(CoreError::InvalidInput(
                "the data set has no sequences".into(),
            ));
        }
        if batch_size == 0 {
            return Err(CoreError::Config("batch size must be at least 1".into()));
        }
        let mut s = InMemorySeqSource {
            examples,
            batch_size,
            seed,
            shuffle,
            device: device.clone(),
            cursor: SeqCursor::default(),
            order: Vec::new(),
        };
        s.order = s.epoch_order(0);
        Ok(s)
    }

    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        if self.shuffle {
            SslRng::derived(
                self.seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                "epoch-order",
            )
            .shuffle(&mut order);
        }
        order
    }

    fn effective_batch(&self) -> usize {
        self.batch_size.min(self.examples.len())
    }
}

impl BatchSource<SeqBatch> for InMemorySeqSource {
    fn next_batch(&mut self) -> Result<SeqBatch> {
        let bs = self.effective_batch();
        if self.cursor.offset + bs > self.examples.len() {
            self.cursor = SeqCursor {
                epoch: self.cursor.epoch + 1,
                offset: 0,
            };
            self.order = self.epoch_order(self.cursor.epoch);
        }
        let idx = &self.order[self.cursor.offset..self.cursor.offset + bs];
        let rows: Vec<&SeqExample> = idx.iter().map(|&i| &self.examples[i]).collect();
        self.cursor.offset += bs;
        SeqBatch::from_examples(&rows, &self.device)
    }

    fn epoch(&self) -> u64 {
        self.cursor.epoch
    }

    fn position(&self) -> Value {
        serde_json::to_value(self.cursor).unwrap_or(Value::Null)
    }

    fn restore(&mut self, position: &Value) -> Result<()> {
        let c: SeqCursor = serde_json::from_value(position.clone()).map_err(|e| {
            CoreError::Config(format!(
                "data position {position} is not a sequence cursor: {e}"
            ))
        })?;
        self.cursor = c;
        self.order = self.epoch_order(c.epoch);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_gaps_and_validity() {
        let a = SeqExample::new(vec![1., 2., f32::NAN, f32::NAN, 5., 6.], 3, 2).unwrap();
        let b = SeqExample::new(vec![7., 8.], 1, 2).unwrap();
        let batch = SeqBatch::from_examples(&[&a, &b], &Device::Cpu).unwrap();
        assert_eq!(batch.x.dims(), [2, 3, 2]);
        assert_eq!(
            batch.valid.to_vec2::<f32>().unwrap(),
            [[1., 0., 1.], [1., 0., 0.]]
        );
        assert_eq!(batch.x.to_vec3::<f32>().unwrap()[0][1], [0., 0.]);
        assert!(SeqExample::new(vec![1.0; 5], 3, 2).is_err());
        // A step with one of two features missing is masked whole: neither the gap nor its
        // observed neighbour reaches the model.
        let p = SeqExample::new(vec![1., f32::NAN, 3., 4.], 2, 2).unwrap();
        let batch = SeqBatch::from_examples(&[&p], &Device::Cpu).unwrap();
        assert_eq!(batch.valid.to_vec2::<f32>().unwrap(), [[0., 1.]]);
        assert_eq!(batch.x.to_vec3::<f32>().unwrap()[0], [[0., 0.], [3., 4.]]);
    }

    #[test]
    fn cursor_resume_gives_the_same_batches() {
        let ex: Vec<SeqExample> = (0..10)
            .map(|i| SeqExample::new(vec![i as f32], 1, 1).unwrap())
            .collect();
        let mut a = InMemorySeqSource::new(ex.clone(), 3, 5, true, &Device::Cpu).unwrap();
        let firsts = |s: &mut InMemorySeqSource| {
            s.next_batch()
                .unwrap()
                .x
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let mut seen = Vec::new();
        for _ in 0..3 {
            seen.extend(firsts(&mut a));
        }
        let mut sorted = seen.clone();
        sorted.sort_by(f32::total_cmp);
        sorted.dedup();
        assert_eq!(sorted.len(), 9, "no repeats within an epoch");
        let pos = a.position();
        let expect: Vec<Vec<f32>> = (0..5).map(|_| firsts(&mut a)).collect();
        let mut b = InMemorySeqSource::new(ex, 3, 5, true, &Device::Cpu).unwrap();
        b.restore(&pos).unwrap();
        let got: Vec<Vec<f32>> = (0..5).map(|_| firsts(&mut b)).collect();
        assert_eq!(expect, got);
        assert!(b.epoch() >= 1);
    }

    #[test]
    fn instance_normalisation_ignores_gaps() {
        let mut e = SeqExample::new(vec![1., f32::NAN, 3.], 3, 1).unwrap();
        e.normalize_instance();
        assert_eq!(e.values[0], -1.0);
        assert!(e.values[1].is_nan());
        assert_eq!(e.values[2], 1.0);
    }
}
