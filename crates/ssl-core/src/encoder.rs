//! The `Encoder` trait: one modality's batch in, embeddings out.

use candle_core::Tensor;

use crate::{Ctx, Result};

/// What an encoder produces for a batch.
#[derive(Debug, Clone)]
pub struct EncoderOutput {
    /// Per-token / patch / timestep embeddings (B, N, D).
    pub tokens: Tensor,
    /// One embedding per example (B, D), pooled as the encoder is configured (mean, class token).
    pub pooled: Tensor,
    /// Every layer's hidden state (input first) when the context asked for them, else empty.
    pub hidden_states: Vec<Tensor>,
}

/// Maps a batch of one modality to embeddings.
///
/// Every backbone (BERT, ViT, series encoders, CLIP towers) implements it, so embedding
/// extraction, health monitoring and the probes work on any of them.
pub trait Encoder {
    /// The batch type the encoder reads.
    type Input;

    /// Encodes a batch. Random choices (dropout) draw from `ctx.rng`.
    fn encode(&self, input: &Self::Input, ctx: &mut Ctx) -> Result<EncoderOutput>;

    /// The embedding width D.
    fn dim(&self) -> usize;
}
