//! The selectable series encoder: one configuration, one type implementing `Encoder`, so
//! tasks, the CLI and the probes work on any of them.

use serde::{Deserialize, Serialize};
use ssl_core::nn::TransformerConfig;
use ssl_core::seq::{SeqBatch, SeqEncoderConfig, SeqTransformerEncoder};
use ssl_core::{Ctx, Encoder, EncoderOutput, ParamBuilder, Result};

use crate::patchtst::{PatchTstConfig, PatchTstEncoder};
use crate::rnn::{RnnCell, RnnConfig, RnnEncoder};
use crate::tcn::{TcnConfig, TcnEncoder};

/// Which encoder.
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EncoderKind {
    /// PatchTST: patches, channel independence, transformer.
    Patchtst,
    /// TS2Vec's dilated convolutions.
    Tcn,
    /// A GRU.
    Gru,
    /// An LSTM.
    Lstm,
    /// ssl-core's per-timestep transformer (channels mixed in the input projection).
    Transformer,
}

/// `[model]`: the encoder and the settings of each kind (only the chosen one is used).
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncoderConfig {
    /// The encoder.
    pub kind: EncoderKind,
    /// PatchTST settings.
    pub patchtst: PatchTstConfig,
    /// Dilated-convolution settings.
    pub tcn: TcnConfig,
    /// GRU / LSTM settings.
    pub rnn: RnnConfig,
    /// Per-timestep transformer settings.
    pub transformer: TransformerConfig,
}

impl EncoderConfig {
    /// A coarse size, in bytes, of the activations one series of `steps` steps and
    /// `channels` channels keeps for the backward pass: the transformer's (PatchTST per
    /// channel over its patches, quadratic in their number), or `steps x hidden x layers`
    /// values (times 8: gates, residuals, gradients) for TCN and the recurrent encoders.
    pub fn activation_bytes(&self, steps: u64, channels: u64) -> u64 {
        use ssl_core::memory::{product_bytes, transformer_activation_bytes};
        match self.kind {
            EncoderKind::Patchtst => {
                let p = &self.patchtst;
                let patches = crate::patchtst::num_patches(
                    usize::try_from(steps).unwrap_or(usize::MAX),
                    p.patch_len.max(1),
                    p.stride.max(1),
                ) as u64;
                product_bytes(&[
                    channels.max(1),
                    transformer_activation_bytes(&p.transformer, patches),
                ])
            }
            EncoderKind::Transformer => transformer_activation_bytes(&self.transformer, steps),
            EncoderKind::Tcn => {
                let t = &self.tcn;
                product_bytes(&[steps, t.hidden.max(t.output) as u64, t.depth as u64, 8, 4])
            }
            EncoderKind::Gru | EncoderKind::Lstm => {
                let r = &self.rnn;
                product_bytes(&[steps, r.hidden as u64, r.layers as u64, 8, 4])
            }
        }
    }
}

impl Default for EncoderConfig {
    fn default() -> Self {
        EncoderConfig {
            kind: EncoderKind::Tcn,
            patchtst: PatchTstConfig::default(),
            tcn: TcnConfig::default(),
            rnn: RnnConfig::default(),
            transformer: TransformerConfig::default(),
        }
    }
}

/// Any of the series encoders.
pub enum SeriesEncoder {
    /// PatchTST.
    PatchTst(PatchTstEncoder),
    /// Dilated convolutions.
    Tcn(TcnEncoder),
    /// GRU or LSTM.
    Rnn(RnnEncoder),
    /// Per-timestep transformer.
    Transformer(SeqTransformerEncoder),
}

impl SeriesEncoder {
    /// Builds the configured encoder for `channels` channels under `pb`.
    pub fn new(cfg: &EncoderConfig, channels: usize, pb: &ParamBuilder) -> Result<Self> {
        Ok(match cfg.kind {
            EncoderKind::Patchtst => {
                SeriesEncoder::PatchTst(PatchTstEncoder::new(&cfg.patchtst, channels, pb)?)
            }
            EncoderKind::Tcn => SeriesEncoder::Tcn(TcnEncoder::new(&cfg.tcn, channels, pb)?),
            EncoderKind::Gru => {
                SeriesEncoder::Rnn(RnnEncoder::new(&cfg.rnn, RnnCell::Gru, channels, pb)?)
            }
            EncoderKind::Lstm => {
                SeriesEncoder::Rnn(RnnEncoder::new(&cfg.rnn, RnnCell::Lstm, channels, pb)?)
            }
            EncoderKind::Transformer => SeriesEncoder::Transformer(SeqTransformerEncoder::new(
                &SeqEncoderConfig {
                    features: channels,
                    transformer: cfg.transformer.clone(),
                },
                pb,
            )?),
        })
    }

    /// True when tokens are one per timestep (every kind but PatchTST), as the TS2Vec task
    /// and per-timestep masking need.
    pub fn per_timestep(&self) -> bool {
        !matches!(self, SeriesEncoder::PatchTst(_))
    }
}

impl Encoder for SeriesEncoder {
    type Input = SeqBatch;

    fn encode(&self, input: &SeqBatch, ctx: &mut Ctx) -> Result<EncoderOutput> {
        match self {
            SeriesEncoder::PatchTst(e) => e.encode(input, ctx),
            SeriesEncoder::Tcn(e) => e.encode(input, ctx),
            SeriesEncoder::Rnn(e) => e.encode(input, ctx),
            SeriesEncoder::Transformer(e) => e.encode(input, ctx),
        }
    }

    fn dim(&self) -> usize {
        match self {
            SeriesEncoder::PatchTst(e) => e.dim(),
            SeriesEncoder::Tcn(e) => e.dim(),
            SeriesEncoder::Rnn(e) => e.dim(),
            SeriesEncoder::Transformer(e) => e.dim(),
        }
    }
}
