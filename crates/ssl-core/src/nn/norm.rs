//! Layer normalisation with learnable scale and shift (`weight`, `bias`).

use candle_core::Tensor;

use crate::nn::ops::{layer_norm, layer_norm_composite};
use crate::{Init, ParamBuilder, Result};

/// Layer normalisation over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// A layer norm over `dim` features (weight 1, bias 0).
    pub fn new(dim: usize, eps: f64, pb: &ParamBuilder) -> Result<Self> {
        Ok(LayerNorm {
            weight: pb.get("weight", dim, Init::Ones)?,
            bias: pb.get("bias", dim, Init::Zeros)?,
            eps,
        })
    }

    /// The scale, shape (dim,).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The shift, shape (dim,).
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// The epsilon added to the variance.
    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Normalises `x` over its last dimension (one fused op for f32 on the CPU, see
    /// [`layer_norm`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }

    /// [`LayerNorm::forward`] from composite candle ops on every device: the reference
    /// transformer stack's path, kept independent of the fused kernels it checks.
    pub fn forward_composite(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm_composite(x, &self.weight, &self.bias, self.eps)
    }
}
