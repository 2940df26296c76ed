//! The one transformer stack every modality shares (BERT, ViT/MAE, series transformer, CLIP).
//!
//! Its interface is the whole stack: tokens `(B, T, D)` and an optional key-padding mask
//! `(B, T)` (1 = attend, 0 = padding) in, `(B, T, D)` out, with every layer's hidden state on
//! request. Modalities own what surrounds it (embeddings, patching, masking, heads, losses) and
//! never reach into its layers, so the stack's implementation can change underneath them.
//!
//! Key names follow Hugging Face under `layer.{i}.`: post-norm layers use BERT's names
//! (`attention.self.query`, `attention.output.dense`, `attention.output.LayerNorm`,
//! `intermediate.dense`, `output.dense`, `output.LayerNorm`); pre-norm layers use ViT's
//! (`layernorm_before`, `attention.attention.query`, `attention.output.dense`,
//! `layernorm_after`, `intermediate.dense`, `output.dense`).

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use ssl_kernels::{Act, BufferPool, FusedSpec, StackOp};

use crate::nn::ops::{cpu_f32_view, dropout, matmul, softmax_last_dim, Activation};
use crate::nn::{LayerNorm, Linear, MatmulPrecision};
use crate::{CoreError, Ctx, Init, ParamBuilder, Result};

// Where the layer norms sit: defined with the kernels (the fused stack needs it), kept here
// at its old path.
pub use ssl_kernels::NormPlacement;

/// Weight initialisation of the stack's linear layers.
#[derive(schemars::JsonSchema, Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StackInit {
    /// Normal with this standard deviation (BERT: 0.02).
    Normal(f64),
    /// Xavier uniform (MAE, ViT).
    #[default]
    XavierUniform,
}

/// Configuration of a [`TransformerStack`].
#[derive(schemars::JsonSchema, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransformerConfig {
    /// Model width D.
    pub dim: usize,
    /// Number of layers.
    pub depth: usize,
    /// Attention heads (must divide `dim`).
    pub heads: usize,
    /// Hidden width of the feed-forward block.
    pub mlp_dim: usize,
    /// Pre- or post-norm.
    pub norm: NormPlacement,
    /// Feed-forward activation.
    pub activation: Activation,
    /// Dropout on attention output and feed-forward output (BERT's hidden_dropout_prob).
    pub dropout: f32,
    /// Dropout on attention probabilities.
    pub attn_dropout: f32,
    /// Layer-norm epsilon (BERT 1e-12, ViT 1e-6).
    pub layer_norm_eps: f64,
    /// Causal (autoregressive) attention.
    pub causal: bool,
    /// Linear-layer initialisation.
    pub init: StackInit,
}

impl Default for TransformerConfig {
    fn default() -> Self {
        TransformerConfig {
            dim: 64,
            depth: 2,
            heads: 4,
            mlp_dim: 256,
            norm: NormPlacement::Pre,
            activation: Activation::GeluErf,
            dropout: 0.0,
            attn_dropout: 0.0,
            layer_norm_eps: 1e-6,
            causal: false,
            init: StackInit::XavierUniform,
        }
    }
}

impl TransformerConfig {
    /// Checks that the configuration is usable.
    pub fn validate(&self) -> Result<()> {
        if self.dim == 0 || self.depth == 0 || self.heads == 0 || self.mlp_dim == 0 {
            return Err(CoreError::Config(format!(
                "transformer dim ({}), depth ({}), heads ({}) and mlp_dim ({}) must be positive",
                self.dim, self.depth, self.heads, self.mlp_dim
            )));
        }
        if !self.dim.is_multiple_of(self.heads) {
            return Err(CoreError::Config(format!(
                "transformer dim {} is not divisible by heads {}",
                self.dim, self.heads
            )));
        }
        for (name, p) in [
            ("dropout", self.dropout),
            ("attn_dropout", self.attn_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(CoreError::Config(format!("{name} = {p} must be in [0, 1)")));
            }
        }
        Ok(())
    }
}

/// Which implementation of the stack runs.
///
/// Both compute the same function with the same parameters. `Fused` runs every layer's
/// forward and backward as one candle custom op on flat buffers (CPU, f32 only; several times
/// faster); `Reference` composes candle ops (any device and dtype; the GPU path, where its
/// softmax and layer norms are candle's fused kernels inside ops of ours with a backward, and
/// `MatmulPrecision::Bf16` gives its products bf16 operands). With dropout the two draw
/// different (equally distributed) masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StackKernel {
    /// `Fused` for f32 input on the CPU, `Reference` otherwise. The environment variable
    /// `SSL_STACK_KERNEL` (`auto`, `fused`, `reference`) overrides it for every stack.
    #[default]
    Auto,
    /// The fused CPU op (falls back to `Reference` off the CPU or for non-f32 input).
    Fused,
    /// The composite candle-op implementation.
    Reference,
}

impl StackKernel {
    /// Reads `SSL_STACK_KERNEL`; `Auto` when unset (also the choice of the other fused ops
    /// that keep a composite reference, such as the time-series TCN and TS2Vec loss).
    pub fn from_env() -> Result<Self> {
        match std::env::var("SSL_STACK_KERNEL") {
            Err(_) => Ok(StackKernel::Auto),
            Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
                "" | "auto" => Ok(StackKernel::Auto),
                "fused" => Ok(StackKernel::Fused),
                "reference" => Ok(StackKernel::Reference),
                other => Err(CoreError::Config(format!(
                    "SSL_STACK_KERNEL = {other:?}: expected auto, fused or reference"
                ))),
            },
        }
    }
}

/// Output of [`TransformerStack::forward`].
#[derive(Debug, Clone)]
pub struct StackOutput {
    /// The last layer's output (B, T, D).
    pub last: Tensor,
    /// When requested: the input followed by every layer's output (`depth + 1` tensors).
    pub hidden_states: Vec<Tensor>,
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    norm_attn: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    norm_mlp: LayerNorm,
}

/// A stack of transformer layers (see the module documentation).
pub struct TransformerStack {
    cfg: TransformerConfig,
    layers: Vec<Layer>,
    kernel: StackKernel,
    /// Buffers the fused op reuses from step to step.
    pool: BufferPool,
}

impl TransformerStack {
    /// Creates the stack's parameters under `pb` (keys `layer.{i}....`).
    pub fn new(cfg: &TransformerConfig, pb: &ParamBuilder) -> Result<Self> {
        cfg.validate()?;
        let init = match cfg.init {
            StackInit::Normal(std) => Init::Normal(std),
            StackInit::XavierUniform => Init::XavierUniform,
        };
        let d = cfg.dim;
        let mut layers = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let lp = pb.pp(format!("layer.{i}"));
            let (qkv, norm_attn, norm_mlp) = match cfg.norm {
                NormPlacement::Post => (
                    lp.pp("attention.self"),
                    "attention.output.LayerNorm",
                    "output.LayerNorm",
                ),
                NormPlacement::Pre => (
                    lp.pp("attention.attention"),
                    "layernorm_before",
                    "layernorm_after",
                ),
            };
            layers.push(Layer {
                query: Linear::new(d, d, true, init, &qkv.pp("query"))?,
                key: Linear::new(d, d, true, init, &qkv.pp("key"))?,
                value: Linear::new(d, d, true, init, &qkv.pp("value"))?,
                attn_out: Linear::new(d, d, true, init, &lp.pp("attention.output.dense"))?,
                norm_attn: LayerNorm::new(d, cfg.layer_norm_eps, &lp.pp(norm_attn))?,
                fc1: Linear::new(d, cfg.mlp_dim, true, init, &lp.pp("intermediate.dense"))?,
                fc2: Linear::new(cfg.mlp_dim, d, true, init, &lp.pp("output.dense"))?,
                norm_mlp: LayerNorm::new(d, cfg.layer_norm_eps, &lp.pp(norm_mlp))?,
            });
        }
        Ok(TransformerStack {
            cfg: cfg.clone(),
            layers,
            kernel: StackKernel::from_env()?,
            pool: BufferPool::default(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    /// Chooses the implementation (see [`StackKernel`]); the default comes from
    /// `SSL_STACK_KERNEL`, else `Auto`.
    pub fn set_kernel(&mut self, kernel: StackKernel) {
        self.kernel = kernel;
    }

    /// The implementation chosen by [`Self::set_kernel`] or the environment.
    pub fn kernel(&self) -> StackKernel {
        self.kernel
    }

    /// Whether `x` runs through the fused op.
    fn runs_fused(&self, x: &Tensor) -> bool {
        self.kernel != StackKernel::Reference
            && matches!(x.device(), Device::Cpu)
            && x.dtype() == DType::F32
    }

    /// `x`'s (B, T, D), or an error naming the width when D is not the stack's.
    fn input_dims(&self, x: &Tensor) -> Result<(usize, usize, usize)> {
        let (b, t, d) = x.dims3()?;
        if d != self.cfg.dim {
            return Err(CoreError::InvalidInput(format!(
                "transformer input has width {d}, the stack expects {}",
                self.cfg.dim
            )));
        }
        Ok((b, t, d))
    }

    /// Runs the stack on `x` (B, T, D) with an optional key-padding mask (B, T), 1 = real token.
    pub fn forward(
        &self,
        x: &Tensor,
        padding_mask: Option<&Tensor>,
        ctx: &mut Ctx,
    ) -> Result<StackOutput> {
        let (b, t, _) = self.input_dims(x)?;
        if self.runs_fused(x) {
            return self.forward_fused(x, padding_mask, ctx);
        }
        let bias = self.attention_bias(b, t, padding_mask, x)?;
        let mut hidden = Vec::new();
        if ctx.output_hidden_states {
            hidden.push(x.clone());
        }
        let mut h = x.clone();
        for layer in &self.layers {
            h = self.layer_forward(layer, &h, bias.as_ref(), ctx)?;
            if ctx.output_hidden_states {
                hidden.push(h.clone());
            }
        }
        Ok(StackOutput {
            last: h,
            hidden_states: hidden,
        })
    }

    /// The last layer's output at `rows` only (indices into the B x T rows, any order), as
    /// (rows, D): what [`Self::forward`]'s last output gives at those rows (up to f32
    /// rounding), for a loss that reads nothing else (MLM's masked positions). On the fused
    /// path the last layer then runs its queries, output projection, norms and MLP on those
    /// rows alone (keys and values still on every row): at 15% of the rows it costs about a
    /// third of a full layer. Elsewhere (the reference path, causal stacks, repeated rows)
    /// the full output is gathered.
    pub fn forward_rows(
        &self,
        x: &Tensor,
        padding_mask: Option<&Tensor>,
        rows: &[u32],
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        let (b, t, d) = self.input_dims(x)?;
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= b * t) {
            return Err(CoreError::InvalidInput(format!(
                "row {r} is outside the batch's {b} x {t} rows"
            )));
        }
        // Sorted for the op; `order[i]` is where the i-th sorted row was asked.
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| rows[i]);
        let sorted: Vec<usize> = order.iter().map(|&i| rows[i] as usize).collect();
        let unique = sorted.windows(2).all(|w| w[0] < w[1]);
        if self.runs_fused(x) && unique && !self.cfg.causal && self.cfg.depth > 0 {
            let asked = ctx.output_hidden_states;
            ctx.output_hidden_states = false;
            let out = self.forward_fused_op(x, padding_mask, Some(sorted), ctx);
            ctx.output_hidden_states = asked;
            let out = out?.reshape((rows.len(), d))?;
            if order.iter().enumerate().all(|(i, &j)| i == j) {
                return Ok(out);
            }
            // Back to the order asked: the sorted position of each asked row.
            let mut inverse = vec![0u32; rows.len()];
            for (i, &j) in order.iter().enumerate() {
                inverse[j] = i as u32;
            }
            return super::ops::select_rows(&out, &inverse);
        }
        super::ops::select_rows(&self.forward(x, padding_mask, ctx)?.last, rows)
    }

    /// The fused path: every layer's parameters concatenated and one custom op. Their
    /// gradients flow back through the concatenation to each variable, or, with a gradient
    /// sink in `ctx` (the trainer's), the concatenation is detached and the op's backward
    /// hands the packed gradient to the sink, which gives each variable its slice.
    fn forward_fused(
        &self,
        x: &Tensor,
        padding_mask: Option<&Tensor>,
        ctx: &mut Ctx,
    ) -> Result<StackOutput> {
        let out = self.forward_fused_op(x, padding_mask, None, ctx)?;
        let last = out.get(out.dim(0)? - 1)?;
        let mut hidden = Vec::new();
        if ctx.output_hidden_states {
            hidden.push(x.clone());
            for i in 0..self.cfg.depth {
                hidden.push(out.get(i)?);
            }
        }
        Ok(StackOutput {
            last,
            hidden_states: hidden,
        })
    }

    /// The fused op's output: (depth or 1, B, T, D), or with `rows` (sorted, unique) (1,
    /// rows, D), the last layer at those rows ([`StackOp::last_rows`]).
    fn forward_fused_op(
        &self,
        x: &Tensor,
        padding_mask: Option<&Tensor>,
        rows: Option<Vec<usize>>,
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let mask = match padding_mask {
            Some(m) if m.dims() != [b, t] => {
                return Err(CoreError::InvalidInput(format!(
                    "padding mask has shape {:?}, expected [{b}, {t}]",
                    m.dims()
                )))
            }
            Some(m) => m.to_dtype(DType::F32)?.contiguous()?,
            None => Tensor::ones((b, t), DType::F32, x.device())?,
        };
        let bias = |l: &Linear| -> Result<Tensor> {
            l.bias()
                .cloned()
                .ok_or_else(|| CoreError::Config("stack linear layer without bias".into()))
        };
        // Every layer's parameters in the op's packing order (`FusedSpec::offsets`).
        let mut params = Vec::with_capacity(16 * self.layers.len());
        for layer in &self.layers {
            let qkv = [&layer.query, &layer.key, &layer.value];
            for l in qkv {
                params.push(l.weight().clone());
            }
            for l in qkv {
                params.push(bias(l)?);
            }
            params.push(layer.attn_out.weight().clone());
            params.push(bias(&layer.attn_out)?);
            params.push(layer.norm_attn.weight().clone());
            params.push(layer.norm_attn.bias().clone());
            params.push(layer.fc1.weight().clone());
            params.push(bias(&layer.fc1)?);
            params.push(layer.fc2.weight().clone());
            params.push(bias(&layer.fc2)?);
            params.push(layer.norm_mlp.weight().clone());
            params.push(layer.norm_mlp.bias().clone());
        }
        // The sink needs the op in the graph through `x` (with the parameters detached, only
        // `x` puts it there).
        let sink = ctx
            .grad_sink
            .as_ref()
            .filter(|_| ctx.backward && x.track_op());
        // The packed parameters stay out of candle's graph with a sink, and with no backward
        // to come when `x` is in the graph: a backward through such a pass still reaches the
        // op (through `x`) and is refused there. An inference pass on an input outside the
        // graph keeps them in it, for the same refusal, instead of silently leaving the
        // parameters without gradients.
        let flat = if sink.is_some() || (!ctx.backward && x.track_op()) {
            pack_detached(&params)?
        } else {
            let parts = params
                .iter()
                .map(Tensor::flatten_all)
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&parts, 0)?.to_dtype(DType::F32)?
        };
        let mailbox = sink.map(|sink| sink.register(params));
        let cfg = &self.cfg;
        let dropping = ctx.train && (cfg.dropout > 0.0 || cfg.attn_dropout > 0.0);
        let seed = if dropping { ctx.rng.next_u64() } else { 0 };
        let spec = FusedSpec {
            depth: cfg.depth,
            dim: cfg.dim,
            mlp: cfg.mlp_dim,
            heads: cfg.heads,
            norm: cfg.norm,
            act: match cfg.activation {
                Activation::GeluErf => Act::GeluErf,
                Activation::GeluTanh => Act::GeluTanh,
                Activation::Relu => Act::Relu,
            },
            dropout: cfg.dropout,
            attn_dropout: cfg.attn_dropout,
            eps: cfg.layer_norm_eps as f32,
            causal: cfg.causal,
            bf16: ctx.precision == MatmulPrecision::Bf16 && super::bf16_matmul_available(),
        };
        let all = ctx.output_hidden_states;
        let mut op = StackOp::new(spec, all, ctx.train, ctx.backward, seed, self.pool.clone());
        if let Some(mailbox) = mailbox {
            op = op.param_grad_to(mailbox);
        }
        if let Some(rows) = rows {
            op = op.last_rows(rows);
        }
        Ok(x.contiguous()?.apply_op3(&flat, &mask, op)?)
    }

    /// Additive attention bias (B, 1, T or 1, T) from padding and causality; `None` when neither.
    fn attention_bias(
        &self,
        b: usize,
        t: usize,
        padding_mask: Option<&Tensor>,
        x: &Tensor,
    ) -> Result<Option<Tensor>> {
        const NEG: f32 = -1e9;
        let mut bias: Option<Tensor> = None;
        if let Some(m) = padding_mask {
            if m.dims() != [b, t] {
                return Err(CoreError::InvalidInput(format!(
                    "padding mask has shape {:?}, expected [{b}, {t}]",
                    m.dims()
                )));
            }
            // (1 - m) * NEG, shaped (B, 1, 1, T) to broadcast over heads and queries.
            let m = m.to_dtype(DType::F32)?;
            let add = ((m.ones_like()? - m)? * f64::from(NEG))?.reshape((b, 1, 1, t))?;
            bias = Some(add);
        }
        if self.cfg.causal {
            let mut v = vec![0f32; t * t];
            for i in 0..t {
                for j in (i + 1)..t {
                    v[i * t + j] = NEG;
                }
            }
            let c = Tensor::from_vec(v, (1, 1, t, t), x.device())?;
            bias = Some(match bias {
                Some(bi) => bi.broadcast_add(&c)?,
                None => c,
            });
        }
        Ok(match bias {
            Some(bi) => Some(bi.to_dtype(x.dtype())?),
            None => None,
        })
    }

    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        bias: Option<&Tensor>,
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let h = self.cfg.heads;
        let dh = d / h;
        let split = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, h, dh))?.transpose(1, 2)?.contiguous()?)
        };
        let p = composite_precision(x, ctx);
        let q = split(layer.query.forward_with(x, p)?)?;
        let k = split(layer.key.forward_with(x, p)?)?;
        let v = split(layer.value.forward_with(x, p)?)?;
        let scale = 1.0 / (dh as f64).sqrt();
        let mut scores = (matmul(&q, &k.t()?.contiguous()?, p)? * scale)?;
        if let Some(bias) = bias {
            scores = scores.broadcast_add(bias)?;
        }
        let probs = softmax_last_dim(&scores)?;
        let probs = dropout(&probs, self.cfg.attn_dropout, ctx.train, ctx.rng)?;
        let ctx_v = matmul(&probs, &v, p)?.transpose(1, 2)?.reshape((b, t, d))?;
        layer.attn_out.forward_with(&ctx_v, p)
    }

    fn mlp(&self, layer: &Layer, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let p = composite_precision(x, ctx);
        let y = self
            .cfg
            .activation
            .forward(&layer.fc1.forward_with(x, p)?)?;
        layer.fc2.forward_with(&y, p)
    }

    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        bias: Option<&Tensor>,
        ctx: &mut Ctx,
    ) -> Result<Tensor> {
        let p = self.cfg.dropout;
        match self.cfg.norm {
            NormPlacement::Pre => {
                let a = self.attention(layer, &norm(&layer.norm_attn, x)?, bias, ctx)?;
                let x = (x + dropout(&a, p, ctx.train, ctx.rng)?)?;
                let m = self.mlp(layer, &norm(&layer.norm_mlp, &x)?, ctx)?;
                Ok((&x + dropout(&m, p, ctx.train, ctx.rng)?)?)
            }
            NormPlacement::Post => {
                let a = self.attention(layer, x, bias, ctx)?;
                let x = norm(
                    &layer.norm_attn,
                    &(x + dropout(&a, p, ctx.train, ctx.rng)?)?,
                )?;
                let m = self.mlp(layer, &x, ctx)?;
                norm(
                    &layer.norm_mlp,
                    &(&x + dropout(&m, p, ctx.train, ctx.rng)?)?,
                )
            }
        }
    }
}

/// A layer norm of the composite path: the fused op with a backward on a GPU (candle's
/// kernel, see [`crate::nn::ops::layer_norm_fused`]), the composite on the CPU (the reference
/// the fused CPU op is checked against).
fn norm(ln: &LayerNorm, x: &Tensor) -> Result<Tensor> {
    if x.device().is_cuda() {
        ln.forward(x)
    } else {
        ln.forward_composite(x)
    }
}

/// The precision of the composite path's products: the context's on a GPU (bf16 there is
/// cuBLAS with bf16 operands, see [`matmul`]); f32 on the CPU, where the composite path is
/// the reference the fused op is checked against.
fn composite_precision(x: &Tensor, ctx: &Ctx) -> MatmulPrecision {
    if x.device().is_cuda() {
        ctx.precision
    } else {
        MatmulPrecision::F32
    }
}

/// `params` flattened one after another into a detached f32 vector: copied in parallel when
/// each is a contiguous f32 CPU tensor, else through candle's `cat`.
fn pack_detached(params: &[Tensor]) -> Result<Tensor> {
    let flat = {
        let guards: Vec<_> = params.iter().map(Tensor::storage_and_layout).collect();
        let slices: Option<Vec<&[f32]>> = guards.iter().map(|(s, l)| cpu_f32_view(s, l)).collect();
        slices.map(|s| ssl_kernels::concat(&s))
    };
    if let Some(flat) = flat {
        let n = flat.len();
        return Ok(Tensor::from_vec(flat, n, &Device::Cpu)?);
    }
    let parts = params
        .iter()
        .map(Tensor::flatten_all)
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?.to_dtype(DType::F32)?.detach())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ParamStore, SslRng};
    use candle_core::Device;

    fn cfg(norm: NormPlacement) -> TransformerConfig {
        TransformerConfig {
            dim: 8,
            depth: 2,
            heads: 2,
            mlp_dim: 16,
            norm,
            ..TransformerConfig::default()
        }
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        for norm in [NormPlacement::Pre, NormPlacement::Post] {
            let store = ParamStore::new(&Device::Cpu);
            let stack = TransformerStack::new(&cfg(norm), &store.builder(0)).unwrap();
            let mut rng = SslRng::new(0);
            let x = Tensor::from_vec(rng.normal_vec(2 * 5 * 8, 0.0, 1.0), (2, 5, 8), &Device::Cpu)
                .unwrap();
            let mask = Tensor::new(
                &[[1f32, 1., 1., 1., 1.], [1., 1., 1., 0., 0.]],
                &Device::Cpu,
            )
            .unwrap();
            let out = stack
                .forward(&x, Some(&mask), &mut Ctx::train(&mut rng))
                .unwrap();
            let loss = out.last.sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            for (name, var) in store.vars() {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{name} got no gradient"));
                let n = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(n > 0.0, "{name} has a zero gradient");
            }
        }
    }

    #[test]
    fn a_grad_sink_gives_the_graphs_gradients() {
        use crate::GradSink;
        use candle_core::Var;
        let store = ParamStore::new(&Device::Cpu);
        let stack = TransformerStack::new(&cfg(NormPlacement::Pre), &store.builder(3)).unwrap();
        let mut rng = SslRng::new(0);
        let x =
            Var::from_vec(rng.normal_vec(2 * 5 * 8, 0.0, 1.0), (2, 5, 8), &Device::Cpu).unwrap();
        let w =
            Tensor::from_vec(rng.normal_vec(2 * 5 * 8, 0.0, 1.0), (2, 5, 8), &Device::Cpu).unwrap();
        // `passes` = 1: the stack once on a tracked input. 3: twice more, on another tracked
        // input and on a plain one (that pass stays in the graph), so each parameter's
        // gradient sums three contributions.
        let loss = |ctx: &mut Ctx, passes: usize| -> Tensor {
            let a = stack.forward(x.as_tensor(), None, ctx).unwrap().last;
            let mut l = a.sqr().unwrap().sum_all().unwrap();
            if passes == 3 {
                let twice = (x.as_tensor() * 2.0).unwrap();
                let b = stack.forward(&twice, None, ctx).unwrap().last;
                let c = stack.forward(&w, None, ctx).unwrap().last;
                l = (l + (b * &w).unwrap().sum_all().unwrap()).unwrap();
                l = (l + c.sum_all().unwrap()).unwrap();
            }
            l
        };
        let flat = |g: &Tensor| g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut tensors: Vec<(String, Tensor)> = store
            .vars()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        tensors.push(("x".into(), x.as_tensor().clone()));
        let (first_name, first) = tensors[0].clone();
        for passes in [1, 3] {
            let mut rng = SslRng::new(1);
            let plain = loss(&mut Ctx::train(&mut rng), passes).backward().unwrap();
            let sink = GradSink::new();
            let mut rng = SslRng::new(1);
            let mut ctx = Ctx::train(&mut rng).with_grad_sink(sink.clone());
            let mut sunk = loss(&mut ctx, passes).backward().unwrap();
            // Before collection the tracked passes' share waits in the sink.
            let waiting = sunk.get(&first).map(flat);
            assert_ne!(
                waiting,
                plain.get(&first).map(flat),
                "{first_name}, {passes}"
            );
            ctx.collect_grads(&mut sunk).unwrap();
            for (name, t) in &tensors {
                let (a, b) = (plain.get(t).unwrap(), sunk.get(t).unwrap());
                assert_eq!(a.dims(), b.dims(), "{name}");
                let (a, b) = (flat(a), flat(b));
                if passes == 1 {
                    // One delivery: candle's zero-fill + add is exact, so bit for bit.
                    assert_eq!(a, b, "{name}");
                } else {
                    // Several: the same terms summed in another order.
                    for (u, v) in a.iter().zip(&b) {
                        assert!(
                            (u - v).abs() <= 1e-5 * (1.0 + u.abs()),
                            "{name}: {u} vs {v}"
                        );
                    }
                }
            }
            // Drained: a second collection adds nothing.
            let again = flat(sunk.get(&first).unwrap());
            ctx.collect_grads(&mut sunk).unwrap();
            assert_eq!(again, flat(sunk.get(&first).unwrap()));
        }
    }

    /// `Ctx::sinking` inside a context that has a sink: the inner backward gets the graph's
    /// gradients, and a forward pass run before it under the outer sink, whose backward comes
    /// after, keeps its delivery for the outer collection.
    #[test]
    fn a_nested_sinking_leaves_the_outer_sink_alone() {
        use crate::GradSink;
        let store = ParamStore::new(&Device::Cpu);
        let stack = TransformerStack::new(&cfg(NormPlacement::Post), &store.builder(5)).unwrap();
        let mut rng = SslRng::new(0);
        let x = candle_core::Var::from_vec(
            rng.normal_vec(2 * 5 * 8, 0.0, 1.0),
            (2, 5, 8),
            &Device::Cpu,
        )
        .unwrap();
        let y = (x.as_tensor() * 0.5).unwrap();
        let loss = |t: &Tensor, ctx: &mut Ctx| -> Tensor {
            let h = stack.forward(t, None, ctx).unwrap().last;
            h.sqr().unwrap().sum_all().unwrap()
        };
        let flat = |g: &candle_core::backprop::GradStore| -> Vec<Vec<f32>> {
            store
                .vars()
                .into_iter()
                .map(|(n, v)| {
                    g.get(v.as_tensor())
                        .unwrap_or_else(|| panic!("no gradient for {n}"))
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f32>()
                        .unwrap()
                })
                .collect()
        };
        let mut rng = SslRng::new(1);
        let plain_a = loss(x.as_tensor(), &mut Ctx::train(&mut rng))
            .backward()
            .unwrap();
        let plain_b = loss(&y, &mut Ctx::train(&mut rng)).backward().unwrap();

        let outer = GradSink::new();
        let mut rng = SslRng::new(1);
        let mut ctx = Ctx::train(&mut rng).with_grad_sink(outer.clone());
        let la = loss(x.as_tensor(), &mut ctx);
        let ((), inner) = ctx
            .sinking(|ctx| Ok(((), loss(&y, ctx).backward()?)))
            .unwrap();
        assert_eq!(flat(&inner), flat(&plain_b));
        let mut ga = la.backward().unwrap();
        ctx.collect_grads(&mut ga).unwrap();
        assert_eq!(flat(&ga), flat(&plain_a));
    }

    #[test]
    fn padding_is_invisible_to_real_tokens() {
        let store = ParamStore::new(&Device::Cpu);
        let stack = TransformerStack::new(&cfg(NormPlacement::Post), &store.builder(1)).unwrap();
        let mut rng = SslRng::new(0);
        let real = rng.normal_vec(3 * 8, 0.0, 1.0);
        let mut a = real.clone();
        a.extend(rng.normal_vec(2 * 8, 0.0, 1.0));
        let mut b = real.clone();
        b.extend(rng.normal_vec(2 * 8, 5.0, 3.0));
        let mask = Tensor::new(&[[1f32, 1., 1., 0., 0.]], &Device::Cpu).unwrap();
        let run = |v: Vec<f32>, rng: &mut SslRng| {
            let x = Tensor::from_vec(v, (1, 5, 8), &Device::Cpu).unwrap();
            stack
                .forward(&x, Some(&mask), &mut Ctx::eval(rng))
                .unwrap()
                .last
                .narrow(1, 0, 3)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (ya, yb) = (run(a, &mut rng), run(b, &mut rng));
        for (p, q) in ya.iter().zip(&yb) {
            assert!((p - q).abs() < 1e-5);
        }
    }

    #[test]
    fn hidden_states_and_key_names() {
        let store = ParamStore::new(&Device::Cpu);
        let stack =
            TransformerStack::new(&cfg(NormPlacement::Post), &store.builder(0).pp("encoder"))
                .unwrap();
        let names: Vec<_> = store.vars().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"encoder.layer.0.attention.self.query.weight".to_string()));
        assert!(names.contains(&"encoder.layer.1.output.LayerNorm.bias".to_string()));
        let mut rng = SslRng::new(0);
        let x = Tensor::zeros((1, 3, 8), DType::F32, &Device::Cpu).unwrap();
        let out = stack
            .forward(&x, None, &mut Ctx::eval(&mut rng).with_hidden_states())
            .unwrap();
        assert_eq!(out.hidden_states.len(), 3);
        let bad = TransformerConfig {
            dim: 10,
            heads: 3,
            ..cfg(NormPlacement::Pre)
        };
        assert!(TransformerStack::new(&bad, &store.builder(0)).is_err());
    }

    #[test]
    fn causal_attention_ignores_the_future() {
        let c = TransformerConfig {
            causal: true,
            ..cfg(NormPlacement::Pre)
        };
        let store = ParamStore::new(&Device::Cpu);
        let stack = TransformerStack::new(&c, &store.builder(0)).unwrap();
        let mut rng = SslRng::new(0);
        let mut v = rng.normal_vec(4 * 8, 0.0, 1.0);
        let x1 = Tensor::from_vec(v.clone(), (1, 4, 8), &Device::Cpu).unwrap();
        for e in v.iter_mut().skip(3 * 8) {
            *e += 10.0;
        }
        let x2 = Tensor::from_vec(v, (1, 4, 8), &Device::Cpu).unwrap();
        let f = |x: &Tensor, rng: &mut SslRng| {
            stack
                .forward(x, None, &mut Ctx::eval(rng))
                .unwrap()
                .last
                .narrow(1, 0, 3)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (a, b) = (f(&x1, &mut rng), f(&x2, &mut rng));
        for (p, q) in a.iter().zip(&b) {
            assert!((p - q).abs() < 1e-5);
        }
    }
}
