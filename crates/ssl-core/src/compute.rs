//! Where the training loop runs: on one of rayon's compute threads.

/// Runs `f` on a worker of a new rayon pool (`RAYON_NUM_THREADS` threads, else one per CPU)
/// and returns its result; when the caller already is a rayon worker, or the pool cannot be
/// built, `f` runs right here.
///
/// Why: every large product, attention block and elementwise pass of the fused kernels is a
/// rayon parallel region. Called from a thread outside the pool (a binary's `main`), each
/// region is handed over to the pool's threads while the caller sleeps, and the serial work
/// between regions (candle's ops, the optimizer's bookkeeping) runs on that extra thread while
/// the pool's threads spin and park: three busy threads on two cores. Run on a pool worker,
/// the serial work and the parallel regions share the same threads. Measured with `cargo
/// bench -p ssl-cli --bench suite -- --precision bf16` (2 threads, three alternating runs
/// each): median MLM step 228-233 ms from `main`, 209-225 ms on a pool worker; MAE 87-103 /
/// 83-86 ms; BERT embeddings 61-66 / 55-60 ms.
///
/// The worker's stack is 64 MiB (the default 2 MiB is small for candle's recursive backward
/// over deep graphs); `f` must be `Send` because it moves to that thread. Thread-bound state
/// (an MPI communicator, a CUDA context) must be created inside `f`, where it is used.
pub fn on_compute_threads<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    match rayon::ThreadPoolBuilder::new()
        .stack_size(64 << 20)
        .thread_name(|i| format!("ssl-compute-{i}"))
        .build()
    {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

/// Runs candle's own elementwise CPU ops on the calling thread: sets `CANDLE_NUM_THREADS=1`
/// unless the user set it. Call it at the start of `main`, before any candle op and before
/// other threads exist (it changes the process environment).
///
/// Why: candle 0.11 spreads its elementwise ops over a pool of its own (`candle-bp-*`, one
/// thread fewer than `CANDLE_NUM_THREADS`, which defaults to rayon's count), whose workers spin
/// for 25,000 pause loops after each op before they sleep, on the same cores as the compute
/// threads. On two cores the CLIP step's profile showed that spinning thread at 12% of all
/// samples. Measured with `cargo bench -p ssl-cli --bench suite -- --precision bf16` (2 threads,
/// five alternating runs each): CLIP step 13.3-13.8 -> 10.9-11.2 ms, MAE 69.7-74.5 ->
/// 68.2-72.3 ms, BERT and PatchTST unchanged. candle's matmuls keep every rayon thread (they
/// follow `RAYON_NUM_THREADS`, not this variable); the fused kernels are rayon's anyway.
pub fn candle_ops_on_caller() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_threads_default_to_one_and_keep_the_users_choice() {
        let before = std::env::var("CANDLE_NUM_THREADS").ok();
        candle_ops_on_caller();
        let after = std::env::var("CANDLE_NUM_THREADS").ok();
        assert_eq!(after, Some(before.unwrap_or_else(|| "1".into())));
    }

    #[test]
    fn runs_on_a_rayon_worker_and_returns_the_result() {
        let (inside, value) =
            on_compute_threads(|| (rayon::current_thread_index().is_some(), 41 + 1));
        assert!(inside);
        assert_eq!(value, 42);
        // Nested calls run in place.
        let nested = on_compute_threads(|| on_compute_threads(rayon::current_thread_index));
        assert!(nested.is_some());
    }
}
