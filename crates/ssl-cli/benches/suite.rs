//! The cross-implementation benchmark suite, our side: six models timed step by step, each
//! printed as one JSON object so `bench/run` can set it against `bench/torch_suite.py`, which
//! runs the same models in PyTorch.
//!
//! ```text
//! cargo bench -p ssl-cli --bench suite -- [--json] [--steps N] [--only NAME[,NAME...]]
//!                                          [--precision f32|bf16] [--device cpu|cuda]
//! ```
//!
//! `--device cuda` runs every model on the first CUDA GPU (build with `--features cuda`; the
//! stack then takes its composite path on candle's CUDA kernels, softmax fused), each step
//! timed until the GPU has finished it; with `--precision bf16` every product of the stack
//! takes bf16 operands through cuBLAS with f32 sums, as PyTorch's CUDA autocast.
//!
//! Every model runs 2 warm-up steps, then `N` timed steps (default 20); the reported figure is
//! the median step time. Threads: `RAYON_NUM_THREADS` (candle's matmuls and our kernels),
//! 2 when unset. Dropout is 0 everywhere. Float32 on the CPU; `--precision bf16` runs the
//! fused stack's linear-layer products in bf16 with f32 accumulation (`MatmulPrecision`),
//! everything else stays f32, as PyTorch's CPU autocast on the other side.
//!
//! - `mlm_train`: BERT masked LM (`BertConfig::preset("mini")` = hidden 256, 4 layers, 4
//!   heads, intermediate 1024, GELU-erf, post-norm; dropout set to 0), vocab 8000, batch 16 x
//!   128 tokens, token masking 15% (80/10/10); one step = masking + forward + backward + AdamW
//!   (lr 1e-4, betas 0.9/0.999, weight decay 0.01). The MLM head runs on the masked positions
//!   only (as ours does; the PyTorch side gathers them before `model.cls`).
//! - `mae_train`: MAE on 32 x 32 x 3 images, patch 4 (64 patches), encoder width 192, depth
//!   6, 3 heads, MLP 4x; decoder width 128, depth 2, 4 heads, MLP 4x; mask ratio 0.75,
//!   `norm_pix_loss` off, augmentation off; batch 32; forward + backward + AdamW (betas
//!   0.9/0.95, weight decay 0.05).
//! - `series_train`: PatchTST masked-patch reconstruction (as `ssl-timeseries`' bench): batch
//!   32 x 336 steps x 1 channel, patches of 12 (28 patches), width 64, depth 3, 4 heads, MLP
//!   128, mask ratio 0.4; the trainer's step: forward/backward, gradient clipping at 1.0, AdamW
//!   (weight decay 0.05).
//! - `clip_train`: CLIP (as `ssl-multimodal`' bench, `ClipConfig::default()`, one pass): batch
//!   64 pairs, images 3 x 32 x 32, ViT patch 8, width 64, depth 2, 4 heads, MLP 128; captions
//!   of 16 tokens, BERT width 64, 2 layers, 4 heads, feed-forward 128, vocab 1000; projections
//!   to 64; the trainer's step with clipping at 1.0, AdamW and the `logit_scale` clamp.
//! - `ts2vec_train`: TS2Vec (as `ssl-timeseries`' bench, the reference's defaults): the
//!   dilated convolution encoder (hidden 64, output 320, depth 10, kernel 3; dropout 0),
//!   batch 8 of 64 noisy sines of 256 steps x 1 channel, two overlapping crops drawn as the
//!   reference draws them, timestamp masking 0.5, the hierarchical contrastive loss (alpha
//!   0.5); the trainer's step with clipping at 1.0 and AdamW. The crops are random, so the
//!   step's work varies: it times at least 20 steps, and its FLOPs are the expectation over
//!   the crop draw (the encoder on both views, `E[l1 + l2] = 2c + (T - c) / 2` rows for a
//!   crop of `c` steps, and the loss's similarity products, averaged over `c` in `[2, T]`).
//! - `mlm_embed`: inference only: the `mlm_train` encoder in evaluation mode with no backward to
//!   follow (`Ctx::inference`), mean pooling, batch 16 x 128 (`PretextTask::embed`).
//! - `peak_matmul`: candle's CPU matmul (gemm 0.19), 1024 x 1024 x 1024 f32; on a CPU with
//!   AMX tiles that passed their check (`ssl_kernels::amx_usable`) also `peak_amx_bf16`, the
//!   same product on AMX tiles in bf16 (`bench/run` prints it under the peak line, ours
//!   only). With `--precision bf16` on the CPU also `peak_bf16`, the product in our bf16 path (`ssl_kernels::MatmulT`, operands rounded while
//!   packed, f32 sums; the AVX-512 BF16 kernel, AMX tiles where usable, or fp16 where
//!   AVX-512 FP16 is and AMX is not), and one `bf16_check` object: the trainer's measurement
//!   (`ssl_kernels::bf16_check`) of bf16 against f32 products, which decides whether
//!   `train.matmul_precision = "bf16"` runs bf16 kernels or stays f32 on this CPU.
//!
//! FLOPs per step are analytic and count matmuls only (2·m·n·k per product), summed over the
//! forward pass; a training step counts 3x its forward pass (backward = 2x forward). A
//! transformer layer over `b` sequences of `n` tokens, width `d`, feed-forward `f`, costs
//! `2·b·n·(4·d² + 2·d·f)` (QKV, output and the two MLP projections) plus `4·b·n²·d` (QKᵀ and
//! attention x V). `bench/torch_suite.py` uses the same formulas.

use std::error::Error;
use std::sync::OnceLock;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::json;
use ssl_core::nn::{bf16_matmul_available, MatmulPrecision, TransformerConfig};
use ssl_core::optim::{clip_scale, AdamW, AdamWConfig};
use ssl_core::seq::{InMemorySeqSource, SeqExample};
use ssl_core::{accumulate, BatchSource, Ctx, ParamStore, PretextTask, RepeatBatch, SslRng};
use ssl_multimodal::{ClipConfig, ClipModel, PairBatch};
use ssl_text::{BertConfig, BertForMaskedLM, BertInput, MaskingConfig, TextBatch, TokenizedSeq};
use ssl_timeseries::{
    MaskedPatchConfig, MaskedPatchTask, PatchTstConfig, PatchTstEncoder, TcnConfig, TcnEncoder,
    Ts2VecConfig, Ts2VecTask,
};
use ssl_vision::{AugmentConfig, Images, MaeConfig, MaeTask, ViTConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Res<T> = Result<T, Box<dyn Error>>;

const WARMUP: usize = 2;
const MODELS: [&str; 6] = [
    "mlm_train",
    "mae_train",
    "series_train",
    "clip_train",
    "ts2vec_train",
    "mlm_embed",
];

/// Matmul FLOPs of one transformer layer (see the module documentation).
fn layer_flops(b: f64, n: f64, d: f64, f: f64) -> f64 {
    2.0 * b * n * (4.0 * d * d + 2.0 * d * f) + 4.0 * b * n * n * d
}

/// Matmul FLOPs of an `(m, k) x (k, n)` product.
fn mm(m: f64, k: f64, n: f64) -> f64 {
    2.0 * m * k * n
}

// ---- BERT (mlm_train, mlm_embed) ----
const MLM_VOCAB: usize = 8000;
const MLM_BATCH: usize = 16;
const MLM_SEQ: usize = 128;

fn mlm_encoder_flops() -> f64 {
    4.0 * layer_flops(MLM_BATCH as f64, MLM_SEQ as f64, 256.0, 1024.0)
}

/// Forward FLOPs of the MLM step: the encoder plus the head (dense D x D, tied decoder
/// D x V) on the expected number of masked positions, 15% of the non-special tokens.
fn mlm_forward_flops() -> f64 {
    let masked = 0.15 * (MLM_BATCH * (MLM_SEQ - 2)) as f64;
    mlm_encoder_flops() + mm(masked, 256.0, 256.0) + mm(masked, 256.0, MLM_VOCAB as f64)
}

fn bert_mini() -> Res<BertConfig> {
    let cfg = BertConfig {
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        ..BertConfig::preset("mini", MLM_VOCAB)?
    };
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.num_attention_heads,
            cfg.intermediate_size
        ),
        (256, 4, 4, 1024),
        "the mini preset changed; the PyTorch side assumes 256/4/4/1024"
    );
    Ok(cfg)
}

/// Random sequences `[CLS] w... [SEP]` (ids 2 and 5..vocab), as `ssl-text`'s `bench_step`.
fn text_batch(rng: &mut SslRng) -> TextBatch {
    let seqs = (0..MLM_BATCH)
        .map(|_| {
            let mut s = TokenizedSeq::default();
            for i in 0..MLM_SEQ {
                let special = i == 0 || i == MLM_SEQ - 1;
                s.ids.push(if special {
                    2
                } else {
                    5 + rng.below(MLM_VOCAB - 5) as u32
                });
                s.word_ids.push((!special).then_some(i as u32));
                s.special.push(special);
            }
            s
        })
        .collect();
    TextBatch {
        seqs,
        pad_id: 0,
        device: device().clone(),
    }
}

fn mlm(steps: usize, train: bool) -> Res<(Vec<f64>, usize)> {
    let store = ParamStore::new(device());
    let model = BertForMaskedLM::new(
        &bert_mini()?,
        MaskingConfig::default(),
        4,
        &store.builder(0),
    )?;
    let mut rng = SslRng::new(0);
    let tb = text_batch(&mut rng);
    let params = store.num_elements();
    if !train {
        let times = time_steps(steps, || {
            let pooled = model.embed(&tb, &mut eval_ctx(&mut rng))?;
            debug_assert_eq!(pooled.dims(), &[MLM_BATCH, 256]);
            Ok(())
        })?;
        return Ok((times, params));
    }
    let mut opt = AdamW::new(&store, AdamWConfig::default())?;
    let vars: Vec<Tensor> = opt.vars().map(|v| v.as_tensor().clone()).collect();
    let mut src = RepeatBatch(tb);
    let times = time_steps(steps, || {
        trainer_step(&model, &mut src, &mut opt, &vars, &mut rng, 1e-4, 0.0)
    })?;
    Ok((times, params))
}

// ---- MAE ----
const MAE_BATCH: usize = 32;
const MAE_SIDE: usize = 32;
const MAE_CHANNELS: usize = 3;

fn mae_flops() -> f64 {
    let b = MAE_BATCH as f64;
    let l = ((MAE_SIDE / 4) * (MAE_SIDE / 4)) as f64; // 64 patches
    let keep = (l * 0.25).floor(); // 16 visible
    let pix = (4 * 4 * MAE_CHANNELS) as f64;
    mm(b * l, pix, 192.0) // patch embedding (every patch, then the visible are gathered)
        + 6.0 * layer_flops(b, keep + 1.0, 192.0, 768.0)
        + mm(b * (keep + 1.0), 192.0, 128.0) // decoder embedding
        + 2.0 * layer_flops(b, l + 1.0, 128.0, 512.0)
        + mm(b * (l + 1.0), 128.0, pix) // pixel prediction
}

fn mae(steps: usize) -> Res<(Vec<f64>, usize)> {
    let vit = ViTConfig {
        image_height: MAE_SIDE,
        image_width: MAE_SIDE,
        channels: MAE_CHANNELS,
        patch_size: 4,
        dim: 192,
        depth: 6,
        heads: 3,
        mlp_ratio: 4.0,
        ..ViTConfig::default()
    };
    let cfg = MaeConfig {
        mask_ratio: 0.75,
        norm_pix_loss: false,
        decoder_dim: 128,
        decoder_depth: 2,
        decoder_heads: 4,
        decoder_mlp_ratio: 4.0,
    };
    let aug = AugmentConfig {
        crop: false,
        hflip: false,
        mean: vec![0.0],
        std: vec![1.0],
        ..AugmentConfig::default()
    };
    let store = ParamStore::new(device());
    let task = MaeTask::new(&vit, &cfg, &aug, &store.builder(0))?;
    let mut opt = AdamW::new(
        &store,
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.05,
        },
    )?;
    let vars: Vec<Tensor> = opt.vars().map(|v| v.as_tensor().clone()).collect();
    let mut rng = SslRng::new(0);
    let n = MAE_BATCH * MAE_CHANNELS * MAE_SIDE * MAE_SIDE;
    let images = Images::from_vec(
        rng.uniform_vec(n, 0.0, 1.0),
        [MAE_BATCH, MAE_CHANNELS, MAE_SIDE, MAE_SIDE],
        device(),
    )?;
    let mut src = RepeatBatch(images);
    let times = time_steps(steps, || {
        trainer_step(&task, &mut src, &mut opt, &vars, &mut rng, 1e-4, 0.0)
    })?;
    Ok((times, store.num_elements()))
}

/// One step of `LoopTrainer` without its logging and guards: forward/backward of one
/// micro-batch (`accumulate`, i.e. the task's `forward_backward`, fused ops' parameter
/// gradients delivered aside), the norm, AdamW at `lr` with the division by the weight and
/// clipping at `clip` (0: none, as the PyTorch side of `mlm_train` and `mae_train`) folded in
/// (`clip_scale`, `step_scaled`), `after_step`.
fn trainer_step<T: PretextTask>(
    task: &T,
    data: &mut dyn BatchSource<T::Batch>,
    opt: &mut AdamW,
    vars: &[Tensor],
    rng: &mut SslRng,
    lr: f64,
    clip: f64,
) -> Res<()> {
    let acc = accumulate(task, data, 1, vars, rng, precision())?;
    let (_, scale) = clip_scale(&acc.grads, 1.0 / acc.weight_sum, clip)?;
    opt.step_scaled(&acc.grads, lr, scale)?;
    task.after_step()?;
    Ok(())
}

/// The trainer's AdamW settings (`TrainConfig::default()`).
fn trainer_adamw() -> AdamWConfig {
    AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.05,
    }
}

// ---- PatchTST masked patches ----
const SERIES_BATCH: usize = 32;
const SERIES_LEN: usize = 336;

fn series_flops() -> f64 {
    let rows = SERIES_BATCH as f64;
    let n = (SERIES_LEN / 12) as f64; // 28 patches
    mm(rows * n, 12.0, 64.0) + 3.0 * layer_flops(rows, n, 64.0, 128.0) + mm(rows * n, 64.0, 12.0)
}

/// Noisy sines of random frequency, as `ssl-timeseries`' bench.
fn series_data(n: usize, t: usize, seed: u64) -> Res<Vec<SeqExample>> {
    let mut rng = SslRng::new(seed);
    (0..n)
        .map(|_| {
            let f = 1.0 + 4.0 * rng.uniform();
            let v = (0..t)
                .map(|s| {
                    (s as f32 * f / t as f32 * std::f32::consts::TAU).sin() + 0.1 * rng.normal()
                })
                .collect();
            Ok(SeqExample::new(v, t, 1)?)
        })
        .collect()
}

fn series(steps: usize) -> Res<(Vec<f64>, usize)> {
    let store = ParamStore::new(device());
    let pb = store.builder(0);
    let cfg = PatchTstConfig {
        patch_len: 12,
        stride: 12,
        dropout: 0.0,
        transformer: TransformerConfig {
            dim: 64,
            depth: 3,
            heads: 4,
            mlp_dim: 128,
            dropout: 0.0,
            ..TransformerConfig::default()
        },
    };
    let enc = PatchTstEncoder::new(&cfg, 1, &pb)?;
    let task = MaskedPatchTask::new(enc, MaskedPatchConfig { mask_ratio: 0.4 }, &pb)?;
    let mut src = InMemorySeqSource::new(
        series_data(256, SERIES_LEN, 2)?,
        SERIES_BATCH,
        0,
        true,
        device(),
    )?;
    let mut opt = AdamW::new(&store, trainer_adamw())?;
    let vars: Vec<Tensor> = opt.vars().map(|v| v.as_tensor().clone()).collect();
    let mut rng = SslRng::new(0);
    let times = time_steps(steps, || {
        trainer_step(&task, &mut src, &mut opt, &vars, &mut rng, 1e-3, 1.0)
    })?;
    Ok((times, store.num_elements()))
}

// ---- TS2Vec ----
const TS2VEC_BATCH: usize = 8;
const TS2VEC_LEN: usize = 256;
/// Fewest timed steps: the crops are random, so one step's work varies.
const TS2VEC_MIN_STEPS: usize = 20;

/// Expected forward FLOPs over the crop draw (see the module documentation).
fn ts2vec_flops() -> f64 {
    let cfg = TcnConfig::default();
    let (h, o, k) = (cfg.hidden as f64, cfg.output as f64, cfg.kernel as f64);
    let row = mm(1.0, 1.0, h)
        + cfg.depth as f64 * 2.0 * mm(1.0, k * h, h)
        + mm(1.0, k * h, o)
        + mm(1.0, k * o, o)
        + mm(1.0, h, o);
    let (b, t) = (TS2VEC_BATCH as f64, TS2VEC_LEN as f64);
    let mut total = 0.0;
    for c in 2..=TS2VEC_LEN {
        let mut f = b * (2.0 * c as f64 + (t - c as f64) / 2.0) * row;
        let mut n = c;
        while n > 1 {
            let nf = n as f64;
            f += nf * mm(2.0 * b, o, 2.0 * b) + b * mm(2.0 * nf, o, 2.0 * nf);
            n /= 2;
        }
        if n == 1 {
            f += mm(2.0 * b, o, 2.0 * b);
        }
        total += f;
    }
    total / (TS2VEC_LEN - 1) as f64
}

fn ts2vec(steps: usize) -> Res<(Vec<f64>, usize)> {
    let store = ParamStore::new(device());
    let cfg = TcnConfig {
        dropout: 0.0,
        ..TcnConfig::default()
    };
    let enc = TcnEncoder::new(&cfg, 1, &store.builder(0))?;
    let task = Ts2VecTask::new(enc, Ts2VecConfig::default(), &store)?;
    let mut src = InMemorySeqSource::new(
        series_data(64, TS2VEC_LEN, 3)?,
        TS2VEC_BATCH,
        0,
        true,
        device(),
    )?;
    let mut opt = AdamW::new(&store, trainer_adamw())?;
    let vars: Vec<Tensor> = opt.vars().map(|v| v.as_tensor().clone()).collect();
    let mut rng = SslRng::new(0);
    let times = time_steps(steps.max(TS2VEC_MIN_STEPS), || {
        trainer_step(&task, &mut src, &mut opt, &vars, &mut rng, 1e-3, 1.0)
    })?;
    Ok((times, store.num_elements()))
}

// ---- CLIP ----
const CLIP_BATCH: usize = 64;
const CLIP_SEQ: usize = 16;
const CLIP_VOCAB: usize = 1000;

fn clip_flops() -> f64 {
    let b = CLIP_BATCH as f64;
    mm(b * 16.0, 3.0 * 8.0 * 8.0, 64.0) // patch embedding, 16 patches
        + 2.0 * layer_flops(b, 17.0, 64.0, 128.0)
        + 2.0 * layer_flops(b, CLIP_SEQ as f64, 64.0, 128.0)
        + 2.0 * mm(b, 64.0, 64.0) // the two projections
        + mm(b, 64.0, b) // logits
}

fn clip(steps: usize) -> Res<(Vec<f64>, usize)> {
    let dev = device().clone();
    let mut cfg = ClipConfig::default();
    cfg.text.vocab_size = CLIP_VOCAB;
    let store = ParamStore::new(&dev);
    let model = ClipModel::new(&cfg, &store.builder(0))?;
    let mut rng = SslRng::new(0);
    let px = rng.uniform_vec(CLIP_BATCH * 3 * 32 * 32, 0.0, 1.0);
    let ids: Vec<u32> = (0..CLIP_BATCH * CLIP_SEQ)
        .map(|_| 5 + rng.below(CLIP_VOCAB - 5) as u32)
        .collect();
    let batch = PairBatch::new(
        Images::from_vec(px, [CLIP_BATCH, 3, 32, 32], &dev)?,
        BertInput {
            input_ids: Tensor::from_vec(ids, (CLIP_BATCH, CLIP_SEQ), &dev)?,
            attention_mask: Tensor::ones((CLIP_BATCH, CLIP_SEQ), DType::F32, &dev)?,
            token_type_ids: Tensor::zeros((CLIP_BATCH, CLIP_SEQ), DType::U32, &dev)?,
        },
    )?;
    // The same batch every step (the suite times compute, not data).
    let mut src = RepeatBatch(batch);
    let mut opt = AdamW::new(&store, trainer_adamw())?;
    let vars: Vec<Tensor> = opt.vars().map(|v| v.as_tensor().clone()).collect();
    let times = time_steps(steps, || {
        trainer_step(&model, &mut src, &mut opt, &vars, &mut rng, 1e-3, 1.0)
    })?;
    Ok((times, store.num_elements()))
}

// ---- peak matmul ----
const PEAK_N: usize = 1024;

fn peak_matmul(reps: usize) -> Res<Vec<f64>> {
    let dev = device().clone();
    let a = Tensor::randn(0f32, 1.0, (PEAK_N, PEAK_N), &dev)?;
    let b = Tensor::randn(0f32, 1.0, (PEAK_N, PEAK_N), &dev)?;
    time_steps(reps, || {
        let c = a.matmul(&b)?;
        debug_assert_eq!(c.dims(), &[PEAK_N, PEAK_N]);
        Ok(())
    })
}

/// The same product on AMX tiles in bf16 (`ssl_kernels::amx_matmul_bt`, packing included),
/// on CPUs that have them: the path every bf16 product takes there (where
/// `ssl_kernels::amx_usable`).
fn peak_amx(reps: usize) -> Res<Vec<f64>> {
    let a: Vec<f32> = (0..PEAK_N * PEAK_N).map(|i| (i as f32).sin()).collect();
    let b: Vec<f32> = (0..PEAK_N * PEAK_N).map(|i| (i as f32).cos()).collect();
    let mut c = vec![0f32; PEAK_N * PEAK_N];
    let dims = (PEAK_N, PEAK_N, PEAK_N);
    time_steps(reps, || {
        let ran = ssl_kernels::amx_matmul_bt(
            &mut c,
            PEAK_N,
            (&a, PEAK_N),
            (&b, PEAK_N),
            dims,
            1.0,
            false,
        );
        if ran {
            Ok(())
        } else {
            Err("AMX became unavailable".into())
        }
    })
}

/// The same product on our bf16 path (bf16 operands rounded while packed, f32 sums: the
/// AVX-512 BF16 kernel, or AMX tiles where `ssl_kernels::amx_usable`), as the stack's and the
/// MLM head's products take it under `--precision bf16`.
fn peak_bf16(reps: usize) -> Res<Vec<f64>> {
    let a = Tensor::randn(0f32, 1.0, (PEAK_N, PEAK_N), &CPU)?;
    let b = Tensor::randn(0f32, 1.0, (PEAK_N, PEAK_N), &CPU)?;
    if !ssl_kernels::linear_takes_bf16(PEAK_N, PEAK_N, PEAK_N) {
        return Err("the bf16 kernel's size rule excludes the peak product".into());
    }
    time_steps(reps, || {
        let c = a.apply_op2_no_bwd(&b, &ssl_kernels::MatmulT { bf16: true })?;
        debug_assert_eq!(c.dims(), &[PEAK_N, PEAK_N]);
        Ok(())
    })
}

/// Prints what the trainer's bf16 check measured on this CPU (a linear layer's three
/// products in each precision) and so what `train.matmul_precision = "bf16"` runs here.
fn report_bf16_check(json: bool) -> Res<()> {
    let c = ssl_kernels::bf16_check()
        .ok_or("--precision bf16: no reduced-precision kernel on this CPU")?;
    let (b, f) = (c.bf16_seconds * 1e3, c.f32_seconds * 1e3);
    let (fb, ff) = (c.forward.bf16_seconds * 1e3, c.forward.f32_seconds * 1e3);
    let pick = |bf16: bool| if bf16 { "bf16" } else { "f32" };
    if json {
        let ms = |x: f64| (x * 1000.0).round() / 1000.0;
        let o = json!({
            "side": "ours",
            "name": "bf16_check",
            "bf16_ms": ms(b),
            "f32_ms": ms(f),
            "bf16_faster": c.bf16_faster(),
            "forward_bf16_ms": ms(fb),
            "forward_f32_ms": ms(ff),
            "inference_faster": c.forward.bf16_faster(),
            "kernel": ssl_kernels::reduced_precision_kernel().name(),
        });
        println!("{o}");
    } else {
        println!(
            "bf16 check     bf16 {b:.2} ms  f32 {f:.2} ms: train.matmul_precision = bf16 trains in {} here; forward {fb:.2} / {ff:.2} ms: inference in {} (reduced-precision kernel: {})",
            pick(c.bf16_faster()),
            pick(c.forward.bf16_faster()),
            ssl_kernels::reduced_precision_kernel(),
        );
    }
    Ok(())
}

/// `WARMUP` untimed calls of `step`, then `steps` timed ones: milliseconds per call.
fn time_steps(steps: usize, mut step: impl FnMut() -> Res<()>) -> Res<Vec<f64>> {
    for _ in 0..WARMUP {
        step()?;
    }
    device().synchronize()?;
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t0 = Instant::now();
        step()?;
        // A GPU runs the step's kernels asynchronously: the time counts until they finish.
        device().synchronize()?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(times)
}

/// The median (mean of the two middle values for an even count, as Python's
/// `statistics.median`).
fn median(times: &[f64]) -> f64 {
    let mut t = times.to_vec();
    t.sort_by(f64::total_cmp);
    let n = t.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        t[n / 2]
    } else {
        0.5 * (t[n / 2 - 1] + t[n / 2])
    }
}

fn report(json: bool, name: &str, times: &[f64], flops: f64, params: Option<usize>) {
    let med = median(times);
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    let gflops = flops / (med * 1e-3) / 1e9;
    if json {
        let mut o = json!({
            "side": "ours",
            "name": name,
            "median_ms": (med * 1000.0).round() / 1000.0,
            "min_ms": (min * 1000.0).round() / 1000.0,
            "steps": times.len(),
            "flops": flops,
            "gflops": (gflops * 100.0).round() / 100.0,
            "threads": threads(),
        });
        if let Some(p) = params {
            o["params"] = p.into();
        }
        println!("{o}");
    } else {
        println!(
            "{name:<14} median {med:>9.2} ms  min {min:>9.2} ms  {gflops:>7.1} GFLOP/s  ({} steps)",
            times.len()
        );
    }
}

fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The stack's product precision for every model (`--precision`).
static PRECISION: OnceLock<MatmulPrecision> = OnceLock::new();

/// The device every model runs on: the CPU unless `--device cuda` set one (on the compute
/// thread, where its context is used).
static DEVICE: OnceLock<Device> = OnceLock::new();
static CPU: Device = Device::Cpu;

fn device() -> &'static Device {
    DEVICE.get().unwrap_or(&CPU)
}

fn precision() -> MatmulPrecision {
    PRECISION.get().copied().unwrap_or_default()
}

/// An inference context (no backward) in the chosen precision.
fn eval_ctx(rng: &mut SslRng) -> Ctx<'_> {
    Ctx::inference(rng).with_precision(precision())
}

struct Args {
    json: bool,
    steps: usize,
    only: Option<Vec<String>>,
    precision: MatmulPrecision,
    /// `--device cuda`: the first CUDA GPU (needs the `cuda` feature).
    cuda: bool,
}

fn parse_args() -> Res<Args> {
    let mut args = Args {
        json: false,
        steps: 20,
        only: None,
        precision: MatmulPrecision::F32,
        cuda: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--json" => args.json = true,
            "--steps" => {
                args.steps = it.next().ok_or("--steps needs a value")?.parse()?;
                if args.steps == 0 {
                    return Err("--steps must be at least 1".into());
                }
            }
            "--only" => {
                let names: Vec<String> = it
                    .next()
                    .ok_or("--only needs a value")?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect();
                if let Some(bad) = names.iter().find(|n| !MODELS.contains(&n.as_str())) {
                    return Err(format!("unknown model `{bad}` (one of {MODELS:?})").into());
                }
                args.only = Some(names);
            }
            "--precision" => {
                args.precision = match it.next().as_deref() {
                    Some("f32") => MatmulPrecision::F32,
                    Some("bf16") => MatmulPrecision::Bf16,
                    other => {
                        return Err(format!("--precision takes f32 or bf16, not {other:?}").into())
                    }
                };
            }
            "--device" => {
                args.cuda = match it.next().as_deref() {
                    Some("cpu") => false,
                    Some("cuda") => true,
                    other => {
                        return Err(format!("--device takes cpu or cuda, not {other:?}").into())
                    }
                };
            }
            // `cargo bench` passes `--bench` to harness-less benches.
            "--bench" => {}
            other => return Err(format!("unknown argument `{other}`").into()),
        }
    }
    // On a GPU bf16 products are cuBLAS's; on the CPU they need the AVX-512 BF16 kernels.
    if args.precision == MatmulPrecision::Bf16 && !args.cuda && !bf16_matmul_available() {
        return Err("--precision bf16: this CPU has no AVX-512 BF16".into());
    }
    Ok(args)
}

fn main() -> Res<()> {
    ssl_core::keep_freed_memory();
    ssl_core::candle_ops_on_caller();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Before anything starts rayon's pool or asks candle for its thread count.
        std::env::set_var("RAYON_NUM_THREADS", "2");
    }
    let args = parse_args()?;
    PRECISION
        .set(args.precision)
        .map_err(|_| "precision set twice")?;
    // As the `ssl` binary: the models run on a compute thread (`ssl_core::on_compute_threads`).
    ssl_core::on_compute_threads(|| run(&args).map_err(|e| e.to_string()))?;
    Ok(())
}

/// Times every model asked for.
fn run(args: &Args) -> Res<()> {
    if args.cuda {
        let gpu = Device::new_cuda(0).map_err(|e| {
            format!("--device cuda: {e} (build with `cargo bench -p ssl-cli --features cuda`)")
        })?;
        DEVICE.set(gpu).map_err(|_| "device set twice")?;
    }
    let peak = peak_matmul(args.steps.max(10))?;
    let n = PEAK_N as f64;
    report(args.json, "peak_matmul", &peak, mm(n, n, n), None);
    if !args.cuda && ssl_kernels::amx_usable() {
        let amx = peak_amx(args.steps.max(10))?;
        report(args.json, "peak_amx_bf16", &amx, mm(n, n, n), None);
    }
    if !args.cuda && args.precision == MatmulPrecision::Bf16 {
        let bf16 = peak_bf16(args.steps.max(10))?;
        report(args.json, "peak_bf16", &bf16, mm(n, n, n), None);
        report_bf16_check(args.json)?;
    }
    for name in MODELS {
        if args
            .only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|x| x == name))
        {
            continue;
        }
        let (times, params, flops) = match name {
            "mlm_train" => {
                let (t, p) = mlm(args.steps, true)?;
                (t, p, 3.0 * mlm_forward_flops())
            }
            "mae_train" => {
                let (t, p) = mae(args.steps)?;
                (t, p, 3.0 * mae_flops())
            }
            "series_train" => {
                let (t, p) = series(args.steps)?;
                (t, p, 3.0 * series_flops())
            }
            "clip_train" => {
                let (t, p) = clip(args.steps)?;
                (t, p, 3.0 * clip_flops())
            }
            "ts2vec_train" => {
                let (t, p) = ts2vec(args.steps)?;
                (t, p, 3.0 * ts2vec_flops())
            }
            "mlm_embed" => {
                let (t, p) = mlm(args.steps, false)?;
                (t, p, mlm_encoder_flops())
            }
            _ => unreachable!("every name of MODELS is matched"),
        };
        report(args.json, name, &times, flops, Some(params));
    }
    Ok(())
}
