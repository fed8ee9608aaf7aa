//! glibc allocator settings for CPU training.
//!
//! A CPU training step allocates and frees hundreds of activation and gradient buffers of 1–30 MB. With glibc's
//! defaults, buffers of that size are served by `mmap` (or trimmed back to the kernel when freed at the top of the
//! heap), so every step pays again for zeroing fresh pages: `perf` showed ~18 % of a paper TransUNet train step in
//! page-fault handling (`clear_page_erms`, `exc_page_fault`). Keeping buffers up to 32 MiB in the heap and never
//! trimming it took the step from 21.5 s to 16.2 s (batch 4, 2 threads) at the same peak RSS.
//!
//! 32 MiB is the largest mmap threshold glibc accepts, and a batch-4 step still allocates buffers above it (the
//! decoder's 112² and 224² feature maps: 38–51 MB), each one fresh zeroed pages again (15 % of a forward pass in
//! `clear_page_erms`). So `mmap` is also switched off for ordinary allocations (`M_MMAP_MAX = 0`): every buffer comes
//! from the heap and is reused once freed. Measured on alternated runs: train step 8.06 → 6.89 s and 9.20 → 8.22 s,
//! forward 5.0–5.4 → 4.5 s on a loaded machine, peak RSS unchanged (3.55 GB).
//!
//! All threads share the main arena (`M_ARENA_MAX = 1`). The training step runs on a compute-pool thread
//! ([`crate::threads`]); with an arena of its own, buffers freed by the setup on the main thread were not reused
//! and the step's peak RSS rose from 3.31 to 3.35–3.74 GB. One arena: 3.30–3.31 GB. The large buffers here make
//! contention on the arena lock negligible (`augment-throughput` on 2 threads: 505–514 vs 507–516 items/s).

/// glibc `mallopt` parameters (malloc.h).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod ffi {
    pub const M_TRIM_THRESHOLD: i32 = -1;
    pub const M_MMAP_THRESHOLD: i32 = -3;
    pub const M_MMAP_MAX: i32 = -4;
    pub const M_ARENA_MAX: i32 = -8;
    extern "C" {
        pub fn mallopt(param: i32, value: i32) -> i32;
    }
}

/// Largest threshold glibc accepts for `M_MMAP_THRESHOLD` on 64-bit targets (half its 64 MiB heap size).
pub const MMAP_THRESHOLD: i32 = 32 << 20;

/// Serves every allocation from the heap and keeps freed buffers there for reuse (module docs). Call once at process
/// start, before threads are spawned. Returns whether the allocator accepted all four settings (always `false` off glibc, where this
/// does nothing). The environment variable `ULTRAREFINER_MALLOC=default` leaves the allocator untouched.
pub fn keep_freed_memory() -> bool {
    if std::env::var("ULTRAREFINER_MALLOC").is_ok_and(|v| v == "default") {
        return false;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is called before any other thread exists.
        unsafe {
            ffi::mallopt(ffi::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && ffi::mallopt(ffi::M_TRIM_THRESHOLD, i32::MAX) == 1
                && ffi::mallopt(ffi::M_MMAP_MAX, 0) == 1
                && ffi::mallopt(ffi::M_ARENA_MAX, 1) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    /// glibc accepts the settings (so a silent no-op on a glibc system is caught).
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_accepts_the_settings() {
        assert!(super::keep_freed_memory());
    }
}
