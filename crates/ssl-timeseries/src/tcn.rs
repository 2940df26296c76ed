//! The dilated convolutional encoder of TS2Vec (Yue et al. 2022): a linear input projection,
//! then residual blocks of two kernel-3 convolutions with dilation 2^i and GELU before each,
//! a 1x1 projection on the residual of the last block. Unobserved steps are zeroed after the
//! input projection (TS2Vec's NaN mask). Optionally causal (left padding only).
//!
//! On the CPU in f32 the blocks run as one fused op with a hand-written backward
//! ([`ssl_kernels::TcnOp`]); the composite candle-op path below is the reference (any device
//! and dtype), and tests hold the two together. [`TcnEncoder::set_kernel`] or
//! `SSL_STACK_KERNEL` (`auto`, `fused`, `reference`, as for the transformer stack) chooses.

use candle_core::{DType, Device, Tensor, D};
use serde::{Deserialize, Serialize};
use ssl_core::nn::ops::{add_broadcast, dropout, Activation};
use ssl_core::nn::{bf16_matmul_available, Linear, MatmulPrecision, StackKernel};
use ssl_core::seq::SeqBatch;
use ssl_core::{CoreError, Ctx, Encoder, EncoderOutput, Init, ParamBuilder, Result};
use ssl_kernels::{BufferPool, TcnOp, TcnSpec};

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
    kernel: StackKernel,
    /// Buffers the fused op reuses from step to step.
    pool: BufferPool,
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
            kernel: StackKernel::from_env()?,
            pool: BufferPool::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TcnConfig {
        &self.cfg
    }

    /// Chooses the blocks' implementation: `Auto` and `Fused` run the fused CPU op for f32
    /// on the CPU (without hidden states), `Reference` the composite candle ops; the default
    /// comes from `SSL_STACK_KERNEL`, else `Auto`.
    pub fn set_kernel(&mut self, kernel: StackKernel) {
        self.kernel = kernel;
    }

    /// The implementation chosen by [`Self::set_kernel`] or the environment.
    pub fn kernel(&self) -> StackKernel {
        self.kernel
    }

    /// Whether the blocks run through the fused op for `h` in `ctx`: f32 on the CPU, no
    /// hidden states asked for (the op returns the last block's output only).
    fn runs_fused(&self, h: &Tensor, ctx: &Ctx) -> bool {
        self.kernel != StackKernel::Reference
            && matches!(h.device(), Device::Cpu)
            && h.dtype() == DType::F32
            && !ctx.output_hidden_states
    }

    /// The blocks as one fused op: every block's parameters concatenated in the op's layout
    /// (their gradients flow back through the concatenation to each variable).
    fn blocks_fused(&self, h: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(6 * self.blocks.len());
        for block in &self.blocks {
            for conv in [
                Some(&block.conv1),
                Some(&block.conv2),
                block.projector.as_ref(),
            ]
            .into_iter()
            .flatten()
            {
                parts.push(conv.weight.flatten_all()?);
                parts.push(conv.bias.clone());
            }
        }
        let flat = Tensor::cat(&parts, 0)?;
        let spec = TcnSpec {
            hidden: self.cfg.hidden,
            output: self.cfg.output,
            depth: self.cfg.depth,
            kernel: self.cfg.kernel,
            causal: self.cfg.causal,
            bf16: ctx.precision == MatmulPrecision::Bf16 && bf16_matmul_available(),
        };
        if flat.elem_count() != spec.param_len() {
            return Err(CoreError::Config(format!(
                "tcn parameters: {} values, the fused op's layout has {}",
                flat.elem_count(),
                spec.param_len()
            )));
        }
        let op = TcnOp::new(spec, ctx.backward, self.pool.clone());
        Ok(h.contiguous()?.apply_op2(&flat, op)?)
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
        let m = input
            .valid
            .to_dtype(input.x.dtype())?
            .unsqueeze(D::Minus1)?;
        let mut h = self.input_fc.forward(&input.x)?.broadcast_mul(&m)?; // (B, T, H)
                                                                         // The fused op runs every block; the composite loop below then has none left.
        let composite: &[Block] = if self.runs_fused(&h, ctx) {
            h = self.blocks_fused(&h, ctx)?;
            &[]
        } else {
            &self.blocks
        };
        let gelu = Activation::GeluErf;
        let mut hidden_states = Vec::new();
        for block in composite {
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

    /// The encoder with `kernel` on a store of `dtype` (same seed, same values).
    fn build(cfg: &TcnConfig, dtype: DType, kernel: StackKernel) -> (ParamStore, TcnEncoder) {
        let store = ParamStore::with_dtype(&Device::Cpu, dtype);
        let mut enc = TcnEncoder::new(cfg, 2, &store.builder(5)).unwrap();
        enc.set_kernel(kernel);
        (store, enc)
    }

    /// The objective's value, each parameter's gradient by name, and the input's gradient.
    type Measured = (f64, Vec<(String, Vec<f64>)>, Vec<f64>);

    /// `sum(w * tokens)` for two series of 6 steps x 2 channels (one step of the first
    /// unobserved), its value and the gradients of every parameter and of the input, in f64.
    fn objective_and_gradients(
        store: &ParamStore,
        enc: &TcnEncoder,
        dtype: DType,
        x_shift: Option<(usize, f64)>,
    ) -> Measured {
        let (b, t) = (2, 6);
        let mut xv: Vec<f64> = (0..b * t * 2).map(|i| (i as f64 * 0.77).sin()).collect();
        if let Some((k, d)) = x_shift {
            xv[k] += d;
        }
        let mut valid = vec![1f32; b * t];
        valid[3] = 0.0;
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(
            &Tensor::from_vec(xv, (b, t, 2), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let batch = SeqBatch {
            x: x.as_tensor().clone(),
            valid: Tensor::from_vec(valid, (b, t), &dev).unwrap(),
        };
        let mut rng = SslRng::new(0);
        let tokens = enc.encode(&batch, &mut Ctx::eval(&mut rng)).unwrap().tokens;
        let d = tokens.dim(2).unwrap();
        let w: Vec<f64> = (0..b * t * d).map(|i| (i as f64 * 0.41).cos()).collect();
        let w = Tensor::from_vec(w, (b, t, d), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let loss = (tokens * w).unwrap().sum_all().unwrap();
        let value = loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let grads = loss.backward().unwrap();
        let f64s = |t: &Tensor| -> Vec<f64> {
            t.flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        let params = store
            .vars()
            .into_iter()
            .map(|(name, v)| {
                let g = grads
                    .get(v.as_tensor())
                    .expect("every parameter has a gradient");
                (name, f64s(g))
            })
            .collect();
        let dx = f64s(grads.get(x.as_tensor()).unwrap());
        (value, params, dx)
    }

    fn small(causal: bool, kernel: usize) -> TcnConfig {
        // Dilations 1, 2, 4, 8 on 6 steps: the last block's outer taps read padding only.
        TcnConfig {
            hidden: 4,
            output: 5,
            depth: 3,
            kernel,
            causal,
            dropout: 0.0,
        }
    }

    /// The fused f32 op against the composite path in f64: the objective, every parameter's
    /// gradient and the input's, causal or not, kernel 3 and 5, with an unobserved step.
    #[test]
    fn fused_blocks_match_the_f64_composite() {
        for (causal, kernel) in [(false, 3), (true, 3), (false, 5)] {
            let cfg = small(causal, kernel);
            let (s32, e32) = build(&cfg, DType::F32, StackKernel::Fused);
            let (s64, e64) = build(&cfg, DType::F64, StackKernel::Reference);
            let (v32, p32, x32) = objective_and_gradients(&s32, &e32, DType::F32, None);
            let (v64, p64, x64) = objective_and_gradients(&s64, &e64, DType::F64, None);
            assert!(
                (v32 - v64).abs() < 1e-4 * (1.0 + v64.abs()),
                "{v32} vs {v64}"
            );
            assert_eq!(p32.len(), p64.len());
            let close = |a: &[f64], b: &[f64], what: &str| {
                let scale = b.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() < 1e-4 * scale,
                        "causal {causal} kernel {kernel}: {what}: {x} vs {y}"
                    );
                }
            };
            for ((n32, g32), (n64, g64)) in p32.iter().zip(&p64) {
                assert_eq!(n32, n64);
                close(g32, g64, n32);
            }
            close(&x32, &x64, "input");
            // The unobserved step's input gets no gradient.
            assert!(x32[6..8].iter().all(|g| *g == 0.0), "{:?}", &x32[6..8]);
        }
    }

    /// The f64 composite path's input gradient against central differences (it is the
    /// reference the fused op is held to).
    #[test]
    fn f64_composite_gradients_match_finite_differences() {
        let cfg = small(true, 3);
        let (s64, e64) = build(&cfg, DType::F64, StackKernel::Reference);
        let (_, _, dx) = objective_and_gradients(&s64, &e64, DType::F64, None);
        let h = 1e-5;
        for k in [0, 5, 13, 23] {
            let up = objective_and_gradients(&s64, &e64, DType::F64, Some((k, h))).0;
            let down = objective_and_gradients(&s64, &e64, DType::F64, Some((k, -h))).0;
            let fd = (up - down) / (2.0 * h);
            assert!(
                (fd - dx[k]).abs() < 1e-6 * (1.0 + fd.abs()),
                "{k}: {fd} vs {}",
                dx[k]
            );
        }
    }

    /// Hidden states (which the fused op does not return) and inference contexts work with
    /// the fused kernel chosen, and give the composite path's tokens.
    #[test]
    fn hidden_states_and_inference_under_the_fused_kernel() {
        let cfg = small(false, 3);
        let (_, fused) = build(&cfg, DType::F32, StackKernel::Fused);
        let (_, reference) = build(&cfg, DType::F32, StackKernel::Reference);
        let v: Vec<f32> = (0..24).map(|i| (i as f32 * 0.3).sin()).collect();
        let e = ssl_core::seq::SeqExample::new(v, 12, 2).unwrap();
        let b = SeqBatch::from_examples(&[&e], &Device::Cpu).unwrap();
        let mut rng = SslRng::new(0);
        let hs = fused
            .encode(&b, &mut Ctx::eval(&mut rng).with_hidden_states())
            .unwrap();
        assert_eq!(hs.hidden_states.len(), cfg.depth + 2);
        let inf = fused.encode(&b, &mut Ctx::inference(&mut rng)).unwrap();
        let r = reference.encode(&b, &mut Ctx::eval(&mut rng)).unwrap();
        let diff = (inf.tokens - &r.tokens)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
        let diff = (hs.tokens - r.tokens)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }
}
