//! PatchTST (Nie et al. 2023): each channel is cut into patches of `patch_len` steps every
//! `stride` steps, each patch is embedded linearly and the shared transformer runs over the
//! patches of one channel. Channels are independent and share every weight.

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use ssl_core::nn::ops::{add_broadcast, dropout, masked_mean};
use ssl_core::nn::{LayerNorm, Linear, TransformerConfig, TransformerStack};
use ssl_core::seq::{sincos_positions, SeqBatch};
use ssl_core::{CoreError, Ctx, Encoder, EncoderOutput, Init, ParamBuilder, Result};

/// Configuration of a [`PatchTstEncoder`] (the channel count comes from the data).
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PatchTstConfig {
    /// Steps per patch.
    pub patch_len: usize,
    /// Steps between patch starts (patch_len: non-overlapping, as PatchTST's pretraining).
    pub stride: usize,
    /// Dropout on the patch embeddings.
    pub dropout: f32,
    /// The transformer over patches.
    pub transformer: TransformerConfig,
}

impl Default for PatchTstConfig {
    fn default() -> Self {
        PatchTstConfig {
            patch_len: 12,
            stride: 12,
            dropout: 0.1,
            transformer: TransformerConfig {
                dim: 64,
                depth: 3,
                heads: 4,
                mlp_dim: 128,
                dropout: 0.1,
                ..TransformerConfig::default()
            },
        }
    }
}

/// Patches of a batch, channel-independent: `values` and `step_valid` are (B·C, N, P),
/// `patch_valid` (B·C, N) is 1 where a patch holds at least one observed step.
#[derive(Debug, Clone)]
pub struct Patches {
    /// Patch values; unobserved steps are 0.
    pub values: Tensor,
    /// 1 where a step of a patch was observed.
    pub step_valid: Tensor,
    /// 1 where a patch holds an observed step.
    pub patch_valid: Tensor,
    /// Batch size B.
    pub batch: usize,
    /// Channels C.
    pub channels: usize,
}

/// Number of patches for `t` steps: the tail is padded with unobserved steps so that every
/// step falls in a patch (PatchTST replicates the last value instead; padding with masked
/// steps keeps gaps and padding honest).
pub fn num_patches(t: usize, patch_len: usize, stride: usize) -> usize {
    let t = t.max(patch_len);
    (t - patch_len).div_ceil(stride) + 1
}

/// Cuts a batch into channel-independent patches (see [`Patches`]).
pub fn patchify(batch: &SeqBatch, patch_len: usize, stride: usize) -> Result<Patches> {
    if patch_len == 0 || stride == 0 {
        return Err(CoreError::Config(format!(
            "patch_len and stride must be at least 1 (got {patch_len}, {stride})"
        )));
    }
    let (b, t, c) = batch.x.dims3()?;
    let x = batch
        .x
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let valid = batch
        .valid
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let n = num_patches(t, patch_len, stride);
    let mut values = vec![0f32; b * c * n * patch_len];
    let mut step_valid = vec![0f32; b * c * n * patch_len];
    let mut patch_valid = vec![0f32; b * c * n];
    for i in 0..b {
        for ch in 0..c {
            let row = i * c + ch;
            for p in 0..n {
                for k in 0..patch_len {
                    let s = p * stride + k;
                    if s < t && valid[i * t + s] > 0.5 {
                        let o = (row * n + p) * patch_len + k;
                        values[o] = x[(i * t + s) * c + ch];
                        step_valid[o] = 1.0;
                        patch_valid[row * n + p] = 1.0;
                    }
                }
            }
        }
    }
    let dev = batch.x.device();
    Ok(Patches {
        values: Tensor::from_vec(values, (b * c, n, patch_len), dev)?,
        step_valid: Tensor::from_vec(step_valid, (b * c, n, patch_len), dev)?,
        patch_valid: Tensor::from_vec(patch_valid, (b * c, n), dev)?,
        batch: b,
        channels: c,
    })
}

/// The PatchTST backbone. Keys: `patch_embedding.{weight,bias}`, `encoder.layer.{i}...`,
/// `layernorm.{weight,bias}`; positions are fixed sin-cos, so any series length works.
///
/// Tokens are (B, C·N, D) (channel-major); the pooled embedding concatenates each channel's
/// mean over its observed patches: (B, C·D).
pub struct PatchTstEncoder {
    cfg: PatchTstConfig,
    channels: usize,
    embed: Linear,
    stack: TransformerStack,
    norm: LayerNorm,
}

impl PatchTstEncoder {
    /// Creates the encoder for `channels` channels under `pb`.
    pub fn new(cfg: &PatchTstConfig, channels: usize, pb: &ParamBuilder) -> Result<Self> {
        cfg.transformer.validate()?;
        if channels == 0 {
            return Err(CoreError::Config(
                "PatchTST needs at least one channel".into(),
            ));
        }
        let d = cfg.transformer.dim;
        Ok(PatchTstEncoder {
            cfg: cfg.clone(),
            channels,
            embed: Linear::new(
                cfg.patch_len,
                d,
                true,
                Init::XavierUniform,
                &pb.pp("patch_embedding"),
            )?,
            stack: TransformerStack::new(&cfg.transformer, &pb.pp("encoder"))?,
            norm: LayerNorm::new(d, cfg.transformer.layer_norm_eps, &pb.pp("layernorm"))?,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PatchTstConfig {
        &self.cfg
    }

    /// Cuts a batch into this encoder's patches.
    pub fn patchify(&self, batch: &SeqBatch) -> Result<Patches> {
        let (_, _, c) = batch.x.dims3()?;
        if c != self.channels {
            return Err(CoreError::InvalidInput(format!(
                "series have {c} channels, the encoder was built for {}",
                self.channels
            )));
        }
        patchify(batch, self.cfg.patch_len, self.cfg.stride)
    }

    /// Runs the backbone on patch values (B·C, N, P) with their validity (B·C, N):
    /// per-patch tokens (B·C, N, D) and, on request, hidden states.
    pub fn encode_patches(
        &self,
        values: &Tensor,
        patch_valid: &Tensor,
        ctx: &mut Ctx,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let h = self.patch_tokens(values, ctx)?;
        let out = self.stack.forward(&h, Some(patch_valid), ctx)?;
        Ok((self.norm.forward(&out.last)?, out.hidden_states))
    }

    /// [`Self::encode_patches`]' tokens at `rows` only (indices into the B·C x N patches),
    /// `(rows, D)`: the last block runs at those patches alone (`TransformerStack::forward_rows`;
    /// keys and values still from every patch), for a loss that reads nothing else.
    pub fn encode_patch_rows(
        &self,
        values: &Tensor,
        patch_valid: &Tensor,
        rows: &[u32],
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        let h = self.patch_tokens(values, ctx)?;
        let out = self.stack.forward_rows(&h, Some(patch_valid), rows, ctx)?;
        self.norm.forward(&out)
    }

    /// The blocks' input: patch embedding, sin-cos positions, dropout.
    fn patch_tokens(&self, values: &Tensor, ctx: &mut Ctx) -> Result<Tensor> {
        let (_, n, _) = values.dims3()?;
        let h = self.embed.forward(values)?;
        let pos = sincos_positions(n, self.cfg.transformer.dim, values.device())?;
        let h = add_broadcast(&h, &pos.to_dtype(h.dtype())?)?;
        let train = ctx.train;
        dropout(&h, self.cfg.dropout, train, ctx.rng)
    }

    fn pool(&self, tokens: &Tensor, patch_valid: &Tensor, b: usize) -> Result<Tensor> {
        let per_channel = masked_mean(tokens, Some(patch_valid))?; // (B·C, D)
        Ok(per_channel.reshape((b, self.channels * self.cfg.transformer.dim))?)
    }
}

impl Encoder for PatchTstEncoder {
    type Input = SeqBatch;

    fn encode(&self, input: &SeqBatch, ctx: &mut Ctx) -> Result<EncoderOutput> {
        let p = self.patchify(input)?;
        let (tokens, hidden_states) = self.encode_patches(&p.values, &p.patch_valid, ctx)?;
        let (_, n, d) = tokens.dims3()?;
        let pooled = self.pool(&tokens, &p.patch_valid, p.batch)?;
        Ok(EncoderOutput {
            tokens: tokens.reshape((p.batch, self.channels * n, d))?,
            pooled,
            hidden_states,
        })
    }

    fn dim(&self) -> usize {
        self.channels * self.cfg.transformer.dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use ssl_core::seq::SeqExample;
    use ssl_core::{ParamStore, SslRng};

    #[test]
    fn patches_cover_every_step_and_keep_gaps_masked() {
        assert_eq!(num_patches(10, 4, 4), 3);
        assert_eq!(num_patches(8, 4, 4), 2);
        assert_eq!(num_patches(3, 4, 2), 1);
        assert_eq!(num_patches(10, 4, 2), 4);
        let vals: Vec<f32> = (0..10)
            .flat_map(|t| {
                if t == 5 {
                    [f32::NAN, f32::NAN]
                } else {
                    [t as f32, 100.0 + t as f32]
                }
            })
            .collect();
        let e = SeqExample::new(vals, 10, 2).unwrap();
        let short = SeqExample::new(vec![1.0, 2.0], 1, 2).unwrap();
        let batch = SeqBatch::from_examples(&[&e, &short], &Device::Cpu).unwrap();
        let p = patchify(&batch, 4, 4).unwrap();
        assert_eq!(p.values.dims(), [4, 3, 4]);
        let v = p.values.to_vec3::<f32>().unwrap();
        assert_eq!(v[0][1], [4., 0., 6., 7.]);
        assert_eq!(v[1][1], [104., 0., 106., 107.], "NaN gap became a masked 0");
        assert_eq!(v[0][2], [8., 9., 0., 0.], "tail padded with masked steps");
        let sv = p.step_valid.to_vec3::<f32>().unwrap();
        assert_eq!(sv[0][1], [1., 0., 1., 1.]);
        assert_eq!(sv[1][1], [1., 0., 1., 1.]);
        assert_eq!(sv[0][2], [1., 1., 0., 0.]);
        let pv = p.patch_valid.to_vec2::<f32>().unwrap();
        assert_eq!(pv[2], [1., 0., 0.], "the one-step series has one patch");
    }

    #[test]
    fn encoder_shapes_and_channel_independence() {
        let dev = Device::Cpu;
        let store = ParamStore::new(&dev);
        let mut cfg = PatchTstConfig {
            patch_len: 4,
            stride: 2,
            dropout: 0.0,
            ..Default::default()
        };
        cfg.transformer.dim = 16;
        cfg.transformer.mlp_dim = 32;
        cfg.transformer.depth = 1;
        cfg.transformer.dropout = 0.0;
        let enc = PatchTstEncoder::new(&cfg, 2, &store.builder(0)).unwrap();
        let a: Vec<f32> = (0..12).map(|i| (i as f32).sin()).collect();
        let e1 = SeqExample::new(a.clone(), 6, 2).unwrap();
        // Same first channel, different second channel.
        let mut b = a.clone();
        for t in 0..6 {
            b[t * 2 + 1] = 5.0;
        }
        let e2 = SeqExample::new(b, 6, 2).unwrap();
        let batch = SeqBatch::from_examples(&[&e1, &e2], &dev).unwrap();
        let mut rng = SslRng::new(0);
        let out = enc.encode(&batch, &mut Ctx::eval(&mut rng)).unwrap();
        let n = num_patches(6, 4, 2);
        assert_eq!(out.tokens.dims(), [2, 2 * n, 16]);
        assert_eq!(out.pooled.dims(), [2, 32]);
        assert_eq!(enc.dim(), 32);
        let p = out.pooled.to_vec2::<f32>().unwrap();
        for (a, b) in p[0][..16].iter().zip(&p[1][..16]) {
            assert!((a - b).abs() < 1e-5, "channel 0 must not see channel 1");
        }
        assert!((0..16).any(|k| (p[0][16 + k] - p[1][16 + k]).abs() > 1e-3));
    }
}
