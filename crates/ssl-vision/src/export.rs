//! Hugging Face export of the ViT encoder: a directory `transformers.ViTModel.from_pretrained`
//! loads (`config.json`, `model.safetensors`, `preprocessor_config.json`).
//!
//! Our ViT already is Hugging Face's ViT (pre-norm layers, exact GELU, a stride-`p`
//! convolution kernel `(D, C, p, p)` applied to patches in `(c, p, q)` order, the class token
//! first, a final layer norm) under the same key names, so the weights are written as they
//! are, with their prefix (`vit.` in a vision run, `vision_model.` in a multimodal one)
//! stripped. What the checkpoint does not hold is added: the fixed 2-D sin-cos position
//! embeddings, as the `(1, 1 + L, D)` parameter `embeddings.position_embeddings` with the
//! class token's slot (zeros) first. No pooler is written (load with
//! `add_pooling_layer=False`); the pooled embedding is the final layer norm's class-token
//! output, or the mean of its patch tokens, as `ssl_pooling` in `config.json` says.
//!
//! `preprocessor_config.json` is a `ViTImageProcessor`'s: rescale by 1/255, then the run's
//! per-channel normalisation, at the model's image size.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use ssl_core::checkpoint::MODEL_FILE;
use ssl_core::{read_safetensors, write_safetensors, CoreError, ParamStore};

use crate::pipeline::{stored_config, VisionConfig};
use crate::{Pooling, Result, ViTConfig, VisionError, VisionTransformer};

/// The key prefix of the ViT in a vision run's checkpoint (MAE and SimCLR alike).
pub const VISION_RUN_PREFIX: &str = "vit";

/// The sub-directory of a run directory that `pretrain` exports the encoder to.
pub const HF_DIR: &str = "hf";

/// Hugging Face's `config.json` for `ViTModel` of `cfg`: `image_size` and `patch_size` as
/// one number for square images (a `[height, width]` pair otherwise, which transformers'
/// ViT accepts), plus `ssl_pooling` (`cls` or `mean`: how our embedding pools the final
/// layer norm's output).
pub fn vit_hf_config(cfg: &ViTConfig) -> Value {
    let t = cfg.transformer();
    let image_size = if cfg.image_height == cfg.image_width {
        json!(cfg.image_height)
    } else {
        json!([cfg.image_height, cfg.image_width])
    };
    json!({
        "architectures": ["ViTModel"],
        "model_type": "vit",
        "hidden_size": t.dim,
        "num_hidden_layers": t.depth,
        "num_attention_heads": t.heads,
        "intermediate_size": t.mlp_dim,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        "layer_norm_eps": t.layer_norm_eps,
        "image_size": image_size,
        "patch_size": cfg.patch_size,
        "num_channels": cfg.channels,
        "qkv_bias": true,
        "encoder_stride": cfg.patch_size,
        "ssl_pooling": match cfg.pooling {
            Pooling::Cls => "cls",
            Pooling::Mean => "mean",
        },
    })
}

/// One value per channel from a statistic given once for every channel or per channel.
fn per_channel(v: &[f32], channels: usize, key: &str) -> Result<Vec<f64>> {
    match v.len() {
        1 => Ok(vec![f64::from(v[0]); channels]),
        n if n == channels => Ok(v.iter().map(|x| f64::from(*x)).collect()),
        n => Err(VisionError::Config(format!(
            "{key} has {n} values: give one, or one per channel ({channels})"
        ))),
    }
}

/// `ViTImageProcessor`'s `preprocessor_config.json`: resize to the model's size (bilinear),
/// rescale by 1/255, normalise by `mean` / `std` (one value, or one per channel), convert to
/// RGB for a 3-channel model only. `mean_key` / `std_key` name the configuration keys in
/// errors.
pub fn vit_preprocessor_config(
    cfg: &ViTConfig,
    (mean, mean_key): (&[f32], &str),
    (std, std_key): (&[f32], &str),
) -> Result<Value> {
    Ok(json!({
        "image_processor_type": "ViTImageProcessor",
        "do_resize": true,
        "size": {"height": cfg.image_height, "width": cfg.image_width},
        "resample": 2,
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": per_channel(mean, cfg.channels, mean_key)?,
        "image_std": per_channel(std, cfg.channels, std_key)?,
        "do_convert_rgb": cfg.channels == 3,
    }))
}

/// The tensors of Hugging Face's `ViTModel` for the ViT of `cfg` whose parameters are the
/// `prefix.*` entries of `params` (`prefix` empty: no prefix): every encoder parameter, with
/// the prefix stripped, as `f32` on the CPU, plus `embeddings.position_embeddings`. Every
/// parameter must be in `params` with the model's shape; errors name the key and `source`.
pub fn vit_hf_tensors(
    cfg: &ViTConfig,
    params: &HashMap<String, Tensor>,
    prefix: &str,
    source: &Path,
) -> Result<HashMap<String, Tensor>> {
    // A model of the same configuration gives the expected names and shapes, and the fixed
    // position embeddings.
    let store = ParamStore::new(&Device::Cpu);
    let root = store.builder(0);
    let vit = if prefix.is_empty() {
        VisionTransformer::new(cfg, &root)?
    } else {
        VisionTransformer::new(cfg, &root.pp(prefix))?
    };
    let strip = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}.")
    };
    let mut out = HashMap::new();
    for (name, var) in store.vars() {
        let t = params.get(&name).ok_or_else(|| {
            CoreError::checkpoint(source, format!("the ViT parameter `{name}` is missing"))
        })?;
        let want = var.as_tensor().dims();
        if t.dims() != want {
            return Err(CoreError::checkpoint(
                source,
                format!(
                    "`{name}` has shape {:?}, the model configured expects {want:?}",
                    t.dims()
                ),
            )
            .into());
        }
        let key = name.strip_prefix(&strip).unwrap_or(&name).to_string();
        out.insert(key, t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?);
    }
    out.insert(
        "embeddings.position_embeddings".into(),
        vit.position_embeddings().clone(),
    );
    Ok(out)
}

/// Writes a JSON value, pretty-printed, to `path` (through a temporary file).
pub(crate) fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| VisionError::io(path, e))?;
    ssl_data::output::write_output(path, text.as_bytes())?;
    Ok(())
}

/// The image statistics a Hugging Face directory is written with: values and the
/// configuration keys they come from (named in errors).
#[derive(Debug, Clone, Copy)]
pub struct Normalisation<'a> {
    /// Per-channel mean (one value: every channel).
    pub mean: &'a [f32],
    /// Per-channel standard deviation (one value: every channel).
    pub std: &'a [f32],
    /// The configuration key of `mean`, e.g. `task.augment.mean`.
    pub mean_key: &'a str,
    /// The configuration key of `std`.
    pub std_key: &'a str,
}

/// Writes the Hugging Face ViT directory `dir` (created if needed) for the ViT of `cfg` whose
/// parameters are `params`' `prefix.*` entries (read from `source`, named in errors):
/// `config.json` ([`vit_hf_config`]), `model.safetensors` ([`vit_hf_tensors`], metadata
/// `{"format": "pt"}`) and `preprocessor_config.json` ([`vit_preprocessor_config`]).
pub fn write_vit_hf_dir(
    cfg: &ViTConfig,
    params: &HashMap<String, Tensor>,
    prefix: &str,
    norm: Normalisation<'_>,
    source: &Path,
    dir: &Path,
) -> Result<PathBuf> {
    // Everything is checked before the first file is written.
    let tensors = vit_hf_tensors(cfg, params, prefix, source)?;
    let pre = vit_preprocessor_config(cfg, (norm.mean, norm.mean_key), (norm.std, norm.std_key))?;
    std::fs::create_dir_all(dir).map_err(|e| VisionError::io(dir, e))?;
    write_json(&dir.join("config.json"), &vit_hf_config(cfg))?;
    write_safetensors(&tensors, &dir.join("model.safetensors"))?;
    write_json(&dir.join("preprocessor_config.json"), &pre)?;
    Ok(dir.to_path_buf())
}

/// The normalisation of a vision run: `task.augment.mean` / `task.augment.std`.
pub(crate) fn run_normalisation(cfg: &VisionConfig) -> Normalisation<'_> {
    Normalisation {
        mean: &cfg.task.augment.mean,
        std: &cfg.task.augment.std,
        mean_key: "task.augment.mean",
        std_key: "task.augment.std",
    }
}

/// Exports the ViT encoder of a vision run as a Hugging Face directory `out_dir`:
/// `checkpoint` is a run directory (its newest checkpoint) or one checkpoint directory (a
/// pretraining or a fine-tuning one: the classifier head is not exported). Returns `out_dir`.
///
/// ```no_run
/// # fn main() -> ssl_vision::Result<()> {
/// let dir = ssl_vision::export_hf("runs/mae".as_ref(), "runs/mae/hf-step-400".as_ref())?;
/// // python: transformers.ViTModel.from_pretrained(dir, add_pooling_layer=False)
/// # Ok(()) }
/// ```
pub fn export_hf(checkpoint: &Path, out_dir: &Path) -> Result<PathBuf> {
    let (ckpt, cfg) = stored_config(checkpoint)?;
    let path = ckpt.join(MODEL_FILE);
    let params = read_safetensors(&path, &Device::Cpu)?;
    write_vit_hf_dir(
        &cfg.model,
        &params,
        VISION_RUN_PREFIX,
        run_normalisation(&cfg),
        &path,
        out_dir,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssl_core::{Ctx, Encoder, SslRng};

    fn tiny(height: usize, width: usize) -> ViTConfig {
        ViTConfig {
            image_height: height,
            image_width: width,
            channels: 3,
            patch_size: 4,
            dim: 16,
            depth: 2,
            heads: 2,
            mlp_ratio: 2.0,
            layer_norm_eps: 1e-6,
            pooling: Pooling::Mean,
        }
    }

    #[test]
    fn tensors_are_the_encoder_under_hf_names_with_the_positions_added() {
        let cfg = tiny(8, 12);
        let store = ParamStore::new(&Device::Cpu);
        let vit = VisionTransformer::new(&cfg, &store.builder(3).pp("vision_model")).unwrap();
        let mut params = store.tensors().unwrap();
        let t = vit_hf_tensors(&cfg, &params, "vision_model", Path::new("m")).unwrap();
        assert_eq!(t.len(), store.len() + 1);
        assert_eq!(
            t["embeddings.patch_embeddings.projection.weight"].dims(),
            [16, 3, 4, 4]
        );
        assert_eq!(t["embeddings.position_embeddings"].dims(), [1, 1 + 6, 16]);
        assert_eq!(
            t["encoder.layer.1.intermediate.dense.weight"].dims(),
            [32, 16]
        );
        // The values are the model's, and loaded back without prefix they give the same
        // encoder output.
        let back = ParamStore::new(&Device::Cpu);
        let vit2 = VisionTransformer::new(&cfg, &back.builder(9)).unwrap();
        let report = back.load_from(&t, Path::new("m")).unwrap();
        assert!(report.missing.is_empty(), "{:?}", report.missing);
        assert_eq!(report.unexpected, ["embeddings.position_embeddings"]);
        let mut rng = SslRng::new(0);
        let x = crate::Images::from_vec(
            rng.normal_vec(2 * 3 * 8 * 12, 0.0, 1.0),
            [2, 3, 8, 12],
            &Device::Cpu,
        )
        .unwrap();
        let a = vit.encode(&x, &mut Ctx::eval(&mut rng)).unwrap().pooled;
        let b = vit2.encode(&x, &mut Ctx::eval(&mut rng)).unwrap().pooled;
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        // A missing parameter or a wrong shape is named.
        params.remove("vision_model.layernorm.bias");
        let err = vit_hf_tensors(&cfg, &params, "vision_model", Path::new("m.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("vision_model.layernorm.bias") && err.contains("m.safetensors"),
            "{err}"
        );
        // (The image size is no parameter's shape: the positions are fixed.)
        let wider = ViTConfig {
            mlp_ratio: 4.0,
            ..cfg.clone()
        };
        let err = vit_hf_tensors(
            &wider,
            &store.tensors().unwrap(),
            "vision_model",
            Path::new("m"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("shape"), "{err}");
    }

    #[test]
    fn configs_carry_the_sizes_and_statistics() {
        let c = vit_hf_config(&tiny(8, 12));
        assert_eq!(c["model_type"], "vit");
        assert_eq!(c["image_size"], json!([8, 12]));
        assert_eq!(c["intermediate_size"], 32);
        assert_eq!(c["ssl_pooling"], "mean");
        assert_eq!(vit_hf_config(&tiny(8, 8))["image_size"], 8);
        let p =
            vit_preprocessor_config(&tiny(8, 12), (&[0.5], "m"), (&[0.1, 0.2, 0.25], "s")).unwrap();
        assert_eq!(p["image_mean"], json!([0.5, 0.5, 0.5]));
        assert_eq!(p["size"], json!({"height": 8, "width": 12}));
        assert_eq!(p["do_convert_rgb"], true);
        let err = vit_preprocessor_config(
            &tiny(8, 8),
            (&[0.5, 0.5], "task.augment.mean"),
            (&[1.0], "s"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("task.augment.mean has 2 values"), "{err}");
    }
}
