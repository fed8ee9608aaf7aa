//! Activations with backward rules that are correct in candle 0.11.1 (SPEC §16.1).
use crate::Result;
use candle_core::Tensor;

/// Exact (erf) GELU, `x·Φ(x)`. `.gelu()` is the tanh approximation and is never used (SPEC §16.1). On the CPU in
/// f32/f64 one fused op (candle's values, one-pass backward with the exact `1/√(2π)`), elsewhere `gelu_erf`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if super::fused::supported(&[x]) {
        return super::fused::gelu(x);
    }
    Ok(x.gelu_erf()?)
}

/// `max(x, 0)`. On the CPU in f32/f64 one fused op whose backward is one pass; elsewhere candle's `relu`. Both give
/// zero gradient where `x < 0`; at exactly 0 the fused op gives 0 (PyTorch) and candle 1.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if super::fused::supported(&[x]) {
        return super::fused::relu(x);
    }
    Ok(x.relu()?)
}

/// `max(a + b, 0)` of two tensors of one shape (a residual join). On the CPU in f32/f64 one fused op with the
/// values and gradients of `relu(a + b)`; elsewhere those two ops.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() == b.shape() && super::fused::supported(&[a, b]) {
        return super::fused::add_relu(a, b);
    }
    relu(&(a + b)?)
}

/// Numerically stable softmax along `dim`, built from differentiable primitives.
///
/// `softmax_last_dim` has no backward (silently detaches), hence this. Over the last axis of a CPU f32/f64 tensor it
/// is one fused op with the backward `dx = y ⊙ (dy − Σ dy⊙y)`; otherwise composed ops, where the max is detached:
/// softmax is invariant to the shift, so its gradient contribution is exactly zero and recording it would only cost
/// memory.
pub fn softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    if dim + 1 == x.rank() && super::fused::supported(&[x]) {
        return super::fused::softmax_last_dim(x);
    }
    let max = x.max_keepdim(dim)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(dim)?;
    Ok(e.broadcast_div(&s)?)
}

/// Numerically stable log-softmax along `dim` (cross-entropy, SPEC §9.1): `x − m − log Σ exp(x − m)` with the
/// detached max `m`.
pub fn log_softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    let max = x.max_keepdim(dim)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(dim)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// `σ(x) = 1/(1+e^−x)` via candle's sigmoid op, whose backward (`σ(1−σ)`) is registered and checked in the tests.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::sigmoid(x)?)
}
