//! The dilated convolutional encoder of TS2Vec (Yue et al. 2022): a linear input projection,
//! then residual blocks of two kernel-3 convolutions with dilation 2^i and GELU before each,
//! a 1x1 projection on the residual of the last block. Unobserved steps are zeroed after the
//! input projection (TS2Vec's NaN mask). Optionally causal (left padding only).

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};
use ssl_core::nn::ops::{add_broadcast, dropout, Activation};
use ssl_core::nn::Linear;
use ssl_core::seq::SeqBatch;
use ssl_core::{CoreError, Ctx, Encoder, EncoderOutput, Init, ParamBuilder, Result};

/// Configuration of a [`TcnEncoder`] (TS2Vec's defaults: hidden 64, output 320, depth 10).
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcnConfig {
    /// Width of the hidden blocks.
    pub hidden: usize,
    /// Output (representation) width.
    pub output: usize,
    /// Number of hidden blocks (plus one output block); block i has dilation 2^i.
    pub depth: usize,
    /// Convolution kernel size (odd).
    pub kernel: usize,
    /// Causal convolutions: step t sees only steps <= t.
    pub causal: bool,
    /// Dropout on the output representation during training (TS2Vec: 0.1).
    pub dropout: f32,
}

impl Default for TcnConfig {
    fn default() -> Self {
        TcnConfig {
            hidden: 64,
            output: 320,
            depth: 10,
            kernel: 3,
            causal: false,
            dropout: 0.1,
        }
    }
}

/// A 1-D convolution over (B, T, C) written as `kernel` shifted matrix products on an
/// explicitly zero-padded input, so its backward is made of matmul, narrow and pad only
/// (candle's conv1d backward underflows when the padding exceeds a short input).
struct Conv {
    /// Per-tap weights (C_in, C_out), from the stored (C_out, C_in, kernel) weight.
    weight: Tensor,
    bias: Tensor,
    dilation: usize,
    kernel: usize,
    causal: bool,
}

impl Conv {
    fn new(
        c_in: usize,
        c_out: usize,
        kernel: usize,
        dilation: usize,
        causal: bool,
        pb: &ParamBuilder,
    ) -> Result<Self> {
        // PyTorch's default Conv1d init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        let bound = 1.0 / ((c_in * kernel) as f64).sqrt();
        Ok(Conv {
            weight: pb.get("weight", (c_out, c_in, kernel), Init::Uniform(bound))?,
            bias: pb.get("bias", c_out, Init::Uniform(bound))?,
            dilation,
            kernel,
            causal,
        })
    }

    /// (B, T, C_in) -> (B, T, C_out), "same" length; causal: output t sees t - reach..=t.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let reach = (self.kernel - 1) * self.dilation;
        let (left, right) = if self.causal {
            (reach, 0)
        } else {
            (reach / 2, reach - reach / 2)
        };
        let xp = x.pad_with_zeros(1, left, right)?;
        let mut y: Option<Tensor> = None;
        for j in 0..self.kernel {
            let xj = xp.narrow(1, j * self.dilation, t)?.reshape((b * t, c))?;
            let wj = self.weight.narrow(2, j, 1)?.squeeze(2)?.t()?; // (C_in, C_out)
            let term = xj.matmul(&wj)?;
            y = Some(match y {
                None => term,
                Some(acc) => (acc + term)?,
            });
        }
        let y = y.ok_or_else(|| CoreError::Config("convolution kernel of size 0".into()))?;
        Ok(add_broadcast(&y, &self.bias)?.reshape((b, t, ()))?)
    }
}

struct Block {
    conv1: Conv,
    conv2: Conv,
    projector: Option<Conv>,
}

/// TS2Vec's encoder. Keys follow the reference: `input_fc.{weight,bias}`,
/// `feature_extractor.net.{i}.conv{1,2}.conv.{weight,bias}`, `feature_extractor.net.{last}.projector.{weight,bias}`.
///
/// Tokens are per timestep (B, T, output); the pooled embedding is the max over observed
/// timesteps (TS2Vec's instance-level representation).
pub struct TcnEncoder {
    cfg: TcnConfig,
    channels: usize,
    input_fc: Linear,
    blocks: Vec<Block>,
}

impl TcnEncoder {
    /// Creates the encoder for `channels` input channels under `pb`.
    pub fn new(cfg: &TcnConfig, channels: usize, pb: &ParamBuilder) -> Result<Self> {
        if cfg.kernel.is_multiple_of(2) || cfg.kernel == 0 {
            return Err(CoreError::Config(format!(
                "tcn kernel must be odd, got {}",
                cfg.kernel
            )));
        }
        if channels == 0 || cfg.hidden == 0 || cfg.output == 0 {
            return Err(CoreError::Config(
                "tcn channels, hidden and output widths must be at least 1".into(),
            ));
        }
        let input_fc = Linear::torch_default(channels, cfg.hidden, &pb.pp("input_fc"))?;
        let mut blocks = Vec::new();
        let mut c_in = cfg.hidden;
        for i in 0..=cfg.depth {
            let c_out = if i == cfg.depth {
                cfg.output
            } else {
                cfg.hidden
            };
            let d = 1usize << i.min(30);
            let bp = pb.pp(format!("feature_extractor.net.{i}"));
            let projector = (c_in != c_out || i == cfg.depth)
                .then(|| Conv::new(c_in, c_out, 1, 1, false, &bp.pp("projector")))
                .transpose()?;
            blocks.push(Block {
                conv1: Conv::new(c_in, c_out, cfg.kernel, d, cfg.causal, &bp.pp("conv1.conv"))?,
                conv2: Conv::new(
                    c_out,
                    c_out,
                    cfg.kernel,
                    d,
                    cfg.causal,
                    &bp.pp("conv2.conv"),
                )?,
                projector,
            });
            c_in = c_out;
        }
        Ok(TcnEncoder {
            cfg: cfg.clone(),
            channels,
            input_fc,
            blocks,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TcnConfig {
        &self.cfg
    }
}

/// Max over the timesteps of `x` (B, T, D) where `valid` (B, T) is 1.
pub fn masked_max(x: &Tensor, valid: &Tensor) -> Result<Tensor> {
    let m = valid.to_dtype(x.dtype())?.unsqueeze(D::Minus1)?;
    let penalty = ((m - 1.0)? * 1e9)?;
    Ok(x.broadcast_add(&penalty)?.max(1)?)
}

impl Encoder for TcnEncoder {
    type Input = SeqBatch;

    fn encode(&self, input: &SeqBatch, ctx: &mut Ctx) -> Result<EncoderOutput> {
        let (_, _, c) = input.x.dims3()?;
        if c != self.channels {
            return Err(CoreError::InvalidInput(format!(
                "series have {c} channels, the encoder was built for {}",
                self.channels
            )));
        }
        let m = input.valid.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?;
        let mut h = self.input_fc.forward(&input.x)?.broadcast_mul(&m)?; // (B, T, H)
        let gelu = Activation::GeluErf;
        let mut hidden_states = Vec::new();
        for block in &self.blocks {
            if ctx.output_hidden_states {
                hidden_states.push(h.clone());
            }
            let residual = match &block.projector {
                Some(p) => p.forward(&h)?,
                None => h.clone(),
            };
            let y = block.conv1.forward(&gelu.forward(&h)?)?;
            let y = block.conv2.forward(&gelu.forward(&y)?)?;
            h = (y + residual)?;
        }
        let tokens = h;
        let train = ctx.train;
        let tokens = dropout(&tokens, self.cfg.dropout, train, ctx.rng)?;
        if ctx.output_hidden_states {
            hidden_states.push(tokens.clone());
        }
        let pooled = masked_max(&tokens, &input.valid)?;
        Ok(EncoderOutput {
            tokens,
            pooled,
            hidden_states,
        })
    }

    fn dim(&self) -> usize {
        self.cfg.output
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use ssl_core::{ParamStore, SslRng};

    fn tiny(causal: bool) -> (ParamStore, TcnEncoder) {
        let store = ParamStore::new(&Device::Cpu);
        let cfg = TcnConfig {
            hidden: 8,
            output: 6,
            depth: 2,
            kernel: 3,
            causal,
            dropout: 0.0,
        };
        let enc = TcnEncoder::new(&cfg, 2, &store.builder(3)).unwrap();
        (store, enc)
    }

    fn batch(vals: Vec<f32>, t: usize) -> SeqBatch {
        let e = ssl_core::seq::SeqExample::new(vals, t, 2).unwrap();
        SeqBatch::from_examples(&[&e], &Device::Cpu).unwrap()
    }

    #[test]
    fn causal_output_does_not_see_the_future() {
        let (_, enc) = tiny(true);
        let a: Vec<f32> = (0..40).map(|i| (i as f32 * 0.3).sin()).collect();
        let mut b = a.clone();
        b[30] += 5.0; // step 15, channel 0
        let mut rng = SslRng::new(0);
        let ta = enc
            .encode(&batch(a, 20), &mut Ctx::eval(&mut rng))
            .unwrap()
            .tokens;
        let tb = enc
            .encode(&batch(b, 20), &mut Ctx::eval(&mut rng))
            .unwrap()
            .tokens;
        let diff = (ta - tb)
            .unwrap()
            .abs()
            .unwrap()
            .sum(2)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (t, d) in diff[0].iter().enumerate() {
            if t < 15 {
                assert!(*d < 1e-6, "step {t} changed");
            } else if t == 15 {
                assert!(*d > 1e-4);
            }
        }
        // The non-causal encoder does see it.
        let (_, enc) = tiny(false);
        let a: Vec<f32> = (0..40).map(|i| (i as f32 * 0.3).sin()).collect();
        let mut b = a.clone();
        b[30] += 5.0;
        let ta = enc
            .encode(&batch(a, 20), &mut Ctx::eval(&mut rng))
            .unwrap()
            .tokens;
        let tb = enc
            .encode(&batch(b, 20), &mut Ctx::eval(&mut rng))
            .unwrap()
            .tokens;
        let diff = (ta - tb)
            .unwrap()
            .abs()
            .unwrap()
            .sum(2)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(diff[0][14] > 1e-5);
    }

    #[test]
    fn shapes_and_gaps() {
        let (store, enc) = tiny(false);
        assert!(store
            .get("feature_extractor.net.2.projector.weight")
            .is_some());
        assert!(store
            .get("feature_extractor.net.0.projector.weight")
            .is_none());
        let mut v: Vec<f32> = (0..20).map(|i| i as f32 * 0.1).collect();
        v[4] = f32::NAN;
        v[5] = f32::NAN; // step 2 fully unobserved
        let mut rng = SslRng::new(0);
        let out = enc.encode(&batch(v, 10), &mut Ctx::eval(&mut rng)).unwrap();
        assert_eq!(out.tokens.dims(), [1, 10, 6]);
        assert_eq!(out.pooled.dims(), [1, 6]);
        assert!(out.pooled.to_vec2::<f32>().unwrap()[0]
            .iter()
            .all(|x| x.is_finite()));
    }
}
