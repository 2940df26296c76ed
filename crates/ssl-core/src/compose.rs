//! Tasks compose: one encoder trained on a weighted sum of pretext tasks (MLM plus a
//! contrastive sentence objective on one BERT, MAE plus SimCLR on one ViT).
//!
//! The parts of a [`ComposedTask`] share parameters by name: build every part from the same
//! [`crate::ParamStore`] (the same [`crate::ParamBuilder`]). An encoder built twice under the
//! same prefix is one set of variables (the second build finds the first one's variables and
//! draws no new initial values), so each part may own its own encoder value while all of them
//! train one encoder. Heads live under names of their own.
//!
//! ```no_run
//! use candle_core::Device;
//! use ssl_core::seq::*;
//! use ssl_core::{ComposedTask, ParamStore};
//!
//! # fn main() -> ssl_core::Result<()> {
//! let store = ParamStore::new(&Device::Cpu);
//! let pb = store.builder(0);
//! let cfg = SeqEncoderConfig { features: 1, ..Default::default() };
//! let masked = MaskedFeatureTask::new(
//!     SeqTransformerEncoder::new(&cfg, &pb)?, 1, MaskedFeatureConfig::default(), &pb)?;
//! // The same encoder variables (same builder, same names), a head of its own.
//! let contrastive = ContrastiveTask::new(
//!     SeqTransformerEncoder::new(&cfg, &pb)?, ContrastiveConfig::default(), &pb)?;
//! let task = ComposedTask::new("masked", 1.0, masked)?
//!     .with("contrastive", 0.5, contrastive)?;
//! // `task` trains through `LoopTrainer::fit` like any other task.
//! # Ok(())
//! # }
//! ```

use std::marker::PhantomData;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};

use crate::{CoreError, Ctx, ParamStore, PretextTask, Result, TaskOutput};

/// A task over batches of type `B` made from a task over another batch type and a function
/// from `B` to that type (e.g. the text column of a text-image pair, or a field of a richer
/// batch): lets tasks over different batch types be parts of one [`ComposedTask`].
///
/// The map runs on every call that takes a batch (`forward`, `embed`, `batch_len`...), so it
/// should be cheap: pick or reshape tensors, leave expensive work (tokenising, decoding) to the
/// data source.
pub struct MapBatch<T, F, B> {
    task: T,
    map: F,
    _batch: PhantomData<fn(&B)>,
}

impl<T, F, B> MapBatch<T, F, B>
where
    T: PretextTask,
    F: Fn(&B) -> Result<T::Batch>,
{
    /// `task` reading the batches `map` makes from a `B`.
    pub fn new(task: T, map: F) -> Self {
        MapBatch {
            task,
            map,
            _batch: PhantomData,
        }
    }

    /// The wrapped task.
    pub fn task(&self) -> &T {
        &self.task
    }
}

impl<T, F, B> PretextTask for MapBatch<T, F, B>
where
    T: PretextTask,
    F: Fn(&B) -> Result<T::Batch>,
{
    type Batch = B;

    fn params(&self) -> &ParamStore {
        self.task.params()
    }

    fn forward(&self, batch: &B, ctx: &mut Ctx) -> Result<TaskOutput> {
        self.task.forward(&(self.map)(batch)?, ctx)
    }

    fn embed(&self, batch: &B, ctx: &mut Ctx) -> Result<Tensor> {
        self.task.embed(&(self.map)(batch)?, ctx)
    }

    /// The wrapped task's count on the mapped batch; `0` if the map fails (the failure shows
    /// in `forward`).
    fn batch_len(&self, batch: &B) -> usize {
        (self.map)(batch).map_or(0, |b| self.task.batch_len(&b))
    }

    fn forward_backward(&self, batch: &B, ctx: &mut Ctx) -> Result<(TaskOutput, GradStore)> {
        self.task.forward_backward(&(self.map)(batch)?, ctx)
    }

    fn after_step(&self) -> Result<()> {
        self.task.after_step()
    }

    fn lr_scale(&self, name: &str) -> f64 {
        self.task.lr_scale(name)
    }
}

struct Part<B> {
    name: String,
    weight: f64,
    task: Box<dyn PretextTask<Batch = B>>,
}

/// A weighted sum of pretext tasks over one batch type, sharing one [`ParamStore`] (see the
/// module documentation): `loss = sum_i weight_i * loss_i`, every part seeing the same batch.
///
/// **Weight.** Each part's `loss_i` is a mean over its own `weight` units (masked tokens,
/// pairs...). The composed [`TaskOutput::weight`] is the number of examples in the batch
/// ([`PretextTask::batch_len`] of the part [`ComposedTask::embed_from`] names): the trainer's
/// gradient accumulation and data-parallel reduction weight each micro-batch's composed loss by
/// its examples, while within a micro-batch each part keeps its own mean. With one micro-batch
/// per step on one process the step's gradient is exactly that of `sum_i weight_i * loss_i`.
/// A part that reports no units (`weight <= 0`) adds nothing to that micro-batch's loss or
/// gradient.
///
/// **Metrics.** Every part's loss as `{name}/loss` and its metrics as `{name}/{metric}`.
///
/// **Backward.** [`PretextTask::forward_backward`] runs each part's own `forward_backward`, in
/// order, and sums their gradients scaled by `units * weight_i / weight_i_units`, so a part that
/// overrides it (CLIP's gradient caching, a gathered contrastive loss's backward across ranks)
/// keeps its behaviour, including any factor it applies on top of `loss x weight`. Each part's
/// graph is freed before the next part runs. [`PretextTask::forward`] builds the sum in one
/// graph instead; its default backward equals `forward_backward` for parts that don't override
/// it.
///
/// **Randomness.** Parts run in the order they were added, each drawing from `ctx.rng` in turn,
/// so a composed run repeats and resumes exactly.
///
/// **After a step.** [`PretextTask::after_step`] calls every part's, in order.
///
/// **Embeddings** come from one part, the first unless [`ComposedTask::embed_from`] names
/// another.
pub struct ComposedTask<B> {
    parts: Vec<Part<B>>,
    embed_part: usize,
}

impl<B: 'static> ComposedTask<B> {
    /// A composition with one part, `task` with weight `weight` under `name`.
    pub fn new(
        name: impl Into<String>,
        weight: f64,
        task: impl PretextTask<Batch = B> + 'static,
    ) -> Result<Self> {
        let first = Part {
            name: name.into(),
            weight,
            task: Box::new(task),
        };
        check_part(&first)?;
        Ok(ComposedTask {
            parts: vec![first],
            embed_part: 0,
        })
    }

    /// Adds `task` with weight `weight` under `name`. It must use the first part's parameter
    /// store, and the name must be new (names prefix the metrics).
    pub fn with(
        mut self,
        name: impl Into<String>,
        weight: f64,
        task: impl PretextTask<Batch = B> + 'static,
    ) -> Result<Self> {
        let part = Part {
            name: name.into(),
            weight,
            task: Box::new(task),
        };
        check_part(&part)?;
        if self.parts.iter().any(|p| p.name == part.name) {
            return Err(CoreError::Config(format!(
                "composed task: two parts are called `{}`",
                part.name
            )));
        }
        if !part.task.params().same_store(self.params()) {
            return Err(CoreError::Config(format!(
                "composed task: part `{}` has a parameter store of its own; build every part \
                 from the same ParamStore so they share the encoder",
                part.name
            )));
        }
        self.parts.push(part);
        Ok(self)
    }

    /// Adds a task over another batch type, reading the batches `map` makes from a `B` (see
    /// [`MapBatch`]).
    pub fn with_mapped<T, F>(
        self,
        name: impl Into<String>,
        weight: f64,
        task: T,
        map: F,
    ) -> Result<Self>
    where
        T: PretextTask + 'static,
        F: Fn(&B) -> Result<T::Batch> + 'static,
    {
        self.with(name, weight, MapBatch::new(task, map))
    }

    /// Embeddings (and the batch length) come from the part called `name`.
    pub fn embed_from(mut self, name: &str) -> Result<Self> {
        self.embed_part = self
            .parts
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| CoreError::Config(format!("composed task: no part called `{name}`")))?;
        Ok(self)
    }

    /// The parts in order: (name, weight, task).
    pub fn parts(&self) -> impl Iterator<Item = (&str, f64, &dyn PretextTask<Batch = B>)> + '_ {
        self.parts
            .iter()
            .map(|p| (p.name.as_str(), p.weight, p.task.as_ref()))
    }

    /// The part called `name`.
    pub fn part(&self, name: &str) -> Option<&dyn PretextTask<Batch = B>> {
        self.parts
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.task.as_ref())
    }
}

fn check_part<B>(part: &Part<B>) -> Result<()> {
    if !(part.weight.is_finite() && part.weight >= 0.0) {
        return Err(CoreError::Config(format!(
            "composed task: part `{}` has weight {}; weights must be finite and non-negative",
            part.name, part.weight
        )));
    }
    if part.name.is_empty() {
        return Err(CoreError::Config(
            "composed task: a part needs a name".into(),
        ));
    }
    Ok(())
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

impl<B> ComposedTask<B> {
    /// Records the part's loss and metrics; returns its weighted loss term (None when the part
    /// reported no units).
    fn term(
        part: &Part<B>,
        out: &TaskOutput,
        metrics: &mut Vec<(String, f64)>,
    ) -> Result<Option<Tensor>> {
        metrics.push((format!("{}/loss", part.name), scalar(&out.loss)?));
        for (k, v) in &out.metrics {
            metrics.push((format!("{}/{k}", part.name), *v));
        }
        if out.weight > 0.0 {
            Ok(Some((&out.loss * part.weight)?))
        } else {
            Ok(None)
        }
    }

    fn sum(terms: Option<Tensor>, like: &ParamStore) -> Result<Tensor> {
        match terms {
            Some(t) => Ok(t),
            None => Ok(Tensor::zeros((), DType::F32, like.device())?),
        }
    }
}

impl<B> PretextTask for ComposedTask<B> {
    type Batch = B;

    /// The store every part shares.
    fn params(&self) -> &ParamStore {
        self.parts[0].task.params()
    }

    fn forward(&self, batch: &B, ctx: &mut Ctx) -> Result<TaskOutput> {
        let units = self.batch_len(batch) as f64;
        let mut metrics = Vec::new();
        let mut loss: Option<Tensor> = None;
        for part in &self.parts {
            let out = part.task.forward(batch, ctx)?;
            if let Some(t) = Self::term(part, &out, &mut metrics)? {
                loss = Some(match loss {
                    Some(l) => (l + t)?,
                    None => t,
                });
            }
        }
        Ok(TaskOutput {
            loss: Self::sum(loss, self.params())?,
            weight: units,
            metrics,
        })
    }

    fn forward_backward(&self, batch: &B, ctx: &mut Ctx) -> Result<(TaskOutput, GradStore)> {
        let units = self.batch_len(batch) as f64;
        let vars = self.params().vars();
        let mut sums: Vec<Option<Tensor>> = vec![None; vars.len()];
        let mut metrics = Vec::new();
        let mut loss: Option<Tensor> = None;
        for part in &self.parts {
            // Each part's gradients are scaled below, so none may wait in a caller's gradient
            // sink: the parts run without it (a part's default `forward_backward` takes a sink
            // of its own and collects it before returning).
            let outer = ctx.grad_sink.take();
            let res = part.task.forward_backward(batch, ctx);
            ctx.grad_sink = outer;
            let (out, grads) = res?;
            let Some(t) = Self::term(part, &out, &mut metrics)? else {
                continue;
            };
            let t = t.detach();
            loss = Some(match loss {
                Some(l) => (l + t)?,
                None => t,
            });
            // The part's gradients are those of `loss_i * weight_i_units` (times whatever the
            // part's own backward adds); the composed objective wants `units * weight_i * loss_i`.
            let factor = units * part.weight / out.weight;
            for (slot, (_, var)) in sums.iter_mut().zip(&vars) {
                if let Some(g) = grads.get(var.as_tensor()) {
                    let g = if factor == 1.0 {
                        g.clone()
                    } else {
                        (g * factor)?
                    };
                    *slot = Some(match slot.take() {
                        Some(a) => (a + g)?,
                        None => g,
                    });
                }
            }
        }
        let mut grads = GradStore::default();
        for (g, (_, var)) in sums.into_iter().zip(&vars) {
            if let Some(g) = g {
                grads.insert(var.as_tensor(), g);
            }
        }
        let out = TaskOutput {
            loss: Self::sum(loss, self.params())?,
            weight: units,
            metrics,
        };
        Ok((out, grads))
    }

    fn embed(&self, batch: &B, ctx: &mut Ctx) -> Result<Tensor> {
        self.parts[self.embed_part].task.embed(batch, ctx)
    }

    fn batch_len(&self, batch: &B) -> usize {
        self.parts[self.embed_part].task.batch_len(batch)
    }

    fn after_step(&self) -> Result<()> {
        for part in &self.parts {
            part.task.after_step()?;
        }
        Ok(())
    }
}
