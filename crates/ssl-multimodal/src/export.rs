//! Hugging Face export of a multimodal run's towers: `DIR/vision` (a directory
//! `transformers.ViTModel` loads, written by [`ssl_vision::write_vit_hf_dir`]), `DIR/text` (a
//! `transformers.BertModel` directory with the run's tokenizer, written by
//! [`ssl_text::export_hf_dir`]), `DIR/projections.safetensors` (the two bias-free projections
//! and the temperature) and `DIR/README.md` (how to apply them).
//!
//! Why not one `CLIPModel` directory: transformers' CLIP towers are not ours. Its vision tower
//! has a patch convolution without bias, a layer norm before the encoder and `quick_gelu`; its
//! text tower is a causal transformer pooled at the end-of-text token. Ours are a ViT (the
//! final layer norm's class token, or its patch mean) and a bidirectional BERT pooled by the
//! mean over real tokens. `VisionTextDualEncoderModel` pairs a ViT and a BERT but pools both
//! through their `tanh` poolers. So each tower is written as the model it is, and the
//! projections beside them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use ssl_core::checkpoint::MODEL_FILE;
use ssl_core::{read_safetensors, write_safetensors, CoreError, ParamStore};
use ssl_text::{export_hf_dir, load_tokenizer, BertModel};
use ssl_vision::{write_vit_hf_dir, Normalisation, Pooling};
use tokenizers::Tokenizer;

use crate::pipeline::{stored_config, MultimodalConfig};
use crate::{MultimodalError, Result, TEXT_PREFIX, VISION_PREFIX};

/// The sub-directory of a run directory that `pretrain` exports the towers to.
pub const HF_DIR: &str = "hf";
/// The projections' file in an export directory.
pub const PROJECTIONS_FILE: &str = "projections.safetensors";

/// The image tower's directory in an export directory.
pub const VISION_DIR: &str = "vision";
/// The text tower's directory in an export directory.
pub const TEXT_DIR: &str = "text";

/// The text tower of `params` (a [`crate::ClipModel`]'s, by name: `text_model.*`) in a store
/// of its own under ssl-text's keys (`bert.*`), every parameter checked by name and shape
/// against a fresh BERT of the configuration.
fn text_tower_store(
    cfg: &MultimodalConfig,
    params: &HashMap<String, Tensor>,
    source: &Path,
) -> Result<ParamStore> {
    let store = ParamStore::new(&Device::Cpu);
    BertModel::new(&cfg.model.text, &store.builder(0).pp("bert"))?;
    let pre = format!("{TEXT_PREFIX}.");
    let mapped: HashMap<String, Tensor> = params
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(&pre)
                .map(|rest| (format!("bert.{rest}"), v.clone()))
        })
        .map(|(k, v)| Ok((k, v.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)))
        .collect::<Result<_>>()?;
    let report = store.load_from(&mapped, source)?;
    if let Some(name) = report.missing.first() {
        let ours = name.replacen("bert.", &pre, 1);
        return Err(CoreError::checkpoint(
            source,
            format!("the text tower parameter `{ours}` is missing"),
        )
        .into());
    }
    Ok(store)
}

/// A `(rows, cols)` parameter of `params`, as `f32` on the CPU, checked against `shape`.
fn param(
    params: &HashMap<String, Tensor>,
    name: &str,
    shape: &[usize],
    source: &Path,
) -> Result<Tensor> {
    let t = params.get(name).ok_or_else(|| {
        CoreError::checkpoint(source, format!("the parameter `{name}` is missing"))
    })?;
    if t.dims() != shape {
        return Err(CoreError::checkpoint(
            source,
            format!(
                "`{name}` has shape {:?}, the model configured expects {shape:?}",
                t.dims()
            ),
        )
        .into());
    }
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)
}

/// The projection heads and the temperature: `visual_projection.weight` `(E, D_image)`,
/// `text_projection.weight` `(E, D_text)`, `logit_scale` `()`, and `logit_bias` `()` for
/// SigLIP, as in `params`.
pub fn projection_tensors(
    cfg: &MultimodalConfig,
    params: &HashMap<String, Tensor>,
    source: &Path,
) -> Result<HashMap<String, Tensor>> {
    let m = &cfg.model;
    let mut out = HashMap::new();
    for (name, width) in [
        ("visual_projection.weight", m.image.dim),
        ("text_projection.weight", m.text.hidden_size),
    ] {
        out.insert(
            name.to_string(),
            param(params, name, &[m.embed_dim, width], source)?,
        );
    }
    out.insert(
        "logit_scale".into(),
        param(params, "logit_scale", &[], source)?,
    );
    if params.contains_key("logit_bias") {
        out.insert(
            "logit_bias".into(),
            param(params, "logit_bias", &[], source)?,
        );
    }
    Ok(out)
}

/// `DIR/README.md`: what the directory holds and how the towers and projections give the
/// run's embeddings.
fn readme(cfg: &MultimodalConfig) -> String {
    let m = &cfg.model;
    let (pooling, pool) = match m.image.pooling {
        Pooling::Cls => ("the class token", "h[:, 0]"),
        Pooling::Mean => ("the mean of the patch tokens", "h[:, 1:].mean(1)"),
    };
    let siglip = matches!(m.loss.kind, crate::LossKind::Siglip);
    format!(
        r#"# CLIP-style towers exported by ssl-multimodal

- `vision/`: a `transformers.ViTModel` directory (ViT, {dv} wide, {lv} layers) with its
  `preprocessor_config.json` (the run's image size and normalisation).
- `text/`: a `transformers.BertModel` directory (BERT, {dt} wide, {lt} layers) with the run's
  tokenizer (`tokenizer.json`).
- `projections.safetensors`: `visual_projection.weight` ({e} x {dv}), `text_projection.weight`
  ({e} x {dt}), `logit_scale`{bias}.

The embeddings of `ssl embed multimodal`:

```python
import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, BertModel, ViTModel
from tokenizers import Tokenizer

vision = ViTModel.from_pretrained("vision", add_pooling_layer=False).eval()
text = BertModel.from_pretrained("text", add_pooling_layer=False).eval()
proc = AutoImageProcessor.from_pretrained("vision")
tok = Tokenizer.from_file("text/tokenizer.json")
proj = load_file("projections.safetensors")

# image: {pooling} of the final layer norm's output, projected, L2-normalised
pixels = proc(images, return_tensors="pt")["pixel_values"]
h = vision(pixel_values=pixels).last_hidden_state
image_emb = torch.nn.functional.normalize({pool} @ proj["visual_projection.weight"].T, dim=-1)

# text: [CLS] + at most {room} tokens + [SEP] (no special tokens from the tokenizer itself),
# the mean of the last hidden state over the real tokens, projected, L2-normalised
ids = [tok.token_to_id("[CLS]")] + tok.encode(caption, add_special_tokens=False).ids[:{room}] + [tok.token_to_id("[SEP]")]
h = text(input_ids=torch.tensor([ids])).last_hidden_state
text_emb = torch.nn.functional.normalize(h.mean(1) @ proj["text_projection.weight"].T, dim=-1)

# similarity logits: exp(logit_scale) * image_emb @ text_emb.T{bias_use}
```

(For batches of captions, pad and average over the attention mask.) Why not a `CLIPModel`:
its towers differ from ours (CLIP's vision tower has a bias-free patch convolution, a layer
norm before the encoder and `quick_gelu`; its text tower is causal and pooled at the
end-of-text token), and `VisionTextDualEncoderModel` pools through `tanh` poolers; each tower
is therefore written as the model it is, with the projections beside them.
"#,
        dv = m.image.dim,
        lv = m.image.depth,
        dt = m.text.hidden_size,
        lt = m.text.num_hidden_layers,
        e = m.embed_dim,
        bias = if siglip { ", `logit_bias`" } else { "" },
        bias_use = if siglip { " + logit_bias (SigLIP)" } else { "" },
        room = cfg.max_seq_len.saturating_sub(2),
        pooling = pooling,
        pool = pool,
    )
}

/// Writes the export directory `dir` (see the module documentation) of the model of `cfg`
/// whose parameters are `params` (a [`crate::ClipModel`]'s, by name, read from `source`,
/// named in errors) with the caption tokenizer `tok`. Every tensor is checked before the
/// first file is written.
pub fn write_clip_hf_dir(
    cfg: &MultimodalConfig,
    params: &HashMap<String, Tensor>,
    tok: &Tokenizer,
    source: &Path,
    dir: &Path,
) -> Result<PathBuf> {
    let text = text_tower_store(cfg, params, source)?;
    let proj = projection_tensors(cfg, params, source)?;
    let m = &cfg.model;
    let norm = Normalisation {
        mean: &m.image_mean,
        std: &m.image_std,
        mean_key: "model.image_mean",
        std_key: "model.image_std",
    };
    write_vit_hf_dir(
        &m.image,
        params,
        VISION_PREFIX,
        norm,
        source,
        &dir.join(VISION_DIR),
    )?;
    let text_dir = dir.join(TEXT_DIR);
    export_hf_dir(&m.text, &text, tok, &text_dir)?;
    // ssl-text writes a masked-LM's configuration; this directory has the encoder only, and
    // says how the run pools it.
    let cpath = text_dir.join("config.json");
    let mut conf = m.text.to_hf_json();
    if let Some(o) = conf.as_object_mut() {
        o.insert("architectures".into(), serde_json::json!(["BertModel"]));
        o.insert("ssl_pooling".into(), "mean".into());
        o.insert("ssl_max_seq_len".into(), cfg.max_seq_len.into());
    }
    let json = serde_json::to_string_pretty(&conf).map_err(|e| MultimodalError::Io {
        path: cpath.clone(),
        source: std::io::Error::other(e),
    })?;
    ssl_data::output::write_output(&cpath, json.as_bytes())?;
    write_safetensors(&proj, &dir.join(PROJECTIONS_FILE))?;
    ssl_data::output::write_output(&dir.join("README.md"), readme(cfg).as_bytes())?;
    Ok(dir.to_path_buf())
}

/// Exports the towers of a multimodal run as Hugging Face directories under `out_dir` (see
/// the module documentation): `checkpoint` is a run directory (its newest checkpoint) or one
/// checkpoint directory; the tokenizer is the run's `tokenizer.file`. Returns `out_dir`.
///
/// ```no_run
/// # fn main() -> ssl_multimodal::Result<()> {
/// ssl_multimodal::export_hf("runs/clip".as_ref(), "runs/clip/hf-step-400".as_ref())?;
/// // python: ViTModel.from_pretrained(".../vision"), BertModel.from_pretrained(".../text")
/// # Ok(()) }
/// ```
pub fn export_hf(checkpoint: &Path, out_dir: &Path) -> Result<PathBuf> {
    let (ckpt, cfg) = stored_config(checkpoint)?;
    let path = ckpt.join(MODEL_FILE);
    let params = read_safetensors(&path, &Device::Cpu)?;
    let tok = load_tokenizer(Path::new(&cfg.tokenizer.file))?;
    write_clip_hf_dir(&cfg, &params, &tok, &path, out_dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClipModel, LossKind};

    fn tiny(kind: LossKind) -> MultimodalConfig {
        let mut cfg = MultimodalConfig::default();
        let m = &mut cfg.model;
        (m.embed_dim, m.loss.kind) = (8, kind);
        (
            m.image.image_height,
            m.image.image_width,
            m.image.patch_size,
        ) = (8, 8, 4);
        (m.image.dim, m.image.depth, m.image.heads) = (16, 1, 2);
        // Filled in from the data in a run.
        (m.image.channels, m.image_mean, m.image_std) = (3, vec![0.5], vec![0.25]);
        (
            m.text.vocab_size,
            m.text.hidden_size,
            m.text.intermediate_size,
        ) = (30, 12, 24);
        (m.text.num_hidden_layers, m.text.num_attention_heads) = (1, 2);
        m.text.max_position_embeddings = 8;
        cfg
    }

    fn params(cfg: &MultimodalConfig) -> HashMap<String, Tensor> {
        let store = ParamStore::new(&Device::Cpu);
        ClipModel::new(&cfg.model, &store.builder(0)).unwrap();
        store.tensors().unwrap()
    }

    #[test]
    fn projections_carry_siglips_bias_and_missing_tensors_are_named() {
        let clip = tiny(LossKind::Clip);
        let p = projection_tensors(&clip, &params(&clip), Path::new("m")).unwrap();
        let mut names: Vec<_> = p.keys().cloned().collect();
        names.sort();
        assert_eq!(
            names,
            [
                "logit_scale",
                "text_projection.weight",
                "visual_projection.weight"
            ]
        );
        assert_eq!(p["text_projection.weight"].dims(), [8, 12]);
        let siglip = tiny(LossKind::Siglip);
        let p = projection_tensors(&siglip, &params(&siglip), Path::new("m")).unwrap();
        assert_eq!(p.len(), 4);
        assert_eq!(p["logit_bias"].dims(), [0usize; 0]);

        let mut bad = params(&clip);
        bad.remove("text_model.encoder.layer.0.output.dense.bias");
        let err = text_tower_store(&clip, &bad, Path::new("m.safetensors"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("text_model.encoder.layer.0.output.dense.bias")
                && err.contains("m.safetensors"),
            "{err}"
        );
        bad.insert(
            "visual_projection.weight".into(),
            Tensor::zeros((8, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        let err = projection_tensors(&clip, &bad, Path::new("m"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("visual_projection.weight") && err.contains("[8, 16]"),
            "{err}"
        );
    }
}
