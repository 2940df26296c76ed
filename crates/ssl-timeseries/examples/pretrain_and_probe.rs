//! Pretrain a series encoder without labels, then probe its frozen embeddings with labels,
//! against the same encoder with random weights.
//!
//! ```text
//! cargo run --release -p ssl-timeseries --example pretrain_and_probe            # synthetic
//! cargo run --release -p ssl-timeseries --example pretrain_and_probe -- \
//!     ../shared/data/timeseries/ucr/GunPoint_TRAIN.parquet ../shared/data/timeseries/ucr/GunPoint_TEST.parquet \
//!     [tcn|gru|lstm|patchtst|transformer] [ts2vec|masked] [steps]
//! ```
//! Training uses the TRAIN split's series only (as TS2Vec's protocol); the probe is fitted on
//! TRAIN embeddings and scored on TEST.

use candle_core::Device;
use ssl_core::probe::{fit_linear_probe, knn_accuracy, KnnConfig, LinearProbeConfig};
use ssl_core::seq::{
    InMemorySeqSource, MaskedFeatureConfig, MaskedFeatureTask, SeqBatch, SeqExample,
};
use ssl_core::{Ctx, LoopTrainer, ParamStore, PretextTask, SslRng, TrainConfig, Trainer};
use ssl_timeseries::{
    read_series, EncoderConfig, EncoderKind, MaskedPatchConfig, MaskedPatchTask, PatchTstEncoder,
    SeriesEncoder, Ts2VecConfig, Ts2VecTask,
};

type AnyError = Box<dyn std::error::Error>;

fn synthetic(n: usize, seed: u64) -> (Vec<SeqExample>, Vec<String>) {
    let mut rng = SslRng::new(seed);
    let mut ex = Vec::new();
    let mut labels = Vec::new();
    for i in 0..n {
        let class = i % 3;
        let (period, phase) = (
            [20.0f32, 10.0, 5.0][class],
            rng.uniform() * std::f32::consts::TAU,
        );
        let v = (0..100)
            .map(|t| {
                (t as f32 / period * std::f32::consts::TAU + phase).sin() * (0.5 + rng.uniform())
                    + 0.2 * rng.normal()
            })
            .collect();
        let mut e = SeqExample::new(v, 100, 1).expect("100 steps x 1 channel");
        e.normalize_instance();
        ex.push(e);
        labels.push(class.to_string());
    }
    (ex, labels)
}

fn load(path: &str) -> Result<(Vec<SeqExample>, Vec<String>), AnyError> {
    let set = read_series(&[path], "x", Some("label"), None, false)?;
    let mut series = set.series;
    for s in &mut series {
        s.normalize_instance();
    }
    Ok((series, set.labels.unwrap_or_default()))
}

fn embed<T: PretextTask<Batch = SeqBatch>>(
    task: &T,
    ex: &[SeqExample],
) -> Result<(Vec<f32>, usize), AnyError> {
    let mut out = Vec::new();
    let mut dim = 0;
    let mut rng = SslRng::new(0);
    for chunk in ex.chunks(64) {
        let b = SeqBatch::from_examples(&chunk.iter().collect::<Vec<_>>(), &Device::Cpu)?;
        let e = task.embed(&b, &mut Ctx::eval(&mut rng))?;
        dim = e.dim(1)?;
        out.extend(e.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok((out, dim))
}

fn probe<T: PretextTask<Batch = SeqBatch>>(
    task: &T,
    train: &(Vec<SeqExample>, Vec<String>),
    test: &(Vec<SeqExample>, Vec<String>),
) -> Result<(f64, f64), AnyError> {
    let mut classes: Vec<&String> = train.1.iter().chain(&test.1).collect();
    classes.sort();
    classes.dedup();
    let ids = |l: &[String]| -> Vec<usize> {
        l.iter()
            .map(|s| classes.binary_search(&s).unwrap_or(0))
            .collect()
    };
    let ((a, dim), (b, _)) = (embed(task, &train.0)?, embed(task, &test.0)?);
    let (ya, yb) = (ids(&train.1), ids(&test.1));
    let linear = fit_linear_probe(&a, &ya, dim, classes.len(), &LinearProbeConfig::default())?
        .accuracy(&b, &yb)?;
    let knn = knn_accuracy(&a, &ya, &b, &yb, dim, classes.len(), &KnnConfig::default())?;
    Ok((linear, knn))
}

fn encoder_config(kind: EncoderKind) -> EncoderConfig {
    let mut cfg = EncoderConfig {
        kind,
        ..EncoderConfig::default()
    };
    cfg.patchtst.patch_len = 8;
    cfg.patchtst.stride = 8;
    cfg
}

/// Probes a randomly initialised model (`make(1)`), pretrains another (`make(0)`) and
/// probes it.
fn run<T: PretextTask<Batch = SeqBatch>>(
    make: impl Fn(u64) -> Result<T, AnyError>,
    train: &(Vec<SeqExample>, Vec<String>),
    test: &(Vec<SeqExample>, Vec<String>),
    steps: u64,
    label: &str,
) -> Result<(), AnyError> {
    let (rl, rk) = probe(&make(1)?, train, test)?;
    let task = make(0)?;
    let mut src = InMemorySeqSource::new(train.0.clone(), 8, 0, true, &Device::Cpu)?;
    let cfg = TrainConfig {
        max_steps: steps,
        batch_size: 8,
        lr: 1e-3,
        warmup_steps: 10,
        log_every: 50,
        health_every: 0,
        ..TrainConfig::default()
    };
    let t0 = std::time::Instant::now();
    let report = LoopTrainer::new(cfg, None)?.fit(&task, &mut src, None)?;
    let (l, k) = probe(&task, train, test)?;
    println!(
        "{label}, {steps} steps in {:.1} s (loss {:.3} -> {:.3})",
        t0.elapsed().as_secs_f64(),
        report.losses.first().map_or(f64::NAN, |x| x.1),
        report.losses.last().map_or(f64::NAN, |x| x.1)
    );
    println!("random init: linear {rl:.3}  kNN {rk:.3}");
    println!("pretrained:  linear {l:.3}  kNN {k:.3}");
    Ok(())
}

fn main() -> Result<(), AnyError> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (train, test) = if args.len() >= 2 {
        (load(&args[0])?, load(&args[1])?)
    } else {
        println!(
            "no data given: synthetic 3-class waves (pass TRAIN.parquet TEST.parquet for UCR)"
        );
        (synthetic(90, 1), synthetic(90, 2))
    };
    let kind = match args.get(2).map(String::as_str).unwrap_or("tcn") {
        "gru" => EncoderKind::Gru,
        "lstm" => EncoderKind::Lstm,
        "patchtst" => EncoderKind::Patchtst,
        "transformer" => EncoderKind::Transformer,
        _ => EncoderKind::Tcn,
    };
    let task_name = args.get(3).cloned().unwrap_or_else(|| "ts2vec".into());
    let steps: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(200);
    let c = train.0.first().map_or(1, |e| e.features);

    let label = format!("{kind:?} + {task_name}");
    let cfg = encoder_config(kind);
    match (task_name.as_str(), kind) {
        ("masked", EncoderKind::Patchtst) => run(
            |seed| {
                let store = ParamStore::new(&Device::Cpu);
                let pb = store.builder(seed);
                let enc = PatchTstEncoder::new(&cfg.patchtst, c, &pb)?;
                Ok(MaskedPatchTask::new(
                    enc,
                    MaskedPatchConfig::default(),
                    &pb,
                )?)
            },
            &train,
            &test,
            steps,
            &label,
        ),
        ("masked", _) => run(
            |seed| {
                let store = ParamStore::new(&Device::Cpu);
                let pb = store.builder(seed);
                let enc = SeriesEncoder::new(&cfg, c, &pb)?;
                let m = MaskedFeatureConfig {
                    mask_prob: 0.3,
                    span: 5,
                };
                Ok(MaskedFeatureTask::new(enc, c, m, &pb)?)
            },
            &train,
            &test,
            steps,
            &label,
        ),
        _ => run(
            |seed| {
                let store = ParamStore::new(&Device::Cpu);
                let enc = SeriesEncoder::new(&cfg, c, &store.builder(seed))?;
                Ok(Ts2VecTask::new(enc, Ts2VecConfig::default(), &store)?)
            },
            &train,
            &test,
            steps,
            &label,
        ),
    }
}
