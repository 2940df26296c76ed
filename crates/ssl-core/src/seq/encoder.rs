//! A transformer encoder for numeric feature sequences.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::nn::ops::masked_mean;
use crate::nn::{LayerNorm, Linear, TransformerConfig, TransformerStack};
use crate::seq::SeqBatch;
use crate::{Ctx, Encoder, EncoderOutput, Init, ParamBuilder, Result};

/// Configuration of a [`SeqTransformerEncoder`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SeqEncoderConfig {
    /// Features per timestep (input width).
    pub features: usize,
    /// The transformer stack (pre-norm by default).
    pub transformer: TransformerConfig,
}

impl Default for SeqEncoderConfig {
    fn default() -> Self {
        SeqEncoderConfig {
            features: 1,
            transformer: TransformerConfig::default(),
        }
    }
}

/// Linear projection of each timestep, fixed sin-cos positions, the shared transformer stack,
/// a final layer norm; pooled embedding = mean over valid timesteps.
///
/// Keys: `embeddings.projection.{weight,bias}`, `encoder.layer.{i}...`, `layernorm.{weight,bias}`.
pub struct SeqTransformerEncoder {
    cfg: SeqEncoderConfig,
    proj: Linear,
    stack: TransformerStack,
    norm: LayerNorm,
}

/// Fixed 1-D sin-cos position embeddings (T, D), as in "Attention is all you need".
pub fn sincos_positions(t: usize, d: usize, device: &Device) -> Result<Tensor> {
    let mut v = vec![0f32; t * d];
    for pos in 0..t {
        for i in 0..d / 2 {
            let freq = 1.0 / 10000f64.powf(2.0 * i as f64 / d as f64);
            let a = pos as f64 * freq;
            v[pos * d + 2 * i] = a.sin() as f32;
            v[pos * d + 2 * i + 1] = a.cos() as f32;
        }
    }
    Ok(Tensor::from_vec(v, (t, d), device)?)
}

impl SeqTransformerEncoder {
    /// Creates the encoder's parameters under `pb`.
    pub fn new(cfg: &SeqEncoderConfig, pb: &ParamBuilder) -> Result<Self> {
        let d = cfg.transformer.dim;
        Ok(SeqTransformerEncoder {
            cfg: cfg.clone(),
            proj: Linear::new(
                cfg.features,
                d,
                true,
                Init::XavierUniform,
                &pb.pp("embeddings.projection"),
            )?,
            stack: TransformerStack::new(&cfg.transformer, &pb.pp("encoder"))?,
            norm: LayerNorm::new(d, cfg.transformer.layer_norm_eps, &pb.pp("layernorm"))?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &SeqEncoderConfig {
        &self.cfg
    }
}

impl Encoder for SeqTransformerEncoder {
    type Input = SeqBatch;

    fn encode(&self, input: &SeqBatch, ctx: &mut Ctx) -> Result<EncoderOutput> {
        let (_, t, f) = input.x.dims3()?;
        if f != self.cfg.features {
            return Err(crate::CoreError::InvalidInput(format!(
                "sequences have {f} features, the encoder was built for {}",
                self.cfg.features
            )));
        }
        let h = self.proj.forward(&input.x)?;
        let pos =
            sincos_positions(t, self.cfg.transformer.dim, input.x.device())?.to_dtype(h.dtype())?;
        let h = crate::nn::ops::add_broadcast(&h, &pos)?;
        let out = self.stack.forward(&h, Some(&input.valid), ctx)?;
        let tokens = self.norm.forward(&out.last)?;
        let pooled = masked_mean(&tokens, Some(&input.valid.to_dtype(DType::F32)?))?;
        Ok(EncoderOutput {
            tokens,
            pooled,
            hidden_states: out.hidden_states,
        })
    }

    fn dim(&self) -> usize {
        self.cfg.transformer.dim
    }
}
