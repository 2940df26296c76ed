//! Recurrent encoders (GRU, LSTM): the baseline for short series. Gate layouts and key names
//! follow PyTorch's `nn.GRU` / `nn.LSTM` (`rnn.weight_ih_l{k}`, `rnn.weight_hh_l{k}`,
//! `rnn.bias_ih_l{k}`, `rnn.bias_hh_l{k}`; gates r, z, n for GRU and i, f, g, o for LSTM), so
//! weights move between the two.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};
use ssl_core::nn::ops::dropout;
use ssl_core::seq::SeqBatch;
use ssl_core::{CoreError, Ctx, Encoder, EncoderOutput, Init, ParamBuilder, Result};

/// Which recurrent cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RnnCell {
    /// Gated recurrent unit.
    Gru,
    /// Long short-term memory.
    Lstm,
}

/// Configuration of an [`RnnEncoder`].
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RnnConfig {
    /// Hidden width.
    pub hidden: usize,
    /// Stacked layers.
    pub layers: usize,
    /// Dropout between layers during training.
    pub dropout: f32,
}

impl Default for RnnConfig {
    fn default() -> Self {
        RnnConfig {
            hidden: 128,
            layers: 1,
            dropout: 0.0,
        }
    }
}

struct Layer {
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor,
    b_hh: Tensor,
}

/// A unidirectional GRU or LSTM over the timesteps. Unobserved steps leave the state
/// unchanged, so padding and gaps never enter it. Tokens are the top layer's state at every
/// step (B, T, H); the pooled embedding is its state after the last observed step.
pub struct RnnEncoder {
    cfg: RnnConfig,
    cell: RnnCell,
    channels: usize,
    layers: Vec<Layer>,
}

impl RnnEncoder {
    /// Creates the encoder for `channels` input channels under `pb`, initialised as PyTorch
    /// does: U(-1/sqrt(H), 1/sqrt(H)) for every weight and bias.
    pub fn new(cfg: &RnnConfig, cell: RnnCell, channels: usize, pb: &ParamBuilder) -> Result<Self> {
        if cfg.hidden == 0 || cfg.layers == 0 || channels == 0 {
            return Err(CoreError::Config(
                "rnn hidden width, layers and channels must be at least 1".into(),
            ));
        }
        let gates = match cell {
            RnnCell::Gru => 3,
            RnnCell::Lstm => 4,
        };
        let h = cfg.hidden;
        let init = Init::Uniform(1.0 / (h as f64).sqrt());
        let pb = pb.pp("rnn");
        let mut layers = Vec::new();
        for k in 0..cfg.layers {
            let c_in = if k == 0 { channels } else { h };
            layers.push(Layer {
                w_ih: pb.get(&format!("weight_ih_l{k}"), (gates * h, c_in), init)?,
                w_hh: pb.get(&format!("weight_hh_l{k}"), (gates * h, h), init)?,
                b_ih: pb.get(&format!("bias_ih_l{k}"), gates * h, init)?,
                b_hh: pb.get(&format!("bias_hh_l{k}"), gates * h, init)?,
            });
        }
        Ok(RnnEncoder {
            cfg: cfg.clone(),
            cell,
            channels,
            layers,
        })
    }

    fn run_layer(&self, layer: &Layer, x: &Tensor, valid: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, t, _) = x.dims3()?;
        let h_dim = self.cfg.hidden;
        // Input projections for every step at once: (B, T, G·H).
        let gi = x
            .broadcast_matmul(&layer.w_ih.t()?)?
            .broadcast_add(&layer.b_ih)?;
        let w_hh_t = layer.w_hh.t()?;
        let mut h = Tensor::zeros((b, h_dim), x.dtype(), x.device())?;
        let mut c = h.clone();
        let mut outs = Vec::with_capacity(t);
        for s in 0..t {
            let g_i = gi.narrow(1, s, 1)?.squeeze(1)?;
            let g_h = h.matmul(&w_hh_t)?.broadcast_add(&layer.b_hh)?;
            let v = valid.narrow(1, s, 1)?; // (B, 1)
            let gate = |g: &Tensor, k: usize| g.narrow(1, k * h_dim, h_dim);
            let (h_new, c_new) = match self.cell {
                RnnCell::Gru => {
                    let r = sigmoid(&(gate(&g_i, 0)? + gate(&g_h, 0)?)?)?;
                    let z = sigmoid(&(gate(&g_i, 1)? + gate(&g_h, 1)?)?)?;
                    let n = (gate(&g_i, 2)? + r.mul(&gate(&g_h, 2)?)?)?.tanh()?;
                    // h' = (1 - z) * n + z * h
                    let h_new = ((&n - z.mul(&n)?)? + z.mul(&h)?)?;
                    (h_new, c.clone())
                }
                RnnCell::Lstm => {
                    let g = (&g_i + &g_h)?;
                    let i = sigmoid(&gate(&g, 0)?)?;
                    let f = sigmoid(&gate(&g, 1)?)?;
                    let gg = gate(&g, 2)?.tanh()?;
                    let o = sigmoid(&gate(&g, 3)?)?;
                    let c_new = (f.mul(&c)? + i.mul(&gg)?)?;
                    let h_new = o.mul(&c_new.tanh()?)?;
                    (h_new, c_new)
                }
            };
            // Unobserved steps keep the previous state.
            h = (h_new.broadcast_mul(&v)? + h.broadcast_mul(&(1.0 - &v)?)?)?;
            if self.cell == RnnCell::Lstm {
                c = (c_new.broadcast_mul(&v)? + c.broadcast_mul(&(1.0 - &v)?)?)?;
            }
            outs.push(h.clone());
        }
        Ok((Tensor::stack(&outs, 1)?, h))
    }
}

/// Logistic sigmoid from differentiable primitives: 1 / (1 + exp(-x)).
fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

impl Encoder for RnnEncoder {
    type Input = SeqBatch;

    fn encode(&self, input: &SeqBatch, ctx: &mut Ctx) -> Result<EncoderOutput> {
        let (_, _, c) = input.x.dims3()?;
        if c != self.channels {
            return Err(CoreError::InvalidInput(format!(
                "series have {c} channels, the encoder was built for {}",
                self.channels
            )));
        }
        let valid = input.valid.to_dtype(DType::F32)?;
        let mut x = input.x.clone();
        let mut last = None;
        let mut hidden_states = Vec::new();
        for (k, layer) in self.layers.iter().enumerate() {
            if k > 0 {
                let train = ctx.train;
                x = dropout(&x, self.cfg.dropout, train, ctx.rng)?;
            }
            let (out, h) = self.run_layer(layer, &x, &valid)?;
            if ctx.output_hidden_states {
                hidden_states.push(out.clone());
            }
            x = out;
            last = Some(h);
        }
        let pooled = last.ok_or_else(|| CoreError::Config("rnn without layers".into()))?;
        let tokens = x.broadcast_mul(&valid.unsqueeze(D::Minus1)?)?;
        Ok(EncoderOutput {
            tokens,
            pooled,
            hidden_states,
        })
    }

    fn dim(&self) -> usize {
        self.cfg.hidden
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use ssl_core::seq::SeqExample;
    use ssl_core::{ParamStore, SslRng};

    /// A GRU step computed by hand in f64 from the stored weights.
    #[test]
    fn gru_matches_the_pytorch_equations_and_skips_gaps() {
        let dev = Device::Cpu;
        let store = ParamStore::new(&dev);
        let cfg = RnnConfig {
            hidden: 3,
            layers: 1,
            dropout: 0.0,
        };
        let enc = RnnEncoder::new(&cfg, RnnCell::Gru, 2, &store.builder(1)).unwrap();
        let w = |n: &str| {
            store
                .get(n)
                .unwrap()
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (wih, whh, bih, bhh) = (
            w("rnn.weight_ih_l0"),
            w("rnn.weight_hh_l0"),
            w("rnn.bias_ih_l0"),
            w("rnn.bias_hh_l0"),
        );
        let xs = [[0.5f32, -1.0], [f32::NAN, f32::NAN], [2.0, 0.25]];
        let mut h = [0f64; 3];
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        for x in xs.iter().filter(|x| x[0].is_finite()) {
            let gi: Vec<f64> = (0..9)
                .map(|r| {
                    bih[r] as f64
                        + (0..2)
                            .map(|c| wih[r * 2 + c] as f64 * x[c] as f64)
                            .sum::<f64>()
                })
                .collect();
            let gh: Vec<f64> = (0..9)
                .map(|r| bhh[r] as f64 + (0..3).map(|c| whh[r * 3 + c] as f64 * h[c]).sum::<f64>())
                .collect();
            let mut hn = [0f64; 3];
            for j in 0..3 {
                let r = sig(gi[j] + gh[j]);
                let z = sig(gi[3 + j] + gh[3 + j]);
                let n = (gi[6 + j] + r * gh[6 + j]).tanh();
                hn[j] = (1.0 - z) * n + z * h[j];
            }
            h = hn;
        }
        let e = SeqExample::new(xs.iter().flatten().copied().collect(), 3, 2).unwrap();
        let batch = SeqBatch::from_examples(&[&e], &dev).unwrap();
        let mut rng = SslRng::new(0);
        let out = enc.encode(&batch, &mut Ctx::eval(&mut rng)).unwrap();
        let got = out.pooled.to_vec2::<f32>().unwrap();
        for j in 0..3 {
            assert!(
                (got[0][j] as f64 - h[j]).abs() < 1e-5,
                "{j}: {} vs {}",
                got[0][j],
                h[j]
            );
        }
        assert_eq!(out.tokens.dims(), [1, 3, 3]);
    }

    #[test]
    fn lstm_runs_stacked_and_padding_keeps_the_state() {
        let dev = Device::Cpu;
        let store = ParamStore::new(&dev);
        let cfg = RnnConfig {
            hidden: 4,
            layers: 2,
            dropout: 0.0,
        };
        let enc = RnnEncoder::new(&cfg, RnnCell::Lstm, 1, &store.builder(1)).unwrap();
        let long = SeqExample::new(vec![0.1, 0.2, 0.3, 0.4], 4, 1).unwrap();
        let short = SeqExample::new(vec![0.1, 0.2], 2, 1).unwrap();
        let mut rng = SslRng::new(0);
        let both = SeqBatch::from_examples(&[&long, &short], &dev).unwrap();
        let alone = SeqBatch::from_examples(&[&short], &dev).unwrap();
        let a = enc
            .encode(&both, &mut Ctx::eval(&mut rng))
            .unwrap()
            .pooled
            .to_vec2::<f32>()
            .unwrap();
        let b = enc
            .encode(&alone, &mut Ctx::eval(&mut rng))
            .unwrap()
            .pooled
            .to_vec2::<f32>()
            .unwrap();
        for j in 0..4 {
            assert!(
                (a[1][j] - b[0][j]).abs() < 1e-6,
                "padding changed the state"
            );
        }
        assert!((0..4).any(|j| (a[0][j] - a[1][j]).abs() > 1e-4));
    }
}
