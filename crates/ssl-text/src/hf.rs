//! Hugging Face directories: load `config.json` + `model.safetensors` + `tokenizer.json`
//! (a `BertModel`, `BertForMaskedLM` or sentence-transformers checkpoint) and export a
//! directory `transformers.BertForMaskedLM.from_pretrained` loads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ssl_core::{read_safetensors, ParamStore};
use tokenizers::Tokenizer;

use crate::bert::{BertConfig, BertForMaskedLM};
use crate::masking::MaskingConfig;
use crate::tokenizer::{check_vocab, load_tokenizer, save_tokenizer, SpecialIds};
use crate::{Result, TextError};

/// A model loaded from a Hugging Face directory.
pub struct HfModel {
    /// The configuration read from `config.json`.
    pub config: BertConfig,
    /// The tokenizer read from `tokenizer.json`.
    pub tokenizer: Tokenizer,
    /// The parameters (encoder from the checkpoint; MLM head from it or fresh).
    pub store: ParamStore,
    /// The model.
    pub model: BertForMaskedLM,
    /// True when the checkpoint had no MLM head and a fresh one was initialised.
    pub fresh_head: bool,
    /// Checkpoint tensors that were not used (pooler, tied decoder...).
    pub unused: Vec<String>,
}

/// Maps a checkpoint key to ours: `bert.`-prefixed encoder keys, `cls.` head keys,
/// `gamma`/`beta` of old checkpoints to `weight`/`bias`.
fn our_key(k: &str) -> String {
    let k = k
        .replace("LayerNorm.gamma", "LayerNorm.weight")
        .replace("LayerNorm.beta", "LayerNorm.bias");
    if k.starts_with("bert.") || k.starts_with("cls.") {
        k
    } else {
        format!("bert.{k}")
    }
}

/// Loads a Hugging Face BERT directory for masked-LM training (domain adaptation).
pub fn load_hf_dir(
    dir: &Path,
    masking: MaskingConfig,
    seed: u64,
    device: &Device,
) -> Result<HfModel> {
    let config = BertConfig::from_hf_file(&dir.join("config.json"))?;
    let tokenizer = load_tokenizer(&dir.join("tokenizer.json"))?;
    check_vocab(
        &tokenizer,
        &dir.join("tokenizer.json"),
        config.vocab_size,
        true,
    )?;
    let sp = SpecialIds::of(&tokenizer)?;
    let weights = dir.join("model.safetensors");
    let raw = read_safetensors(&weights, device)?;
    let values: HashMap<String, Tensor> = raw.into_iter().map(|(k, v)| (our_key(&k), v)).collect();
    let store = ParamStore::new(device);
    let model = BertForMaskedLM::new(&config, masking, sp.mask, &store.builder(seed))?;
    let report = store.load_from(&values, &weights)?;
    let missing_encoder: Vec<&String> = report
        .missing
        .iter()
        .filter(|k| !k.starts_with("cls."))
        .collect();
    if let Some(k) = missing_encoder.first() {
        return Err(TextError::Core(ssl_core::CoreError::Checkpoint {
            path: weights,
            message: format!(
                "encoder parameter `{k}` is missing ({} missing)",
                missing_encoder.len()
            ),
        }));
    }
    let fresh_head = report.missing.iter().any(|k| k.starts_with("cls."));
    Ok(HfModel {
        config,
        tokenizer,
        store,
        model,
        fresh_head,
        unused: report.unexpected,
    })
}

/// Writes `config.json`, `model.safetensors` (our keys, which are `BertForMaskedLM`'s; the
/// decoder is tied so transformers restores it from the word embeddings) and the tokenizer.
pub fn export_hf_dir(
    config: &BertConfig,
    store: &ParamStore,
    tokenizer: &Tokenizer,
    dir: &Path,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| TextError::io(dir, e))?;
    let cpath = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config.to_hf_json()).map_err(|e| TextError::Json {
        path: cpath.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(&cpath, text).map_err(|e| TextError::io(&cpath, e))?;
    store.save_safetensors(&dir.join("model.safetensors"))?;
    save_tokenizer(tokenizer, dir)?;
    Ok(dir.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bert::BertForMaskedLM;
    use crate::data::{tokenize_texts, InputConfig, InputMode, TextBatch};
    use crate::tokenizer::{train_from_texts, TokenizerConfig};
    use ssl_core::{Ctx, SslRng};

    #[test]
    fn export_then_load_gives_identical_logits_and_bare_encoders_get_a_fresh_head() {
        let texts: Vec<String> = (0..20)
            .map(|i| format!("the page cache {i} holds file pages"))
            .collect();
        let tok = train_from_texts(
            texts.clone().into_iter(),
            &TokenizerConfig {
                vocab_size: 120,
                min_frequency: 1,
                ..Default::default()
            },
        )
        .unwrap();
        let cfg = BertConfig {
            vocab_size: tok.get_vocab_size(true),
            hidden_size: 16,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            intermediate_size: 32,
            max_position_embeddings: 16,
            ..BertConfig::default()
        };
        let store = ParamStore::new(&Device::Cpu);
        let model =
            BertForMaskedLM::new(&cfg, MaskingConfig::default(), 4, &store.builder(5)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        export_hf_dir(&cfg, &store, &tok, dir.path()).unwrap();
        let loaded = load_hf_dir(dir.path(), MaskingConfig::default(), 9, &Device::Cpu).unwrap();
        assert!(!loaded.fresh_head);
        let seqs = tokenize_texts(
            &tok,
            &texts[..2],
            &InputConfig {
                mode: InputMode::Document,
                max_seq_len: 16,
            },
            None,
            &[],
        )
        .unwrap();
        let batch = TextBatch {
            seqs,
            pad_id: 0,
            device: Device::Cpu,
        };
        let mut rng = SslRng::new(0);
        let a = model
            .logits(&batch.tensors().unwrap(), &mut Ctx::eval(&mut rng))
            .unwrap();
        let b = loaded
            .model
            .logits(&batch.tensors().unwrap(), &mut Ctx::eval(&mut rng))
            .unwrap();
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);

        // A bare encoder (sentence-transformers layout: no `bert.` prefix, no head, a pooler).
        let bare = tempfile::tempdir().unwrap();
        let mut t: HashMap<String, Tensor> = HashMap::new();
        for (k, v) in store.tensors().unwrap() {
            if let Some(s) = k.strip_prefix("bert.") {
                t.insert(s.to_string(), v);
            }
        }
        t.insert(
            "pooler.dense.bias".into(),
            Tensor::zeros(16, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&t, bare.path().join("model.safetensors")).unwrap();
        std::fs::copy(
            dir.path().join("config.json"),
            bare.path().join("config.json"),
        )
        .unwrap();
        std::fs::copy(
            dir.path().join("tokenizer.json"),
            bare.path().join("tokenizer.json"),
        )
        .unwrap();
        let l2 = load_hf_dir(bare.path(), MaskingConfig::default(), 9, &Device::Cpu).unwrap();
        assert!(l2.fresh_head);
        // Adapting it at the default rate: the fresh head's own parameters train at the
        // from-scratch rate (factor 40 on 5e-5), the rest (the tied decoder is the word
        // embeddings) at the checkpoint's.
        use ssl_core::PretextTask;
        let mut cfg = crate::TextConfig::default();
        cfg.model.init_from = bare.path().to_string_lossy().into_owned();
        cfg.resolve_lr();
        let tok = load_tokenizer(&bare.path().join("tokenizer.json")).unwrap();
        let (store, model) = crate::build_model(&mut cfg, &tok, &Device::Cpu).unwrap();
        let mut heads = 0;
        for (name, _) in store.vars() {
            let fresh = name.starts_with("cls.predictions.");
            heads += usize::from(fresh);
            let want = if fresh { 40.0 } else { 1.0 };
            assert!((model.lr_scale(&name) - want).abs() < 1e-9, "{name}");
        }
        // Dense weight and bias, LayerNorm weight and bias, the output bias.
        assert_eq!(heads, 5);
        // A checkpoint with its head keeps one rate for everything.
        let mut cfg = crate::TextConfig::default();
        cfg.model.init_from = dir.path().to_string_lossy().into_owned();
        cfg.resolve_lr();
        let (_, with_head) = crate::build_model(&mut cfg, &tok, &Device::Cpu).unwrap();
        assert_eq!(with_head.lr_scale("cls.predictions.bias"), 1.0);
        assert_eq!(l2.unused, vec!["bert.pooler.dense.bias".to_string()]);
        // Missing encoder weights are an error naming the key.
        t.remove("embeddings.word_embeddings.weight");
        candle_core::safetensors::save(&t, bare.path().join("model.safetensors")).unwrap();
        let err = load_hf_dir(bare.path(), MaskingConfig::default(), 9, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("word_embeddings"), "{err}");
    }
}
