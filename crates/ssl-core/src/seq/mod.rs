//! The generic framework on numeric feature sequences `(batch, seq, features)`: masked feature
//! prediction, contrastive views with NT-Xent, and denoising reconstruction, each on any
//! [`crate::Encoder`] of [`SeqBatch`]es, plus a transformer encoder for them.

pub mod augment;
mod batch;
mod contrastive;
mod denoise;
mod encoder;
mod masked;

pub use augment::SeqAugmentConfig;
pub use batch::{InMemorySeqSource, SeqBatch, SeqCursor, SeqExample};
pub use contrastive::{ContrastiveConfig, ContrastiveTask};
pub use denoise::{DenoisingConfig, DenoisingTask};
pub use encoder::{sincos_positions, SeqEncoderConfig, SeqTransformerEncoder};
pub use masked::{MaskedFeatureConfig, MaskedFeatureTask};
