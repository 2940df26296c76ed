//! # ssl-core
//!
//! The traits and the training machinery every self-supervised pretext task shares:
//!
//! - [`Encoder`], [`PretextTask`], [`Trainer`] (implemented by [`LoopTrainer`]) and the
//!   [`BatchSource`] the trainer pulls from;
//! - [`ComposedTask`]: one encoder trained on a weighted sum of pretext tasks (boxed tasks
//!   are tasks too, so `Box<dyn PretextTask<Batch = B>>` holds a task chosen at run time);
//! - [`nn`]: the one transformer stack of every modality, built from ops whose gradients flow;
//! - [`optim`]: AdamW with parameter groups and saveable state, LR schedules, clipping;
//! - [`checkpoint`]: atomic, resumable checkpoints; [`StopFlag`] for SIGINT/SIGTERM;
//! - [`monitor`], [`health`], [`plot`], [`tensorboard`]: `metrics.jsonl`, progress, embedding
//!   health, curves, TensorBoard event files;
//! - [`probe`]: linear and k-NN probes on frozen embeddings;
//! - [`finetune`]: a classification head on any encoder, fine-tuned (layer-wise decay, label
//!   smoothing, frozen or full) on label fractions, against random initialisation;
//! - [`Collective`]: data-parallel communication ([`SingleProcess`] here);
//! - [`seq`]: the generic pretext tasks on numeric feature sequences.
//!
//! Everything random draws from an [`SslRng`] so runs repeat exactly and resume exactly.
//!
//! Speed on the CPU: run the training loop inside [`on_compute_threads`] (the fused kernels'
//! parallel regions then share the calling thread instead of waking a pool from outside);
//! at the start of `main` call [`candle_ops_on_caller`] (candle's own worker pool spins on the
//! same cores otherwise) and, in a binary with mimalloc as its global allocator,
//! [`keep_freed_memory`].
//!
//! ```no_run
//! use candle_core::Device;
//! use ssl_core::seq::*;
//! use ssl_core::{LoopTrainer, ParamStore, TrainConfig, Trainer};
//!
//! # fn main() -> ssl_core::Result<()> {
//! let examples: Vec<SeqExample> = (0..64)
//!     .map(|i| SeqExample::new((0..32).map(|t| ((t + i) as f32 * 0.3).sin()).collect(), 32, 1))
//!     .collect::<Result<_, _>>()?;
//! let store = ParamStore::new(&Device::Cpu);
//! let pb = store.builder(0);
//! let cfg = SeqEncoderConfig { features: 1, ..Default::default() };
//! let encoder = SeqTransformerEncoder::new(&cfg, &pb)?;
//! let task = MaskedFeatureTask::new(encoder, 1, MaskedFeatureConfig::default(), &pb)?;
//! let mut data = InMemorySeqSource::new(examples, 16, 0, true, &Device::Cpu)?;
//! let train = TrainConfig { max_steps: 100, ..Default::default() };
//! // On a compute thread (see `on_compute_threads`).
//! let report = ssl_core::on_compute_threads(|| {
//!     LoopTrainer::new(train, Some("runs/demo".into()))?.fit(&task, &mut data, None)
//! })?;
//! println!("final loss {:?}", report.losses.last());
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]
// No `unsafe` here (the kernels live in ssl-kernels), except that the MPI and NCCL handles
// (features `mpi`, `nccl`) are declared `Send` and `Sync`, each impl allowed where it stands.
#![cfg_attr(not(feature = "mpi"), forbid(unsafe_code))]
#![cfg_attr(feature = "mpi", deny(unsafe_code))]

pub mod best;
pub mod checkpoint;
mod collective;
mod compose;
mod compute;
pub mod config_doc;
mod ctx;
mod device;
mod encoder;
mod error;
mod eval_hook;
pub mod finetune;
pub mod guard;
pub mod health;
mod hook;
pub mod linalg;
pub mod loss;
pub mod memory;
pub mod monitor;
#[cfg(feature = "mpi")]
mod mpi_collective;
#[cfg(feature = "nccl")]
mod nccl_collective;
pub mod nn;
pub mod optim;
pub mod parallel;
mod params;
pub mod plot;
pub mod preset;
pub mod probe;
mod rng;
pub mod run_dir;
mod run_guard;
pub mod seq;
mod signal;
mod task;
pub mod tensorboard;
mod trainer;

pub use collective::{
    broadcast_params, gather_rows, Collective, SharedCollective, SingleProcess, ThreadGroup,
};
pub use compose::{ComposedTask, MapBatch};
pub use compute::{candle_ops_on_caller, on_compute_threads};
pub use ctx::{Ctx, GradSink};
pub use device::parse_device;
pub use encoder::{Encoder, EncoderOutput};
pub use error::{CoreError, Result};
pub use eval_hook::{heldout_task_loss, EvalFigures, HeldoutEval, EVAL_PREFIX};
pub use hook::{HookCtx, TrainHook};
#[cfg(feature = "mpi")]
pub use mpi_collective::MpiCollective;
#[cfg(feature = "nccl")]
pub use nccl_collective::NcclCollective;
pub use parallel::Parallel;
pub use params::{
    read_safetensors, write_safetensors, Init, LoadReport, Param, ParamBuilder, ParamStore,
};
pub use rng::SslRng;
pub use signal::StopFlag;
pub use ssl_kernels::keep_freed_memory;
pub use task::{BatchSource, PretextTask, RepeatBatch, TaskOutput};
pub use trainer::{
    accumulate, inference_precision, plot_run, scale_grads, Accumulated, LoopTrainer, TrainConfig,
    TrainReport, Trainer,
};
