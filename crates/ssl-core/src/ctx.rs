//! The context a forward pass runs in.

use crate::nn::MatmulPrecision;
use crate::SslRng;

/// Training or evaluation mode plus the random stream for dropout, masks and augmentations.
///
/// Everything random in a forward pass draws from `rng`, which the trainer saves in every
/// checkpoint, so a resumed run repeats the uninterrupted run exactly.
pub struct Ctx<'a> {
    /// Training mode: dropout active, augmentations random.
    pub train: bool,
    /// Ask encoders for every layer's hidden state (for "embeddings from layer k").
    pub output_hidden_states: bool,
    /// The random stream.
    pub rng: &'a mut SslRng,
    /// Precision of the fused CPU stack's linear-layer products (f32 unless asked).
    pub precision: MatmulPrecision,
    /// Whether a backward pass may run through this forward pass. When false (embedding
    /// extraction, the first pass of gradient caching) the fused CPU stack keeps none of the
    /// activations backward needs, writes less memory and frees its buffers layer by layer;
    /// a backward pass through its output is then an error.
    pub backward: bool,
}

impl<'a> Ctx<'a> {
    /// A training-mode context.
    pub fn train(rng: &'a mut SslRng) -> Self {
        Ctx {
            train: true,
            output_hidden_states: false,
            rng,
            precision: MatmulPrecision::F32,
            backward: true,
        }
    }

    /// An evaluation-mode context (no dropout); gradients may still be taken through it.
    pub fn eval(rng: &'a mut SslRng) -> Self {
        Ctx {
            train: false,
            output_hidden_states: false,
            rng,
            precision: MatmulPrecision::F32,
            backward: true,
        }
    }

    /// An evaluation-mode context with no backward pass to follow (embeddings, scores): the
    /// fused stack keeps no activations for one (see [`Ctx::backward`]).
    pub fn inference(rng: &'a mut SslRng) -> Self {
        Ctx {
            backward: false,
            ..Ctx::eval(rng)
        }
    }

    /// The same context, with the stack's products in `precision`.
    pub fn with_precision(mut self, precision: MatmulPrecision) -> Self {
        self.precision = precision;
        self
    }

    /// The same context, asking for every layer's hidden state.
    pub fn with_hidden_states(mut self) -> Self {
        self.output_hidden_states = true;
        self
    }
}
