//! Neural-network building blocks whose gradients are known to flow (see DESIGN.md).

mod linear;
mod norm;
pub mod ops;
mod precision;
mod transformer;

pub use linear::Linear;
pub use norm::LayerNorm;
pub use ops::Activation;
#[doc(hidden)]
pub use precision::bf16_product_seconds;
pub use precision::{bf16_matmul_available, MatmulPrecision};
pub use transformer::{
    NormPlacement, StackInit, StackKernel, StackOutput, TransformerConfig, TransformerStack,
};
