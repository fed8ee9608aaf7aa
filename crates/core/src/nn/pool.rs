//! 3×3 / stride-2 max-pool without padding (TransUNet root, SPEC §5.2).
//!
//! `Tensor::max_pool2d` has a wrong backward (scaled by 1/k²) in candle 0.11.1 (SPEC §16.1), so the pool is the
//! element-wise `maximum` of strided `index_select` views. Max is separable, so the window max is taken along H
//! (3 views) and then along W (3 views): the same forward values as the 9-view form with 6 gathers instead of 9.
//! On exact ties `maximum` splits the gradient (SPEC §16.4); PyTorch gives it to the first maximum. Ties occur only
//! between equal values (e.g. ReLU zeros, whose upstream gradient is zero anyway). On the CPU (f32/f64) one fused
//! kernel (`pool_fused`) computes the same values and gives a tied gradient to the first maximum, as PyTorch does.
use crate::{Error, Result};
use candle_core::Tensor;

/// Max over taps `k, k+2, k+4, …` (`k = 0, 1, 2`) along `dim`, giving `n_out` outputs.
fn max3_along(x: &Tensor, dim: usize, n_out: usize) -> Result<Tensor> {
    let dev = x.device();
    let view = |k: usize| -> Result<Tensor> {
        let ids: Vec<u32> = (0..n_out).map(|o| (2 * o + k) as u32).collect();
        let ids = Tensor::from_vec(ids, n_out, dev)?;
        Ok(x.index_select(&ids, dim)?)
    };
    Ok(view(0)?.maximum(&view(1)?)?.maximum(&view(2)?)?)
}

/// `MaxPool2d(kernel 3, stride 2, padding 0)` on `(B, C, H, W)`: output `⌊(H−3)/2⌋+1` × `⌊(W−3)/2⌋+1`.
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if h < 3 || w < 3 {
        return Err(Error::Arg(format!(
            "max_pool_3x3_s2: input {h}x{w} is smaller than the 3x3 window"
        )));
    }
    if super::pool_fused::applies(x) {
        return Ok(super::pool_fused::max_pool_3x3_s2(x)?);
    }
    max_pool_composed(x)
}

/// The pool from gathers and `maximum` (any device); the fused CPU kernel is tested against it.
pub(super) fn max_pool_composed(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let y = max3_along(x, 2, (h - 3) / 2 + 1)?;
    max3_along(&y, 3, (w - 3) / 2 + 1)
}
