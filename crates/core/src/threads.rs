//! Runs a command's work on a worker of the compute thread pool, not on the process's main thread.
//!
//! Every CPU kernel that splits work (the `gemm` crate's products, our convolution, norm and elementwise kernels)
//! does so through rayon. Called from a thread outside the pool, each split is a "cold" injection: the caller queues
//! the job, wakes a sleeping worker (which wakes the second), and blocks on a lock until both are done, so every
//! product pays two thread wake-ups and the caller's core idles meanwhile. A training step issues thousands of such
//! splits. Called from a pool worker instead, the caller runs one half itself and the other worker steals the rest
//! (or the caller takes it back if that worker is slow to wake).
//!
//! The pool has candle's thread count (`RAYON_NUM_THREADS`, else the physical cores) and the same threads serve every
//! rayon call made inside. `ULTRAREFINER_COMPUTE_POOL=0` runs the work on the calling thread instead.

/// Stack of each pool thread: 4× a main thread's usual 8 MiB. The work includes candle's recursive walk over the
/// autograd graph (frames along the deepest path), which rayon's 2 MiB default is not sized for.
const STACK_BYTES: usize = 32 << 20;

/// Runs `f` on a worker of a new pool of `candle_core::utils::get_num_threads()` threads and returns its result.
/// Falls back to running `f` on the calling thread if the pool cannot be created or is switched off.
pub fn run_on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if std::env::var("ULTRAREFINER_COMPUTE_POOL").is_ok_and(|v| v == "0") {
        return f();
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(candle_core::utils::get_num_threads())
        .stack_size(STACK_BYTES)
        .thread_name(|i| format!("ur-compute-{i}"))
        .build();
    match pool {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

#[cfg(test)]
mod tests {
    /// The work runs on a worker of a pool of candle's thread count (not on the calling thread) and its result comes
    /// back; rayon calls inside use that pool.
    #[test]
    fn runs_on_a_pool_worker_with_candles_thread_count() {
        let caller = std::thread::current().id();
        let (index, threads, same_thread, sum) = super::run_on_compute_pool(|| {
            use rayon::prelude::*;
            (
                rayon::current_thread_index(),
                rayon::current_num_threads(),
                std::thread::current().id() == caller,
                (0..1000u64).into_par_iter().sum::<u64>(),
            )
        });
        if std::env::var("ULTRAREFINER_COMPUTE_POOL").is_ok_and(|v| v == "0") {
            return;
        }
        assert!(index.is_some(), "not on a pool worker");
        assert!(!same_thread);
        assert_eq!(threads, candle_core::utils::get_num_threads());
        assert_eq!(sum, 499_500);
    }
}
