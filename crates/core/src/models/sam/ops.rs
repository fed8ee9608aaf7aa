//! Small building blocks of the SAM port (SPEC §6, §16): linear layers over plain tensors or `Var`s, differentiable
//! LayerNorm / LayerNorm2d, and the two execution modes of the image encoder.
//!
//! Every op here has a differentiable form (explicit mean/variance, generic softmax) used on gradient paths, and a
//! fused form (`candle_nn::ops::layer_norm`, `softmax_last_dim`) used only by the frozen, detached image-encoder path
//! (SPEC §6.9, §16.1).
use crate::Result;
use candle_core::{DType, Tensor, D};
use candle_nn::{Init, VarBuilder};

/// How a forward pass is executed (SPEC §6.9, §16.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exec {
    /// Inference-only fast kernels (fused LayerNorm, `softmax_last_dim`); no gradient flows.
    Fast,
    /// Differentiable ops only (explicit LayerNorm, generic softmax).
    Grad,
}

/// Kaiming-uniform bound of PyTorch's default `nn.Linear`/`nn.Conv2d` init (`a = √5` → `1/√fan_in`).
pub fn torch_uniform(fan_in: usize) -> Init {
    let b = 1.0 / (fan_in.max(1) as f64).sqrt();
    Init::Uniform { lo: -b, up: b }
}

/// `y = x Wᵀ + b` with `W (out,in)`, PyTorch default init.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", torch_uniform(in_dim))?;
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", torch_uniform(in_dim))?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.t()?;
        let y = match x.rank() {
            // A row slice of a wider tensor (e.g. one token of `hs`) has a row stride ≠ its width: CUDA's gemm
            // refuses that layout (the CPU accepts it), so such inputs are copied first.
            2 => x.contiguous()?.matmul(&w)?,
            3 => {
                let (b, n, c) = x.dims3()?;
                x.reshape((b * n, c))?.matmul(&w)?.reshape((b, n, ()))?
            }
            _ => {
                let dims = x.dims().to_vec();
                let c = dims[dims.len() - 1];
                let lead: usize = dims[..dims.len() - 1].iter().product();
                let mut out = dims.clone();
                *out.last_mut().expect("rank>0") = self.weight.dim(0)?;
                x.reshape((lead, c))?.matmul(&w)?.reshape(out)?
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Layer norm over the last dimension with affine parameters `weight`/`bias` (init 1 / 0).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }
    pub fn forward(&self, x: &Tensor, exec: Exec) -> Result<Tensor> {
        match exec {
            Exec::Fast => Ok(candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps as f32,
            )?),
            Exec::Grad => layer_norm_last(x, &self.weight, &self.bias, self.eps),
        }
    }
}

/// Differentiable layer norm over the last dimension (explicit mean and biased variance, as PyTorch).
pub fn layer_norm_last(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mu = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mu)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(y.broadcast_mul(w)?.broadcast_add(b)?)
}

/// LayerNorm2d of segment-anything: normalises each pixel of `(B,C,H,W)` over channels (SPEC §6.2).
#[derive(Debug, Clone)]
pub struct LayerNorm2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm2d {
    pub fn new(channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }
    pub fn forward(&self, x: &Tensor, exec: Exec) -> Result<Tensor> {
        match exec {
            Exec::Fast => {
                let y = candle_nn::ops::layer_norm(
                    &x.permute((0, 2, 3, 1))?.contiguous()?,
                    &self.weight,
                    &self.bias,
                    self.eps as f32,
                )?;
                Ok(y.permute((0, 3, 1, 2))?)
            }
            Exec::Grad => {
                let c = self.weight.dim(0)?;
                let mu = x.mean_keepdim(1)?;
                let xc = x.broadcast_sub(&mu)?;
                let var = xc.sqr()?.mean_keepdim(1)?;
                let y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
                let w = self.weight.reshape((1, c, 1, 1))?;
                let b = self.bias.reshape((1, c, 1, 1))?;
                Ok(y.broadcast_mul(&w)?.broadcast_add(&b)?)
            }
        }
    }
}

/// Softmax over the last dimension in the requested execution mode.
pub fn softmax_last(x: &Tensor, exec: Exec) -> Result<Tensor> {
    match exec {
        Exec::Fast => Ok(candle_nn::ops::softmax_last_dim(&x.contiguous()?)?),
        Exec::Grad => Ok(candle_nn::ops::softmax(x, D::Minus1)?),
    }
}

/// 2-D convolution with PyTorch layout `(out, in, k, k)` and default init.
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    pub fn new(
        in_c: usize,
        out_c: usize,
        k: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let fan_in = in_c * k * k;
        let weight = vb.get_with_hints((out_c, in_c, k, k), "weight", torch_uniform(fan_in))?;
        let bias = if bias {
            Some(vb.get_with_hints(out_c, "bias", torch_uniform(fan_in))?)
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
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        if self.stride > 1 && h != w {
            return Err(crate::Error::msg(format!(
                "strided conv2d needs a square input (SPEC §16.1), got {h}x{w}"
            )));
        }
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?,
            None => y,
        })
    }
}

/// Transposed convolution k2 s2 with PyTorch layout `(in, out, k, k)` and default init (fan_in = out·k·k as PyTorch).
#[derive(Debug, Clone)]
pub struct ConvTranspose2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub stride: usize,
}

impl ConvTranspose2d {
    pub fn new(in_c: usize, out_c: usize, k: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let fan_in = out_c * k * k;
        let weight = vb.get_with_hints((in_c, out_c, k, k), "weight", torch_uniform(fan_in))?;
        let bias = vb.get_with_hints(out_c, "bias", torch_uniform(fan_in))?;
        Ok(Self {
            weight,
            bias,
            stride,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv_transpose2d(&self.weight, 0, 0, self.stride, 1)?;
        Ok(y.broadcast_add(&self.bias.reshape((1, self.bias.dim(0)?, 1, 1))?)?)
    }
}

/// Exact (erf) GELU (SPEC §6.1).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu_erf()?)
}

/// Embedding table `weight (n, dim)` initialised N(0,1) as `nn.Embedding`.
pub fn embedding(n: usize, dim: usize, vb: VarBuilder) -> Result<Tensor> {
    Ok(vb.get_with_hints(
        (n, dim),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        },
    )?)
}

/// Casts to f32 when needed.
pub fn to_f32(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        Ok(x.clone())
    } else {
        Ok(x.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Central-difference check (f64) of d/dx Σ f(x)·r for one input.
    fn fd_check(f: &dyn Fn(&Tensor) -> Tensor, x0: &Tensor, r: &Tensor) {
        let x = Var::from_tensor(x0).unwrap();
        let y = (f(x.as_tensor()) * r).unwrap().sum_all().unwrap();
        let g: Vec<f64> = y
            .backward()
            .unwrap()
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = x0.flatten_all().unwrap().to_vec1().unwrap();
        let h = 1e-6;
        for i in 0..base.len() {
            let eval = |d: f64| {
                let mut v = base.clone();
                v[i] += d;
                let t = Tensor::from_vec(v, x0.shape(), &Device::Cpu).unwrap();
                (f(&t) * r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            assert!(
                (fd - g[i]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "element {i}: fd {fd} vs analytic {}",
                g[i]
            );
        }
    }

    fn seq(n: usize, a: f64) -> Vec<f64> {
        (0..n).map(|i| ((i as f64 + 1.0) * a).sin()).collect()
    }

    #[test]
    fn layer_norms_match_finite_differences() {
        let dev = Device::Cpu;
        let x = Tensor::from_vec(seq(2 * 3 * 5, 0.7), (2, 3, 5), &dev).unwrap();
        let r = Tensor::from_vec(seq(30, 1.3), (2, 3, 5), &dev).unwrap();
        let w = Tensor::from_vec(seq(5, 2.1), 5, &dev).unwrap();
        let b = Tensor::from_vec(seq(5, 0.3), 5, &dev).unwrap();
        let (w2, b2) = (w.clone(), b.clone());
        fd_check(
            &move |t| layer_norm_last(t, &w2, &b2, 1e-5).unwrap(),
            &x,
            &r,
        );
        let x2 = x.clone();
        let b3 = b.clone();
        fd_check(
            &move |t| layer_norm_last(&x2, t, &b3, 1e-5).unwrap(),
            &w,
            &r,
        );
        // LayerNorm2d over channels of (B,C,H,W).
        let x4 = Tensor::from_vec(seq(2 * 4 * 3 * 3, 0.9), (2, 4, 3, 3), &dev).unwrap();
        let r4 = Tensor::from_vec(seq(72, 1.7), (2, 4, 3, 3), &dev).unwrap();
        let ln = LayerNorm2d {
            weight: Tensor::from_vec(seq(4, 1.1), 4, &dev).unwrap(),
            bias: Tensor::from_vec(seq(4, 0.5), 4, &dev).unwrap(),
            eps: 1e-6,
        };
        fd_check(&move |t| ln.forward(t, Exec::Grad).unwrap(), &x4, &r4);
        // The fused path agrees with the differentiable one.
        let ln = LayerNorm {
            weight: w.to_dtype(DType::F32).unwrap(),
            bias: b.to_dtype(DType::F32).unwrap(),
            eps: 1e-6,
        };
        let xf = x.to_dtype(DType::F32).unwrap();
        let d = (ln.forward(&xf, Exec::Fast).unwrap() - ln.forward(&xf, Exec::Grad).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "fast vs grad layer norm: {d}");
    }
}
