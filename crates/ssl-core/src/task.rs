//! The `PretextTask` trait and the batch-source trait the trainer pulls from.

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use serde_json::Value;

use crate::{Ctx, ParamStore, Result};

/// The result of one forward pass of a pretext task.
#[derive(Debug, Clone)]
pub struct TaskOutput {
    /// Scalar loss: the mean over `weight` units (masked tokens, samples, pairs...).
    pub loss: Tensor,
    /// How many units the mean is over. Gradient accumulation and data-parallel reduction
    /// weight each micro-batch by it, so accumulating micro-batches equals one large batch.
    pub weight: f64,
    /// Named task metrics (accuracy, alignment...), averaged with the same weights.
    pub metrics: Vec<(String, f64)>,
}

/// Owns an encoder and its heads; turns an unlabelled batch into a loss.
///
/// Masking and augmentation are pure functions of the batch and `ctx.rng`, so they are
/// testable on their own and a resumed run repeats them exactly.
pub trait PretextTask {
    /// The batch type.
    type Batch;

    /// Every trainable parameter (encoder and heads), by name.
    fn params(&self) -> &ParamStore;

    /// Builds the pretext task from `batch` and returns the loss.
    fn forward(&self, batch: &Self::Batch, ctx: &mut Ctx) -> Result<TaskOutput>;

    /// Pooled embeddings (B, D) of the encoder alone, in evaluation mode.
    fn embed(&self, batch: &Self::Batch, ctx: &mut Ctx) -> Result<Tensor>;

    /// Number of examples in a batch (for throughput).
    fn batch_len(&self, batch: &Self::Batch) -> usize;

    /// Forward and backward of one micro-batch: the output of [`PretextTask::forward`] and
    /// the gradients of `loss * weight`. The default back-propagates through the graph of
    /// `forward`. Tasks whose loss couples every example of the batch override it to bound
    /// memory, e.g. CLIP's gradient caching (embed every chunk without a graph, take the
    /// loss's gradient w.r.t. the embeddings, then back-propagate chunk by chunk). The default
    /// runs inside [`Ctx::sinking`] (fused ops' parameter gradients delivered aside, the same
    /// values); an override gets every gradient through the graph unless it wraps its forward
    /// and backward in [`Ctx::sinking`] too.
    fn forward_backward(
        &self,
        batch: &Self::Batch,
        ctx: &mut Ctx,
    ) -> Result<(TaskOutput, GradStore)> {
        ctx.sinking(|ctx| {
            let out = self.forward(batch, ctx)?;
            let grads = (&out.loss * out.weight)?.backward()?;
            Ok((out, grads))
        })
    }

    /// Called by the trainer after every applied optimizer step (default: nothing), for
    /// constraints on parameters such as clamping a learnable temperature.
    fn after_step(&self) -> Result<()> {
        Ok(())
    }

    /// The learning rate's factor for parameter `name` (default 1): layer-wise learning-rate
    /// decay in fine-tuning; 0 freezes the parameter (the trainer does not update it, nor
    /// warn that no gradient reaches it).
    fn lr_scale(&self, _name: &str) -> f64 {
        1.0
    }
}

/// A boxed task is a task: every method forwards to the box's content, the overridable ones
/// ([`PretextTask::forward_backward`], [`PretextTask::after_step`]) included, so
/// `Box<dyn PretextTask<Batch = B>>` stands for any task over `B` (a task chosen at run time
/// from a configuration, the parts of a [`crate::ComposedTask`]) without a hand-written
/// forwarding enum.
impl<T: PretextTask + ?Sized> PretextTask for Box<T> {
    type Batch = T::Batch;

    fn params(&self) -> &ParamStore {
        (**self).params()
    }

    fn forward(&self, batch: &Self::Batch, ctx: &mut Ctx) -> Result<TaskOutput> {
        (**self).forward(batch, ctx)
    }

    fn embed(&self, batch: &Self::Batch, ctx: &mut Ctx) -> Result<Tensor> {
        (**self).embed(batch, ctx)
    }

    fn batch_len(&self, batch: &Self::Batch) -> usize {
        (**self).batch_len(batch)
    }

    fn forward_backward(
        &self,
        batch: &Self::Batch,
        ctx: &mut Ctx,
    ) -> Result<(TaskOutput, GradStore)> {
        (**self).forward_backward(batch, ctx)
    }

    fn after_step(&self) -> Result<()> {
        (**self).after_step()
    }

    fn lr_scale(&self, name: &str) -> f64 {
        (**self).lr_scale(name)
    }
}

/// An endless, resumable stream of batches.
pub trait BatchSource<B> {
    /// The next batch (sources cycle through epochs; they never run dry).
    fn next_batch(&mut self) -> Result<B>;

    /// The current epoch (0-based).
    fn epoch(&self) -> u64;

    /// The position in the stream, saved in checkpoints.
    fn position(&self) -> Value;

    /// Continues from a position returned by [`BatchSource::position`].
    fn restore(&mut self, position: &Value) -> Result<()>;
}

/// The same batch at every step, never advancing (its position is null): for benchmarks and
/// checks that exercise the compute of a training step, not the data.
#[derive(Debug, Clone)]
pub struct RepeatBatch<B>(pub B);

impl<B: Clone> BatchSource<B> for RepeatBatch<B> {
    fn next_batch(&mut self) -> Result<B> {
        Ok(self.0.clone())
    }

    fn epoch(&self) -> u64 {
        0
    }

    fn position(&self) -> Value {
        Value::Null
    }

    fn restore(&mut self, _: &Value) -> Result<()> {
        Ok(())
    }
}
