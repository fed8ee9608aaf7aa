//! Activations with backward rules that are correct in candle 0.11.1 (SPEC §16.1).
use crate::Result;
use candle_core::Tensor;

/// Exact (erf) GELU, `x·Φ(x)`. `.gelu()` is the tanh approximation and is never used (SPEC §16.1).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu_erf()?)
}

/// Numerically stable softmax along `dim`, built from differentiable primitives.
///
/// `softmax_last_dim` has no backward (silently detaches), hence this. The max is detached: softmax is invariant to
/// the shift, so its gradient contribution is exactly zero and recording it would only cost memory.
pub fn softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    let max = x.max_keepdim(dim)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(dim)?;
    Ok(e.broadcast_div(&s)?)
}
