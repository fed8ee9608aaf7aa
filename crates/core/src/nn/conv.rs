//! Convolution wrappers with explicit PyTorch-default initialisation, and TransUNet's weight-standardised conv.
use super::init::torch_uniform;
use crate::{Error, Result};
use candle_core::Tensor;
use candle_nn::{Conv2d, Conv2dConfig, ConvTranspose2d, ConvTranspose2dConfig, VarBuilder};

/// Eps of the weight standardisation (SPEC §5.2; fixture config `eps`).
pub const STD_CONV_EPS: f64 = 1e-5;

/// `Conv2d(in, out, k)` with PyTorch's default init: weight and bias `U(±1/√fan_in)`, `fan_in = in/groups·k²`.
/// Keys `weight` `(out, in/groups, k, k)` and, if `bias`, `bias` `(out)`.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: Conv2dConfig,
    bias: bool,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let groups = cfg.groups.max(1);
    let fan_in = in_channels / groups * kernel * kernel;
    let w = vb.get_with_hints(
        (out_channels, in_channels / groups, kernel, kernel),
        "weight",
        torch_uniform(fan_in),
    )?;
    let b = if bias {
        Some(vb.get_with_hints(out_channels, "bias", torch_uniform(fan_in))?)
    } else {
        None
    };
    Ok(Conv2d::new(w, b, cfg))
}

/// `ConvTranspose2d(in, out, k)` (SAM output upscaling, k2 s2). Weight `(in, out, k, k)`; PyTorch computes the fan-in
/// from dim 1, so init is `U(±1/√(out·k²))` for weight and bias. candle records a backward for conv_transpose2d.
pub fn conv_transpose2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    cfg: ConvTranspose2dConfig,
    bias: bool,
    vb: VarBuilder,
) -> Result<ConvTranspose2d> {
    let fan_in = out_channels * kernel * kernel;
    let w = vb.get_with_hints(
        (in_channels, out_channels, kernel, kernel),
        "weight",
        torch_uniform(fan_in),
    )?;
    let b = if bias {
        Some(vb.get_with_hints(out_channels, "bias", torch_uniform(fan_in))?)
    } else {
        None
    };
    Ok(ConvTranspose2d::new(w, b, cfg))
}

/// candle's conv2d backward derives the output padding from H only, so a strided conv on an input whose H and W
/// leave different remainders modulo the stride fails in backward (SPEC §16.1). Reject such inputs up front.
pub fn check_strided_input(x: &Tensor, stride: usize) -> Result<()> {
    let (_, _, h, w) = x.dims4()?;
    if stride > 1 && h % stride != w % stride {
        return Err(Error::Arg(format!(
            "strided conv (stride {stride}) on a {h}x{w} input: H and W differ modulo the stride, which candle's \
             backward cannot handle; pad the input to a square"
        )));
    }
    Ok(())
}

/// Weight-standardised convolution of the TransUNet ResNet (BiT "StdConv2d"): before each convolution
/// `ŵ = (w − mean)/√(var + 1e-5)` with mean and population variance over `(in, kh, kw)` per output channel.
#[derive(Debug, Clone)]
pub struct StdConv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl StdConv2d {
    /// Keys `weight` `(out, in, k, k)` (+ `bias` when `bias`), PyTorch default init.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let fan_in = in_channels * kernel * kernel;
        let weight = vb.get_with_hints(
            (out_channels, in_channels, kernel, kernel),
            "weight",
            torch_uniform(fan_in),
        )?;
        let bias = if bias {
            Some(vb.get_with_hints(out_channels, "bias", torch_uniform(fan_in))?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
        })
    }

    pub fn from_tensors(
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
    ) -> Self {
        Self {
            weight,
            bias,
            stride,
            padding,
        }
    }

    /// The raw (unstandardised) weight, as stored under `weight`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// `ŵ`, differentiable with respect to the raw weight.
    pub fn standardised_weight(&self) -> Result<Tensor> {
        let (o, i, kh, kw) = self.weight.dims4()?;
        let w = self.weight.reshape((o, i * kh * kw))?;
        if super::fused::supported(&[&w]) {
            // A LayerNorm without affine over each output channel's (in, kh, kw).
            let (one, zero) = (
                Tensor::ones(i * kh * kw, w.dtype(), w.device())?,
                Tensor::zeros(i * kh * kw, w.dtype(), w.device())?,
            );
            return Ok(
                super::fused::layer_norm(&w, &one, &zero, STD_CONV_EPS)?.reshape((o, i, kh, kw))?
            );
        }
        let mean = w.mean_keepdim(1)?;
        let wc = w.broadcast_sub(&mean)?;
        let var = wc.sqr()?.mean_keepdim(1)?;
        Ok(wc
            .broadcast_div(&(var + STD_CONV_EPS)?.sqrt()?)?
            .reshape((o, i, kh, kw))?)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_strided_input(x, self.stride)?;
        let w = self.standardised_weight()?;
        super::conv2d_gemm_bias(x, &w, self.bias.as_ref(), self.stride, self.padding)
    }
}
