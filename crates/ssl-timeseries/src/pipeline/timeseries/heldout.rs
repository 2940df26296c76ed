//! The forecast errors of the held-out evaluation while a forecasting run trains: the model
//! against the naive forecast (the last observed value) on held-out windows, pooled over
//! every lead time of the horizon and every channel, in the original scale.

use candle_core::{DType, Device};
use ssl_core::seq::{SeqBatch, SeqExample};
use ssl_core::{CoreError, Ctx, Encoder, EvalFigures, Parallel, Result, SslRng};

use crate::{naive_forecast, ForecastTask};

/// `mse`, `mae` of `task` and `naive_mse`, `naive_mae` of the naive forecast on this rank's
/// held-out `windows` (`context + horizon` steps each), `batch` at a time on `device`, summed over the
/// ranks of `par` (collective: every rank calls it). A (window, lead, channel) is scored where
/// its target is observed and its context has an observed value.
pub fn forecast_errors<E: Encoder<Input = SeqBatch>>(
    par: &Parallel,
    task: &ForecastTask<E>,
    windows: &[SeqExample],
    batch: usize,
    device: &Device,
) -> Result<EvalFigures> {
    let cfg = task.config();
    let (l, h) = (cfg.context, cfg.horizon);
    // n, model squared, naive squared, model absolute, naive absolute.
    let mut acc = [0f64; 5];
    let mut rng = SslRng::derived(0, "heldout-forecast");
    for chunk in windows.chunks(batch.max(1)) {
        let c = chunk[0].features;
        let contexts: Vec<SeqExample> = chunk
            .iter()
            .map(|w| {
                if w.steps != l + h || w.features != c {
                    return Err(CoreError::InvalidInput(format!(
                        "held-out window is {} x {}, expected {} x {c}",
                        w.steps,
                        w.features,
                        l + h
                    )));
                }
                SeqExample::new(w.values[..l * c].to_vec(), l, c)
            })
            .collect::<Result<_>>()?;
        let refs: Vec<&SeqExample> = contexts.iter().collect();
        let b = SeqBatch::from_examples(&refs, device)?;
        let pred = task
            .predict(&b, &mut Ctx::inference(&mut rng))?
            .to_dtype(DType::F32)?
            .to_vec3::<f32>()?;
        for (i, w) in chunk.iter().enumerate() {
            for (lead, row) in pred[i].iter().enumerate().take(h) {
                for (ch, &m) in row.iter().enumerate().take(c) {
                    let y = w.values[(l + lead) * c + ch];
                    let Some(nv) = naive_forecast(&contexts[i], ch) else {
                        continue;
                    };
                    if !y.is_finite() {
                        continue;
                    }
                    let (y, m, nv) = (f64::from(y), f64::from(m), f64::from(nv));
                    acc[0] += 1.0;
                    acc[1] += (m - y).powi(2);
                    acc[2] += (nv - y).powi(2);
                    acc[3] += (m - y).abs();
                    acc[4] += (nv - y).abs();
                }
            }
        }
    }
    let s = par.sum_f64(&acc)?;
    let n = s[0].max(1.0);
    Ok([
        ("mse", s[1] / n),
        ("naive_mse", s[2] / n),
        ("mae", s[3] / n),
        ("naive_mae", s[4] / n),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect())
}
