//! Forecasting as a pretext task: from the first `context` steps of a window predict the next
//! `horizon` steps of every channel at once (a direct multi-step head), in RevIN-normalised
//! space; the loss is the MSE over observed target steps. Also the evaluation against naive
//! and seasonal-naive forecasts.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use ssl_core::loss::masked_mse;
use ssl_core::nn::Linear;
use ssl_core::seq::{SeqBatch, SeqExample};
use ssl_core::{
    CoreError, Ctx, Encoder, Init, ParamBuilder, ParamStore, PretextTask, Result, SslRng,
    TaskOutput,
};

use crate::revin::Revin;

/// What the forecasting head reads.
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForecastHead {
    /// Every token, flattened (PatchTST's flatten head): needs a fixed context length.
    Flatten,
    /// The pooled embedding only.
    Pooled,
}

/// Settings of [`ForecastTask`].
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForecastConfig {
    /// Steps of context the model sees.
    pub context: usize,
    /// Steps predicted.
    pub horizon: usize,
    /// The head's input.
    pub head: ForecastHead,
    /// Reversible instance normalisation of each window.
    pub revin: bool,
    /// Learnable RevIN affine map.
    pub revin_affine: bool,
}

impl Default for ForecastConfig {
    fn default() -> Self {
        ForecastConfig {
            context: 104,
            horizon: 12,
            head: ForecastHead::Flatten,
            revin: true,
            revin_affine: false,
        }
    }
}

/// Direct multi-step forecasting on any per-series encoder. Batches are windows of
/// `context + horizon` steps. The head is `forecast_head` (tokens or pooled -> horizon·C).
pub struct ForecastTask<E> {
    encoder: E,
    head: Linear,
    revin: Option<Revin>,
    cfg: ForecastConfig,
    channels: usize,
    store: ParamStore,
}

impl<E: Encoder<Input = SeqBatch>> ForecastTask<E> {
    /// Wraps `encoder` for `channels` channels, creating the head under `pb`.
    pub fn new(
        encoder: E,
        channels: usize,
        cfg: ForecastConfig,
        pb: &ParamBuilder,
    ) -> Result<Self> {
        if cfg.context == 0 || cfg.horizon == 0 {
            return Err(CoreError::Config(format!(
                "forecast context and horizon must be at least 1 (got {}, {})",
                cfg.context, cfg.horizon
            )));
        }
        let in_dim = match cfg.head {
            ForecastHead::Pooled => encoder.dim(),
            ForecastHead::Flatten => {
                // The token count for this context length, from one dry run.
                let probe = SeqBatch {
                    x: Tensor::zeros((1, cfg.context, channels), DType::F32, pb.device())?,
                    valid: Tensor::ones((1, cfg.context), DType::F32, pb.device())?,
                };
                let mut rng = SslRng::new(0);
                let out = encoder.encode(&probe, &mut Ctx::inference(&mut rng))?;
                out.tokens.elem_count()
            }
        };
        let head = Linear::new(
            in_dim,
            cfg.horizon * channels,
            true,
            Init::XavierUniform,
            &pb.pp("forecast_head"),
        )?;
        let revin = cfg
            .revin
            .then(|| Revin::new(channels, cfg.revin_affine, pb))
            .transpose()?;
        Ok(ForecastTask {
            encoder,
            head,
            revin,
            cfg,
            channels,
            store: pb.store().clone(),
        })
    }

    /// The encoder.
    pub fn encoder(&self) -> &E {
        &self.encoder
    }

    /// The settings.
    pub fn config(&self) -> &ForecastConfig {
        &self.cfg
    }

    /// Forecasts (B, horizon, C) from contexts (B, context, C), normalised when RevIN is on
    /// (returned with the statistics to map back), in the original scale otherwise.
    fn forecast_normalised(
        &self,
        context: &SeqBatch,
        ctx: &mut Ctx,
    ) -> Result<(Tensor, Option<crate::revin::RevinStats>)> {
        let (b, t, c) = context.x.dims3()?;
        if t != self.cfg.context || c != self.channels {
            return Err(CoreError::InvalidInput(format!(
                "forecast context is {t} steps x {c} channels, the model expects {} x {}",
                self.cfg.context, self.channels
            )));
        }
        let (input, stats) = match &self.revin {
            Some(r) => {
                let (x, s) = r.normalize(&context.x, &context.valid)?;
                (
                    SeqBatch {
                        x,
                        valid: context.valid.clone(),
                    },
                    Some(s),
                )
            }
            None => (context.clone(), None),
        };
        let out = self.encoder.encode(&input, ctx)?;
        let feats = match self.cfg.head {
            ForecastHead::Pooled => out.pooled,
            ForecastHead::Flatten => out.tokens.reshape((b, ()))?,
        };
        let y = self
            .head
            .forward(&feats)?
            .reshape((b, self.cfg.horizon, self.channels))?;
        Ok((y, stats))
    }

    /// Forecasts (B, horizon, C) in the original scale from contexts (B, context, C).
    pub fn predict(&self, context: &SeqBatch, ctx: &mut Ctx) -> Result<Tensor> {
        let (y, stats) = self.forecast_normalised(context, ctx)?;
        match (&self.revin, stats) {
            (Some(r), Some(s)) => r.denormalize(&y, &s),
            _ => Ok(y),
        }
    }

    fn split(&self, batch: &SeqBatch) -> Result<(SeqBatch, SeqBatch)> {
        let (_, t, _) = batch.x.dims3()?;
        let (l, h) = (self.cfg.context, self.cfg.horizon);
        if t != l + h {
            return Err(CoreError::InvalidInput(format!(
                "forecast windows must have context + horizon = {} steps, got {t}",
                l + h
            )));
        }
        let part = |start, len| -> Result<SeqBatch> {
            Ok(SeqBatch {
                x: batch.x.narrow(1, start, len)?,
                valid: batch.valid.narrow(1, start, len)?,
            })
        };
        Ok((part(0, l)?, part(l, h)?))
    }
}

impl<E: Encoder<Input = SeqBatch>> PretextTask for ForecastTask<E> {
    type Batch = SeqBatch;

    fn params(&self) -> &ParamStore {
        &self.store
    }

    fn forward(&self, batch: &SeqBatch, ctx: &mut Ctx) -> Result<TaskOutput> {
        let (context, target) = self.split(batch)?;
        let (pred, stats) = self.forecast_normalised(&context, ctx)?;
        let target_x = match (&self.revin, &stats) {
            (Some(r), Some(s)) => r.apply(&target.x, s)?,
            _ => target.x.clone(),
        };
        if target.valid.sum_all()?.to_scalar::<f32>()? <= 0.0 {
            return Err(CoreError::InvalidInput(
                "no observed target step in this batch of forecast windows".into(),
            ));
        }
        let (loss, count) = masked_mse(&pred, &target_x, &target.valid)?;
        let mse = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok(TaskOutput {
            loss,
            weight: count,
            metrics: vec![("forecast_mse".into(), mse)],
        })
    }

    fn embed(&self, batch: &SeqBatch, ctx: &mut Ctx) -> Result<Tensor> {
        Ok(self.encoder.encode(batch, ctx)?.pooled)
    }

    fn batch_len(&self, batch: &SeqBatch) -> usize {
        batch.len()
    }
}

/// Errors of one method at one lead time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Errors {
    /// Mean squared error.
    pub mse: f64,
    /// Mean absolute error.
    pub mae: f64,
}

/// Forecast errors at one lead time (1 = the next step), over the (window, channel) pairs
/// where the target and every method's forecast exist.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HorizonReport {
    /// Lead time in steps.
    pub horizon: usize,
    /// Pairs scored.
    pub n: usize,
    /// The model.
    pub model: Errors,
    /// Last observed value.
    pub naive: Errors,
    /// The value one season before the target.
    pub seasonal_naive: Errors,
}

/// The naive forecast: the last observed value of each channel in the context (None when the
/// context has none).
pub fn naive_forecast(context: &SeqExample, channel: usize) -> Option<f32> {
    let f = context.features;
    (0..context.steps)
        .rev()
        .map(|t| context.values[t * f + channel])
        .find(|v| v.is_finite())
}

/// The seasonal-naive forecast of lead `h` (1-based): the value `period` steps before the
/// target, taken from the context (None when out of the context or unobserved).
pub fn seasonal_naive_forecast(
    context: &SeqExample,
    channel: usize,
    h: usize,
    period: usize,
) -> Option<f32> {
    let target = context.steps + h - 1;
    let src = target.checked_sub(period)?;
    if src >= context.steps {
        return None;
    }
    let v = context.values[src * context.features + channel];
    v.is_finite().then_some(v)
}

/// Scores `task` on test windows (`context + horizon` steps each) at the lead times in
/// `horizons`, against naive and seasonal-naive (`period`) forecasts, in the original scale.
pub fn evaluate_forecast<E: Encoder<Input = SeqBatch>>(
    task: &ForecastTask<E>,
    windows: &[SeqExample],
    horizons: &[usize],
    period: usize,
    batch_size: usize,
) -> Result<Vec<HorizonReport>> {
    let mut scorer = ForecastScorer::new(task, horizons, period)?;
    for chunk in windows.chunks(batch_size.max(1)) {
        scorer.add(task, chunk)?;
    }
    Ok(scorer.finish())
}

/// [`evaluate_forecast`]'s running sums, fed one batch of test windows at a time (a stream of
/// windows is scored in constant memory); the same figures as [`evaluate_forecast`] on the
/// windows concatenated in the same batches.
#[derive(Debug, Clone)]
pub struct ForecastScorer {
    horizons: Vec<usize>,
    period: usize,
    /// Per lead: n, mse x3, mae x3 (model, naive, seasonal naive).
    acc: Vec<[f64; 7]>,
    rng: SslRng,
}

impl ForecastScorer {
    /// A scorer of `task`'s forecasts at `horizons` (each within its horizon) against naive and
    /// seasonal-naive (`period`) forecasts.
    pub fn new<E: Encoder<Input = SeqBatch>>(
        task: &ForecastTask<E>,
        horizons: &[usize],
        period: usize,
    ) -> Result<Self> {
        let hmax = task.cfg.horizon;
        if let Some(h) = horizons.iter().find(|&&h| h == 0 || h > hmax) {
            return Err(CoreError::Config(format!(
                "evaluation lead {h} is outside the model's horizon 1..={hmax}"
            )));
        }
        Ok(ForecastScorer {
            horizons: horizons.to_vec(),
            period,
            acc: vec![[0f64; 7]; horizons.len()],
            rng: SslRng::new(0),
        })
    }

    /// Scores one batch of test windows.
    pub fn add<E: Encoder<Input = SeqBatch>>(
        &mut self,
        task: &ForecastTask<E>,
        chunk: &[SeqExample],
    ) -> Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let (l, hmax) = (task.cfg.context, task.cfg.horizon);
        let c = task.channels;
        let contexts: Vec<SeqExample> = chunk
            .iter()
            .map(|w| {
                if w.steps != l + hmax || w.features != c {
                    return Err(CoreError::InvalidInput(format!(
                        "test window is {} x {}, expected {} x {c}",
                        w.steps,
                        w.features,
                        l + hmax
                    )));
                }
                SeqExample::new(w.values[..l * c].to_vec(), l, c)
            })
            .collect::<Result<_>>()?;
        let batch = SeqBatch::from_examples(
            &contexts.iter().collect::<Vec<_>>(),
            task.head.weight().device(),
        )?;
        let pred = task
            .predict(&batch, &mut Ctx::eval(&mut self.rng))?
            .to_dtype(DType::F32)?
            .to_vec3::<f32>()?;
        for (i, w) in chunk.iter().enumerate() {
            for (k, &h) in self.horizons.iter().enumerate() {
                for (ch, &m) in pred[i][h - 1].iter().enumerate().take(c) {
                    let y = w.values[(l + h - 1) * c + ch];
                    let naive = naive_forecast(&contexts[i], ch);
                    let seasonal = seasonal_naive_forecast(&contexts[i], ch, h, self.period);
                    let (Some(nv), Some(sv)) = (naive, seasonal) else {
                        continue;
                    };
                    if !y.is_finite() {
                        continue;
                    }
                    let (y, m, nv, sv) = (f64::from(y), f64::from(m), f64::from(nv), f64::from(sv));
                    let a = &mut self.acc[k];
                    a[0] += 1.0;
                    for (j, p) in [m, nv, sv].iter().enumerate() {
                        a[1 + j] += (p - y).powi(2);
                        a[4 + j] += (p - y).abs();
                    }
                }
            }
        }
        Ok(())
    }

    /// The errors per lead time.
    pub fn finish(self) -> Vec<HorizonReport> {
        self.horizons
            .iter()
            .zip(self.acc)
            .map(|(&h, a)| {
                let n = a[0].max(1.0);
                let e = |j: usize| Errors {
                    mse: a[1 + j] / n,
                    mae: a[4 + j] / n,
                };
                HorizonReport {
                    horizon: h,
                    n: a[0] as usize,
                    model: e(0),
                    naive: e(1),
                    seasonal_naive: e(2),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn baselines_use_the_last_observed_and_the_season() {
        let c = SeqExample::new(vec![1., 2., 3., f32::NAN], 4, 1).unwrap();
        assert_eq!(naive_forecast(&c, 0), Some(3.0));
        // Context steps 0..4, lead 1 targets step 4; period 3 -> step 1.
        assert_eq!(seasonal_naive_forecast(&c, 0, 1, 3), Some(2.0));
        assert_eq!(seasonal_naive_forecast(&c, 0, 2, 3), Some(3.0));
        assert_eq!(seasonal_naive_forecast(&c, 0, 3, 3), None, "unobserved");
        assert_eq!(
            seasonal_naive_forecast(&c, 0, 4, 3),
            None,
            "beyond the context"
        );
        assert_eq!(
            seasonal_naive_forecast(&c, 0, 1, 5),
            None,
            "before the context"
        );
    }
}
