//! The ViT encoder: patch embedding, class token, fixed 2-D sin-cos positions, the shared
//! pre-norm [`TransformerStack`], a final layer norm.
//!
//! Keys follow Hugging Face ViT: `embeddings.cls_token`,
//! `embeddings.patch_embeddings.projection.{weight,bias}` (a `(D, C, p, p)` convolution
//! kernel), `encoder.layer.{i}...`, `layernorm.{weight,bias}`.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use ssl_core::nn::ops::{add_broadcast, matmul_t};
use ssl_core::nn::{
    Activation, LayerNorm, MatmulPrecision, NormPlacement, StackInit, TransformerConfig,
    TransformerStack,
};
use ssl_core::{Ctx, Encoder, EncoderOutput, Init, ParamBuilder};

use crate::masking::gather_tokens;
use crate::patch::{grid_size, patches_for_conv};
use crate::pos_embed::sincos_2d;
use crate::{Result, VisionError};

/// A batch of images `(B, C, H, W)`, `f32`. Pretext tasks take raw `[0, 1]` pixels and
/// normalise them; the encoder itself takes normalised pixels.
#[derive(Debug, Clone)]
pub struct Images {
    /// Pixels `(B, C, H, W)`.
    pub pixels: Tensor,
}

impl Images {
    /// A batch from flat `(B, C, H, W)` values.
    pub fn from_vec(data: Vec<f32>, shape: [usize; 4], device: &Device) -> Result<Self> {
        if data.len() != shape.iter().product::<usize>() {
            return Err(VisionError::InvalidInput(format!(
                "{} pixel values do not fill a batch of shape {shape:?}",
                data.len()
            )));
        }
        Ok(Images {
            pixels: Tensor::from_vec(data, shape.to_vec(), device)?,
        })
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.pixels.dims().first().copied().unwrap_or(0)
    }

    /// True for an empty batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How [`VisionTransformer`] pools tokens into one embedding.
#[derive(
    schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The class token's output.
    #[default]
    Cls,
    /// The mean of the patch tokens' outputs.
    Mean,
}

/// Configuration of a [`VisionTransformer`].
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ViTConfig {
    /// Image height.
    pub image_height: usize,
    /// Image width.
    pub image_width: usize,
    /// Channels (1 grey, 3 RGB, or any count).
    pub channels: usize,
    /// Square patch side (must divide height and width). 0 in `ssl pretrain vision`: chosen
    /// from the image size, ViT's 16 or less so that the grid keeps at least 8 patches a side
    /// (4 under 32 pixels: 28x28 -> 7, 32 -> 4, 64 -> 8, 224 -> 16).
    pub patch_size: usize,
    /// Width D (a multiple of 4 for the 2-D sin-cos positions).
    pub dim: usize,
    /// Transformer layers.
    pub depth: usize,
    /// Attention heads.
    pub heads: usize,
    /// Feed-forward width as a multiple of `dim`.
    pub mlp_ratio: f64,
    /// Layer-norm epsilon (MAE: 1e-6).
    pub layer_norm_eps: f64,
    /// Pooled embedding: class token or mean of patch tokens (`ssl pretrain vision`: the
    /// mean, since MAE trains the patch tokens and never the class token).
    pub pooling: Pooling,
}

impl Default for ViTConfig {
    fn default() -> Self {
        ViTConfig::preset("tiny", 224, 224, 3, 16).unwrap_or(ViTConfig {
            image_height: 224,
            image_width: 224,
            channels: 3,
            patch_size: 16,
            dim: 192,
            depth: 12,
            heads: 3,
            mlp_ratio: 4.0,
            layer_norm_eps: 1e-6,
            pooling: Pooling::Cls,
        })
    }
}

impl ViTConfig {
    /// A named preset (`tiny` 192/12/3, `small` 384/12/6, `base` 768/12/12, as DeiT/MAE) for
    /// the given image size, channels and patch size.
    pub fn preset(
        name: &str,
        height: usize,
        width: usize,
        channels: usize,
        patch: usize,
    ) -> Result<Self> {
        let (dim, depth, heads) = match name {
            "tiny" => (192, 12, 3),
            "small" => (384, 12, 6),
            "base" => (768, 12, 12),
            other => {
                return Err(VisionError::Config(format!(
                    "unknown ViT preset `{other}` (tiny, small, base)"
                )))
            }
        };
        Ok(ViTConfig {
            image_height: height,
            image_width: width,
            channels,
            patch_size: patch,
            dim,
            depth,
            heads,
            mlp_ratio: 4.0,
            layer_norm_eps: 1e-6,
            pooling: Pooling::Cls,
        })
    }

    /// The patch grid `(rows, columns)`.
    pub fn grid(&self) -> Result<(usize, usize)> {
        grid_size(self.image_height, self.image_width, self.patch_size)
    }

    /// Number of patches L.
    pub fn num_patches(&self) -> Result<usize> {
        let (h, w) = self.grid()?;
        Ok(h * w)
    }

    /// Values per patch `p * p * C`.
    pub fn patch_dim(&self) -> usize {
        self.patch_size * self.patch_size * self.channels
    }

    /// The shared stack's configuration (pre-norm, exact GELU, Xavier init, no dropout).
    pub fn transformer(&self) -> TransformerConfig {
        TransformerConfig {
            dim: self.dim,
            depth: self.depth,
            heads: self.heads,
            mlp_dim: ((self.dim as f64) * self.mlp_ratio).round() as usize,
            norm: NormPlacement::Pre,
            activation: Activation::GeluErf,
            dropout: 0.0,
            attn_dropout: 0.0,
            layer_norm_eps: self.layer_norm_eps,
            causal: false,
            init: StackInit::XavierUniform,
        }
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<()> {
        if self.channels == 0 {
            return Err(VisionError::Config(
                "model.channels must be at least 1".into(),
            ));
        }
        self.grid()?;
        if !self.dim.is_multiple_of(4) {
            return Err(VisionError::Config(format!(
                "model.dim = {} must be a multiple of 4 (2-D sin-cos positions)",
                self.dim
            )));
        }
        if self.mlp_ratio.is_nan() || self.mlp_ratio <= 0.0 {
            return Err(VisionError::Config(format!(
                "model.mlp_ratio = {} must be positive",
                self.mlp_ratio
            )));
        }
        self.transformer().validate()?;
        Ok(())
    }
}

/// Xavier-uniform bound of a `(fan_out, fan_in)` matrix.
pub(crate) fn xavier_bound(fan_in: usize, fan_out: usize) -> f64 {
    (6.0 / (fan_in + fan_out) as f64).sqrt()
}

/// A Vision Transformer encoder (see the module documentation).
pub struct VisionTransformer {
    cfg: ViTConfig,
    cls_token: Tensor,
    patch_weight: Tensor,
    patch_bias: Tensor,
    pos_embed: Tensor,
    stack: TransformerStack,
    norm: LayerNorm,
}

impl VisionTransformer {
    /// Creates the encoder's parameters under `pb` (MAE's initialisation: Xavier-uniform
    /// patch kernel and linear layers, class token N(0, 0.02)).
    pub fn new(cfg: &ViTConfig, pb: &ParamBuilder) -> Result<Self> {
        cfg.validate()?;
        let (gh, gw) = cfg.grid()?;
        let d = cfg.dim;
        let emb = pb.pp("embeddings");
        let cls_token = emb.get_with_decay("cls_token", (1, 1, d), Init::Normal(0.02), false)?;
        let proj = emb.pp("patch_embeddings.projection");
        let bound = xavier_bound(cfg.patch_dim(), d);
        let patch_weight = proj.get(
            "weight",
            (d, cfg.channels, cfg.patch_size, cfg.patch_size),
            Init::Uniform(bound),
        )?;
        let patch_bias = proj.get("bias", d, Init::Zeros)?;
        let pos = sincos_2d(d, gh, gw, true)?;
        let pos_embed = Tensor::from_vec(pos, (1, gh * gw + 1, d), pb.device())?;
        let stack = TransformerStack::new(&cfg.transformer(), &pb.pp("encoder"))?;
        let norm = LayerNorm::new(d, cfg.layer_norm_eps, &pb.pp("layernorm"))?;
        Ok(VisionTransformer {
            cfg: cfg.clone(),
            cls_token,
            patch_weight,
            patch_bias,
            pos_embed,
            stack,
            norm,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ViTConfig {
        &self.cfg
    }

    /// The fixed position embeddings `(1, 1 + L, D)`: the class token's slot (zeros, as MAE)
    /// first, then the patches in row-major grid order (what Hugging Face ViT's
    /// `embeddings.position_embeddings` holds).
    pub fn position_embeddings(&self) -> &Tensor {
        &self.pos_embed
    }

    /// Patch embeddings plus position embeddings `(B, L, D)` of normalised pixels.
    pub fn embed_patches(&self, pixels: &Tensor) -> Result<Tensor> {
        let x = self.project_patches(&self.check_patches(pixels)?)?;
        let l = x.dim(1)?;
        let pos = self.pos_embed.narrow(1, 1, l)?;
        Ok(add_broadcast(&x, &pos)?)
    }

    /// [`VisionTransformer::embed_patches`] at the patches `ids[i]` of image `i` only (each
    /// row of `ids` as long, indices below the number of patches): `(B, K, D)`, the rows
    /// [`crate::masking::gather_tokens`] would pick from the full embedding (MAE's visible
    /// patches), with the product and its backward over those rows alone.
    pub fn embed_patches_at(&self, pixels: &Tensor, ids: &[Vec<u32>]) -> Result<Tensor> {
        let patches = self.check_patches(pixels)?;
        let l = patches.dim(1)?;
        if let Some(&bad) = ids.iter().flatten().find(|&&i| i as usize >= l) {
            return Err(VisionError::InvalidInput(format!(
                "patch index {bad} is out of range for {l} patches"
            )));
        }
        let x = self.project_patches(&gather_tokens(&patches, ids)?)?;
        let (b, k, d) = x.dims3()?;
        let at = Tensor::from_vec(
            ids.iter().flatten().copied().collect::<Vec<u32>>(),
            b * k,
            x.device(),
        )?;
        let pos = self
            .pos_embed
            .narrow(1, 1, l)?
            .squeeze(0)?
            .index_select(&at, 0)?
            .reshape((b, k, d))?;
        Ok((x + pos)?)
    }

    /// The images as rows of patch pixels `(B, L, C * p * p)`, after checking their shape.
    fn check_patches(&self, pixels: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = pixels.dims4()?;
        if (c, h, w)
            != (
                self.cfg.channels,
                self.cfg.image_height,
                self.cfg.image_width,
            )
        {
            return Err(VisionError::InvalidInput(format!(
                "images are {c}x{h}x{w} (channels x height x width), the model expects {}x{}x{}",
                self.cfg.channels, self.cfg.image_height, self.cfg.image_width
            )));
        }
        patches_for_conv(pixels, self.cfg.patch_size)
    }

    /// The patch projection (weight and bias, no positions) of rows of patch pixels:
    /// `(B, N, C * p * p)` to `(B, N, D)`.
    fn project_patches(&self, patches: &Tensor) -> Result<Tensor> {
        let (b, l, k) = patches.dims3()?;
        let w = self.patch_weight.reshape((self.cfg.dim, k))?;
        // One op with its own backward on the CPU (candle's matmul by the transposed view
        // costs three graph nodes and zero-filled buffers each way).
        let x = patches.reshape((b * l, k))?;
        Ok(
            add_broadcast(&matmul_t(&x, &w, MatmulPrecision::F32)?, &self.patch_bias)?
                .reshape((b, l, self.cfg.dim))?,
        )
    }

    /// Runs the class token and `tokens` (B, N, D) (all or a subset of the patch embeddings
    /// from [`VisionTransformer::embed_patches`]) through the stack and the final norm.
    /// Returns `(B, 1 + N, D)`, class token first, and the hidden states when asked for.
    pub fn forward_tokens(&self, tokens: &Tensor, ctx: &mut Ctx) -> Result<(Tensor, Vec<Tensor>)> {
        let out = self
            .stack
            .forward(&self.with_class_token(tokens)?, None, ctx)?;
        Ok((self.norm.forward(&out.last)?, out.hidden_states))
    }

    /// The class token (with its position) before `tokens` (B, N, D): (B, 1 + N, D).
    fn with_class_token(&self, tokens: &Tensor) -> Result<Tensor> {
        let (b, _, d) = tokens.dims3()?;
        let cls = (&self.cls_token + self.pos_embed.narrow(1, 0, 1)?)?.broadcast_as((b, 1, d))?;
        Ok(Tensor::cat(&[&cls, tokens], 1)?)
    }

    /// The pooled output alone, `(B, D)`: what [`Encoder::encode`]'s `pooled` gives (up to f32
    /// rounding). With class-token pooling (and no hidden states asked for) the last block
    /// runs at the class tokens only (`TransformerStack::forward_rows`; keys and values
    /// still from every token), for losses that read nothing else (SimCLR, CLIP).
    pub fn pooled(&self, input: &Images, ctx: &mut Ctx) -> Result<Tensor> {
        if self.cfg.pooling != Pooling::Cls || ctx.output_hidden_states {
            return Ok(self.encode(input, ctx)?.pooled);
        }
        let x = self.with_class_token(&self.embed_patches(&input.pixels)?)?;
        let (b, n, _) = x.dims3()?;
        let rows: Vec<u32> = (0..b).map(|i| (i * n) as u32).collect();
        let cls = self.stack.forward_rows(&x, None, &rows, ctx)?;
        Ok(self.norm.forward(&cls)?)
    }

    /// Pools `(B, 1 + N, D)` normed outputs as configured.
    pub fn pool(&self, out: &Tensor) -> Result<Tensor> {
        let n = out.dim(1)?;
        Ok(match self.cfg.pooling {
            Pooling::Cls => out.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => out.narrow(1, 1, n - 1)?.mean(1)?,
        })
    }

    /// Pools with an explicit choice.
    pub fn pool_with(&self, out: &Tensor, pooling: Pooling) -> Result<Tensor> {
        let n = out.dim(1)?;
        Ok(match pooling {
            Pooling::Cls => out.narrow(1, 0, 1)?.squeeze(1)?,
            Pooling::Mean => out.narrow(1, 1, n - 1)?.mean(1)?,
        })
    }
}

impl Encoder for VisionTransformer {
    type Input = Images;

    /// `tokens` are the patch tokens `(B, L, D)` (class token dropped); `pooled` is the class
    /// token or the mean of the patch tokens.
    fn encode(&self, input: &Images, ctx: &mut Ctx) -> ssl_core::Result<EncoderOutput> {
        let x = self.embed_patches(&input.pixels)?;
        let (out, hidden_states) = self.forward_tokens(&x, ctx)?;
        let n = out.dim(1)?;
        let pooled = self.pool(&out)?;
        Ok(EncoderOutput {
            tokens: out.narrow(1, 1, n - 1)?,
            pooled,
            hidden_states,
        })
    }

    fn dim(&self) -> usize {
        self.cfg.dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssl_core::{ParamStore, SslRng};

    pub(crate) fn tiny(channels: usize) -> ViTConfig {
        ViTConfig {
            image_height: 8,
            image_width: 12,
            channels,
            patch_size: 4,
            dim: 16,
            depth: 2,
            heads: 2,
            mlp_ratio: 2.0,
            layer_norm_eps: 1e-6,
            pooling: Pooling::Cls,
        }
    }

    #[test]
    fn shapes_keys_and_gradients() {
        for (channels, pooling) in [(1, Pooling::Cls), (3, Pooling::Mean)] {
            let store = ParamStore::new(&Device::Cpu);
            let cfg = ViTConfig {
                pooling,
                ..tiny(channels)
            };
            let vit = VisionTransformer::new(&cfg, &store.builder(0)).unwrap();
            let mut rng = SslRng::new(0);
            let x = Images::from_vec(
                rng.normal_vec(2 * channels * 8 * 12, 0.0, 1.0),
                [2, channels, 8, 12],
                &Device::Cpu,
            )
            .unwrap();
            let out = vit.encode(&x, &mut Ctx::train(&mut rng)).unwrap();
            assert_eq!(out.tokens.dims(), [2, 6, 16]);
            assert_eq!(out.pooled.dims(), [2, 16]);
            let names: Vec<String> = store.vars().into_iter().map(|(n, _)| n).collect();
            for k in [
                "embeddings.cls_token",
                "embeddings.patch_embeddings.projection.weight",
                "encoder.layer.1.attention.attention.query.weight",
                "encoder.layer.0.layernorm_before.bias",
                "layernorm.weight",
            ] {
                assert!(names.iter().any(|n| n == k), "{k} missing from {names:?}");
            }
            let loss = (out.pooled.sqr().unwrap().sum_all().unwrap()
                + out.tokens.sqr().unwrap().sum_all().unwrap())
            .unwrap();
            let grads = loss.backward().unwrap();
            for (name, var) in store.vars() {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{name}"));
                let n = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(n > 0.0, "{name} has a zero gradient");
            }
        }
    }

    /// `pooled` against `encode(..).pooled`: the same values and gradients, with class-token
    /// pooling (the last block at the class tokens only) and mean pooling (the full path).
    #[test]
    fn pooled_alone_equals_the_encoders_pooled() {
        for pooling in [Pooling::Cls, Pooling::Mean] {
            let store = ParamStore::new(&Device::Cpu);
            let cfg = ViTConfig { pooling, ..tiny(3) };
            let vit = VisionTransformer::new(&cfg, &store.builder(0)).unwrap();
            let mut rng = SslRng::new(5);
            let x = Images::from_vec(
                rng.normal_vec(3 * 3 * 8 * 12, 0.0, 1.0),
                [3, 3, 8, 12],
                &Device::Cpu,
            )
            .unwrap();
            let w =
                Tensor::from_vec(rng.normal_vec(3 * 16, 0.0, 1.0), (3, 16), &Device::Cpu).unwrap();
            let run = |alone: bool| {
                let mut r = SslRng::new(1);
                let mut ctx = Ctx::eval(&mut r);
                let p = if alone {
                    vit.pooled(&x, &mut ctx).unwrap()
                } else {
                    vit.encode(&x, &mut ctx).unwrap().pooled
                };
                let g = (&p * &w).unwrap().sum_all().unwrap().backward().unwrap();
                let grads: Vec<Vec<f32>> = store
                    .vars()
                    .into_iter()
                    .map(|(_, v)| {
                        let g = g.get(v.as_tensor()).unwrap();
                        g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                    })
                    .collect();
                (p.flatten_all().unwrap().to_vec1::<f32>().unwrap(), grads)
            };
            let (p1, g1) = run(false);
            let (p2, g2) = run(true);
            for (a, b) in p1.iter().zip(&p2) {
                assert!((a - b).abs() <= 1e-5, "{pooling:?}: {a} vs {b}");
            }
            // Against the largest gradient: the key bias's is zero but for rounding.
            let scale = g1.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
            for (ga, gb) in g1.iter().zip(&g2) {
                for (a, b) in ga.iter().zip(gb) {
                    assert!((a - b).abs() <= 1e-5 * scale, "{pooling:?}: {a} vs {b}");
                }
            }
        }
    }

    /// The patches' embedding at chosen patches equals the full embedding gathered there,
    /// values and gradients; an index past the last patch is refused.
    #[test]
    fn embedding_chosen_patches_equals_gathering_the_full_embedding() {
        let store = ParamStore::new(&Device::Cpu);
        let vit = VisionTransformer::new(&tiny(3), &store.builder(0)).unwrap();
        let mut rng = SslRng::new(2);
        let x = rng.normal_vec(2 * 3 * 8 * 12, 0.0, 1.0);
        let x = Tensor::from_vec(x, (2, 3, 8, 12), &Device::Cpu).unwrap();
        // Six patches per image; rows out of order.
        let ids = vec![vec![5u32, 0, 3], vec![1, 4, 2]];
        let w = Tensor::from_vec(
            rng.normal_vec(2 * 3 * 16, 0.0, 1.0),
            (2, 3, 16),
            &Device::Cpu,
        )
        .unwrap();
        let run = |at: bool| {
            let e = if at {
                vit.embed_patches_at(&x, &ids).unwrap()
            } else {
                gather_tokens(&vit.embed_patches(&x).unwrap(), &ids).unwrap()
            };
            let g = (&e * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let mut all = vec![e.flatten_all().unwrap().to_vec1::<f32>().unwrap()];
            for (_, v) in store.vars() {
                if let Some(g) = g.get(v.as_tensor()) {
                    all.push(g.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                }
            }
            all
        };
        let (full, at) = (run(false), run(true));
        assert_eq!(full.len(), 3, "values, weight and bias gradients");
        assert_eq!(full.len(), at.len());
        for (a, b) in full.iter().zip(&at) {
            for (x, y) in a.iter().zip(b) {
                assert!((x - y).abs() <= 1e-5 * (1.0 + x.abs()), "{x} vs {y}");
            }
        }
        let err = vit
            .embed_patches_at(&x, &[vec![6], vec![0]])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("patch index 6") && err.contains("6 patches"),
            "{err}"
        );
    }

    #[test]
    fn rejects_bad_shapes() {
        let store = ParamStore::new(&Device::Cpu);
        let bad = ViTConfig {
            patch_size: 5,
            ..tiny(1)
        };
        assert!(VisionTransformer::new(&bad, &store.builder(0)).is_err());
        let vit = VisionTransformer::new(&tiny(1), &store.builder(0)).unwrap();
        let x = Images::from_vec(vec![0.0; 3 * 8 * 12], [1, 3, 8, 12], &Device::Cpu).unwrap();
        let mut rng = SslRng::new(0);
        let err = vit
            .encode(&x, &mut Ctx::eval(&mut rng))
            .unwrap_err()
            .to_string();
        assert!(err.contains("3x8x12"), "{err}");
        assert_eq!(ViTConfig::preset("base", 224, 224, 3, 16).unwrap().dim, 768);
        assert!(ViTConfig::preset("huge2", 224, 224, 3, 16).is_err());
    }
}
