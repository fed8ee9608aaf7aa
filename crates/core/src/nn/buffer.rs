//! Output buffers that a kernel overwrites in full.
use candle_core::WithDType;

/// A vector of `len` elements whose contents are unspecified until written.
///
/// `vec![0.0; len]` zero-fills on the calling thread (the heap is never trimmed, see `crate::malloc`, so `calloc`
/// cannot hand out fresh zero pages), while the other cores wait. For an output that a GEMM (`read_dst = false`) or a
/// row kernel then overwrites, that fill is pure overhead: `perf` put ~0.25 s of a 5.3 s paper TransUNet train step
/// (batch 4, 2 threads) in such fills.
///
/// # Safety
/// The caller writes every element before any is read. (`T` is a candle element type: plain data, every bit pattern
/// a valid value, no destructor.)
pub(crate) unsafe fn uninit_vec<T: WithDType>(len: usize) -> Vec<T> {
    // SAFETY: same contract.
    unsafe { uninit_vec_with_spare(len, 0) }
}

/// [`uninit_vec`] with room for `spare` more elements, so that appending them does not move the buffer.
///
/// # Safety
/// As for [`uninit_vec`].
// The kernels write through `&mut [T]`, so the buffer is a `Vec<T>` before it is written, as candle's own CPU kernels
// do (cpu_backend::utils::unary_map_vec_par): nothing reads an element before its write, and `T` has no invalid bit
// patterns.
#[allow(clippy::uninit_vec)]
pub(crate) unsafe fn uninit_vec_with_spare<T: WithDType>(len: usize, spare: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(len + spare);
    // SAFETY: capacity is `len`; the caller initialises every element before reading (contract above).
    unsafe { v.set_len(len) };
    v
}
