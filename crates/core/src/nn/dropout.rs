//! Dropout with a host-generated Bernoulli mask from the project RNG (SPEC §0: every random stream is a
//! counter-based ChaCha8 stream, so masks are reproducible and independent of thread counts and devices).
use crate::rng::stream_rng;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use rand::Rng;

/// Inverted dropout with drop probability `p`: kept elements are scaled by `1/(1−p)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    p: f64,
}

impl Dropout {
    /// `p` is validated when the layer is applied in train mode.
    pub fn new(p: f64) -> Self {
        Self { p }
    }

    pub fn p(&self) -> f64 {
        self.p
    }

    /// `rng_seed = None` (evaluation) or `p = 0` returns `x` unchanged. Otherwise the mask is drawn from
    /// `stream_rng(seed, "dropout", [])`; the caller passes a seed already mixed with epoch/step/layer so that each
    /// application gets its own stream.
    pub fn forward_t(&self, x: &Tensor, rng_seed: Option<u64>) -> Result<Tensor> {
        let Some(seed) = rng_seed else {
            return Ok(x.clone());
        };
        if !(0.0..=1.0).contains(&self.p) {
            return Err(Error::Arg(format!(
                "dropout probability {} is outside [0, 1]",
                self.p
            )));
        }
        if self.p == 0.0 {
            return Ok(x.clone());
        }
        if self.p >= 1.0 {
            return Ok(x.zeros_like()?);
        }
        let mask = bernoulli_keep_mask(x.elem_count(), self.p, seed);
        let mask = Tensor::from_vec(mask, x.shape(), &Device::Cpu)?
            .to_dtype(x.dtype())?
            .to_device(x.device())?;
        Ok((x * mask)?)
    }
}

/// `n` values, each `1/(1−p)` with probability `1−p` and `0` otherwise (f64 so the scale is exact before casting).
fn bernoulli_keep_mask(n: usize, p: f64, seed: u64) -> Vec<f64> {
    let mut rng = stream_rng(seed, "dropout", &[]);
    let keep = 1.0 / (1.0 - p);
    (0..n)
        .map(|_| if rng.gen::<f64>() < p { 0.0 } else { keep })
        .collect()
}

/// The mask `forward_t` would apply, as an f32 tensor (tests and debugging).
pub fn dropout_mask(shape: &[usize], p: f64, seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    Ok(
        Tensor::from_vec(bernoulli_keep_mask(n, p, seed), shape, &Device::Cpu)?
            .to_dtype(DType::F32)?,
    )
}
