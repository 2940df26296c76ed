//! BERT for masked language modelling on ssl-core's shared post-norm transformer stack.
//!
//! Variable names are Hugging Face `BertForMaskedLM` keys: `bert.embeddings.{word,position,
//! token_type}_embeddings.weight`, `bert.embeddings.LayerNorm.{weight,bias}`,
//! `bert.encoder.layer.{i}....` (from the stack), `cls.predictions.transform.dense.*`,
//! `cls.predictions.transform.LayerNorm.*`, `cls.predictions.bias`. The decoder is tied to the
//! word embeddings (Hugging Face's `cls.predictions.decoder.weight`), so it has no key of its own.

use std::path::Path;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};
use ssl_core::nn::ops::{
    add_broadcast, dropout, embedding_sum, linear_cross_entropy, masked_mean, matmul_t, Activation,
};
use ssl_core::nn::{
    LayerNorm, Linear, MatmulPrecision, NormPlacement, StackInit, TransformerConfig,
    TransformerStack,
};
use ssl_core::{
    Ctx, Encoder, EncoderOutput, Init, ParamBuilder, ParamStore, PretextTask, TaskOutput,
};

use crate::data::{BertInput, TextBatch};
use crate::masking::{mask_sequence, MaskInput, MaskVocab, MaskingConfig, IGNORE_INDEX};
use crate::{Result, TextError};

/// A BERT configuration with Hugging Face's `config.json` field names.
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BertConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width D.
    pub hidden_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Feed-forward width.
    pub intermediate_size: usize,
    /// `gelu` (erf), `gelu_new` / `gelu_pytorch_tanh` (tanh) or `relu`.
    pub hidden_act: String,
    /// Dropout on embeddings, attention output and feed-forward output.
    pub hidden_dropout_prob: f32,
    /// Dropout on attention probabilities.
    pub attention_probs_dropout_prob: f32,
    /// Longest sequence.
    pub max_position_embeddings: usize,
    /// Segment types.
    pub type_vocab_size: usize,
    /// Layer-norm epsilon.
    pub layer_norm_eps: f64,
    /// Standard deviation of the normal initialisation.
    pub initializer_range: f64,
    /// Id of `[PAD]` (its embedding row starts at zero).
    pub pad_token_id: u32,
}

impl Default for BertConfig {
    fn default() -> Self {
        BertConfig::preset("mini", 30522).unwrap_or_else(|_| BertConfig::base(30522))
    }
}

impl BertConfig {
    fn base(vocab: usize) -> Self {
        BertConfig {
            vocab_size: vocab,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            initializer_range: 0.02,
            pad_token_id: 0,
        }
    }

    /// A size preset (the BERT miniatures of Turc et al.): `tiny` (2 layers x 128),
    /// `mini` (4 x 256), `small` (4 x 512), `base` (12 x 768); heads = width / 64.
    pub fn preset(name: &str, vocab_size: usize) -> Result<Self> {
        let (l, h) = match name {
            "tiny" => (2, 128),
            "mini" => (4, 256),
            "small" => (4, 512),
            "base" => (12, 768),
            other => {
                return Err(TextError::Config(format!(
                    "unknown BERT preset `{other}` (tiny, mini, small, base)"
                )))
            }
        };
        Ok(BertConfig {
            num_hidden_layers: l,
            hidden_size: h,
            num_attention_heads: h / 64,
            intermediate_size: 4 * h,
            ..BertConfig::base(vocab_size)
        })
    }

    /// The activation named by `hidden_act`.
    pub fn activation(&self) -> Result<Activation> {
        Ok(match self.hidden_act.as_str() {
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(TextError::Config(format!(
                    "hidden_act `{other}` is not supported (gelu, gelu_new, relu)"
                )))
            }
        })
    }

    /// The shared stack's configuration (post-norm, BERT names).
    pub fn transformer(&self) -> Result<TransformerConfig> {
        Ok(TransformerConfig {
            dim: self.hidden_size,
            depth: self.num_hidden_layers,
            heads: self.num_attention_heads,
            mlp_dim: self.intermediate_size,
            norm: NormPlacement::Post,
            activation: self.activation()?,
            dropout: self.hidden_dropout_prob,
            attn_dropout: self.attention_probs_dropout_prob,
            layer_norm_eps: self.layer_norm_eps,
            causal: false,
            init: StackInit::Normal(self.initializer_range),
        })
    }

    /// Hugging Face's `config.json` for `BertForMaskedLM`.
    pub fn to_hf_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(m) = v.as_object_mut() {
            m.insert(
                "architectures".into(),
                serde_json::json!(["BertForMaskedLM"]),
            );
            m.insert("model_type".into(), "bert".into());
            m.insert("position_embedding_type".into(), "absolute".into());
            m.insert("torch_dtype".into(), "float32".into());
        }
        v
    }

    /// Reads a Hugging Face `config.json` (unknown fields are ignored).
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| TextError::io(path, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| TextError::Json {
            path: path.into(),
            message: e.to_string(),
        })?;
        if let Some(t) = v.get("model_type").and_then(|t| t.as_str()) {
            if t != "bert" {
                return Err(TextError::Json {
                    path: path.into(),
                    message: format!("model_type is `{t}`, only `bert` is supported"),
                });
            }
        }
        if let Some(p) = v.get("position_embedding_type").and_then(|t| t.as_str()) {
            if p != "absolute" {
                return Err(TextError::Json {
                    path: path.into(),
                    message: format!("position_embedding_type `{p}` is not supported"),
                });
            }
        }
        serde_json::from_value(v).map_err(|e| TextError::Json {
            path: path.into(),
            message: e.to_string(),
        })
    }
}

/// How [`BertModel`] pools a sequence into one vector.
#[derive(
    schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean over the non-padding tokens (sentence-transformers).
    #[default]
    Mean,
    /// The `[CLS]` token.
    Cls,
}

/// BERT's encoder: embeddings + the shared post-norm stack. Implements [`Encoder`].
pub struct BertModel {
    cfg: BertConfig,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    emb_norm: LayerNorm,
    stack: TransformerStack,
    pooling: Pooling,
    layer: Option<usize>,
}

impl BertModel {
    /// Creates the parameters under `pb` (use `pb.pp("bert")` for HF's MLM keys).
    pub fn new(cfg: &BertConfig, pb: &ParamBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let std = Init::Normal(cfg.initializer_range);
        let e = pb.pp("embeddings");
        let word = e
            .pp("word_embeddings")
            .get("weight", (cfg.vocab_size, d), std)?;
        // Hugging Face zeroes the padding row at initialisation.
        let pad = cfg.pad_token_id as usize;
        if pad < cfg.vocab_size {
            if let Some(var) = pb.store().get(&e.pp("word_embeddings").path("weight")) {
                let mut rows = var.as_tensor().to_vec2::<f32>()?;
                rows[pad].iter_mut().for_each(|x| *x = 0.0);
                var.set(&Tensor::new(rows, pb.device())?)?;
            }
        }
        Ok(BertModel {
            word,
            position: e.pp("position_embeddings").get(
                "weight",
                (cfg.max_position_embeddings, d),
                std,
            )?,
            token_type: e.pp("token_type_embeddings").get(
                "weight",
                (cfg.type_vocab_size, d),
                std,
            )?,
            emb_norm: LayerNorm::new(d, cfg.layer_norm_eps, &e.pp("LayerNorm"))?,
            stack: TransformerStack::new(&cfg.transformer()?, &pb.pp("encoder"))?,
            cfg: cfg.clone(),
            pooling: Pooling::Mean,
            layer: None,
        })
    }

    /// Sets the pooling and the layer whose hidden state is pooled (0 = embeddings,
    /// `num_hidden_layers` or `None` = last).
    pub fn with_pooling(mut self, pooling: Pooling, layer: Option<usize>) -> Result<Self> {
        if let Some(l) = layer {
            if l > self.cfg.num_hidden_layers {
                return Err(TextError::Config(format!(
                    "embedding layer {l} does not exist (the model has {} layers; 0 = embeddings)",
                    self.cfg.num_hidden_layers
                )));
            }
        }
        self.pooling = pooling;
        self.layer = layer;
        Ok(self)
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    /// The word-embedding matrix (V, D), shared with the MLM decoder.
    pub fn word_embeddings(&self) -> &Tensor {
        &self.word
    }

    /// Embeddings: word + position + token type, LayerNorm, dropout.
    fn embed(&self, input: &BertInput, ctx: &mut Ctx) -> Result<Tensor> {
        let t = input.input_ids.dim(1)?;
        if t > self.cfg.max_position_embeddings {
            return Err(TextError::InvalidInput(format!(
                "sequence length {t} exceeds max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        let ids = input.input_ids.flatten_all()?;
        let max = ids.max(0)?.to_dtype(DType::U32)?.to_scalar::<u32>()?;
        if max as usize >= self.cfg.vocab_size {
            return Err(TextError::InvalidInput(format!(
                "token id {max} is outside the vocabulary of {} (tokenizer and model disagree)",
                self.cfg.vocab_size
            )));
        }
        // The three lookups and sums: one parallel op on the CPU, in training too.
        let x = embedding_sum(
            &self.word,
            &self.position,
            &self.token_type,
            &input.input_ids,
            &input.token_type_ids,
            ctx.grad_sink.as_ref(),
        )?;
        let x = self.emb_norm.forward(&x)?;
        Ok(dropout(
            &x,
            self.cfg.hidden_dropout_prob,
            ctx.train,
            ctx.rng,
        )?)
    }

    /// Runs the encoder: last hidden state (B, T, D) and, when asked, every layer's.
    pub fn forward(&self, input: &BertInput, ctx: &mut Ctx) -> Result<(Tensor, Vec<Tensor>)> {
        let x = self.embed(input, ctx)?;
        let out = self.stack.forward(&x, Some(&input.attention_mask), ctx)?;
        Ok((out.last, out.hidden_states))
    }

    /// The last hidden state at `rows` only (indices into the batch's B x T positions), as
    /// (rows, D): on the fused stack the last layer runs only those rows after its keys and
    /// values (see `TransformerStack::forward_rows`), so a loss on a few positions (MLM's
    /// masked ones) skips most of that layer.
    pub fn forward_rows(&self, input: &BertInput, rows: &[u32], ctx: &mut Ctx) -> Result<Tensor> {
        let x = self.embed(input, ctx)?;
        Ok(self
            .stack
            .forward_rows(&x, Some(&input.attention_mask), rows, ctx)?)
    }
}

impl Encoder for BertModel {
    type Input = BertInput;

    fn encode(&self, input: &BertInput, ctx: &mut Ctx) -> ssl_core::Result<EncoderOutput> {
        let want_layer = self.layer.filter(|&l| l != self.cfg.num_hidden_layers);
        let asked = ctx.output_hidden_states;
        if want_layer.is_some() {
            ctx.output_hidden_states = true;
        }
        let res = self.forward(input, ctx);
        ctx.output_hidden_states = asked;
        let (last, hidden) = res?;
        let tokens = match want_layer {
            Some(l) => hidden.get(l).cloned().ok_or_else(|| {
                ssl_core::CoreError::InvalidInput(format!("no hidden state for layer {l}"))
            })?,
            None => last,
        };
        let pooled = match self.pooling {
            Pooling::Mean => masked_mean(&tokens, Some(&input.attention_mask))?,
            Pooling::Cls => tokens.narrow(1, 0, 1)?.squeeze(1)?,
        };
        Ok(EncoderOutput {
            tokens,
            pooled,
            hidden_states: if asked { hidden } else { Vec::new() },
        })
    }

    fn dim(&self) -> usize {
        self.cfg.hidden_size
    }
}

/// `BertForMaskedLM`: the encoder plus the MLM head (dense + activation + LayerNorm, decoder
/// tied to the word embeddings, its own bias). Implements [`PretextTask`] with the configured
/// masking; the loss is the mean cross-entropy over the selected positions only.
pub struct BertForMaskedLM {
    bert: BertModel,
    dense: Linear,
    norm: LayerNorm,
    bias: Tensor,
    masking: MaskingConfig,
    mask_id: u32,
    store: ParamStore,
    head_lr_scale: f64,
}

/// Ids, labels and how many positions were selected for one masked batch.
pub struct MaskedBatch {
    /// Corrupted inputs.
    pub input: BertInput,
    /// Flat indices (row-major over (B, T)) of the selected positions.
    pub positions: Vec<u32>,
    /// Original ids at those positions.
    pub targets: Vec<u32>,
}

impl BertForMaskedLM {
    /// Creates the model under `pb` (keys `bert.*`, `cls.predictions.*`).
    pub fn new(
        cfg: &BertConfig,
        masking: MaskingConfig,
        mask_id: u32,
        pb: &ParamBuilder,
    ) -> Result<Self> {
        masking.validate()?;
        if mask_id as usize >= cfg.vocab_size {
            return Err(TextError::Config(format!(
                "[MASK] id {mask_id} is outside the vocabulary of {}",
                cfg.vocab_size
            )));
        }
        let bert = BertModel::new(cfg, &pb.pp("bert"))?;
        let h = pb.pp("cls.predictions");
        let init = Init::Normal(cfg.initializer_range);
        Ok(BertForMaskedLM {
            dense: Linear::new(
                cfg.hidden_size,
                cfg.hidden_size,
                true,
                init,
                &h.pp("transform.dense"),
            )?,
            norm: LayerNorm::new(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                &h.pp("transform.LayerNorm"),
            )?,
            bias: h.get("bias", cfg.vocab_size, Init::Zeros)?,
            bert,
            masking,
            mask_id,
            store: pb.store().clone(),
            head_lr_scale: 1.0,
        })
    }

    /// Sets the learning rate's factor for the MLM head's own parameters (`cls.predictions.*`;
    /// the decoder is tied to the word embeddings and keeps the encoder's rate): 1 by default,
    /// [`crate::TextConfig::fresh_head_lr_scale`] when adaptation starts from a checkpoint
    /// without an MLM head. Read by the trainer through [`PretextTask::lr_scale`].
    pub fn set_head_lr_scale(&mut self, scale: f64) {
        self.head_lr_scale = scale;
    }

    /// The encoder.
    pub fn bert(&self) -> &BertModel {
        &self.bert
    }

    /// Replaces the encoder's pooling settings (see [`BertModel::with_pooling`]).
    pub fn set_pooling(&mut self, pooling: Pooling, layer: Option<usize>) -> Result<()> {
        if let Some(l) = layer {
            if l > self.bert.cfg.num_hidden_layers {
                return Err(TextError::Config(format!(
                    "embedding layer {l} does not exist (the model has {} layers; 0 = embeddings)",
                    self.bert.cfg.num_hidden_layers
                )));
            }
        }
        self.bert.pooling = pooling;
        self.bert.layer = layer;
        Ok(())
    }

    /// The masking settings.
    pub fn masking(&self) -> &MaskingConfig {
        &self.masking
    }

    /// MLM logits (.., V) of hidden states (.., D): transform, then the tied decoder, with
    /// their products in `precision` (see [`ssl_core::nn::ops::matmul_t`]).
    pub fn mlm_logits(&self, hidden: &Tensor, precision: MatmulPrecision) -> Result<Tensor> {
        let h = self.mlm_transform(hidden, precision)?;
        let dims = h.dims().to_vec();
        let d = self.bert.cfg.hidden_size;
        let rows = h.elem_count() / d;
        let logits = add_broadcast(
            &matmul_t(&h.reshape((rows, d))?, &self.bert.word, precision)?,
            &self.bias,
        )?;
        let mut out = dims;
        if let Some(l) = out.last_mut() {
            *l = self.bert.cfg.vocab_size;
        }
        Ok(logits.reshape(out)?)
    }

    /// The MLM head's transform (dense, activation, layer norm) of hidden states (.., D).
    fn mlm_transform(&self, hidden: &Tensor, precision: MatmulPrecision) -> Result<Tensor> {
        let act = self.bert.cfg.activation()?;
        Ok(self
            .norm
            .forward(&act.forward(&self.dense.forward_with(hidden, precision)?)?)?)
    }

    /// Logits (B, T, V) for unmasked inputs (as `BertForMaskedLM.forward(...).logits`).
    pub fn logits(&self, input: &BertInput, ctx: &mut Ctx) -> Result<Tensor> {
        let (h, _) = self.bert.forward(input, ctx)?;
        self.mlm_logits(&h, ctx.precision)
    }

    /// Masks every sequence of `batch` with `rng`. When no position is selected in the whole
    /// batch (possible with token masking of very short texts), one random candidate is
    /// selected so the loss is defined; a batch without any candidate is an error.
    pub fn mask_batch(&self, batch: &TextBatch, rng: &mut ssl_core::SslRng) -> Result<MaskedBatch> {
        let vocab = MaskVocab {
            size: self.bert.cfg.vocab_size as u32,
            mask_id: self.mask_id,
        };
        let t = batch.max_len();
        let mut ids: Vec<Vec<u32>> = Vec::with_capacity(batch.len());
        let mut positions = Vec::new();
        let mut targets = Vec::new();
        for (r, s) in batch.seqs.iter().enumerate() {
            let m = mask_sequence(
                &MaskInput {
                    ids: &s.ids,
                    word_ids: &s.word_ids,
                    special: &s.special,
                    entities: &s.entities,
                },
                &self.masking,
                vocab,
                rng,
            )?;
            for (i, l) in m.labels.iter().enumerate() {
                if *l != IGNORE_INDEX {
                    positions.push((r * t + i) as u32);
                    targets.push(*l as u32);
                }
            }
            ids.push(m.input_ids);
        }
        if positions.is_empty() {
            let cands: Vec<(usize, usize)> = batch
                .seqs
                .iter()
                .enumerate()
                .flat_map(|(r, s)| {
                    s.special
                        .iter()
                        .enumerate()
                        .filter(|(_, sp)| !**sp)
                        .map(move |(i, _)| (r, i))
                })
                .collect();
            if cands.is_empty() {
                return Err(TextError::InvalidInput(
                    "the batch has no maskable token (every token is special or padding)".into(),
                ));
            }
            let (r, i) = cands[rng.below(cands.len())];
            positions.push((r * t + i) as u32);
            targets.push(batch.seqs[r].ids[i]);
            ids[r][i] = self.mask_id;
        }
        let refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
        Ok(MaskedBatch {
            input: batch.tensors_for(&refs)?,
            positions,
            targets,
        })
    }

    /// Loss, number of selected positions and correct predictions for a masked batch.
    pub fn masked_loss(&self, mb: &MaskedBatch, ctx: &mut Ctx) -> Result<(Tensor, usize, usize)> {
        // Only the masked positions' outputs are read: the last layer computes no others.
        let picked = self.bert.forward_rows(&mb.input, &mb.positions, ctx)?;
        let dev = picked.device();
        let targets = Tensor::from_vec(mb.targets.clone(), mb.targets.len(), dev)?;
        // The tied decoder and the loss as one op: the (positions, V) logits never enter
        // the graph.
        let (loss, pred) = linear_cross_entropy(
            &self.mlm_transform(&picked, ctx.precision)?,
            &self.bert.word,
            Some(&self.bias),
            &targets,
            ctx.precision,
            ctx.grad_sink.as_ref(),
        )?;
        let correct = pred.iter().zip(&mb.targets).filter(|(p, t)| p == t).count();
        Ok((loss, mb.targets.len(), correct))
    }
}

impl PretextTask for BertForMaskedLM {
    type Batch = TextBatch;

    fn params(&self) -> &ParamStore {
        &self.store
    }

    fn forward(&self, batch: &TextBatch, ctx: &mut Ctx) -> ssl_core::Result<TaskOutput> {
        let mb = self.mask_batch(batch, ctx.rng)?;
        let (loss, n, correct) = self.masked_loss(&mb, ctx)?;
        let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        Ok(TaskOutput {
            loss,
            weight: n as f64,
            metrics: vec![
                ("masked_accuracy".into(), correct as f64 / n as f64),
                ("perplexity".into(), l.exp()),
            ],
        })
    }

    fn embed(&self, batch: &TextBatch, ctx: &mut Ctx) -> ssl_core::Result<Tensor> {
        let input = batch.tensors()?;
        Ok(self.bert.encode(&input, ctx)?.pooled)
    }

    fn batch_len(&self, batch: &TextBatch) -> usize {
        batch.len()
    }

    fn lr_scale(&self, name: &str) -> f64 {
        if name.starts_with("cls.") {
            self.head_lr_scale
        } else {
            1.0
        }
    }
}

/// Held-out masked-LM figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MlmEval {
    /// Mean cross-entropy over the masked positions.
    pub loss: f64,
    /// exp(loss).
    pub perplexity: f64,
    /// Fraction of masked positions predicted exactly.
    pub masked_accuracy: f64,
    /// Masked positions evaluated.
    pub masked_tokens: usize,
}

/// Evaluates `model` on `seqs` in evaluation mode with masks drawn from `seed` (the same seed
/// gives the same masks, so two models are compared on identical positions).
pub fn evaluate_mlm(
    model: &BertForMaskedLM,
    seqs: &[crate::data::TokenizedSeq],
    batch_size: usize,
    pad_id: u32,
    seed: u64,
    device: &candle_core::Device,
) -> Result<MlmEval> {
    let mut acc = MlmAccum::new(batch_size, pad_id, seed, device);
    acc.add(model, seqs.to_vec())?;
    acc.finish(model)
}

/// [`evaluate_mlm`] over sequences that arrive in parts (a stream): sequences are evaluated in
/// batches of `batch_size` as they fill, with one masking RNG, so the figures are those of
/// [`evaluate_mlm`] on all the sequences in the order given.
pub struct MlmAccum {
    rng: ssl_core::SslRng,
    drop_rng: ssl_core::SslRng,
    batch_size: usize,
    pad_id: u32,
    device: candle_core::Device,
    pending: Vec<crate::data::TokenizedSeq>,
    sum: f64,
    n: usize,
    correct: usize,
}

impl MlmAccum {
    /// An empty accumulator (masks drawn from `seed`).
    pub fn new(batch_size: usize, pad_id: u32, seed: u64, device: &candle_core::Device) -> Self {
        MlmAccum {
            rng: ssl_core::SslRng::derived(seed, "mlm-eval"),
            drop_rng: ssl_core::SslRng::new(0),
            batch_size: batch_size.max(1),
            pad_id,
            device: device.clone(),
            pending: Vec::new(),
            sum: 0.0,
            n: 0,
            correct: 0,
        }
    }

    fn run(&mut self, model: &BertForMaskedLM, seqs: Vec<crate::data::TokenizedSeq>) -> Result<()> {
        let batch = TextBatch {
            seqs,
            pad_id: self.pad_id,
            device: self.device.clone(),
        };
        if batch.seqs.iter().all(|s| s.special.iter().all(|x| *x)) {
            return Ok(());
        }
        let mb = model.mask_batch(&batch, &mut self.rng)?;
        let (loss, k, c) = model.masked_loss(&mb, &mut Ctx::inference(&mut self.drop_rng))?;
        self.sum += loss.to_dtype(DType::F64)?.to_scalar::<f64>()? * k as f64;
        self.n += k;
        self.correct += c;
        Ok(())
    }

    /// Adds sequences, evaluating every full batch.
    pub fn add(
        &mut self,
        model: &BertForMaskedLM,
        seqs: Vec<crate::data::TokenizedSeq>,
    ) -> Result<()> {
        self.pending.extend(seqs);
        while self.pending.len() >= self.batch_size {
            let rest = self.pending.split_off(self.batch_size);
            let full = std::mem::replace(&mut self.pending, rest);
            self.run(model, full)?;
        }
        Ok(())
    }

    /// Evaluates the last, partial batch and returns the figures.
    pub fn finish(mut self, model: &BertForMaskedLM) -> Result<MlmEval> {
        let last = std::mem::take(&mut self.pending);
        if !last.is_empty() {
            self.run(model, last)?;
        }
        if self.n == 0 {
            return Err(TextError::InvalidInput(
                "no maskable token in the evaluation data".into(),
            ));
        }
        let loss = self.sum / self.n as f64;
        Ok(MlmEval {
            loss,
            perplexity: loss.exp(),
            masked_accuracy: self.correct as f64 / self.n as f64,
            masked_tokens: self.n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::TokenizedSeq;
    use candle_core::Device;
    use ssl_core::{LoopTrainer, SslRng, TrainConfig, Trainer};

    fn tiny(vocab: usize) -> BertConfig {
        BertConfig {
            vocab_size: vocab,
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 32,
            max_position_embeddings: 32,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            ..BertConfig::default()
        }
    }

    fn seq(ids: &[u32]) -> TokenizedSeq {
        let mut s = TokenizedSeq::default();
        s.ids.push(2);
        s.word_ids.push(None);
        s.special.push(true);
        for (k, &i) in ids.iter().enumerate() {
            s.ids.push(i);
            s.word_ids.push(Some(k as u32));
            s.special.push(false);
        }
        s.ids.push(3);
        s.word_ids.push(None);
        s.special.push(true);
        s
    }

    /// A CPU batch of [`seq`]s, padded with id 0.
    fn batch(seqs: &[&[u32]]) -> TextBatch {
        TextBatch {
            seqs: seqs.iter().map(|ids| seq(ids)).collect(),
            pad_id: 0,
            device: Device::Cpu,
        }
    }

    /// The tiny MLM model with half the tokens masked.
    fn half_masked(store: &ParamStore) -> BertForMaskedLM {
        let masking = MaskingConfig {
            mask_prob: 0.5,
            ..Default::default()
        };
        BertForMaskedLM::new(&tiny(40), masking, 4, &store.builder(0)).unwrap()
    }

    /// MLM whose masks depend on each sequence alone (seeded by its ids), so one process on a
    /// batch and two ranks on its halves draw the same masks.
    struct RowSeeded(BertForMaskedLM);

    impl PretextTask for RowSeeded {
        type Batch = TextBatch;
        fn params(&self) -> &ParamStore {
            &self.0.store
        }
        fn forward(&self, batch: &TextBatch, ctx: &mut Ctx) -> ssl_core::Result<TaskOutput> {
            let mut sum: Option<Tensor> = None;
            let mut count = 0usize;
            for s in &batch.seqs {
                let one = TextBatch {
                    seqs: vec![s.clone()],
                    pad_id: batch.pad_id,
                    device: batch.device.clone(),
                };
                let seed = s.ids.iter().fold(7u64, |h, &i| h * 31 + u64::from(i));
                let mb = self.0.mask_batch(&one, &mut SslRng::new(seed))?;
                let (loss, n, _) = self.0.masked_loss(&mb, ctx)?;
                let part = (loss * n as f64)?;
                sum = Some(match sum {
                    Some(t) => (t + part)?,
                    None => part,
                });
                count += n;
            }
            let loss = (sum.expect("non-empty batch") / count as f64)?;
            Ok(TaskOutput {
                loss,
                weight: count as f64,
                metrics: Vec::new(),
            })
        }
        fn embed(&self, batch: &TextBatch, ctx: &mut Ctx) -> ssl_core::Result<Tensor> {
            self.0.embed(batch, ctx)
        }
        fn batch_len(&self, batch: &TextBatch) -> usize {
            batch.len()
        }
    }

    #[test]
    fn two_ranks_train_mlm_like_one_process_on_the_combined_batch() {
        use crate::data::InMemoryTextSource;
        use ssl_core::{Collective, ThreadGroup};
        let seqs: Vec<TokenizedSeq> = (0..16u32)
            .map(|i| {
                seq(&(0..3 + i % 5)
                    .map(|k| 5 + (i * 7 + k * 3) % 35)
                    .collect::<Vec<_>>())
            })
            .collect();
        let cfg = BertConfig {
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            ..tiny(40)
        };
        let masking = MaskingConfig {
            mask_prob: 0.3,
            ..Default::default()
        };
        // Large eps: Adam's update is then proportional to the gradient (see ssl-core's
        // tests/distributed.rs), so the comparison measures the gradients.
        let train = TrainConfig {
            max_steps: 6,
            batch_size: 8,
            lr: 0.05,
            eps: 1.0,
            warmup_steps: 0,
            health_every: 0,
            ..TrainConfig::default()
        };
        let run = |data: Vec<TokenizedSeq>, batch: usize, c: Option<ThreadGroup>, seed: u64| {
            let store = ParamStore::new(&Device::Cpu);
            let task =
                RowSeeded(BertForMaskedLM::new(&cfg, masking, 4, &store.builder(seed)).unwrap());
            let mut src = InMemoryTextSource::new(data, batch, 0, false, 0, &Device::Cpu).unwrap();
            let mut t = LoopTrainer::new(train.clone(), None).unwrap();
            if let Some(c) = c {
                t = t.collective(Box::new(c));
            }
            t.fit(&task, &mut src, None).unwrap();
            store
                .vars()
                .into_iter()
                .flat_map(|(_, v)| {
                    v.as_tensor()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
                .collect::<Vec<f32>>()
        };
        let one = run(seqs.clone(), 8, None, 0);
        let ranks: Vec<Vec<f32>> = std::thread::scope(|sc| {
            let hs: Vec<_> = ThreadGroup::new(2)
                .into_iter()
                .map(|c| {
                    // Rank r: the r-th half of every combined batch of 8; rank 1 starts from
                    // other weights, which the broadcast replaces.
                    let r = c.rank();
                    let mine: Vec<TokenizedSeq> = seqs
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| (i % 8) / 4 == r)
                        .map(|(_, s)| s.clone())
                        .collect();
                    let run = &run;
                    sc.spawn(move || run(mine, 4, Some(c), r as u64 * 9))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(ranks[0], ranks[1], "ranks ended with different parameters");
        let scale = one.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = one
            .iter()
            .zip(&ranks[0])
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        assert!(diff < 1e-6, "2 ranks vs 1 process: {diff}");
        let store = ParamStore::new(&Device::Cpu);
        BertForMaskedLM::new(&cfg, masking, 4, &store.builder(0)).unwrap();
        let moved = store
            .vars()
            .into_iter()
            .flat_map(|(_, v)| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .zip(&one)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        assert!(
            moved > 1e-3,
            "training hardly moved the parameters ({moved})"
        );
    }

    #[test]
    fn key_names_are_hugging_face_bert_for_masked_lm() {
        let store = ParamStore::new(&Device::Cpu);
        BertForMaskedLM::new(&tiny(40), MaskingConfig::default(), 4, &store.builder(0)).unwrap();
        let names: Vec<String> = store.vars().into_iter().map(|(n, _)| n).collect();
        for k in [
            "bert.embeddings.word_embeddings.weight",
            "bert.embeddings.position_embeddings.weight",
            "bert.embeddings.token_type_embeddings.weight",
            "bert.embeddings.LayerNorm.weight",
            "bert.encoder.layer.0.attention.self.query.weight",
            "bert.encoder.layer.1.output.LayerNorm.bias",
            "cls.predictions.transform.dense.weight",
            "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.bias",
        ] {
            assert!(names.contains(&k.to_string()), "missing {k}");
        }
        // 5 embedding tensors + 16 per layer + 5 head tensors.
        assert_eq!(names.len(), 5 + 16 * 2 + 5);
        let pad = store.get("bert.embeddings.word_embeddings.weight").unwrap();
        assert!(pad
            .as_tensor()
            .get(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|x| *x == 0.0));
        assert!(BertConfig::preset("huge", 10).is_err());
        assert_eq!(
            BertConfig::preset("mini", 10).unwrap().num_attention_heads,
            4
        );
    }

    #[test]
    fn every_trainable_variable_gets_a_gradient() {
        let store = ParamStore::new(&Device::Cpu);
        let model = half_masked(&store);
        let batch = batch(&[&[10, 11, 12, 13, 14, 15], &[20, 21, 22]]);
        let mut rng = SslRng::new(3);
        let out = model.forward(&batch, &mut Ctx::train(&mut rng)).unwrap();
        assert!(out.weight >= 1.0);
        let grads = out.loss.backward().unwrap();
        for (name, var) in store.vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"));
            let n = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(n > 0.0, "{name}: zero gradient");
        }
    }

    /// The trainer's path (`forward_backward`: the fused ops' parameter gradients through a
    /// sink, the stack's packed mailbox and the tied word table's one cell) gives every
    /// variable the plain graph's gradient.
    #[test]
    fn the_sinks_gradients_equal_the_graphs() {
        let store = ParamStore::new(&Device::Cpu);
        let model = half_masked(&store);
        // Repeated ids: the word table's rows sum several tokens and the decoder's share.
        let batch = batch(&[&[10, 11, 10, 13, 11, 15], &[20, 10, 22]]);
        let mut rng = SslRng::new(3);
        let out = model.forward(&batch, &mut Ctx::train(&mut rng)).unwrap();
        let plain = (&out.loss * out.weight).unwrap().backward().unwrap();
        let mut rng = SslRng::new(3);
        let (_, sunk) = model
            .forward_backward(&batch, &mut Ctx::train(&mut rng))
            .unwrap();
        for (name, var) in store.vars() {
            let (a, b) = (plain.get(var.as_tensor()), sunk.get(var.as_tensor()));
            let (Some(a), Some(b)) = (a, b) else {
                panic!("{name}: a gradient on one path only");
            };
            let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
            let scale = a.abs().unwrap().max_all().unwrap();
            let (diff, scale) = (
                diff.to_scalar::<f32>().unwrap(),
                scale.to_scalar::<f32>().unwrap(),
            );
            assert!(diff <= 1e-6 * (1.0 + scale), "{name}: {diff} (of {scale})");
        }
    }

    #[test]
    fn padding_does_not_change_real_tokens_and_dropout_works() {
        let store = ParamStore::new(&Device::Cpu);
        let model = BertForMaskedLM::new(&tiny(40), MaskingConfig::default(), 4, &store.builder(1))
            .unwrap();
        let short = batch(&[&[10, 11]]);
        let both = batch(&[&[10, 11], &[12, 13, 14, 15, 16]]);
        let mut rng = SslRng::new(0);
        let a = model
            .logits(&short.tensors().unwrap(), &mut Ctx::eval(&mut rng))
            .unwrap();
        let b = model
            .logits(&both.tensors().unwrap(), &mut Ctx::eval(&mut rng))
            .unwrap();
        let a = a
            .get(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = b
            .get(0)
            .unwrap()
            .narrow(0, 0, 4)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let diff = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-4, "padding changed logits by {diff}");
        // Dropout: two training passes differ, two eval passes agree.
        let inp = both.tensors().unwrap();
        let t1 = model.logits(&inp, &mut Ctx::train(&mut rng)).unwrap();
        let t2 = model.logits(&inp, &mut Ctx::train(&mut rng)).unwrap();
        let d = (t1 - t2)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d > 1e-4, "dropout is a no-op");
        let e1 = model.logits(&inp, &mut Ctx::eval(&mut rng)).unwrap();
        let e2 = model.logits(&inp, &mut Ctx::eval(&mut rng)).unwrap();
        assert_eq!(
            e1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            e2.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    #[test]
    fn encoder_pooling_and_layers() {
        let store = ParamStore::new(&Device::Cpu);
        let model = BertModel::new(&tiny(40), &store.builder(0)).unwrap();
        let batch = batch(&[&[10, 11], &[12, 13, 14, 15]]);
        let inp = batch.tensors().unwrap();
        let mut rng = SslRng::new(0);
        let out = model.encode(&inp, &mut Ctx::eval(&mut rng)).unwrap();
        assert_eq!(out.pooled.dims(), &[2, 16]);
        assert!(out.hidden_states.is_empty());
        // Mean pooling ignores padding: row 0 equals the mean of its 4 real tokens.
        let t0 = out
            .tokens
            .get(0)
            .unwrap()
            .narrow(0, 0, 4)
            .unwrap()
            .mean(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let p0 = out.pooled.get(0).unwrap().to_vec1::<f32>().unwrap();
        assert!(t0.iter().zip(&p0).all(|(a, b)| (a - b).abs() < 1e-5));
        let cls = model.with_pooling(Pooling::Cls, Some(0)).unwrap();
        let out0 = cls.encode(&inp, &mut Ctx::eval(&mut rng)).unwrap();
        assert_eq!(out0.pooled.dims(), &[2, 16]);
        assert!(cls.with_pooling(Pooling::Cls, Some(3)).is_err());
    }

    #[test]
    fn loss_falls_on_a_tiny_corpus() {
        let store = ParamStore::new(&Device::Cpu);
        let cfg = BertConfig {
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            ..tiny(30)
        };
        let model =
            BertForMaskedLM::new(&cfg, MaskingConfig::default(), 4, &store.builder(0)).unwrap();
        // Deterministic patterns: the next token is the previous + 1 (mod 20) + 5.
        let seqs: Vec<TokenizedSeq> = (0..32)
            .map(|s| {
                seq(&(0..12)
                    .map(|k| 5 + ((s + k) % 20) as u32)
                    .collect::<Vec<_>>())
            })
            .collect();
        let eval =
            |m: &BertForMaskedLM| evaluate_mlm(m, &seqs, 16, 0, 7, &Device::Cpu).unwrap().loss;
        let before = eval(&model);
        let mut src =
            crate::data::InMemoryTextSource::new(seqs.clone(), 16, 0, true, 0, &Device::Cpu)
                .unwrap();
        let train = TrainConfig {
            max_steps: 400,
            lr: 5e-3,
            warmup_steps: 5,
            checkpoint_every_steps: 0,
            checkpoint_every_minutes: 0.0,
            health_every: 0,
            log_every: 1000,
            ..Default::default()
        };
        let report = LoopTrainer::new(train, None)
            .unwrap()
            .fit(&model, &mut src, None)
            .unwrap();
        assert!(
            report.params_without_grad.is_empty(),
            "{:?}",
            report.params_without_grad
        );
        let after = eval(&model);
        assert!(after < 0.6 * before, "held-out loss {before} -> {after}");
    }
}
