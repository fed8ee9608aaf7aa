//! Differentiable op toolkit (SPEC §0 resampling kernels, §1.1, §5, §6.8, §16).
//!
//! candle 0.11.1 silently detaches several fused kernels and has wrong backward rules for others (SPEC §16.1). Every
//! op here is built from primitives whose backward is correct, and is finite-difference tested in f64
//! (`tests/nn_grad.rs`). Models use these instead of the candle equivalents on every gradient path:
//!
//! | need | use | instead of |
//! |---|---|---|
//! | softmax / log-softmax over `dim` | [`softmax`], [`log_softmax`] | `softmax_last_dim` |
//! | LayerNorm (last axis / NCHW channels) | [`LayerNorm`], [`LayerNorm2d`] (`forward_fast` only when frozen) | `candle_nn::LayerNorm` |
//! | bilinear / nearest resize | [`resize_bilinear`], [`resize_nearest`] | `upsample_*2d` |
//! | 3×3/s2 max-pool | [`max_pool_3x3_s2`] | `max_pool2d` |
//! | BCE with logits | [`bce_with_logits`] | `binary_cross_entropy_with_logit` |
//! | GELU | [`gelu`] (erf) | `.gelu()` |
//! | TransUNet ResNet | [`StdConv2d`], [`GroupNorm`] | — |
//! | conv on the CPU as GEMMs (forward and backward) | [`conv2d_gemm`], [`conv2d_gemm_bias`], [`conv2d_layer`] | `Tensor::conv2d` / `Conv2d::forward` |
//! | BatchNorm with buffers | [`BatchNorm2d::forward_t`] | `candle_nn::BatchNorm` |
//! | dropout from the project RNG | [`Dropout::forward_t`] | `candle_nn::Dropout` |
//! | PyTorch-initialised layers | [`conv2d`], [`conv_transpose2d`], [`linear`], [`init`] | candle's kaiming-normal defaults |
//! | LoRA adapters | [`LoraLinear`] | — |
//!
//! On the CPU in f32/f64, [`GroupNorm`], [`LayerNorm`], [`LayerNorm2d`], [`softmax`] over the last axis, [`gelu`] and
//! [`StdConv2d::standardised_weight`] run as fused ops with hand-derived backward (`fused.rs`); elsewhere they are
//! composed candle ops.
mod act;
mod attention_fused;
mod batchnorm;
mod batchnorm_fused;
mod buffer;
mod conv;
mod conv_gemm;
mod dropout;
mod fast_math;
mod fused;
mod gelu_dropout;
mod group_norm;
pub mod init;
mod linear;
mod linear_fused;
mod lora;
mod loss;
mod norm;
mod pool;
mod pool_fused;
mod resize;
mod resize_cache;
mod resize_fused;

pub use act::{add_relu, gelu, log_softmax, relu, sigmoid, softmax};
pub use attention_fused::{attention, attention_supported};
pub use batchnorm::BatchNorm2d;
pub use conv::{check_strided_input, conv2d, conv_transpose2d, StdConv2d, STD_CONV_EPS};
pub use conv_gemm::{conv2d_gemm, conv2d_gemm_bias, conv2d_layer};
pub use dropout::{dropout_mask, Dropout};
pub use gelu_dropout::gelu_dropout;
pub use group_norm::GroupNorm;
pub use linear::linear;
pub use linear_fused::{linear_fused, linear_layer};
pub use lora::LoraLinear;
pub use loss::bce_with_logits;
pub use norm::{LayerNorm, LayerNorm2d};
pub use pool::max_pool_3x3_s2;
pub use resize::{bilinear_taps, nearest_indices, resize_bilinear, resize_nearest, LinearTaps};

/// candle layer types returned by the wrappers, re-exported so callers need not name `candle_nn`.
pub use candle_nn::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig, Linear};

/// The data of a CPU storage viewed through a contiguous layout `l`, for the fused CPU kernels; `what` names the
/// operand (e.g. "batch_norm input") in the error for a non-contiguous one.
fn cpu_data<'a, T: candle_core::WithDType>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    if !l.is_contiguous() {
        candle_core::bail!("{what} must be contiguous");
    }
    let data = T::cpu_storage_as_slice(s)?;
    Ok(&data[l.start_offset()..l.start_offset() + l.shape().elem_count()])
}

/// Converts a crate error back into a candle error for `candle_core::Module` impls.
fn to_candle(e: crate::Error) -> candle_core::Error {
    match e {
        crate::Error::Candle(e) => e,
        other => candle_core::Error::Msg(other.to_string()),
    }
}
