//! Differentiable resampling of `(B, C, H, W)` maps with the three kernels of SPEC §0.
//!
//! candle's `upsample_bilinear2d` has no backward and its nearest kernel does not promise the §0 index rule, so both
//! are built in gather form: per axis, two `index_select`s and a lerp (`index_select` backs up through `index_add`).
//! Source positions follow PyTorch's f32 arithmetic exactly (scale rounded to the dtype first, then
//! `s = r·(o+0.5) − 0.5` in that dtype), which reproduces `F.interpolate` to about 1 ulp; computing positions in
//! f64 would drift by up to ~2e-6 (SPEC §0).
use super::resize_cache::{get_or_build, AxisKey, AxisTensors};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// Per-output-index taps of one axis: `y[o] = l0[o]·x[i0[o]] + l1[o]·x[i1[o]]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearTaps {
    pub i0: Vec<u32>,
    pub i1: Vec<u32>,
    /// Weights as f64 values; for f32 tensors they are exactly the f32 numbers PyTorch uses.
    pub l0: Vec<f64>,
    pub l1: Vec<f64>,
}

/// Bilinear taps of one axis, in f32 arithmetic (`f64_arith = false`, for f32/f16/bf16 tensors) or f64.
pub fn bilinear_taps(
    n_in: usize,
    n_out: usize,
    align_corners: bool,
    f64_arith: bool,
) -> LinearTaps {
    if f64_arith {
        taps_generic::<f64>(n_in, n_out, align_corners)
    } else {
        taps_generic::<f32>(n_in, n_out, align_corners)
    }
}

/// The few float operations the tap computation needs, so f32 and f64 share one code path.
trait TapFloat: Copy + PartialOrd {
    fn from_usize(v: usize) -> Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    fn div(self, o: Self) -> Self;
}

macro_rules! tap_float {
    ($t:ty) => {
        impl TapFloat for $t {
            fn from_usize(v: usize) -> Self {
                v as $t
            }
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            fn to_f64(self) -> f64 {
                self as f64
            }
            fn add(self, o: Self) -> Self {
                self + o
            }
            fn sub(self, o: Self) -> Self {
                self - o
            }
            fn mul(self, o: Self) -> Self {
                self * o
            }
            fn div(self, o: Self) -> Self {
                self / o
            }
        }
    };
}
tap_float!(f32);
tap_float!(f64);

fn taps_generic<F: TapFloat>(n_in: usize, n_out: usize, ac: bool) -> LinearTaps {
    let zero = F::from_f64(0.0);
    let one = F::from_f64(1.0);
    let half = F::from_f64(0.5);
    // Scale rounded to the working dtype first (PyTorch `area_pixel_compute_scale`).
    let r = if ac {
        if n_out > 1 {
            F::from_usize(n_in - 1).div(F::from_usize(n_out - 1))
        } else {
            zero
        }
    } else {
        F::from_usize(n_in).div(F::from_usize(n_out))
    };
    let mut t = LinearTaps {
        i0: Vec::with_capacity(n_out),
        i1: Vec::with_capacity(n_out),
        l0: Vec::with_capacity(n_out),
        l1: Vec::with_capacity(n_out),
    };
    for o in 0..n_out {
        let s = if n_in == n_out {
            // PyTorch copies when sizes agree; the formulas give the same positions anyway.
            F::from_usize(o)
        } else if ac {
            r.mul(F::from_usize(o))
        } else {
            let s = r.mul(F::from_usize(o).add(half)).sub(half);
            if s < zero {
                zero
            } else {
                s
            }
        };
        let i0 = (s.to_f64().floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let mut l1 = s.sub(F::from_usize(i0));
        if l1 < zero {
            l1 = zero;
        }
        if l1 > one {
            l1 = one;
        }
        t.i0.push(i0 as u32);
        t.i1.push(i1 as u32);
        t.l0.push(one.sub(l1).to_f64());
        t.l1.push(l1.to_f64());
    }
    t
}

/// Nearest source indices `min(⌊o·n_in/n_out⌋, n_in−1)` in exact integer arithmetic (SPEC §0, PyTorch 'nearest').
pub fn nearest_indices(n_in: usize, n_out: usize) -> Vec<u32> {
    (0..n_out)
        .map(|o| ((o * n_in) / n_out).min(n_in - 1) as u32)
        .collect()
}

fn check_sizes(what: &str, x: &Tensor, out_h: usize, out_w: usize) -> Result<(usize, usize)> {
    let (_, _, h, w) = x.dims4().map_err(|_| {
        Error::Arg(format!(
            "{what}: expected a (B, C, H, W) tensor, got shape {:?}",
            x.dims()
        ))
    })?;
    if h == 0 || w == 0 || out_h == 0 || out_w == 0 {
        return Err(Error::Arg(format!(
            "{what}: cannot resize {h}x{w} to {out_h}x{out_w} (empty axis)"
        )));
    }
    Ok((h, w))
}

fn index_tensor(ids: Vec<u32>, dev: &Device) -> Result<Tensor> {
    let n = ids.len();
    Ok(Tensor::from_vec(ids, n, dev)?)
}

/// Bilinear tensors of one axis on `x`'s device. Weights are built on the host in f64 holding the exact
/// dtype values, then cast (exactly) to the tensor dtype and moved to the device.
fn bilinear_axis(
    x: &Tensor,
    dim: usize,
    n_in: usize,
    n_out: usize,
    ac: bool,
) -> Result<AxisTensors> {
    let dev = x.device();
    let key = AxisKey {
        align_corners: Some(ac),
        n_in,
        n_out,
        dim,
        dtype: x.dtype(),
    };
    get_or_build(key, dev, || {
        let taps = bilinear_taps(n_in, n_out, ac, x.dtype() == DType::F64);
        let mut shape = [1usize; 4];
        shape[dim] = n_out;
        let weight = |v: Vec<f64>| -> Result<Tensor> {
            Ok(Tensor::from_vec(v, &shape[..], &Device::Cpu)?
                .to_dtype(x.dtype())?
                .to_device(dev)?)
        };
        Ok(AxisTensors::Bilinear {
            i0: index_tensor(taps.i0, dev)?,
            i1: index_tensor(taps.i1, dev)?,
            l0: weight(taps.l0)?,
            l1: weight(taps.l1)?,
        })
    })
}

/// Lerps along `dim` (2 or 3) of a 4-D tensor: `l0·x[i0] + l1·x[i1]`.
fn lerp_axis(x: &Tensor, dim: usize, n_in: usize, n_out: usize, ac: bool) -> Result<Tensor> {
    if n_in == n_out {
        return Ok(x.clone());
    }
    if super::resize_fused::applies(x) {
        let taps = bilinear_taps(n_in, n_out, ac, x.dtype() == DType::F64);
        return Ok(super::resize_fused::lerp_axis(x, dim, n_in, taps)?);
    }
    let AxisTensors::Bilinear { i0, i1, l0, l1 } = bilinear_axis(x, dim, n_in, n_out, ac)? else {
        return Err(Error::msg(
            "resize: bilinear cache entry holds nearest indices",
        ));
    };
    let a = x.index_select(&i0, dim)?;
    let b = x.index_select(&i1, dim)?;
    // `l0·a + l1·b` (not `a + l1·(b − a)`) matches PyTorch's weighting order.
    Ok((a.broadcast_mul(&l0)? + b.broadcast_mul(&l1)?)?)
}

/// Nearest gather along `dim` with the §0 index rule.
fn nearest_axis(x: &Tensor, dim: usize, n_in: usize, n_out: usize) -> Result<Tensor> {
    if n_in == n_out {
        return Ok(x.clone());
    }
    let dev = x.device();
    let key = AxisKey {
        align_corners: None,
        n_in,
        n_out,
        dim,
        dtype: x.dtype(),
    };
    let t = get_or_build(key, dev, || {
        Ok(AxisTensors::Nearest {
            idx: index_tensor(nearest_indices(n_in, n_out), dev)?,
        })
    })?;
    match t {
        AxisTensors::Nearest { idx } => Ok(x.index_select(&idx, dim)?),
        AxisTensors::Bilinear { .. } => Err(Error::msg(
            "resize: nearest cache entry holds bilinear taps",
        )),
    }
}

/// Bilinear resize of `(B, C, H, W)` to `(out_h, out_w)`, no antialiasing; `align_corners` as in PyTorch.
/// Differentiable with respect to `x`.
pub fn resize_bilinear(
    x: &Tensor,
    out_h: usize,
    out_w: usize,
    align_corners: bool,
) -> Result<Tensor> {
    let (h, w) = check_sizes("resize_bilinear", x, out_h, out_w)?;
    let y = lerp_axis(x, 2, h, out_h, align_corners)?;
    lerp_axis(&y, 3, w, out_w, align_corners)
}

/// Nearest resize (PyTorch `mode='nearest'`, floor mapping). Differentiable (gradient is summed into the source).
pub fn resize_nearest(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (h, w) = check_sizes("resize_nearest", x, out_h, out_w)?;
    let y = nearest_axis(x, 2, h, out_h)?;
    nearest_axis(&y, 3, w, out_w)
}
