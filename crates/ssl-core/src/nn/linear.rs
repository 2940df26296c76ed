//! A fully connected layer with Hugging Face key names (`weight` (out, in), `bias`).

use candle_core::Tensor;

use super::ops::matmul_t;
use super::MatmulPrecision;
use crate::{Init, ParamBuilder, Result};

/// `y = x W^T + b` over the last dimension of any-rank input.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// A layer `in_dim -> out_dim` with weights from `init` and zero bias.
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        init: Init,
        pb: &ParamBuilder,
    ) -> Result<Self> {
        let weight = pb.get("weight", (out_dim, in_dim), init)?;
        let bias = if bias {
            Some(pb.get("bias", out_dim, Init::Zeros)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// PyTorch's default `nn.Linear` initialisation: uniform in `±1/sqrt(in_dim)` for weight and bias.
    pub fn torch_default(in_dim: usize, out_dim: usize, pb: &ParamBuilder) -> Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let weight = pb.get("weight", (out_dim, in_dim), Init::Uniform(bound))?;
        let bias = Some(pb.get("bias", out_dim, Init::Uniform(bound))?);
        Ok(Linear { weight, bias })
    }

    /// The weight, shape (out, in).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, shape (out,), when the layer has one.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Applies the layer to `x` (.., in) giving (.., out), in f32.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, MatmulPrecision::F32)
    }

    /// [`Linear::forward`] with the product in `precision` (see [`super::ops::matmul_t`]).
    pub fn forward_with(&self, x: &Tensor, precision: MatmulPrecision) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / in_dim.max(1);
        let x2 = x.reshape((rows, in_dim))?;
        let mut y = matmul_t(&x2, &self.weight, precision)?;
        if let Some(b) = &self.bias {
            y = super::ops::add_broadcast(&y, b)?;
        }
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = self.weight.dim(0)?;
        }
        Ok(y.reshape(out_dims)?)
    }
}
