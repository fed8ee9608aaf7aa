//! Differentiable 2-D convolution whose CPU backward runs as GEMMs (the layout of PyTorch's CPU "slow conv").
//!
//! candle 0.11.1 differentiates `conv2d` on the CPU with a naive `conv_transpose2d` loop (input gradient) and a
//! "convolution with the gradient as kernel" that degenerates into one matrix-vector product per input channel
//! (weight gradient); in a TransUNet training step these two took most of the time. Here, with `K = Cin·kh·kw`
//! and `L = Ho·Wo`:
//!
//! * forward: candle's fused `conv2d` (so values are bit-identical to the frozen/eval path);
//! * input gradient, per sample: `col2im(Wᵀ (K, Cout) · dY_b (Cout, L))`;
//! * weight gradient: `Σ_b dY_b (Cout, L) · cols(X_b)ᵀ (L, K)`, the im2col columns rebuilt per sample.
//!
//! A 1×1 stride-1 unpadded convolution needs no im2col: the sample itself is the column matrix. Only one sample's
//! columns exist at a time, so memory stays at the level of candle's own kernels.
use crate::{Error, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::sync::Mutex;

/// Geometry of one convolution (dilation 1, groups 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geom {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    c_out: usize,
    k_h: usize,
    k_w: usize,
    stride: usize,
    pad: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    fn new(x: &[usize], k: &[usize], stride: usize, pad: usize) -> Result<Self> {
        let bad = |m: String| Err(Error::Arg(format!("conv2d_gemm: {m}")));
        let (&[b, c, h, w], &[c_out, c_k, k_h, k_w]) = (x, k) else {
            return bad(format!("input {x:?} and kernel {k:?} must both be 4-D"));
        };
        if c != c_k {
            return bad(format!(
                "input has {c} channels but the kernel {k:?} expects {c_k}"
            ));
        }
        if stride == 0 || k_h == 0 || k_w == 0 || h + 2 * pad < k_h || w + 2 * pad < k_w {
            return bad(format!(
                "kernel {k_h}×{k_w} (stride {stride}, padding {pad}) does not fit the {h}×{w} input"
            ));
        }
        Ok(Self {
            b,
            c,
            h,
            w,
            c_out,
            k_h,
            k_w,
            stride,
            pad,
            ho: (h + 2 * pad - k_h) / stride + 1,
            wo: (w + 2 * pad - k_w) / stride + 1,
        })
    }

    /// `K = Cin·kh·kw`, the rows of the column matrix.
    fn k(&self) -> usize {
        self.c * self.k_h * self.k_w
    }

    /// `L = Ho·Wo`, the columns of the column matrix.
    fn l(&self) -> usize {
        self.ho * self.wo
    }

    fn plane(&self) -> usize {
        self.h * self.w
    }

    /// The sample is its own column matrix.
    fn pointwise(&self) -> bool {
        self.k_h == 1 && self.k_w == 1 && self.stride == 1 && self.pad == 0
    }

    /// Output indices `[lo, hi)` whose input index `o·stride + tap − pad` lies in `[0, size)`.
    fn valid(&self, tap: usize, size: usize, out: usize) -> (usize, usize) {
        let s = self.stride;
        let lo = if self.pad > tap {
            (self.pad - tap).div_ceil(s)
        } else {
            0
        };
        let hi = if size + self.pad > tap {
            ((size + self.pad - tap - 1) / s + 1).min(out)
        } else {
            0
        };
        (lo.min(hi), hi)
    }

    fn x_shape(&self) -> Shape {
        Shape::from((self.b, self.c, self.h, self.w))
    }

    fn y_shape(&self) -> Shape {
        Shape::from((self.b, self.c_out, self.ho, self.wo))
    }

    fn w_shape(&self) -> Shape {
        Shape::from((self.c_out, self.c, self.k_h, self.k_w))
    }
}

/// Columns `(K, L)` of one sample `(C, H, W)`; row `c·kh·kw + i·kw + j` matches the flattened kernel.
fn im2col<T: WithDType>(g: &Geom, x: &[T], cols: &mut [T]) {
    let (l, plane, s, p) = (g.l(), g.plane(), g.stride, g.pad);
    cols.par_chunks_mut(l).enumerate().for_each(|(r, row)| {
        let (c, i, j) = (r / (g.k_h * g.k_w), (r / g.k_w) % g.k_h, r % g.k_w);
        let src = &x[c * plane..(c + 1) * plane];
        let (ylo, yhi) = g.valid(i, g.h, g.ho);
        let (xlo, xhi) = g.valid(j, g.w, g.wo);
        for (oy, dst) in row.chunks_mut(g.wo).enumerate() {
            if oy < ylo || oy >= yhi {
                dst.fill(T::zero());
                continue;
            }
            let line = &src[(oy * s + i - p) * g.w..][..g.w];
            dst[..xlo].fill(T::zero());
            dst[xhi..].fill(T::zero());
            if s == 1 {
                let ix = xlo + j - p;
                dst[xlo..xhi].copy_from_slice(&line[ix..ix + (xhi - xlo)]);
            } else {
                for (ox, d) in dst.iter_mut().enumerate().take(xhi).skip(xlo) {
                    *d = line[ox * s + j - p];
                }
            }
        }
    });
}

/// Adjoint of [`im2col`]: scatters-adds the columns `(K, L)` back into one sample `(C, H, W)` (overwritten).
fn col2im<T: WithDType>(g: &Geom, cols: &[T], x: &mut [T]) {
    let (l, s, p) = (g.l(), g.stride, g.pad);
    x.par_chunks_mut(g.plane())
        .enumerate()
        .for_each(|(c, plane)| {
            plane.fill(T::zero());
            for i in 0..g.k_h {
                let (ylo, yhi) = g.valid(i, g.h, g.ho);
                for j in 0..g.k_w {
                    let (xlo, xhi) = g.valid(j, g.w, g.wo);
                    let row = &cols[((c * g.k_h + i) * g.k_w + j) * l..][..l];
                    for oy in ylo..yhi {
                        let line = &mut plane[(oy * s + i - p) * g.w..][..g.w];
                        let src = &row[oy * g.wo..][..g.wo];
                        for ox in xlo..xhi {
                            line[ox * s + j - p] += src[ox];
                        }
                    }
                }
            }
        });
}

/// The contiguous data of a storage viewed through `l`.
fn slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<&'a [T]> {
    if !l.is_contiguous() {
        candle_core::bail!("conv2d_gemm: {what} must be contiguous");
    }
    let data = T::cpu_storage_as_slice(s)?;
    Ok(&data[l.start_offset()..l.start_offset() + l.shape().elem_count()])
}

/// `a (m, k) · b (k, n)` on storages viewed through the given layouts (candle's CPU GEMM).
fn gemm<T: WithDType>(
    a: &CpuStorage,
    la: &Layout,
    b: &CpuStorage,
    lb: &Layout,
    (m, n, k): (usize, usize, usize),
) -> candle_core::Result<Vec<T>> {
    T::cpu_storage_data(a.matmul(b, (1, m, n, k), la, lb)?)
}

/// Row-major `(rows, cols)` view starting at `offset`.
fn rm(rows: usize, cols: usize, offset: usize) -> Layout {
    Layout::contiguous_with_offset((rows, cols), offset)
}

/// Transposed view: the `(rows, cols)` matrix whose storage is a row-major `(cols, rows)` at `offset`.
fn tr(rows: usize, cols: usize, offset: usize) -> Layout {
    Layout::new(Shape::from((rows, cols)), vec![1, rows], offset)
}

/// Owned storage of `(K, L)` columns of sample `bi` (`None` for a pointwise conv: the sample itself is used).
fn sample_cols<T: WithDType>(g: &Geom, x: &[T], bi: usize) -> Option<CpuStorage> {
    if g.pointwise() {
        return None;
    }
    let mut cols = vec![T::zero(); g.k() * g.l()];
    im2col(g, &x[bi * g.c * g.plane()..][..g.c * g.plane()], &mut cols);
    Some(T::to_cpu_storage_owned(cols))
}

/// `dX` from `dY` (`gs`, `(B, Cout, Ho, Wo)`) and the kernel.
fn input_grad<T: WithDType>(
    g: &Geom,
    gs: &CpuStorage,
    gl: &Layout,
    ws: &CpuStorage,
    wl: &Layout,
) -> candle_core::Result<CpuStorage> {
    slice::<T>(gs, gl, "gradient")?;
    slice::<T>(ws, wl, "kernel")?;
    let (k, l) = (g.k(), g.l());
    let wt = tr(k, g.c_out, wl.start_offset());
    let mut out = vec![T::zero(); g.b * g.c * g.plane()];
    for (bi, dst) in out.chunks_mut(g.c * g.plane()).enumerate() {
        let dy = rm(g.c_out, l, gl.start_offset() + bi * g.c_out * l);
        let cols = gemm::<T>(ws, &wt, gs, &dy, (k, l, g.c_out))?;
        if g.pointwise() {
            dst.copy_from_slice(&cols);
        } else {
            col2im(g, &cols, dst);
        }
    }
    Ok(T::to_cpu_storage_owned(out))
}

/// `dW` from `dY` (`gs`) and the input (`xs`).
fn weight_grad<T: WithDType>(
    g: &Geom,
    gs: &CpuStorage,
    gl: &Layout,
    xs: &CpuStorage,
    xl: &Layout,
) -> candle_core::Result<CpuStorage> {
    slice::<T>(gs, gl, "gradient")?;
    let x = slice::<T>(xs, xl, "input")?;
    let (k, l) = (g.k(), g.l());
    let mut acc = vec![T::zero(); g.c_out * k];
    for bi in 0..g.b {
        let dy = rm(g.c_out, l, gl.start_offset() + bi * g.c_out * l);
        let part = match sample_cols(g, x, bi) {
            Some(cols) => gemm::<T>(gs, &dy, &cols, &tr(l, k, 0), (g.c_out, k, l))?,
            None => {
                let off = xl.start_offset() + bi * k * l;
                gemm::<T>(gs, &dy, xs, &tr(l, k, off), (g.c_out, k, l))?
            }
        };
        for (a, p) in acc.iter_mut().zip(part) {
            *a += p;
        }
    }
    Ok(T::to_cpu_storage_owned(acc))
}

macro_rules! dispatch {
    ($f:ident, $g:expr, $s1:expr, $l1:expr, $s2:expr, $l2:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => $f::<f32>($g, $s1, $l1, $s2, $l2),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => $f::<f64>($g, $s1, $l1, $s2, $l2),
            _ => candle_core::bail!("conv2d_gemm: only f32/f64 pairs of equal dtype are supported"),
        }
    };
}

/// `y = conv2d(x, w)` whose value candle's fused kernel has already computed (`out`, taken by the forward so the
/// graph does not keep a second copy); backward through [`InputGrad`] and [`WeightGrad`].
struct Conv {
    g: Geom,
    out: Mutex<Option<Tensor>>,
}
/// `dX = conv2dᵀ(dY, w)` (no backward of its own).
struct InputGrad(Geom);
/// `dW` from `(dY, x)` (no backward of its own).
struct WeightGrad(Geom);

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = self
            .out
            .lock()
            .map_err(|_| candle_core::Error::Msg("conv2d_gemm: poisoned lock".into()))?
            .take();
        let Some(out) = out else {
            candle_core::bail!("conv2d_gemm: the forward ran twice");
        };
        let (storage, layout) = out.storage_and_layout();
        let data = match &*storage {
            candle_core::Storage::Cpu(cs) if layout.is_contiguous() => {
                let n = layout.shape().elem_count();
                match cs {
                    CpuStorage::F32(v) => CpuStorage::F32(v[layout.start_offset()..][..n].to_vec()),
                    CpuStorage::F64(v) => CpuStorage::F64(v[layout.start_offset()..][..n].to_vec()),
                    _ => candle_core::bail!("conv2d_gemm: unexpected dtype"),
                }
            }
            _ => {
                candle_core::bail!("conv2d_gemm: the forward result is not a contiguous CPU tensor")
            }
        };
        Ok((data, self.g.y_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let dx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(&w.contiguous()?, &InputGrad(self.g))?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(grad.apply_op2_no_bwd(&x.contiguous()?, &WeightGrad(self.g))?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "conv2d-gemm-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((
            dispatch!(input_grad, &self.0, s1, l1, s2, l2)?,
            self.0.x_shape(),
        ))
    }
}

impl CustomOp2 for WeightGrad {
    fn name(&self) -> &'static str {
        "conv2d-gemm-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((
            dispatch!(weight_grad, &self.0, s1, l1, s2, l2)?,
            self.0.w_shape(),
        ))
    }
}

/// Whether [`conv2d_gemm`] takes its GEMM path for these operands (CPU, f32/f64).
fn gemm_path(x: &Tensor, w: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == w.dtype() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Differentiable `conv2d(x (B,Cin,H,W), w (Cout,Cin,kh,kw))` with dilation 1 and one group — bit for bit the
/// value of `x.conv2d(w, padding, stride, 1, 1)` (candle's fused forward). On the CPU in f32/f64, when a gradient
/// is recorded, both gradients run as GEMMs (see the module docs); otherwise (no gradient, other devices or dtypes)
/// it is plainly candle's `conv2d`.
pub fn conv2d_gemm(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    if !(gemm_path(x, w) && (x.track_op() || w.track_op())) {
        return Ok(x.conv2d(w, padding, stride, 1, 1)?);
    }
    let g = Geom::new(x.dims(), w.dims(), stride, padding)?;
    let out = x
        .detach()
        .conv2d(&w.detach(), padding, stride, 1, 1)?
        .contiguous()?;
    let op = Conv {
        g,
        out: Mutex::new(Some(out)),
    };
    Ok(x.apply_op2(w, op)?)
}

/// [`conv2d_gemm`] through a candle [`candle_nn::Conv2d`] layer (weight, optional bias, stride and padding from
/// its config); layers with dilation or groups use candle's own forward.
pub fn conv2d_layer(conv: &candle_nn::Conv2d, x: &Tensor) -> Result<Tensor> {
    use candle_nn::Module;
    let cfg = conv.config();
    if cfg.dilation != 1 || cfg.groups != 1 {
        return Ok(conv.forward(x)?);
    }
    let y = conv2d_gemm(x, conv.weight(), cfg.stride, cfg.padding)?;
    match conv.bias() {
        None => Ok(y),
        Some(b) => Ok(y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn ramp(shape: &[usize], scale: f64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| ((i * 7919 % 113) as f64 / 113.0 - 0.5) * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Forward and both gradients equal candle's conv2d (f64) over kernel sizes, strides, paddings and odd shapes.
    #[test]
    fn matches_candle_conv2d_and_its_gradients() {
        let cases = [
            // (b, c, h, w, cout, k, stride, pad)
            (2, 3, 7, 7, 4, 3, 1, 1),
            (2, 3, 8, 8, 4, 3, 2, 1),
            (1, 2, 9, 9, 3, 7, 2, 3),
            (2, 5, 6, 6, 4, 1, 1, 0),
            (2, 5, 6, 6, 4, 1, 2, 0),
            (1, 2, 5, 5, 2, 3, 1, 0),
            (1, 3, 6, 8, 2, 3, 2, 1),
        ];
        for (b, c, h, w, co, k, s, p) in cases {
            let x = candle_core::Var::from_tensor(&ramp(&[b, c, h, w], 2.0)).unwrap();
            let wt = candle_core::Var::from_tensor(&ramp(&[co, c, k, k], 1.0)).unwrap();
            let ours = conv2d_gemm(x.as_tensor(), wt.as_tensor(), s, p).unwrap();
            let theirs = x.as_tensor().conv2d(wt.as_tensor(), p, s, 1, 1).unwrap();
            let r = ramp(theirs.dims(), 3.0);
            let diff = |a: &Tensor, b: &Tensor| -> f64 {
                (a - b)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .max(0)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let case = format!("b{b} c{c} {h}x{w} co{co} k{k} s{s} p{p}");
            assert_eq!(ours.dims(), theirs.dims(), "{case}");
            assert!(diff(&ours, &theirs) < 1e-12, "{case}: forward");
            let go = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gt = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, v) in [("input", &x), ("kernel", &wt)] {
                let a = go.get(v.as_tensor()).unwrap();
                let e = gt.get(v.as_tensor()).unwrap();
                assert!(diff(a, e) < 1e-12, "{case}: {name} gradient");
            }
        }
    }

    #[test]
    fn untracked_operands_use_candle_and_f32_is_bit_identical() {
        let x = ramp(&[1, 2, 5, 5], 1.0).to_dtype(DType::F32).unwrap();
        let w = ramp(&[3, 2, 3, 3], 1.0).to_dtype(DType::F32).unwrap();
        let a = conv2d_gemm(&x, &w, 1, 1).unwrap();
        let wv = candle_core::Var::from_tensor(&w).unwrap();
        let b = conv2d_gemm(&x, wv.as_tensor(), 1, 1).unwrap();
        let bits = |t: &Tensor| -> Vec<u32> {
            t.flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_eq!(bits(&a), bits(&b));
    }

    #[test]
    fn rejects_mismatched_channels() {
        let x = candle_core::Var::from_tensor(&ramp(&[1, 2, 5, 5], 1.0)).unwrap();
        let w = ramp(&[3, 4, 3, 3], 1.0);
        let e = conv2d_gemm(x.as_tensor(), &w, 1, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("channels"), "{e}");
    }
}
