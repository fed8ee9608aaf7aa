//! Differentiable LayerNorm over the last axis and over the channel axis of NCHW maps (SPEC §16.1).
//!
//! candle's `LayerNorm` / `ops::layer_norm` take a fused kernel without backward for contiguous inputs, which silently
//! detaches everything upstream. These modules compute mean and biased variance explicitly (PyTorch semantics:
//! `(x − μ)/√(σ² + eps)·w + b`). `forward_fast` keeps the fused kernel for frozen, no-grad use (SAM encoder).
use super::init::{ONES, ZEROS};
use crate::Result;
use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

/// Normalises `x` along `dim` with the two-pass (centred) biased variance, which is more accurate in f32 than
/// `E[x²] − E[x]²`. Half-precision inputs are normalised in f32 and cast back (as `layer_norm_slow` does): the
/// statistics of a 768/256-wide row are too coarse in bf16.
fn normalise(x: &Tensor, dim: usize, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = match dtype {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
        _ => x.clone(),
    };
    let mean = xf.mean_keepdim(dim)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(dim)?;
    Ok(xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?)
}

/// LayerNorm over the last dimension; keys `weight`, `bias` (shape `(dim)`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Reads (or initialises: weight 1, bias 0) `weight` and `bias` of length `dim`.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", ONES)?;
        let bias = vb.get_with_hints(dim, "bias", ZEROS)?;
        Ok(Self { weight, bias, eps })
    }

    /// Wraps existing tensors (e.g. frozen weights already loaded).
    pub fn from_tensors(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Differentiable forward over the last axis: on the CPU in f32/f64 one fused op with a hand-derived
    /// backward, elsewhere (CUDA, half precision) composed candle ops.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if super::fused::supported(&[x, &self.weight, &self.bias]) {
            return super::fused::layer_norm(x, &self.weight, &self.bias, self.eps);
        }
        let y = normalise(x, x.rank().saturating_sub(1), self.eps)?;
        Ok(y.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?)
    }

    /// Fused candle kernel: **no backward**. Only for frozen modules whose output is detached anyway.
    pub fn forward_fast(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::layer_norm(
            &x.contiguous()?,
            &self.weight,
            &self.bias,
            self.eps as f32,
        )?)
    }
}

impl candle_core::Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        LayerNorm::forward(self, x).map_err(super::to_candle)
    }
}

/// SAM's LayerNorm2d: normalises each pixel over the channel axis of `(B, C, H, W)`; keys `weight`, `bias` `(C)`.
#[derive(Debug, Clone)]
pub struct LayerNorm2d {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm2d {
    /// Reads (or initialises: weight 1, bias 0 — SPEC §16.2, candle's own SAM defaults them to zero).
    pub fn new(channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", ONES)?;
        let bias = vb.get_with_hints(channels, "bias", ZEROS)?;
        Ok(Self { weight, bias, eps })
    }

    pub fn from_tensors(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// Per-channel affine parameters shaped `(1, C, 1, 1)` for broadcasting over NCHW.
    fn affine(&self) -> Result<(Tensor, Tensor)> {
        let c = self.weight.dim(0)?;
        Ok((
            self.weight.reshape((1, c, 1, 1))?,
            self.bias.reshape((1, c, 1, 1))?,
        ))
    }

    /// Differentiable forward over axis 1 of `(B, C, H, W)`: on the CPU in f32/f64 one fused op with a
    /// hand-derived backward, elsewhere composed candle ops.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if super::fused::supported(&[x, &self.weight, &self.bias]) {
            return super::fused::channel_norm(x, &self.weight, &self.bias, self.eps);
        }
        let y = normalise(x, 1, self.eps)?;
        let (w, b) = self.affine()?;
        Ok(y.broadcast_mul(&w)?.broadcast_add(&b)?)
    }

    /// Fused kernel on a channels-last copy: **no backward** (frozen encoder neck only).
    pub fn forward_fast(&self, x: &Tensor) -> Result<Tensor> {
        let xl = x.permute((0, 2, 3, 1))?.contiguous()?;
        let y = candle_nn::ops::layer_norm(&xl, &self.weight, &self.bias, self.eps as f32)?;
        Ok(y.permute((0, 3, 1, 2))?.contiguous()?)
    }
}

impl candle_core::Module for LayerNorm2d {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        LayerNorm2d::forward(self, x).map_err(super::to_candle)
    }
}
