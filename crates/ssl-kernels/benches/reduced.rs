//! The bf16 setting's products, and TS2Vec's convolution stack, timed against f32 on this CPU
//! (both alternated in one process, medians): where the reduced precision pays and where its
//! size rules keep f32.
//!
//! ```text
//! cargo bench -p ssl-kernels --bench reduced            # products: ms and reduced / f32
//! cargo bench -p ssl-kernels --bench reduced -- tcn     # the TCN op, forward and backward
//! ```

use std::time::Instant;

use candle_core::{Device, Var};
use ssl_kernels::{
    cpu_name, reduced_precision_kernel, time_reduced_product, BufferPool, ReducedKernel, TcnOp,
    TcnSpec,
};

fn main() {
    // `cargo bench` passes `--bench`; the mode is the first other argument.
    let mode = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let kernel = reduced_precision_kernel();
    println!(
        "{}; reduced-precision kernel: {kernel}; {} threads",
        cpu_name(),
        rayon::current_num_threads()
    );
    if kernel == ReducedKernel::F32 {
        println!("no reduced-precision kernel on this CPU: nothing to compare");
        return;
    }
    match mode.as_deref() {
        Some("tcn") => tcn(),
        _ => products(),
    }
}

/// Products of the suite's models and of larger ones, in the orientation each takes:
/// `(name, (m, n, k), (A transposed, B transposed))`. On AVX-512 FP16 the narrow ones (MAE's
/// 128 x 128, the TCN's 64 x 192) stay f32 under the kernels' rule: their ratio is the same
/// product timed twice, this machine's noise.
fn products() {
    let shapes = [
        (
            "BERT-mini dW 256 (halves' 1024 tokens)",
            (256, 256, 1024),
            (true, false),
        ),
        (
            "BERT-mini dW 256, 4096 tokens",
            (256, 256, 4096),
            (true, false),
        ),
        (
            "BERT-base dW 768, 2048 tokens",
            (768, 768, 2048),
            (true, false),
        ),
        (
            "BERT-base dW 768, 8192 tokens",
            (768, 768, 8192),
            (true, false),
        ),
        (
            "BERT-base dW 3072, 8192 tokens",
            (3072, 768, 8192),
            (true, false),
        ),
        ("BERT-base x W^T 768", (8192, 768, 768), (false, true)),
        ("BERT-base g W 3072", (8192, 768, 3072), (false, false)),
        ("MAE decoder dW 128 x 128", (128, 128, 1040), (true, false)),
        ("MAE decoder dX 128", (1040, 128, 128), (false, false)),
        (
            "TCN dW 64 x 192, 12000 steps",
            (64, 192, 12000),
            (true, false),
        ),
        (
            "TCN d(col) 192, 12000 steps",
            (12000, 192, 64),
            (false, false),
        ),
        ("TCN last dW 320 x 960", (320, 960, 12000), (true, false)),
        ("TCN last d(col) 960", (12000, 960, 320), (false, false)),
    ];
    println!(
        "{:>40}  {:>10} {:>10} {:>7}",
        "product (m x n x k)", "reduced", "f32", "ratio"
    );
    for (name, (m, n, k), ts) in shapes {
        let (r, f) = time_reduced_product((m, n, k), ts, 9);
        println!(
            "{name:>40}  {:>7.3} ms {:>7.3} ms {:>7.2}   ({m} x {n} x {k})",
            r * 1e3,
            f * 1e3,
            r / f
        );
    }
}

/// TS2Vec's encoder body at its defaults (hidden 64, output 320, depth 10, kernel 3), batch 8,
/// forward and backward, the bf16 setting against f32, alternated 20 times after 4 warm-ups.
fn tcn() {
    let dev = Device::Cpu;
    let b = 8;
    let spec = |bf16| TcnSpec {
        hidden: 64,
        output: 320,
        depth: 10,
        kernel: 3,
        causal: false,
        bf16,
    };
    println!(
        "{:>6}  {:>10} {:>10} {:>7}",
        "length", "reduced", "f32", "ratio"
    );
    for t in [128usize, 512, 1500, 3000] {
        let np = spec(false).param_len();
        let p: Vec<f32> = (0..np).map(|i| (i as f32 * 0.37).sin() * 0.05).collect();
        let h: Vec<f32> = (0..b * t * 64).map(|i| (i as f32 * 0.91).sin()).collect();
        let (Ok(hv), Ok(pv)) = (
            Var::from_vec(h, (b, t, 64), &dev),
            Var::from_vec(p, np, &dev),
        ) else {
            eprintln!("could not build the inputs");
            return;
        };
        let pool = BufferPool::default();
        let mut times = [Vec::new(), Vec::new()];
        for rep in 0..24 {
            for (i, bf16) in [true, false].into_iter().enumerate() {
                let op = TcnOp::new(spec(bf16), true, pool.clone());
                let t0 = Instant::now();
                let step = hv
                    .as_tensor()
                    .apply_op2(pv.as_tensor(), op)
                    .and_then(|out| out.sum_all())
                    .and_then(|loss| loss.backward());
                if let Err(e) = step {
                    eprintln!("TCN step failed: {e}");
                    return;
                }
                if rep >= 4 {
                    times[i].push(t0.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let (r, f) = (median(&mut times[0]), median(&mut times[1]));
        println!("{t:>6}  {r:>7.2} ms {f:>7.2} ms {:>7.2}", r / f);
    }
}
