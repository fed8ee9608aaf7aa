//! Small building blocks shared by the TransUNet modules: PyTorch-initialised Conv2d/Linear with explicit `Init`
//! hints (SPEC §5.4, §16.3) and a dropout that is a no-op for `p = 0` or without a seed.
use crate::Result;
use candle_core::Tensor;
use candle_nn::{Conv2d, Conv2dConfig, Init, Linear, VarBuilder};

/// PyTorch default `U(−1/√fan_in, 1/√fan_in)` for weights and biases.
pub fn torch_uniform(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// `Conv2d(cin → cout, k×k, stride, padding)`; keys `weight` `(cout, cin, k, k)` and (optionally) `bias`.
pub fn conv2d(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let fan_in = cin * k * k;
    let w = vb.get_with_hints((cout, cin, k, k), "weight", torch_uniform(fan_in))?;
    let b = if bias {
        Some(vb.get_with_hints(cout, "bias", torch_uniform(fan_in))?)
    } else {
        None
    };
    let cfg = Conv2dConfig {
        padding,
        stride,
        dilation: 1,
        groups: 1,
        cudnn_fwd_algo: None,
    };
    Ok(Conv2d::new(w, b, cfg))
}

/// `Linear(cin → cout)` with bias; weight `(cout, cin)`.
pub fn linear(cin: usize, cout: usize, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get_with_hints((cout, cin), "weight", torch_uniform(cin))?;
    let b = vb.get_with_hints(cout, "bias", torch_uniform(cin))?;
    Ok(Linear::new(w, Some(b)))
}

/// Dropout with a host-generated mask (SPEC §11.1.6); identity when `p = 0` or when no seed is given (eval).
#[derive(Debug, Clone)]
pub struct Dropout {
    p: f64,
    inner: crate::nn::Dropout,
}

impl Dropout {
    pub fn new(p: f64) -> Self {
        Self {
            p,
            inner: crate::nn::Dropout::new(p),
        }
    }

    pub fn forward_t(&self, x: &Tensor, seed: Option<u64>) -> Result<Tensor> {
        match seed {
            Some(s) if self.p > 0.0 => self.inner.forward_t(x, Some(s)),
            _ => Ok(x.clone()),
        }
    }
}
