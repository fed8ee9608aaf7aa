//! Differentiable 2-D convolution computed as GEMMs on the CPU, forward and backward (the layout of PyTorch's CPU
//! "slow conv"), directly in NCHW.
//!
//! candle 0.11.1 runs `conv2d` on the CPU as an element-by-element im2col into `(B, L, K)`, one matmul into
//! `(B, L, Cout)` and an element-by-element transposing copy to NCHW; it differentiates it with a naive
//! `conv_transpose2d` loop (input gradient) and a "convolution with the gradient as kernel" that degenerates into
//! one matrix-vector product per input channel (weight gradient). Here, with `K = Cin·kh·kw` and `L = Ho·Wo`, per
//! sample `b`:
//!
//! * forward: `Y_b (Cout, L) = W (Cout, K) · cols(X_b) (K, L)` written in place into the NCHW output, the bias (if
//!   any) written first and accumulated onto;
//! * input gradient: `dX_b = col2im(Wᵀ (K, Cout) · dY_b (Cout, L))`;
//! * weight gradient: `dW += dY_b (Cout, L) · cols(X_b)ᵀ (L, K)`, accumulated in place across samples;
//! * bias gradient: `db = Σ_b Σ_l dY_b`.
//!
//! A 1×1 stride-1 unpadded convolution needs no im2col: the sample itself is the column matrix. Otherwise the
//! columns are built one band of output rows at a time (at most `TILE` elements, so they stay in cache), and the
//! products of a band write into / read from the matching columns of `Y_b` / `dY_b` through strides. The products run
//! on the `gemm` crate (candle's own CPU GEMM) with candle's thread count, in place (`read_dst` to accumulate).
use super::buffer::uninit_vec;
use crate::{Error, Result};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType,
};
use rayon::prelude::*;
use std::ops::Range;

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

/// Columns `(K, (oy1 − oy0)·Wo)` of one sample `(C, H, W)` for the output rows `rows = oy0..oy1`; row
/// `c·kh·kw + i·kw + j` matches the flattened kernel.
fn im2col<T: WithDType>(g: &Geom, x: &[T], rows: Range<usize>, cols: &mut [T]) {
    let (plane, s, p) = (g.plane(), g.stride, g.pad);
    let lt = rows.len() * g.wo;
    cols.par_chunks_mut(lt).enumerate().for_each(|(r, row)| {
        let (c, i, j) = (r / (g.k_h * g.k_w), (r / g.k_w) % g.k_h, r % g.k_w);
        let src = &x[c * plane..(c + 1) * plane];
        let (ylo, yhi) = g.valid(i, g.h, g.ho);
        let (xlo, xhi) = g.valid(j, g.w, g.wo);
        for (oy, dst) in rows.clone().zip(row.chunks_mut(g.wo)) {
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

/// Adjoint of [`im2col`]: scatters-adds the columns `(K, (oy1 − oy0)·Wo)` of the output rows `rows` into one
/// sample `(C, H, W)`.
fn col2im_add<T: WithDType>(g: &Geom, cols: &[T], rows: Range<usize>, x: &mut [T]) {
    let (s, p) = (g.stride, g.pad);
    let lt = rows.len() * g.wo;
    x.par_chunks_mut(g.plane())
        .enumerate()
        .for_each(|(c, plane)| {
            for i in 0..g.k_h {
                let (ylo, yhi) = g.valid(i, g.h, g.ho);
                for j in 0..g.k_w {
                    let (xlo, xhi) = g.valid(j, g.w, g.wo);
                    let row = &cols[((c * g.k_h + i) * g.k_w + j) * lt..][..lt];
                    for oy in ylo.max(rows.start)..yhi.min(rows.end) {
                        let line = &mut plane[(oy * s + i - p) * g.w..][..g.w];
                        let src = &row[(oy - rows.start) * g.wo..][..g.wo];
                        for ox in xlo..xhi {
                            line[ox * s + j - p] += src[ox];
                        }
                    }
                }
            }
        });
}

/// Elements of one tile of columns: the columns of a large convolution are built a band of output rows at a time so
/// that they stay in cache (a 224² decoder conv would otherwise write and re-read ~100 MB per sample).
const TILE: usize = 1 << 20;

/// Bands of output rows `oy0..oy1` whose columns `(K, (oy1 − oy0)·Wo)` hold at most [`TILE`] elements (at least
/// one row).
fn bands(g: &Geom) -> impl Iterator<Item = Range<usize>> {
    let per = (TILE / (g.k() * g.wo).max(1)).clamp(1, g.ho.max(1));
    let ho = g.ho;
    (0..ho).step_by(per).map(move |o| o..(o + per).min(ho))
}

/// The element types the GEMM path computes in (the `gemm` crate panics on any other).
pub(super) trait Float: WithDType {}
impl Float for f32 {}
impl Float for f64 {}

/// A matrix view `(rows, cols)` into `data` with element `(r, c)` at `r·rs + c·cs`.
#[derive(Clone, Copy)]
pub(super) struct View<'a, T> {
    data: &'a [T],
    rs: usize,
    cs: usize,
}

impl<'a, T> View<'a, T> {
    /// Element `(r, c)` at `r·rs + c·cs`.
    pub(super) fn strided(data: &'a [T], rs: usize, cs: usize) -> Self {
        Self { data, rs, cs }
    }

    /// Row-major with `cols` columns.
    pub(super) fn rm(data: &'a [T], cols: usize) -> Self {
        Self {
            data,
            rs: cols,
            cs: 1,
        }
    }

    /// `(rows, cols)` stored column-major, i.e. the transpose of a row-major `(cols, rows)` matrix.
    pub(super) fn tr(data: &'a [T], rows: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: rows,
        }
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `gemm`'s threading with candle's thread count. Samples run one after the other, each product over all threads:
/// on the R50-ViT-B/16 convs (224², batch 4, 2 threads) this took 5.5 CPU-s for forward + both gradients against
/// 7.1 CPU-s with the samples in parallel and single-threaded products (`conv_gemm_layer_timing`).
pub(super) fn parallelism() -> gemm::Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// `dst (m, n)` (row-major, rows `dst_rs` apart) `= a (m, k) · b (k, n)`, or `+=` with `accumulate`.
pub(super) fn matmul<T: Float>(
    dst: &mut [T],
    dst_rs: usize,
    (m, n, k): (usize, usize, usize),
    a: View<T>,
    b: View<T>,
    accumulate: bool,
    par: gemm::Parallelism,
) {
    assert!(
        n <= dst_rs
            && (m == 0 || (m - 1) * dst_rs + n <= dst.len())
            && a.fits(m, k)
            && b.fits(k, n),
        "gemm: matrix views out of bounds"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for row in dst.chunks_mut(dst_rs).take(m) {
                row[..n].fill(T::zero());
            }
        }
        return;
    }
    // SAFETY: T is f32 or f64; every element addressed by the (m, n, k) shapes and strides lies inside the
    // slices (checked above); `dst` is exclusively borrowed and does not alias `a` or `b`.
    // gemm computes dst := alpha·dst + beta·a·b, reading dst only when read_dst is set.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        )
    }
}

/// `Y (B, Cout, L) = W · cols(X_b)` (+ bias per output channel).
fn forward<T: Float>(
    g: &Geom,
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    par: gemm::Parallelism,
) -> Vec<T> {
    if g.stride == 1 && !g.pointwise() {
        return forward_shifted(g, x, w, bias, par);
    }
    let (k, l, cx, cy) = (g.k(), g.l(), g.c * g.plane(), g.c_out * g.l());
    // SAFETY: every sample is written in full below: by the bias fill, or by the non-accumulating products whose
    // bands cover all output rows.
    let mut y = unsafe { uninit_vec::<T>(g.b * cy) };
    let mut cols = Vec::new();
    for (bi, yb) in y.chunks_mut(cy.max(1)).enumerate() {
        let xb = &x[bi * cx..][..cx];
        if let Some(bias) = bias {
            for (row, &v) in yb.chunks_mut(l).zip(bias) {
                row.fill(v);
            }
        }
        let a = View::rm(w, k);
        if g.pointwise() {
            matmul(
                yb,
                l,
                (g.c_out, l, k),
                a,
                View::rm(xb, l),
                bias.is_some(),
                par,
            );
            continue;
        }
        for rows in bands(g) {
            let lt = rows.len() * g.wo;
            cols.resize(k * lt, T::zero());
            im2col(g, xb, rows.clone(), &mut cols);
            let dst = &mut yb[rows.start * g.wo..];
            matmul(
                dst,
                l,
                (g.c_out, lt, k),
                a,
                View::rm(&cols, lt),
                bias.is_some(),
                par,
            );
        }
    }
    y
}

/// Stride-1 forward without a column matrix (implicit GEMM): `Y = Σ_taps W[:, :, i, j] · shift_{i,j}(X_p)` over a
/// zero-padded copy `X_p (Cin, Hp, Wp)` of each sample. Computed on rows `Wp` wide, output pixel `(oy, ox)` is column
/// `oy·Wp + ox` and tap `(i, j)` reads `X_p` from offset `i·Wp + j` on, so every tap is a plain strided view; the
/// `Wp − Wo` extra columns per row are computed and dropped. Against im2col this saves writing and re-reading the
/// `(Cin·k², L)` columns; e.g. on the 224² decoder conv 64 → 16 (batch 4) that matrix is 115 MB per sample.
fn forward_shifted<T: Float>(
    g: &Geom,
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    par: gemm::Parallelism,
) -> Vec<T> {
    let (wp, hp) = (g.w + 2 * g.pad, g.h + 2 * g.pad);
    let (plane_p, n, kk, l) = (hp * wp, g.ho * wp, g.k_h * g.k_w, g.l());
    let (cx, cy) = (g.c * g.plane(), g.c_out * l);
    // The last tap's view of the last channel runs k_w − 2 elements past the padded planes.
    let mut xp = vec![T::zero(); g.c * plane_p + g.k_w];
    // SAFETY: `yp` is written in full for each sample (the bias fill, or the first tap's non-accumulating product)
    // before it is read, and `y` by the copy of every output row from `yp`.
    let mut yp = unsafe { uninit_vec::<T>(g.c_out * n) };
    let mut y = unsafe { uninit_vec::<T>(g.b * cy) };
    for (bi, yb) in y.chunks_mut(cy.max(1)).enumerate() {
        let xb = &x[bi * cx..][..cx];
        // Only the interior is written, so the zero border survives from one sample to the next.
        xp[..g.c * plane_p]
            .par_chunks_mut(plane_p)
            .zip(xb.par_chunks(g.plane()))
            .for_each(|(dst, src)| {
                for (r, line) in src.chunks(g.w).enumerate() {
                    dst[(r + g.pad) * wp + g.pad..][..g.w].copy_from_slice(line);
                }
            });
        if let Some(bias) = bias {
            for (row, &v) in yp.chunks_mut(n).zip(bias) {
                row.fill(v);
            }
        }
        for i in 0..g.k_h {
            for j in 0..g.k_w {
                let tap = i * g.k_w + j;
                let a = View {
                    data: &w[tap..],
                    rs: g.c * kk,
                    cs: kk,
                };
                let b = View {
                    data: &xp[i * wp + j..],
                    rs: plane_p,
                    cs: 1,
                };
                matmul(
                    &mut yp,
                    n,
                    (g.c_out, n, g.c),
                    a,
                    b,
                    bias.is_some() || tap > 0,
                    par,
                );
            }
        }
        yb.par_chunks_mut(l.max(1))
            .zip(yp.par_chunks(n.max(1)))
            .for_each(|(dst, src)| {
                for (d, s) in dst.chunks_mut(g.wo).zip(src.chunks(wp)) {
                    d.copy_from_slice(&s[..g.wo]);
                }
            });
    }
    y
}

/// The geometry and kernel that compute `dX` of a stride-1 convolution as a forward convolution of `dY`: with
/// `p' = k − 1 − p`, `dX = conv(dY, W', padding p')` where `W'[ci, co, i, j] = W[co, ci, k−1−i, k−1−j]`. `None`
/// for other strides and non-square kernels.
fn transposed<T: Float>(g: &Geom, w: &[T]) -> Option<(Geom, Vec<T>)> {
    let k = g.k_h;
    if g.stride != 1 || g.k_w != k || g.pointwise() || g.pad >= k {
        return None;
    }
    let gt = Geom::new(
        &[g.b, g.c_out, g.ho, g.wo],
        &[g.c, g.c_out, k, k],
        1,
        k - 1 - g.pad,
    )
    .ok()?;
    debug_assert_eq!((gt.ho, gt.wo), (g.h, g.w));
    let kk = k * k;
    let mut wt = vec![T::zero(); w.len()];
    for co in 0..g.c_out {
        for ci in 0..g.c {
            let src = &w[(co * g.c + ci) * kk..][..kk];
            let dst = &mut wt[(ci * g.c_out + co) * kk..][..kk];
            for (d, &v) in dst.iter_mut().zip(src.iter().rev()) {
                *d = v;
            }
        }
    }
    Some((gt, wt))
}

/// `dX` from `dY (B, Cout, L)` and the kernel. Stride-1 convolutions gather `dY` into columns (one forward
/// convolution, [`transposed`]) instead of scattering a `(Cin·k², L)` product back with col2im: the same FLOPs with an
/// inner dimension `Cout·k²` instead of `Cout` and no scatter pass (`conv_gemm_layer_timing`: the 224² decoder conv 64 → 16, batch 4, 0.18 → 0.07 s wall).
fn input_grad<T: Float>(g: &Geom, dy: &[T], w: &[T], par: gemm::Parallelism) -> Vec<T> {
    if let Some((gt, wt)) = transposed(g, w) {
        return forward(&gt, dy, &wt, None, par);
    }
    let (k, l, cx, cy) = (g.k(), g.l(), g.c * g.plane(), g.c_out * g.l());
    let mut dx = vec![T::zero(); g.b * cx];
    let mut cols = Vec::new();
    for (bi, dst) in dx.chunks_mut(cx.max(1)).enumerate() {
        let (a, dyb) = (View::tr(w, k), &dy[bi * cy..][..cy]);
        if g.pointwise() {
            matmul(dst, l, (k, l, g.c_out), a, View::rm(dyb, l), false, par);
            continue;
        }
        for rows in bands(g) {
            let lt = rows.len() * g.wo;
            cols.resize(k * lt, T::zero());
            let b = View {
                data: &dyb[rows.start * g.wo..],
                rs: l,
                cs: 1,
            };
            matmul(&mut cols, lt, (k, lt, g.c_out), a, b, false, par);
            col2im_add(g, &cols, rows, dst);
        }
    }
    dx
}

/// Kernels with at most this many elements get their weight gradient from [`DW_PARTS`] partial sums computed in
/// parallel: a `(Cout, Cin·k²)` product that small is too few output blocks for `gemm` to keep two threads busy (the
/// 224² decoder convs ran at 1.3 of 2 cores).
const SMALL_DW: usize = 1 << 16;

/// Partial sums of a small weight gradient, also with one thread: fixed, so the result does not depend on the thread
/// count.
const DW_PARTS: usize = 4;

/// `dW = Σ_b dY_b · cols(X_b)ᵀ`.
fn weight_grad<T: Float>(g: &Geom, dy: &[T], x: &[T], par: gemm::Parallelism) -> Vec<T> {
    // One work item per (sample, band of output rows).
    let items: Vec<(usize, Range<usize>)> = (0..g.b)
        .flat_map(|bi| {
            let bands: Vec<Range<usize>> = if g.pointwise() {
                std::iter::once(0..g.ho).collect()
            } else {
                bands(g).collect()
            };
            bands.into_iter().map(move |r| (bi, r))
        })
        .collect();
    if g.c_out * g.k() > SMALL_DW || items.len() < 2 {
        return weight_grad_items(g, dy, x, &items, par);
    }
    let per = items.len().div_ceil(DW_PARTS);
    let parts: Vec<Vec<T>> = items
        .par_chunks(per)
        .map(|chunk| weight_grad_items(g, dy, x, chunk, gemm::Parallelism::None))
        .collect();
    let mut parts = parts.into_iter();
    let mut dw = parts
        .next()
        .unwrap_or_else(|| vec![T::zero(); g.c_out * g.k()]);
    for p in parts {
        for (a, b) in dw.iter_mut().zip(p) {
            *a += b;
        }
    }
    dw
}

/// `Σ dY_b[:, rows] · cols(X_b)[:, rows]ᵀ` over `items = (b, rows)`, accumulated in place.
fn weight_grad_items<T: Float>(
    g: &Geom,
    dy: &[T],
    x: &[T],
    items: &[(usize, Range<usize>)],
    par: gemm::Parallelism,
) -> Vec<T> {
    let (k, l, cx, cy) = (g.k(), g.l(), g.c * g.plane(), g.c_out * g.l());
    let mut dw = if items.is_empty() {
        vec![T::zero(); g.c_out * k]
    } else {
        // SAFETY: the first item's product does not accumulate (`gemm` does not read it) and writes all of `dw`.
        unsafe { uninit_vec::<T>(g.c_out * k) }
    };
    let mut cols = Vec::new();
    let mut first = true;
    for (bi, rows) in items.iter().cloned() {
        let (xb, dyb) = (&x[bi * cx..][..cx], &dy[bi * cy..][..cy]);
        if g.pointwise() {
            let (a, b) = (View::rm(dyb, l), View::tr(xb, l));
            matmul(&mut dw, k, (g.c_out, k, l), a, b, !first, par);
            first = false;
            continue;
        }
        let lt = rows.len() * g.wo;
        cols.resize(k * lt, T::zero());
        im2col(g, xb, rows.clone(), &mut cols);
        let a = View {
            data: &dyb[rows.start * g.wo..],
            rs: l,
            cs: 1,
        };
        matmul(
            &mut dw,
            k,
            (g.c_out, k, lt),
            a,
            View::tr(&cols, lt),
            !first,
            par,
        );
        first = false;
    }
    dw
}

/// `db[o] = Σ_b Σ_l dY[b, o, l]`.
fn bias_grad<T: Float>(g: &Geom, dy: &[T]) -> Vec<T> {
    let l = g.l().max(1);
    let mut db = vec![T::zero(); g.c_out];
    for (i, row) in dy.chunks(l).enumerate() {
        db[i % g.c_out.max(1)] += row.iter().fold(T::zero(), |s, &v| s + v);
    }
    db
}

/// Runs `$body` with `T` bound to the storages' common element type (f32 or f64).
macro_rules! with_float {
    ($t:ident, [$($s:expr),+], $body:expr) => {{
        let s = [$($s),+];
        if s.iter().all(|s| matches!(s, CpuStorage::F32(_))) {
            type $t = f32;
            $body
        } else if s.iter().all(|s| matches!(s, CpuStorage::F64(_))) {
            type $t = f64;
            $body
        } else {
            candle_core::bail!("fused GEMM op: only f32/f64 operands of equal dtype are supported")
        }
    }};
}
pub(super) use with_float;

/// A GEMM layer op `$op(geometry)`: `CustomOp2` (no bias) and `CustomOp3` (with bias), whose CPU forward runs `$forward`
/// on the f32/f64 slices `$x`, `$w`, `$bias: Option<&[T]>` and geometry `$g` (output shape `$y_shape`), and whose
/// backward applies the gradient ops `$input_grad`, `$weight_grad`, `$bias_grad` (each built from `$geom`, with `$me`
/// bound to the op) only for tracked operands. `$what` names the operands in errors.
macro_rules! gemm_layer_op {
    (
        $op:ident, ($name:literal, $name_bias:literal), $what:literal,
        |$g:ident, $x:ident, $w:ident, $bias:ident| $forward:expr, $y_shape:expr,
        ($input_grad:ident, $weight_grad:ident, $bias_grad:ident), |$me:ident| $geom:expr
    ) => {
        impl $op {
            fn fwd(
                &self,
                (xs, xl): (&CpuStorage, &Layout),
                (ws, wl): (&CpuStorage, &Layout),
                b: Option<(&CpuStorage, &Layout)>,
            ) -> candle_core::Result<(CpuStorage, Shape)> {
                let $g = &self.0;
                let bs = b.map_or(xs, |b| b.0);
                let y = with_float!(T, [xs, ws, bs], {
                    let $bias = match b {
                        Some((s, l)) => Some(super::cpu_data::<T>(s, l, concat!($what, " bias"))?),
                        None => None,
                    };
                    let $x = super::cpu_data::<T>(xs, xl, concat!($what, " input"))?;
                    let $w = super::cpu_data::<T>(ws, wl, concat!($what, " weight"))?;
                    T::to_cpu_storage_owned($forward)
                });
                Ok((y, $y_shape))
            }

            /// Gradients of the input and the weight, each only where its operand is tracked.
            fn grads(
                &self,
                x: &Tensor,
                w: &Tensor,
                grad: &Tensor,
            ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
                let $me = self;
                let dx = if x.track_op() {
                    Some(grad.apply_op2_no_bwd(&w.contiguous()?, &$input_grad($geom))?)
                } else {
                    None
                };
                let dw = if w.track_op() {
                    Some(grad.apply_op2_no_bwd(&x.contiguous()?, &$weight_grad($geom))?)
                } else {
                    None
                };
                Ok((dx, dw))
            }
        }

        impl CustomOp2 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                s1: &CpuStorage,
                l1: &Layout,
                s2: &CpuStorage,
                l2: &Layout,
            ) -> candle_core::Result<(CpuStorage, Shape)> {
                self.fwd((s1, l1), (s2, l2), None)
            }

            fn bwd(
                &self,
                x: &Tensor,
                w: &Tensor,
                _res: &Tensor,
                grad: &Tensor,
            ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
                self.grads(x, w, &grad.contiguous()?)
            }
        }

        impl CustomOp3 for $op {
            fn name(&self) -> &'static str {
                $name_bias
            }

            fn cpu_fwd(
                &self,
                s1: &CpuStorage,
                l1: &Layout,
                s2: &CpuStorage,
                l2: &Layout,
                s3: &CpuStorage,
                l3: &Layout,
            ) -> candle_core::Result<(CpuStorage, Shape)> {
                self.fwd((s1, l1), (s2, l2), Some((s3, l3)))
            }

            fn bwd(
                &self,
                x: &Tensor,
                w: &Tensor,
                b: &Tensor,
                _res: &Tensor,
                grad: &Tensor,
            ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
                let grad = grad.contiguous()?;
                let (dx, dw) = self.grads(x, w, &grad)?;
                let $me = self;
                let db = if b.track_op() {
                    Some(grad.apply_op1_no_bwd(&$bias_grad($geom))?)
                } else {
                    None
                };
                Ok((dx, dw, db))
            }
        }
    };
}
pub(super) use gemm_layer_op;

/// `CustomOp2` (forward only) for a gradient op `$op` over two f32/f64 operands named `$what_a`, `$what_b` in errors:
/// `$body` computes the output `Vec<T>` from the slices `$a`, `$b` and the op's geometry `$g`; `$shape` is its shape.
macro_rules! gemm_grad_op {
    ($op:ty, $name:literal, ($what_a:literal, $what_b:literal), |$g:ident, $a:ident, $b:ident| $body:expr, $shape:expr) => {
        impl CustomOp2 for $op {
            fn name(&self) -> &'static str {
                $name
            }

            fn cpu_fwd(
                &self,
                s1: &CpuStorage,
                l1: &Layout,
                s2: &CpuStorage,
                l2: &Layout,
            ) -> candle_core::Result<(CpuStorage, Shape)> {
                let $g = &self.0;
                let out = with_float!(T, [s1, s2], {
                    let $a = super::cpu_data::<T>(s1, l1, $what_a)?;
                    let $b = super::cpu_data::<T>(s2, l2, $what_b)?;
                    T::to_cpu_storage_owned($body)
                });
                Ok((out, $shape))
            }
        }
    };
}
pub(super) use gemm_grad_op;

/// `y = conv2d(x, w) (+ b)`: a [`CustomOp2`] without bias, a [`CustomOp3`] with it.
struct Conv(Geom);
/// `dX = conv2dᵀ(dY, w)` (no backward of its own).
struct InputGrad(Geom);
/// `dW` from `(dY, x)` (no backward of its own).
struct WeightGrad(Geom);
/// `db` from `dY` (no backward of its own).
struct BiasGrad(Geom);

gemm_layer_op!(
    Conv,
    ("conv2d-gemm", "conv2d-gemm-bias"),
    "conv2d_gemm",
    |g, x, w, bias| forward(g, x, w, bias, parallelism()),
    g.y_shape(),
    (InputGrad, WeightGrad, BiasGrad),
    |op| op.0
);
gemm_grad_op!(
    InputGrad,
    "conv2d-gemm-input-grad",
    ("conv2d_gemm gradient", "conv2d_gemm kernel"),
    |g, dy, w| input_grad(g, dy, w, parallelism()),
    g.x_shape()
);
gemm_grad_op!(
    WeightGrad,
    "conv2d-gemm-weight-grad",
    ("conv2d_gemm gradient", "conv2d_gemm input"),
    |g, dy, x| weight_grad(g, dy, x, parallelism()),
    g.w_shape()
);

impl CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "conv2d-gemm-bias-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let db = with_float!(T, [s], {
            T::to_cpu_storage_owned(bias_grad(
                &self.0,
                super::cpu_data::<T>(s, l, "conv2d_gemm gradient")?,
            ))
        });
        Ok((db, Shape::from(self.0.c_out)))
    }
}

/// Whether [`conv2d_gemm`] takes its GEMM path for these operands (CPU, f32/f64 of one dtype).
fn gemm_path(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> bool {
    let dt = x.dtype();
    x.device().is_cpu()
        && w.device().is_cpu()
        && matches!(dt, DType::F32 | DType::F64)
        && w.dtype() == dt
        && b.is_none_or(|b| b.device().is_cpu() && b.dtype() == dt)
}

/// Differentiable `conv2d(x (B,Cin,H,W), w (Cout,Cin,kh,kw))` with dilation 1 and one group, the value of
/// `x.conv2d(w, padding, stride, 1, 1)`. On the CPU in f32/f64 the forward and both gradients run as GEMMs (see the
/// module docs), with or without a recorded gradient; on other devices or dtypes it is plainly candle's `conv2d`.
pub fn conv2d_gemm(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Tensor> {
    conv2d_gemm_bias(x, w, None, stride, padding)
}

/// [`conv2d_gemm`] plus an optional per-output-channel bias `b (Cout,)`, fused into the GEMM path (written into
/// the output before the product accumulates onto it; its gradient sums `dY`). Elsewhere: candle's `conv2d`
/// followed by a broadcast add.
pub fn conv2d_gemm_bias(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    if !gemm_path(x, w, b) {
        let y = x.conv2d(w, padding, stride, 1, 1)?;
        return Ok(match b {
            None => y,
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?)?,
        });
    }
    let g = Geom::new(x.dims(), w.dims(), stride, padding)?;
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    match b {
        None => Ok(x.apply_op2(&w, Conv(g))?),
        Some(b) => {
            if b.dims() != [g.c_out] {
                return Err(Error::Arg(format!(
                    "conv2d_gemm: bias {:?} does not match the {} output channels",
                    b.dims(),
                    g.c_out
                )));
            }
            Ok(x.apply_op3(&w, &b.contiguous()?, Conv(g))?)
        }
    }
}

/// [`conv2d_gemm_bias`] through a candle [`candle_nn::Conv2d`] layer (weight, optional bias, stride and padding from
/// its config); layers with dilation or groups use candle's own forward.
pub fn conv2d_layer(conv: &candle_nn::Conv2d, x: &Tensor) -> Result<Tensor> {
    use candle_nn::Module;
    let cfg = conv.config();
    if cfg.dilation != 1 || cfg.groups != 1 {
        return Ok(conv.forward(x)?);
    }
    conv2d_gemm_bias(x, conv.weight(), conv.bias(), cfg.stride, cfg.padding)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_core::Device;

    /// A deterministic f64 test tensor with values in `[−scale/2, scale/2)` (shared with the fused Linear's tests).
    pub(in crate::nn) fn ramp(shape: &[usize], scale: f64) -> Tensor {
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
            (1, 4, 11, 11, 5, 1, 2, 0),
            (3, 2, 5, 7, 3, 3, 2, 0),
            // stride 1: dX as a forward convolution of dY (non-square maps, k5, padding 0..k−1, Cout > Cin)
            (2, 3, 6, 9, 5, 3, 1, 1),
            (1, 2, 8, 7, 3, 5, 1, 2),
            (1, 3, 9, 9, 2, 5, 1, 1),
            (1, 2, 4, 4, 3, 3, 1, 2),
            (1, 4, 7, 5, 2, 5, 1, 4),
        ];
        for (b, c, h, w, co, k, s, p) in cases {
            let case = format!("b{b} c{c} {h}x{w} co{co} k{k} s{s} p{p}");
            assert_matches_candle(&[b, c, h, w], &[co, c, k, k], 1.0, (s, p), &case);
        }
    }

    /// `conv2d_gemm` against candle's `conv2d` (f64 ramps; kernel ramp scaled by `w_scale`): the output and the input
    /// and kernel gradients of `Σ y ⊙ r` agree to 1e-12 relative to the largest reference value.
    fn assert_matches_candle(
        x_shape: &[usize],
        w_shape: &[usize],
        w_scale: f64,
        (s, p): (usize, usize),
        case: &str,
    ) {
        let x = candle_core::Var::from_tensor(&ramp(x_shape, 2.0)).unwrap();
        let w = candle_core::Var::from_tensor(&ramp(w_shape, w_scale)).unwrap();
        let ours = conv2d_gemm(x.as_tensor(), w.as_tensor(), s, p).unwrap();
        let theirs = x.as_tensor().conv2d(w.as_tensor(), p, s, 1, 1).unwrap();
        assert_eq!(ours.dims(), theirs.dims(), "{case}");
        assert!(rel_diff(&ours, &theirs) < 1e-12, "{case}: forward");
        let r = ramp(theirs.dims(), 3.0);
        let grads = |y: &Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let (go, gt) = (grads(&ours), grads(&theirs));
        for (name, v) in [("input", &x), ("kernel", &w)] {
            let (a, e) = (
                go.get(v.as_tensor()).unwrap(),
                gt.get(v.as_tensor()).unwrap(),
            );
            assert!(rel_diff(a, e) < 1e-12, "{case}: {name} gradient");
        }
    }

    /// Largest `|a − b|` over all elements, relative to `max |b|`.
    pub(in crate::nn) fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        let max = |t: Tensor| -> f64 {
            t.to_dtype(DType::F64)
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
        max((a - b).unwrap()) / max(b.clone()).max(1e-30)
    }

    /// f32, with and without a recorded gradient and with a fused bias: within 1e-5 (relative to the largest
    /// output) of candle's conv2d + broadcast bias, over the ResNet/decoder geometries.
    /// Non-square kernels take the shifted-view forward (stride 1) and, having no square flip, the col2im input
    /// gradient.
    #[test]
    fn non_square_kernels_match_candle() {
        for (kh, kw, pad) in [(1, 3, 1), (3, 1, 0), (2, 3, 1)] {
            let case = format!("{kh}x{kw} p{pad}");
            assert_matches_candle(&[2, 3, 6, 7], &[4, 3, kh, kw], 1.0, (1, pad), &case);
        }
    }

    #[test]
    fn f32_forward_is_close_to_candle() {
        let cases = [
            // (b, c, h, w, cout, k, stride, pad)
            (4, 3, 29, 29, 8, 7, 2, 3),   // root 7×7/s2
            (2, 16, 15, 15, 24, 1, 1, 0), // pointwise
            (2, 16, 15, 15, 24, 1, 2, 0), // downsample 1×1/s2
            (1, 8, 14, 14, 8, 3, 2, 1),   // 3×3/s2, batch 1
            (3, 5, 9, 13, 7, 3, 1, 1),    // odd, non-square
            (1, 4, 6, 6, 3, 3, 1, 0),
        ];
        for (b, c, h, w, co, k, s, p) in cases {
            let case = format!("b{b} c{c} {h}x{w} co{co} k{k} s{s} p{p}");
            let f32t = |t: Tensor| t.to_dtype(DType::F32).unwrap();
            let x = f32t(ramp(&[b, c, h, w], 2.0));
            let wt = f32t(ramp(&[co, c, k, k], 1.0));
            let bias = f32t(ramp(&[co], 0.7));
            let theirs = x.conv2d(&wt, p, s, 1, 1).unwrap();
            let theirs_b = theirs
                .broadcast_add(&bias.reshape((1, co, 1, 1)).unwrap())
                .unwrap();
            let untracked = conv2d_gemm(&x, &wt, s, p).unwrap();
            let wv = candle_core::Var::from_tensor(&wt).unwrap();
            let tracked = conv2d_gemm(&x, wv.as_tensor(), s, p).unwrap();
            let biased = conv2d_gemm_bias(&x, &wt, Some(&bias), s, p).unwrap();
            assert_eq!(untracked.dims(), theirs.dims(), "{case}");
            assert!(rel_diff(&untracked, &theirs) < 1e-5, "{case}: untracked");
            assert!(rel_diff(&tracked, &theirs) < 1e-5, "{case}: tracked");
            assert!(rel_diff(&biased, &theirs_b) < 1e-5, "{case}: bias");
        }
    }

    /// The fused bias and its gradient equal conv2d + broadcast_add (f64).
    #[test]
    fn fused_bias_matches_broadcast_add_and_its_gradient() {
        for (s, p, k) in [(1, 1, 3), (2, 0, 1), (1, 0, 1)] {
            let x = candle_core::Var::from_tensor(&ramp(&[2, 3, 7, 7], 2.0)).unwrap();
            let w = candle_core::Var::from_tensor(&ramp(&[4, 3, k, k], 1.0)).unwrap();
            let b = candle_core::Var::from_tensor(&ramp(&[4], 0.5)).unwrap();
            let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
            let ours = conv2d_gemm_bias(xt, wt, Some(bt), s, p).unwrap();
            let theirs = xt
                .conv2d(wt, p, s, 1, 1)
                .unwrap()
                .broadcast_add(&bt.reshape((1, 4, 1, 1)).unwrap())
                .unwrap();
            assert!(rel_diff(&ours, &theirs) < 1e-12, "s{s} p{p} k{k}: forward");
            let r = ramp(theirs.dims(), 3.0);
            let go = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gt = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, v) in [("input", &x), ("kernel", &w), ("bias", &b)] {
                let (a, e) = (
                    go.get(v.as_tensor()).unwrap(),
                    gt.get(v.as_tensor()).unwrap(),
                );
                assert!(rel_diff(a, e) < 1e-12, "s{s} p{p} k{k}: {name} gradient");
            }
        }
    }

    #[test]
    fn rejects_a_bias_of_the_wrong_length() {
        let x = ramp(&[1, 2, 5, 5], 1.0);
        let w = ramp(&[3, 2, 3, 3], 1.0);
        let e = conv2d_gemm_bias(&x, &w, Some(&ramp(&[2], 1.0)), 1, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("bias"), "{e}");
    }

    /// Serial and threaded products agree (f64).
    #[test]
    fn serial_and_threaded_products_agree() {
        let g = Geom::new(&[3, 4, 9, 9], &[5, 4, 3, 3], 2, 1).unwrap();
        let f64v = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let x = f64v(ramp(&[3, 4, 9, 9], 2.0));
        let w = f64v(ramp(&[5, 4, 3, 3], 1.0));
        let dy = f64v(ramp(&[3, 5, 5, 5], 1.5));
        let runs: Vec<_> = [gemm::Parallelism::None, gemm::Parallelism::Rayon(2)]
            .into_iter()
            .map(|par| {
                (
                    forward(&g, &x, &w, None, par),
                    input_grad(&g, &dy, &w, par),
                    weight_grad(&g, &dy, &x, par),
                )
            })
            .collect();
        let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-12);
        let (r, e) = (&runs[1], &runs[0]);
        assert!(close(&r.0, &e.0) && close(&r.1, &e.1) && close(&r.2, &e.2));

        // A small kernel takes the weight gradient as DW_PARTS partial sums: the same bits for every thread count,
        // and the same value as one running sum over all (sample, band) items.
        let g = Geom::new(&[5, 3, 9, 9], &[2, 3, 3, 3], 1, 1).unwrap();
        let x = f64v(ramp(&[5, 3, 9, 9], 2.0));
        let dy = f64v(ramp(&[5, 2, 9, 9], 1.5));
        let bits = |v: Vec<f64>| v.into_iter().map(f64::to_bits).collect::<Vec<_>>();
        let serial = weight_grad(&g, &dy, &x, gemm::Parallelism::None);
        for n in [2, 3] {
            let threaded = weight_grad(&g, &dy, &x, gemm::Parallelism::Rayon(n));
            assert_eq!(bits(threaded), bits(serial.clone()), "{n} threads");
        }
        let items: Vec<_> = (0..5).map(|b| (b, 0..9)).collect();
        let one_sum = weight_grad_items(&g, &dy, &x, &items, gemm::Parallelism::None);
        assert!(close(&serial, &one_sum));
        assert!(serial.iter().any(|v| v.abs() > 1.0));
    }

    /// Convolutions whose columns exceed [`TILE`] run in bands of output rows (here 3 uneven bands of a 7×7/s2
    /// and 2 of a 3×3/s1): forward and gradients still equal candle's (f64).
    #[test]
    fn banded_columns_match_candle() {
        for (c, size, k, s, p) in [(32, 80, 7, 2, 3), (128, 40, 3, 1, 1)] {
            let g = Geom::new(&[2, c, size, size], &[3, c, k, k], s, p).unwrap();
            assert!(bands(&g).count() >= 2, "c{c} k{k}: one band only");
            assert_matches_candle(
                &[2, c, size, size],
                &[3, c, k, k],
                0.1,
                (s, p),
                &format!("c{c} k{k}"),
            );
        }
    }

    /// Process CPU seconds (user + system, all threads) from /proc/self/stat.
    fn cpu_s() -> f64 {
        let s = std::fs::read_to_string("/proc/self/stat").unwrap();
        let f: Vec<&str> = s[s.rfind(')').unwrap() + 2..].split(' ').collect();
        (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
    }

    /// CPU and wall seconds of forward, input and weight gradient of the R50-ViT-B/16 TransUNet convs (224², batch
    /// 4, f32, layer counts of one step), next to candle's own conv2d forward, per layer. Run: `cargo test --release -p ultrarefiner --lib conv_gemm_layer_timing --
    /// --ignored --nocapture`.
    #[test]
    #[ignore = "timing study (about a minute); prints a table"]
    fn conv_gemm_layer_timing() {
        // (cin, size, cout, k, stride, pad, count)
        let layers = [
            (3, 224, 64, 7, 2, 3, 1),
            (64, 55, 64, 1, 1, 0, 1),
            (64, 55, 256, 1, 1, 0, 2),
            (64, 55, 64, 3, 1, 1, 3),
            (256, 55, 64, 1, 1, 0, 2),
            (256, 55, 128, 1, 1, 0, 1),
            (128, 55, 128, 3, 2, 1, 1),
            (256, 55, 512, 1, 2, 0, 1),
            (128, 28, 512, 1, 1, 0, 4),
            (512, 28, 128, 1, 1, 0, 3),
            (128, 28, 128, 3, 1, 1, 3),
            (512, 28, 256, 1, 1, 0, 1),
            (256, 28, 256, 3, 2, 1, 1),
            (512, 28, 1024, 1, 2, 0, 1),
            (256, 14, 1024, 1, 1, 0, 9),
            (1024, 14, 256, 1, 1, 0, 8),
            (256, 14, 256, 3, 1, 1, 8),
            (1024, 14, 768, 1, 1, 0, 1),
            (768, 14, 512, 3, 1, 1, 1),
            (1024, 28, 256, 3, 1, 1, 1),
            (256, 28, 256, 3, 1, 1, 1),
            (512, 56, 128, 3, 1, 1, 1),
            (128, 56, 128, 3, 1, 1, 1),
            (192, 112, 64, 3, 1, 1, 1),
            (64, 112, 64, 3, 1, 1, 1),
            (64, 224, 16, 3, 1, 1, 1),
            (16, 224, 16, 3, 1, 1, 1),
            (16, 224, 2, 3, 1, 1, 1),
        ];
        let par = parallelism();
        let mut total = [0.0f64; 6];
        let mut candle_total = (0.0f64, 0.0f64);
        for (cin, size, cout, k, s, p, count) in layers {
            let g = Geom::new(&[4, cin, size, size], &[cout, cin, k, k], s, p).unwrap();
            let v =
                |n: usize| -> Vec<f32> { (0..n).map(|i| (i % 97) as f32 / 97.0 - 0.5).collect() };
            let x = v(4 * cin * size * size);
            let w = v(cout * g.k());
            let dy = v(4 * cout * g.l());
            let time = |f: &dyn Fn()| {
                let (c0, t0) = (cpu_s(), std::time::Instant::now());
                f();
                (cpu_s() - c0, t0.elapsed().as_secs_f64())
            };
            let (xt, wt) = (
                Tensor::from_slice(&x, (4, cin, size, size), &Device::Cpu).unwrap(),
                Tensor::from_slice(&w, (cout, cin, k, k), &Device::Cpu).unwrap(),
            );
            let candle = time(&|| drop(xt.conv2d(&wt, p, s, 1, 1).unwrap()));
            let r = [
                time(&|| drop(forward(&g, &x, &w, None, par))),
                time(&|| drop(input_grad(&g, &dy, &w, par))),
                time(&|| drop(weight_grad(&g, &dy, &x, par))),
            ];
            let mut row = [0.0f64; 6];
            for (j, (c, t)) in r.into_iter().enumerate() {
                row[2 * j] = c * count as f64;
                row[2 * j + 1] = t * count as f64;
            }
            println!(
                "cin {cin:4} {size:3}² cout {cout:4} k{k} s{s} ×{count}: cpu/wall fwd {:.2}/{:.2} dx {:.2}/{:.2} \
                 dw {:.2}/{:.2} | candle fwd {:.2}/{:.2}",
                row[0],
                row[1],
                row[2],
                row[3],
                row[4],
                row[5],
                candle.0 * count as f64,
                candle.1 * count as f64
            );
            candle_total.0 += candle.0 * count as f64;
            candle_total.1 += candle.1 * count as f64;
            for (t, r) in total.iter_mut().zip(row) {
                *t += r;
            }
        }
        println!(
            "total: cpu/wall fwd {:.2}/{:.2} dx {:.2}/{:.2} dw {:.2}/{:.2} | candle fwd {:.2}/{:.2}",
            total[0], total[1], total[2], total[3], total[4], total[5], candle_total.0, candle_total.1
        );
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
