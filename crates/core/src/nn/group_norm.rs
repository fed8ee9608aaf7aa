//! GroupNorm over `(B, C, H, W)` with explicit, differentiable ops (TransUNet ResNet, SPEC §5.2).
//!
//! The eps is the caller's: 1e-6 for root/gn1/gn2/gn3, 1e-5 for `gn_proj` (one channel per group).
use super::init::{ONES, ZEROS};
use crate::{Error, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// `GroupNorm(groups, channels, eps)`; keys `weight`, `bias` `(C)`, init 1 / 0.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(Error::Config(format!(
                "GroupNorm at `{}`: {channels} channels are not divisible into {groups} groups",
                vb.prefix()
            )));
        }
        let weight = vb.get_with_hints(channels, "weight", ONES)?;
        let bias = vb.get_with_hints(channels, "bias", ZEROS)?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    pub fn from_tensors(groups: usize, weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self {
            weight,
            bias,
            groups,
            eps,
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// Statistics per (sample, group) over `(C/G, H, W)`; biased variance, eps inside the sqrt (PyTorch).
    /// On the CPU in f32/f64 one fused op with a hand-derived backward; elsewhere composed candle ops.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_maybe_relu(x, false)
    }

    /// `relu(self.forward(x))`; on the CPU in f32/f64 the ReLU is part of the fused op (applied while each channel
    /// is in cache, no separate node in the graph), with the same values and gradients.
    pub fn forward_relu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_maybe_relu(x, true)
    }

    fn forward_maybe_relu(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        if !c.is_multiple_of(self.groups) {
            return Err(Error::msg(format!(
                "GroupNorm: input has {c} channels, not divisible by {} groups",
                self.groups
            )));
        }
        if super::fused::supported(&[x, &self.weight, &self.bias]) {
            return super::fused::group_norm(
                x,
                &self.weight,
                &self.bias,
                self.groups,
                self.eps,
                relu,
            );
        }
        let xg = x.reshape((b, self.groups, (c / self.groups) * h * w))?;
        let mean = xg.mean_keepdim(2)?;
        let xc = xg.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(2)?;
        let y = xc
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .reshape((b, c, h, w))?;
        let wt = self.weight.reshape((1, c, 1, 1))?;
        let bs = self.bias.reshape((1, c, 1, 1))?;
        let y = y.broadcast_mul(&wt)?.broadcast_add(&bs)?;
        if relu {
            super::relu(&y)
        } else {
            Ok(y)
        }
    }
}
