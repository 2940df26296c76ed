//! The context a forward pass runs in.

use std::sync::{Arc, Mutex, PoisonError};

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use ssl_kernels::{GradCell, ParamGradMailbox};

use crate::nn::MatmulPrecision;
use crate::{CoreError, Result, SslRng};

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
    /// Where fused ops hand their parameters' gradients over outside candle's graph (`None`:
    /// every gradient goes through the graph). Set for the span of [`Ctx::sinking`] (which the
    /// default [`crate::PretextTask::forward_backward`] uses) or by [`Ctx::with_grad_sink`];
    /// whoever sets one adds what it collects ([`Ctx::collect_grads`]) before reading or
    /// scaling the gradients.
    pub grad_sink: Option<GradSink>,
}

/// Parameter gradients that fused ops deliver outside candle's graph, waiting to be added to
/// a backward pass's [`GradStore`].
///
/// candle accumulates every gradient as a zero-filled tensor plus an add at each node it
/// passes, so a fused op's packed parameters (concatenated from each layer's variables) cost
/// three such passes over every parameter per step. With a sink the fused transformer stack
/// packs its parameters detached, its backward leaves the packed gradient in a mailbox, and
/// [`GradSink::drain_into`] gives each variable its slice of it, with no copy. The gradients
/// are the same: bit for bit when the stack runs once in a loss, up to the order of the sum
/// when it runs several times.
///
/// A parameter that several fused ops read (BERT's word table: the input embedding and the
/// MLM head's tied decoder) gets one [`GradCell`] ([`GradSink::cell`]): each op's backward
/// adds its share to it in place, and the drain hands the sum to the variable, instead of
/// candle filling a zero table and adding each op's dense gradient to it: the same gradient
/// up to the order of the sum (a word's token rows are added to the loss's share one by one
/// rather than summed first). The drain closes the cells it collects: a backward that runs
/// after it and would add to one is an error, not a gradient nobody reads.
#[derive(Clone, Default)]
pub struct GradSink(Arc<Mutex<Pending>>);

#[derive(Default)]
struct Pending {
    packed: Vec<PendingGrads>,
    /// Variables with a cell, by candle's tensor id.
    cells: Vec<(Tensor, GradCell)>,
}

/// One fused op's parameters (in packing order) and the mailbox its backward fills.
struct PendingGrads {
    params: Vec<Tensor>,
    mailbox: ParamGradMailbox,
}

impl GradSink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a fused op over `params` (the variables it packs, in order) and returns the
    /// mailbox its backward fills with the packed gradient.
    pub fn register(&self, params: Vec<Tensor>) -> ParamGradMailbox {
        let mailbox = ParamGradMailbox::default();
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .packed
            .push(PendingGrads {
                params,
                mailbox: mailbox.clone(),
            });
        mailbox
    }

    /// The cell that fused ops reading `param` add its gradient to (the same cell for every
    /// op until the next drain), or `None` where a cell cannot stand for candle's gradient:
    /// `param` is not a variable (its gradient must flow on through the graph) or not an f32
    /// CPU tensor.
    pub fn cell(&self, param: &Tensor) -> Option<GradCell> {
        if !param.is_variable()
            || param.dtype() != candle_core::DType::F32
            || !param.device().is_cpu()
        {
            return None;
        }
        let mut pending = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((_, cell)) = pending.cells.iter().find(|(t, _)| t.id() == param.id()) {
            return Some(cell.clone());
        }
        let cell = GradCell::new();
        pending.cells.push((param.clone(), cell.clone()));
        Some(cell)
    }

    /// Adds every gradient delivered since the last call to `grads` (each variable's slice of
    /// its op's packed gradient, and each cell's sum, added to the gradient `grads` has for
    /// it) and forgets the registered ops and cells, those whose backward never ran included.
    pub fn drain_into(&self, grads: &mut GradStore) -> Result<()> {
        let Pending { packed, cells } =
            std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner));
        for (param, cell) in cells {
            let Some(g) = cell.take() else { continue };
            let g = Tensor::from_vec(g, param.shape(), param.device())?;
            add_grad(grads, &param, g)?;
        }
        for p in packed {
            let packed = p
                .mailbox
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            let Some(packed) = packed else { continue };
            let total: usize = p.params.iter().map(Tensor::elem_count).sum();
            if packed.elem_count() != total {
                return Err(CoreError::InvalidInput(format!(
                    "a fused op delivered {} gradient values for {total} parameter values",
                    packed.elem_count()
                )));
            }
            let packed = packed.flatten_all()?;
            let mut offset = 0;
            for param in &p.params {
                let n = param.elem_count();
                let mut piece = packed.narrow(0, offset, n)?.reshape(param.shape())?;
                offset += n;
                if piece.dtype() != param.dtype() {
                    piece = piece.to_dtype(param.dtype())?;
                }
                add_grad(grads, param, piece)?;
            }
        }
        Ok(())
    }
}

/// Adds `g` to the gradient `grads` has for `param`, or gives it `g` when it has none.
fn add_grad(grads: &mut GradStore, param: &Tensor, g: Tensor) -> Result<()> {
    let sum = match grads.get(param) {
        Some(before) => (before + &g)?,
        None => g,
    };
    grads.insert(param, sum);
    Ok(())
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
            grad_sink: None,
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
            grad_sink: None,
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

    /// The same context, with fused ops' parameter gradients delivered to `sink` (see
    /// [`GradSink`]) by the forward passes run with it outside [`Ctx::sinking`]: the caller
    /// adds them ([`Ctx::collect_grads`]) after `backward` and before reading or scaling the
    /// gradients, so code that scales its [`GradStore`] must not be run with a sink it does not
    /// collect first.
    pub fn with_grad_sink(mut self, sink: GradSink) -> Self {
        self.grad_sink = Some(sink);
        self
    }

    /// Adds the gradients fused ops delivered to this context's sink (if any) to `grads`:
    /// call it after `backward` and before anything that reads or scales `grads`.
    pub fn collect_grads(&self, grads: &mut GradStore) -> Result<()> {
        match &self.grad_sink {
            Some(sink) => sink.drain_into(grads),
            None => Ok(()),
        }
    }

    /// Runs `f`, a forward pass and its backward, with fused ops' parameter gradients
    /// delivered to a sink ([`GradSink`]), and adds them to the gradients `f` returns before
    /// returning them: the gradients of the graph, computed with less of candle's bookkeeping.
    /// `f` must return the gradients of its backward unchanged (scaling the loss before
    /// `backward` is fine; scaling the [`GradStore`] after it is not: do that after this call).
    /// `f` gets a sink of its own even inside a context that has one, which is left as it was
    /// (what fused ops delivered to it before is collected by whoever set it).
    ///
    /// The default [`crate::PretextTask::forward_backward`] runs in one, so a task's override
    /// gets no sink, and every gradient through the graph, unless it asks for one here.
    pub fn sinking<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<(T, GradStore)>,
    ) -> Result<(T, GradStore)> {
        let sink = GradSink::new();
        let outer = self.grad_sink.replace(sink.clone());
        let res = f(self);
        self.grad_sink = outer;
        let (out, mut grads) = res?;
        sink.drain_into(&mut grads)?;
        Ok((out, grads))
    }

    /// The same context, asking for every layer's hidden state.
    pub fn with_hidden_states(mut self) -> Self {
        self.output_hidden_states = true;
        self
    }
}
