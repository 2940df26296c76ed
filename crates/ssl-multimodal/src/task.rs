//! [`ClipModel`] as an [`ssl_core::PretextTask`] on [`PairBatch`]es, with gradient caching
//! (GradCache, open_clip's `accum_freq`) so a batch larger than memory keeps every negative.
//!
//! Gradient caching computes exactly the gradient of the loss over the whole batch:
//! 1. embed every chunk of `micro_batch` pairs and drop its graph, remembering the chunk's
//!    random stream;
//! 2. compute the loss on the full similarity matrix of the cached embeddings and its
//!    gradient w.r.t. the embeddings (and `logit_scale` / `logit_bias`);
//! 3. for each chunk, re-run the towers with the same random stream and back-propagate
//!    `sum(embedding * cached_gradient)`, adding the parameter gradients up.
//!
//! Only one chunk's activations are alive at a time; the cost is a second forward pass.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use ssl_core::{Ctx, ParamStore, PretextTask, TaskOutput};
use ssl_text::BertInput;
use ssl_vision::Images;

use crate::loss::alignment_accuracy;
use crate::model::ClipModel;
use crate::{MultimodalError, Result};

/// A batch of image-caption pairs: row `i` of `images` belongs with row `i` of `text`.
#[derive(Debug, Clone)]
pub struct PairBatch {
    /// Raw `[0, 1]` pixels `(B, C, H, W)`.
    pub images: Images,
    /// The captions' token ids, padding mask and segment ids `(B, T)`.
    pub text: BertInput,
}

impl PairBatch {
    /// Builds a batch, checking that both sides hold the same number of rows.
    pub fn new(images: Images, text: BertInput) -> Result<Self> {
        let t = text.input_ids.dim(0)?;
        if images.len() != t {
            return Err(MultimodalError::InvalidInput(format!(
                "a pair batch has {} images but {t} captions",
                images.len()
            )));
        }
        Ok(PairBatch { images, text })
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.images.len()
    }

    /// True without pairs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pairs `start..start + len`.
    pub fn narrow(&self, start: usize, len: usize) -> Result<PairBatch> {
        Ok(PairBatch {
            images: Images {
                pixels: self.images.pixels.narrow(0, start, len)?,
            },
            text: BertInput {
                input_ids: self.text.input_ids.narrow(0, start, len)?,
                attention_mask: self.text.attention_mask.narrow(0, start, len)?,
                token_type_ids: self.text.token_type_ids.narrow(0, start, len)?,
            },
        })
    }
}

impl ClipModel {
    /// Metrics of a step: in-batch top-1 alignment both ways and the temperature.
    fn step_metrics(&self, image: &Tensor, text: &Tensor) -> Result<Vec<(String, f64)>> {
        let (i2t, t2i) = alignment_accuracy(&image.detach(), &text.detach())?;
        let s = self.logit_scale_value()?;
        let mut m = vec![
            ("i2t_accuracy".to_string(), i2t),
            ("t2i_accuracy".to_string(), t2i),
            ("logit_scale".to_string(), s),
            ("scale".to_string(), s.exp()),
        ];
        if let Some(b) = self.logit_bias() {
            m.push((
                "logit_bias".to_string(),
                b.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?,
            ));
        }
        Ok(m)
    }

    /// `(rank, world)` of the data-parallel run (`(0, 1)` alone).
    fn rank_world(&self) -> (usize, usize) {
        self.ranks
            .as_ref()
            .map_or((0, 1), |c| (c.rank(), c.world_size()))
    }

    /// Every rank's rows of `local` `(n, d)` in rank order; this rank's rows keep their graph,
    /// the others are constants. All ranks must call it with the same `n`.
    fn gather_rows(&self, local: &Tensor) -> Result<Tensor> {
        match self.ranks.as_ref() {
            Some(c) => Ok(ssl_core::gather_rows(c.as_ref(), local)?),
            None => Ok(local.clone()),
        }
    }

    /// The training step of a data-parallel run: the loss over every rank's pairs, and the
    /// gradients of `loss * N` (N pairs over all ranks) reaching this rank's parameters through
    /// its own embeddings. Reported with this rank's weight `n`, the trainer's sum over ranks
    /// divided by the summed weight is exactly the one-process gradient of the combined batch.
    fn forward_backward_gathered(
        &self,
        batch: &PairBatch,
        ctx: &mut Ctx,
    ) -> Result<(TaskOutput, GradStore)> {
        let (_, world) = self.rank_world();
        let n = batch.len();
        let micro = self.cfg.micro_batch;
        if micro > 0 && micro < n {
            return self.grad_cache(batch, micro, ctx);
        }
        let img = self.gather_rows(&self.encode_image(&batch.images, ctx)?)?;
        let txt = self.gather_rows(&self.encode_text(&batch.text, ctx)?)?;
        let loss = self.loss_shared(&img, &txt, world)?;
        let grads = (&loss * (n * world) as f64)?.backward()?;
        let metrics = self.step_metrics(&img, &txt)?;
        Ok((
            TaskOutput {
                loss: loss.detach(),
                weight: n as f64,
                metrics,
            },
            grads,
        ))
    }

    /// One pass over the whole batch with its graph: the loss and the step metrics.
    pub fn forward_pairs(&self, batch: &PairBatch, ctx: &mut Ctx) -> Result<TaskOutput> {
        let img = self.encode_image(&batch.images, ctx)?;
        let txt = self.encode_text(&batch.text, ctx)?;
        let loss = self.loss(&img, &txt)?;
        let metrics = self.step_metrics(&img, &txt)?;
        Ok(TaskOutput {
            loss,
            weight: batch.len() as f64,
            metrics,
        })
    }

    /// Gradient caching over chunks of `micro_batch` pairs (see the module documentation).
    /// Returns the detached loss and the gradients of `loss * N`, equal to those of
    /// [`ClipModel::forward_pairs`] followed by a backward pass, up to float rounding.
    pub fn grad_cache(
        &self,
        batch: &PairBatch,
        micro_batch: usize,
        ctx: &mut Ctx,
    ) -> Result<(TaskOutput, GradStore)> {
        let n = batch.len();
        if micro_batch == 0 {
            return Err(MultimodalError::Config(
                "gradient caching needs model.micro_batch >= 1".into(),
            ));
        }
        let chunks: Vec<(usize, usize)> = (0..n)
            .step_by(micro_batch)
            .map(|s| (s, micro_batch.min(n - s)))
            .collect();
        let mut streams = Vec::with_capacity(chunks.len());
        let mut imgs = Vec::with_capacity(chunks.len());
        let mut txts = Vec::with_capacity(chunks.len());
        // The first pass only reads the embeddings: no backward runs through it.
        let backward = std::mem::replace(&mut ctx.backward, false);
        let mut first = || -> Result<()> {
            for &(s, l) in &chunks {
                streams.push(ctx.rng.clone());
                let part = batch.narrow(s, l)?;
                imgs.push(self.encode_image(&part.images, ctx)?.detach());
                txts.push(self.encode_text(&part.text, ctx)?.detach());
            }
            Ok(())
        };
        let res = first();
        ctx.backward = backward;
        res?;
        let img = Var::from_tensor(&Tensor::cat(&imgs, 0)?)?;
        let txt = Var::from_tensor(&Tensor::cat(&txts, 0)?)?;
        // In a data-parallel run the loss spans every rank's cached embeddings.
        let (_, world) = self.rank_world();
        let all_img = self.gather_rows(img.as_tensor())?;
        let all_txt = self.gather_rows(txt.as_tensor())?;
        let loss = self.loss_shared(&all_img, &all_txt, world)?;
        let mut grads = (&loss * (n * world) as f64)?.backward()?;
        let missing = || {
            MultimodalError::InvalidInput("the loss has no gradient w.r.t. the embeddings".into())
        };
        let g_img = grads.remove(img.as_tensor()).ok_or_else(missing)?;
        let g_txt = grads.remove(txt.as_tensor()).ok_or_else(missing)?;
        for (k, &(s, l)) in chunks.iter().enumerate() {
            let mut rng = streams[k].clone();
            let mut replay = Ctx {
                train: ctx.train,
                output_hidden_states: false,
                rng: &mut rng,
                precision: ctx.precision,
                backward: true,
                grad_sink: ctx.grad_sink.clone(),
            };
            let part = batch.narrow(s, l)?;
            let e_img = self.encode_image(&part.images, &mut replay)?;
            let e_txt = self.encode_text(&part.text, &mut replay)?;
            let surrogate = ((e_img * g_img.narrow(0, s, l)?)?.sum_all()?
                + (e_txt * g_txt.narrow(0, s, l)?)?.sum_all()?)?;
            grads.extend(surrogate.backward()?)?;
        }
        let metrics = self.step_metrics(&all_img, &all_txt)?;
        Ok((
            TaskOutput {
                loss: loss.detach(),
                weight: n as f64,
                metrics,
            },
            grads,
        ))
    }
}

impl PretextTask for ClipModel {
    type Batch = PairBatch;

    fn params(&self) -> &ParamStore {
        &self.store
    }

    fn forward(&self, batch: &PairBatch, ctx: &mut Ctx) -> ssl_core::Result<TaskOutput> {
        Ok(self.forward_pairs(batch, ctx)?)
    }

    /// With `micro_batch` set and smaller than the batch: gradient caching.
    fn forward_backward(
        &self,
        batch: &PairBatch,
        ctx: &mut Ctx,
    ) -> ssl_core::Result<(TaskOutput, GradStore)> {
        // Each path returns its backward's gradients unscaled (the factors scale the loss):
        // fused ops may deliver theirs aside.
        ctx.sinking(|ctx| {
            if self.rank_world().1 > 1 {
                return Ok(self.forward_backward_gathered(batch, ctx)?);
            }
            let micro = self.cfg.micro_batch;
            if micro > 0 && micro < batch.len() {
                return Ok(self.grad_cache(batch, micro, ctx)?);
            }
            let out = self.forward_pairs(batch, ctx)?;
            let grads = (&out.loss * out.weight)?.backward()?;
            Ok((out, grads))
        })
    }

    /// The image embeddings (normalised, in the shared space).
    fn embed(&self, batch: &PairBatch, ctx: &mut Ctx) -> ssl_core::Result<Tensor> {
        Ok(self.encode_image(&batch.images, ctx)?)
    }

    fn batch_len(&self, batch: &PairBatch) -> usize {
        batch.len()
    }

    /// Clamps `logit_scale` to `[0, loss.logit_scale_max]`.
    fn after_step(&self) -> ssl_core::Result<()> {
        Ok(self.clamp_logit_scale()?)
    }
}
