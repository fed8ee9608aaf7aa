//! Fused CPU kernels with hand-derived backward: GroupNorm, LayerNorm over the last axis (also StdConv2d's weight
//! standardisation), LayerNorm over the channel axis (LayerNorm2d), softmax over the last axis, exact GELU and ReLU.
//!
//! The composed versions (kept for CUDA and half precision) record ~10 candle ops each; every op is one or more full
//! passes over memory in the forward and again in the backward, plus candle's per-op gradient bookkeeping. Here each
//! forward is one custom op (two reads and one write of the input), and each backward is one no-backward custom op
//! that computes all gradients (`[dx | dw | db]` in one buffer, split into views) in two passes. Statistics
//! (mean, 1/σ) are kept from the forward; sums are accumulated in f64 (eight independent lanes so they vectorise),
//! elementwise work is done in the tensor's dtype. The callers dispatch with [`supported`] (CPU, f32/f64).
//!
//! Semantics (PyTorch): biased variance, eps inside the square root, two-pass (centred) variance.
use super::buffer::{uninit_vec, uninit_vec_with_spare};
use super::fast_math::{run_widest, Kernel};
use crate::Result;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::sync::Mutex;

/// f32/f64 with the transcendentals the kernels need. f32 uses the vectorisable forms of `fast_math` (softmax and
/// GELU loops would otherwise call scalar libm per element); f64, used for gradient checks, uses libm.
pub(super) trait Float: WithDType {
    const FRAC_1_SQRT_2: Self;
    /// `1/√(2π)`
    const FRAC_1_SQRT_2PI: Self;
    /// `eˣ` for `x ≤ 0`.
    fn exp_nonpos(self) -> Self;
    /// `(erf(z), e^{−z²})`.
    fn erf_and_gauss(self) -> (Self, Self);
    /// IEEE `maxNum` (ignores a NaN operand), which vectorises as a reduction.
    fn max_num(self, other: Self) -> Self;
}

impl Float for f32 {
    const FRAC_1_SQRT_2: Self = std::f32::consts::FRAC_1_SQRT_2;
    const FRAC_1_SQRT_2PI: Self =
        (std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2 * 0.5) as f32;
    #[inline(always)]
    fn exp_nonpos(self) -> Self {
        super::fast_math::exp_nonpos(self)
    }
    #[inline(always)]
    fn erf_and_gauss(self) -> (Self, Self) {
        super::fast_math::erf_and_gauss(self)
    }
    #[inline(always)]
    fn max_num(self, other: Self) -> Self {
        self.max(other)
    }
}

impl Float for f64 {
    const FRAC_1_SQRT_2: Self = std::f64::consts::FRAC_1_SQRT_2;
    const FRAC_1_SQRT_2PI: Self =
        std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2 * 0.5;
    fn exp_nonpos(self) -> Self {
        self.exp()
    }
    fn erf_and_gauss(self) -> (Self, Self) {
        (candle_core::cpu::erf::erf_f64(self), (-(self * self)).exp())
    }
    fn max_num(self, other: Self) -> Self {
        self.max(other)
    }
}

/// Whether the fused kernels handle these operands: all on the CPU, one dtype, f32 or f64.
pub(super) fn supported(ts: &[&Tensor]) -> bool {
    let Some(first) = ts.first() else {
        return false;
    };
    let dt = first.dtype();
    matches!(dt, DType::F32 | DType::F64)
        && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == dt)
}

const LANES: usize = 8;

/// Σ f(aᵢ) in f64 with [`LANES`] independent accumulators (vectorisable, and more accurate than one).
#[inline(always)]
fn lane_sum<T: Copy>(a: &[T], f: impl Fn(T) -> f64) -> f64 {
    let mut acc = [0f64; LANES];
    let mut it = a.chunks_exact(LANES);
    for c in &mut it {
        for (s, &v) in acc.iter_mut().zip(c) {
            *s += f(v);
        }
    }
    acc.iter().sum::<f64>() + it.remainder().iter().map(|&v| f(v)).sum::<f64>()
}

/// Σ f(aᵢ, bᵢ) like [`lane_sum`].
#[inline(always)]
fn lane_sum2<T: Copy>(a: &[T], b: &[T], f: impl Fn(T, T) -> f64) -> f64 {
    let mut acc = [0f64; LANES];
    let (mut ia, mut ib) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    for (ca, cb) in (&mut ia).zip(&mut ib) {
        for ((s, &u), &v) in acc.iter_mut().zip(ca).zip(cb) {
            *s += f(u, v);
        }
    }
    let tail: f64 = ia
        .remainder()
        .iter()
        .zip(ib.remainder())
        .map(|(&u, &v)| f(u, v))
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// Σ f(aᵢ, bᵢ, cᵢ) like [`lane_sum`].
#[inline(always)]
fn lane_sum3<T: Copy>(a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> f64) -> f64 {
    let mut acc = [0f64; LANES];
    let (mut ia, mut ib, mut ic) = (
        a.chunks_exact(LANES),
        b.chunks_exact(LANES),
        c.chunks_exact(LANES),
    );
    for ((ca, cb), cc) in (&mut ia).zip(&mut ib).zip(&mut ic) {
        for (((s, &u), &v), &w) in acc.iter_mut().zip(ca).zip(cb).zip(cc) {
            *s += f(u, v, w);
        }
    }
    let tail: f64 = ia
        .remainder()
        .iter()
        .zip(ib.remainder())
        .zip(ic.remainder())
        .map(|((&u, &v), &w)| f(u, v, w))
        .sum();
    acc.iter().sum::<f64>() + tail
}

/// `(mean, 1/√(var + eps))` of a row (two-pass, biased variance).
fn row_stats<T: WithDType>(x: &[T], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let mu = lane_sum(x, |v| v.to_f64()) / n;
    let var = lane_sum(x, |v| {
        let d = v.to_f64() - mu;
        d * d
    }) / n;
    (mu, 1.0 / (var + eps).sqrt())
}

/// `(Σ dy, Σ dy·(x − μ))` over a row.
fn row_grad_sums<T: WithDType>(dy: &[T], x: &[T], mu: f64) -> (f64, f64) {
    let s1 = lane_sum(dy, |g| g.to_f64());
    let s2 = lane_sum2(dy, x, |g, v| g.to_f64() * (v.to_f64() - mu));
    (s1, s2)
}

/// The data of a contiguous storage viewed through `l`.
fn view<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&T::cpu_storage_as_slice(s)?[a..b]),
        None => candle_core::bail!("{op}: operands must be contiguous"),
    }
}

pub(super) fn lock<'a, V>(
    m: &'a Mutex<V>,
    op: &str,
) -> candle_core::Result<std::sync::MutexGuard<'a, V>> {
    m.lock()
        .map_err(|_| candle_core::Error::Msg(format!("{op}: poisoned lock")))
}

macro_rules! dispatch3 {
    ($op:expr, $f:ident, $s1:expr, $l1:expr, $s2:expr, $l2:expr, $s3:expr, $l3:expr) => {
        match ($s1, $s2, $s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                $op.$f::<f32>($s1, $l1, $s2, $l2, $s3, $l3)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                $op.$f::<f64>($s1, $l1, $s2, $l2, $s3, $l3)
            }
            _ => candle_core::bail!("{}: only f32/f64 operands of one dtype", $op.name()),
        }
    };
}

macro_rules! dispatch2 {
    ($op:expr, $f:ident, $s1:expr, $l1:expr, $s2:expr, $l2:expr) => {
        match ($s1, $s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => $op.$f::<f32>($s1, $l1, $s2, $l2),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => $op.$f::<f64>($s1, $l1, $s2, $l2),
            _ => candle_core::bail!("{}: only f32/f64 operands of one dtype", $op.name()),
        }
    };
}

/// `CustomOp2::cpu_fwd` that calls the op's generic `run::<T>` for f32 or f64 operands.
macro_rules! cpu_fwd_by_dtype2 {
    () => {
        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            dispatch2!(self, run, s1, l1, s2, l2)
        }
    };
}

/// `CustomOp3::cpu_fwd` that calls the op's generic `run::<T>` for f32 or f64 operands.
macro_rules! cpu_fwd_by_dtype3 {
    () => {
        fn cpu_fwd(
            &self,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            dispatch3!(self, run, s1, l1, s2, l2, s3, l3)
        }
    };
}

/// Splits a concatenated gradient `[dx | dw | db]` (any part may be absent) into tensors of the operands' shapes.
fn split_grads(
    all: &Tensor,
    x: Option<&Tensor>,
    wb: Option<(&Tensor, &Tensor)>,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let mut off = 0;
    let mut take = |t: &Tensor| -> candle_core::Result<Tensor> {
        let n = t.elem_count();
        let part = all.narrow(0, off, n)?.reshape(t.shape())?;
        off += n;
        Ok(part)
    };
    let dx = x.map(&mut take).transpose()?;
    let (dw, db) = match wb {
        Some((w, b)) => (Some(take(w)?), Some(take(b)?)),
        None => (None, None),
    };
    Ok((dx, dw, db))
}

/// Which gradients a backward computes.
#[derive(Debug, Clone, Copy)]
struct Need {
    dx: bool,
    dwb: bool,
}

// ---------------------------------------------------------------------------------------------------------------
// Normalisations: one generic op pair, the kernels per kind
// ---------------------------------------------------------------------------------------------------------------

/// A normalisation with per-channel affine: its forward (output and per-row `(μ, 1/σ)`) and its backward
/// (`[dx | dw | db]` from `(dy, x, w)`, each part only when asked for).
trait NormKind: Copy + Send + Sync + 'static {
    const NAME: &'static str;
    const GRAD_NAME: &'static str;

    fn fwd<T: WithDType>(&self, eps: f64, x: &[T], w: &[T], b: &[T]) -> (Vec<T>, Vec<(f64, f64)>);

    fn grad<T: WithDType>(&self, stats: &[(f64, f64)], need: Need, dxw: Three<T>) -> Vec<T>;

    /// Rows (statistics) of an input of `len` elements with an affine of `channels`, if the sizes agree.
    fn rows(&self, len: usize, channels: usize) -> Option<usize>;

    /// The forward applies `max(·, 0)` to its output (a fused ReLU), so the backward masks `dy` by `y > 0` first.
    fn relu(&self) -> bool {
        false
    }
}

/// The forward op of a [`NormKind`]; keeps the statistics for the backward.
struct NormOp<K: NormKind> {
    kind: K,
    eps: f64,
    stats: Mutex<Vec<(f64, f64)>>,
}

/// The backward op of a [`NormKind`] (no backward of its own).
struct NormGrad<K: NormKind> {
    kind: K,
    stats: Vec<(f64, f64)>,
    need: Need,
}

/// Three contiguous operands of one dtype.
type Three<'a, T> = (&'a [T], &'a [T], &'a [T]);

fn three<'a, T: WithDType>(
    op: &str,
    (s1, l1): (&'a CpuStorage, &Layout),
    (s2, l2): (&'a CpuStorage, &Layout),
    (s3, l3): (&'a CpuStorage, &Layout),
) -> candle_core::Result<Three<'a, T>> {
    Ok((view(s1, l1, op)?, view(s2, l2, op)?, view(s3, l3, op)?))
}

impl<K: NormKind> NormOp<K> {
    fn run<T: WithDType>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, b) = three::<T>(K::NAME, (s1, l1), (s2, l2), (s3, l3))?;
        if self.kind.rows(x.len(), w.len()).is_none() || b.len() != w.len() {
            candle_core::bail!("{}: input and affine sizes disagree", K::NAME);
        }
        let (y, stats) = self.kind.fwd(self.eps, x, w, b);
        *lock(&self.stats, K::NAME)? = stats;
        Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
    }
}

impl<K: NormKind> CustomOp3 for NormOp<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    cpu_fwd_by_dtype3!();

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let need = Need {
            dx: x.track_op(),
            dwb: w.track_op() || b.track_op(),
        };
        if !need.dx && !need.dwb {
            return Ok((None, None, None));
        }
        let masked;
        let grad = if self.kind.relu() {
            masked = relu_grad(grad, res)?;
            &masked
        } else {
            grad
        };
        let op = NormGrad {
            kind: self.kind,
            stats: lock(&self.stats, K::NAME)?.clone(),
            need,
        };
        let all = grad.contiguous()?.apply_op3_no_bwd(x, w, &op)?;
        let (dx, dw, db) = split_grads(&all, need.dx.then_some(x), need.dwb.then_some((w, b)))?;
        Ok((dx, dw.filter(|_| w.track_op()), db.filter(|_| b.track_op())))
    }
}

impl<K: NormKind> NormGrad<K> {
    fn run<T: WithDType>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (dy, x, w) = three::<T>(K::GRAD_NAME, (s1, l1), (s2, l2), (s3, l3))?;
        if self.kind.rows(x.len(), w.len()) != Some(self.stats.len()) || dy.len() != x.len() {
            candle_core::bail!(
                "{}: statistics or gradient do not match the input",
                K::GRAD_NAME
            );
        }
        let out = self.kind.grad(&self.stats, self.need, (dy, x, w));
        let len = out.len();
        Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
    }
}

impl<K: NormKind> CustomOp3 for NormGrad<K> {
    fn name(&self) -> &'static str {
        K::GRAD_NAME
    }

    cpu_fwd_by_dtype3!();
}

/// Appends `dw, db` (f64 sums) to `dx` when they were asked for.
/// The buffer of a norm's gradient: `dx` (if asked for; unspecified until written) with room for the `dw` and `db`
/// that [`append_wb`] then appends without moving it.
///
/// # Safety
/// The caller writes all `len` elements of `dx` before any is read.
unsafe fn dx_buffer<T: WithDType>(need: Need, len: usize, channels: usize) -> Vec<T> {
    let spare = if need.dwb { 2 * channels } else { 0 };
    // SAFETY: the caller's contract.
    unsafe { uninit_vec_with_spare(if need.dx { len } else { 0 }, spare) }
}

fn append_wb<T: WithDType>(mut dx: Vec<T>, need: Need, dw: Vec<f64>, db: Vec<f64>) -> Vec<T> {
    if need.dwb {
        dx.extend(dw.into_iter().chain(db).map(T::from_f64));
    }
    dx
}

fn apply_norm<K: NormKind>(
    kind: K,
    eps: f64,
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
) -> Result<Tensor> {
    let op = NormOp {
        kind,
        eps,
        stats: Mutex::new(Vec::new()),
    };
    let (w, b) = (
        w.flatten_all()?.contiguous()?,
        b.flatten_all()?.contiguous()?,
    );
    Ok(x.contiguous()?.apply_op3(&w, &b, op)?)
}

// ---------------------------------------------------------------------------------------------------------------
// GroupNorm
// ---------------------------------------------------------------------------------------------------------------

/// GroupNorm of `(N, C, H·W)`: statistics per (sample, group) over `(C/G, H·W)`.
#[derive(Debug, Clone, Copy)]
struct GroupNormKind {
    c: usize,
    hw: usize,
    groups: usize,
    relu: bool,
}

impl GroupNormKind {
    /// Channels per group.
    fn cg(&self) -> usize {
        self.c / self.groups
    }

    /// Elements per (sample, group).
    fn m(&self) -> usize {
        self.cg() * self.hw
    }
}

impl NormKind for GroupNormKind {
    const NAME: &'static str = "group-norm";
    const GRAD_NAME: &'static str = "group-norm-grad";

    fn rows(&self, len: usize, channels: usize) -> Option<usize> {
        let per_sample = self.c * self.hw;
        (channels == self.c && per_sample > 0 && len.is_multiple_of(per_sample))
            .then(|| len / per_sample * self.groups)
    }

    fn relu(&self) -> bool {
        self.relu
    }

    fn fwd<T: WithDType>(&self, eps: f64, x: &[T], w: &[T], b: &[T]) -> (Vec<T>, Vec<(f64, f64)>) {
        let (cg, hw, m) = (self.cg(), self.hw, self.m());
        // SAFETY: each parallel chunk below writes every element of its part of `y`.
        let mut y = unsafe { uninit_vec::<T>(x.len()) };
        let mut stats = vec![(0.0, 0.0); x.len() / m];
        y.par_chunks_mut(m)
            .zip(x.par_chunks(m))
            .zip(stats.par_iter_mut())
            .enumerate()
            .for_each(|(r, ((yr, xr), st))| {
                let (mu, rstd) = row_stats(xr, eps);
                *st = (mu, rstd);
                let mu_t = T::from_f64(mu);
                let c0 = (r % self.groups) * cg;
                for (k, (yp, xp)) in yr.chunks_mut(hw).zip(xr.chunks(hw)).enumerate() {
                    let a = T::from_f64(rstd * w[c0 + k].to_f64());
                    let bc = b[c0 + k];
                    for (yv, &xv) in yp.iter_mut().zip(xp) {
                        *yv = (xv - mu_t) * a + bc;
                    }
                    if self.relu {
                        relu_in_place(yp);
                    }
                }
            });
        (y, stats)
    }

    fn grad<T: WithDType>(&self, stats: &[(f64, f64)], need: Need, dxw: Three<T>) -> Vec<T> {
        let (dy, x, w) = dxw;
        let (cg, hw, m) = (self.cg(), self.hw, self.m());
        // Per (sample, channel): (Σ dy, Σ dy·x̂).
        let mut sums = vec![(0.0, 0.0); x.len() / hw];
        // SAFETY: when allocated, each parallel chunk below writes every element of its part of `dx`.
        let mut dx = unsafe { dx_buffer(need, x.len(), self.c) };
        let row = |r: usize, sums: &mut [(f64, f64)], dxr: Option<&mut [T]>| {
            let (mu, rstd) = stats[r];
            let (xr, dyr) = (&x[r * m..][..m], &dy[r * m..][..m]);
            let c0 = (r % self.groups) * cg;
            // With g = dy·w: A = Σ g, B = Σ g·x̂ over the group.
            let (mut a_sum, mut b_sum) = (0.0, 0.0);
            for (k, s) in sums.iter_mut().enumerate() {
                let (s1, s2) = row_grad_sums(&dyr[k * hw..][..hw], &xr[k * hw..][..hw], mu);
                *s = (s1, s2 * rstd);
                let wc = w[c0 + k].to_f64();
                a_sum += wc * s1;
                b_sum += wc * s2 * rstd;
            }
            let Some(dxr) = dxr else { return };
            // dx = rstd·(g − A/M − x̂·B/M)
            let mf = m as f64;
            let q = T::from_f64(-rstd * rstd * b_sum / mf);
            let r0 = T::from_f64(-rstd * a_sum / mf);
            let mu_t = T::from_f64(mu);
            for k in 0..cg {
                let a = T::from_f64(rstd * w[c0 + k].to_f64());
                let (xp, dyp) = (&xr[k * hw..][..hw], &dyr[k * hw..][..hw]);
                for ((d, &xv), &gv) in dxr[k * hw..][..hw].iter_mut().zip(xp).zip(dyp) {
                    *d = a * gv + q * (xv - mu_t) + r0;
                }
            }
        };
        if need.dx {
            sums.par_chunks_mut(cg)
                .zip(dx.par_chunks_mut(m))
                .enumerate()
                .for_each(|(r, (s, d))| row(r, s, Some(d)));
        } else {
            sums.par_chunks_mut(cg)
                .enumerate()
                .for_each(|(r, s)| row(r, s, None));
        }
        let (mut dw, mut db) = (vec![0f64; self.c], vec![0f64; self.c]);
        for sn in sums.chunks(self.c) {
            for ((&(s1, s2), w_acc), b_acc) in sn.iter().zip(&mut dw).zip(&mut db) {
                *b_acc += s1;
                *w_acc += s2;
            }
        }
        append_wb(dx, need, dw, db)
    }
}

/// Fused GroupNorm of `x (N, C, …)` with per-channel affine `w, b (C)`, followed by ReLU when `relu`; the caller
/// checks [`supported`].
pub(super) fn group_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    groups: usize,
    eps: f64,
    relu: bool,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        return Err(crate::Error::msg(format!(
            "group_norm: input {dims:?} does not split into {groups} groups"
        )));
    }
    let kind = GroupNormKind {
        c: dims[1],
        hw: dims[2..].iter().product(),
        groups,
        relu,
    };
    apply_norm(kind, eps, x, w, b)
}

// ---------------------------------------------------------------------------------------------------------------
// LayerNorm over the last axis
// ---------------------------------------------------------------------------------------------------------------

/// Rows per parallel task of the LayerNorm kernels.
const ROW_BLOCK: usize = 16;

/// LayerNorm over rows of `d` (the last axis).
#[derive(Debug, Clone, Copy)]
struct LayerNormKind {
    d: usize,
}

impl NormKind for LayerNormKind {
    const NAME: &'static str = "layer-norm";
    const GRAD_NAME: &'static str = "layer-norm-grad";

    fn rows(&self, len: usize, channels: usize) -> Option<usize> {
        (channels == self.d && self.d > 0 && len.is_multiple_of(self.d)).then(|| len / self.d)
    }

    fn fwd<T: WithDType>(&self, eps: f64, x: &[T], w: &[T], b: &[T]) -> (Vec<T>, Vec<(f64, f64)>) {
        let d = self.d;
        // SAFETY: each parallel chunk below writes every element of its part of `y`.
        let mut y = unsafe { uninit_vec::<T>(x.len()) };
        let mut stats = vec![(0.0, 0.0); x.len() / d];
        y.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .zip(stats.par_iter_mut())
            .with_min_len(ROW_BLOCK)
            .for_each(|((yr, xr), st)| {
                let (mu, rstd) = row_stats(xr, eps);
                *st = (mu, rstd);
                let (mu_t, r_t) = (T::from_f64(mu), T::from_f64(rstd));
                for (((yv, &xv), &wv), &bv) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                    *yv = (xv - mu_t) * r_t * wv + bv;
                }
            });
        (y, stats)
    }

    fn grad<T: WithDType>(&self, stats: &[(f64, f64)], need: Need, dxw: Three<T>) -> Vec<T> {
        let (dy, x, w) = dxw;
        let d = self.d;
        let rows = stats.len();
        let df = d as f64;
        let wb_len = if need.dwb { d } else { 0 };
        // One block of rows: writes its dx rows (if asked) and returns its partial (dw, db).
        let block = |bi: usize, mut dxb: Option<&mut [T]>| -> (Vec<f64>, Vec<f64>) {
            let r0 = bi * ROW_BLOCK;
            let (mut dw, mut db) = (vec![0f64; wb_len], vec![0f64; wb_len]);
            for i in 0..ROW_BLOCK.min(rows - r0) {
                let r = r0 + i;
                let (mu, rstd) = stats[r];
                let (xr, dyr) = (&x[r * d..][..d], &dy[r * d..][..d]);
                for (((w_acc, b_acc), &g), &xv) in dw.iter_mut().zip(db.iter_mut()).zip(dyr).zip(xr)
                {
                    let g = g.to_f64();
                    *b_acc += g;
                    *w_acc += g * (xv.to_f64() - mu) * rstd;
                }
                let Some(dxb) = dxb.as_deref_mut() else {
                    continue;
                };
                // g = dy·w; dx = rstd·(g − Σg/D − x̂·Σ(g·x̂)/D)
                let a = lane_sum2(dyr, w, |g, wv| g.to_f64() * wv.to_f64());
                let bsum = lane_sum3(dyr, w, xr, |g, wv, v| {
                    g.to_f64() * wv.to_f64() * (v.to_f64() - mu)
                }) * rstd;
                let q = T::from_f64(-rstd * rstd * bsum / df);
                let c0 = T::from_f64(-rstd * a / df);
                let (mu_t, r_t) = (T::from_f64(mu), T::from_f64(rstd));
                for (((dv, &xv), &gv), &wv) in dxb[i * d..][..d].iter_mut().zip(xr).zip(dyr).zip(w)
                {
                    *dv = r_t * wv * gv + q * (xv - mu_t) + c0;
                }
            }
            (dw, db)
        };
        let add = |mut a: (Vec<f64>, Vec<f64>), b: (Vec<f64>, Vec<f64>)| {
            for (u, v) in
                a.0.iter_mut()
                    .chain(a.1.iter_mut())
                    .zip(b.0.iter().chain(&b.1))
            {
                *u += v;
            }
            a
        };
        let zero = || (vec![0f64; wb_len], vec![0f64; wb_len]);
        // SAFETY: when allocated, each parallel chunk below writes every element of its part of `dx`.
        let mut dx = unsafe { dx_buffer(need, x.len(), d) };
        let (dw, db) = if need.dx {
            dx.par_chunks_mut(ROW_BLOCK * d)
                .enumerate()
                .map(|(bi, dxb)| block(bi, Some(dxb)))
                .reduce(zero, add)
        } else {
            (0..rows.div_ceil(ROW_BLOCK))
                .into_par_iter()
                .map(|bi| block(bi, None))
                .reduce(zero, add)
        };
        append_wb(dx, need, dw, db)
    }
}

/// Fused LayerNorm over the last axis of `x (…, D)` with `w, b (D)`; the caller checks [`supported`].
pub(super) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dims().last().copied().unwrap_or(1);
    if d == 0 || w.elem_count() != d || b.elem_count() != d {
        return Err(crate::Error::msg(format!(
            "layer_norm: input {:?} with weight {:?} and bias {:?}",
            x.dims(),
            w.dims(),
            b.dims()
        )));
    }
    apply_norm(LayerNormKind { d }, eps, x, w, b)
}

// ---------------------------------------------------------------------------------------------------------------
// LayerNorm over the channel axis of NCHW (SAM's LayerNorm2d)
// ---------------------------------------------------------------------------------------------------------------

/// Pixels per parallel task of the channel-norm statistics.
const PIXEL_BLOCK: usize = 256;

/// LayerNorm over `C` of `(N, C, H·W)`: statistics per (sample, pixel), indexed `n·HW + p`.
#[derive(Debug, Clone, Copy)]
struct ChannelNormKind {
    c: usize,
    hw: usize,
}

impl ChannelNormKind {
    /// Runs `f(n, p0, out)` for blocks of [`PIXEL_BLOCK`] pixels of every sample, `out` being the per-pixel slots
    /// `n·HW + p0 ..` of `per_pixel`.
    fn pixel_blocks<V: Send>(
        &self,
        per_pixel: &mut [V],
        f: impl Fn(usize, usize, &mut [V]) + Sync,
    ) {
        per_pixel
            .par_chunks_mut(self.hw)
            .enumerate()
            .for_each(|(n, sample)| {
                sample
                    .par_chunks_mut(PIXEL_BLOCK)
                    .enumerate()
                    .for_each(|(pb, out)| f(n, pb * PIXEL_BLOCK, out))
            });
    }

    /// Pixels `p0..p0+len` of channel `ch` of sample `n`.
    fn pixels<'a, T>(&self, t: &'a [T], n: usize, ch: usize, p0: usize, len: usize) -> &'a [T] {
        &t[(n * self.c + ch) * self.hw + p0..][..len]
    }
}

impl NormKind for ChannelNormKind {
    const NAME: &'static str = "channel-norm";
    const GRAD_NAME: &'static str = "channel-norm-grad";

    fn rows(&self, len: usize, channels: usize) -> Option<usize> {
        let per_sample = self.c * self.hw;
        (channels == self.c && per_sample > 0 && len.is_multiple_of(per_sample))
            .then(|| len / per_sample * self.hw)
    }

    fn fwd<T: WithDType>(&self, eps: f64, x: &[T], w: &[T], b: &[T]) -> (Vec<T>, Vec<(f64, f64)>) {
        let (c, hw) = (self.c, self.hw);
        let cf = c as f64;
        let mut stats = vec![(0.0, 0.0); x.len() / c];
        self.pixel_blocks(&mut stats, |n, p0, out| {
            let len = out.len();
            let mut acc = vec![0f64; len];
            for ch in 0..c {
                for (a, &v) in acc.iter_mut().zip(self.pixels(x, n, ch, p0, len)) {
                    *a += v.to_f64();
                }
            }
            for (o, &a) in out.iter_mut().zip(&acc) {
                o.0 = a / cf;
            }
            acc.fill(0.0);
            for ch in 0..c {
                for ((a, &v), o) in acc
                    .iter_mut()
                    .zip(self.pixels(x, n, ch, p0, len))
                    .zip(out.iter())
                {
                    let d = v.to_f64() - o.0;
                    *a += d * d;
                }
            }
            for (o, &a) in out.iter_mut().zip(&acc) {
                o.1 = 1.0 / (a / cf + eps).sqrt();
            }
        });
        // SAFETY: each parallel chunk below writes every element of its part of `y`.
        let mut y = unsafe { uninit_vec::<T>(x.len()) };
        y.par_chunks_mut(hw).enumerate().for_each(|(plane, yp)| {
            let (n, ch) = (plane / c, plane % c);
            let (wc, bc) = (w[ch], b[ch]);
            let st = &stats[n * hw..][..hw];
            for ((o, &v), &(mu, rstd)) in yp.iter_mut().zip(&x[plane * hw..][..hw]).zip(st) {
                *o = (v - T::from_f64(mu)) * T::from_f64(rstd) * wc + bc;
            }
        });
        (y, stats)
    }

    fn grad<T: WithDType>(&self, stats: &[(f64, f64)], need: Need, dxw: Three<T>) -> Vec<T> {
        let (dy, x, w) = dxw;
        let (c, hw) = (self.c, self.hw);
        let cf = c as f64;
        // Per pixel, with g = dy·w: (Σ_c g / C, Σ_c g·x̂ / C).
        let mut ab = vec![(0.0, 0.0); if need.dx { stats.len() } else { 0 }];
        if need.dx {
            self.pixel_blocks(&mut ab, |n, p0, out| {
                let len = out.len();
                let st = &stats[n * hw + p0..][..len];
                for ch in 0..c {
                    let wc = w[ch].to_f64();
                    let (gs, xs) = (
                        self.pixels(dy, n, ch, p0, len),
                        self.pixels(x, n, ch, p0, len),
                    );
                    for (((o, &g), &v), &(mu, rstd)) in out.iter_mut().zip(gs).zip(xs).zip(st) {
                        let g = g.to_f64() * wc;
                        o.0 += g;
                        o.1 += g * (v.to_f64() - mu) * rstd;
                    }
                }
                for o in out.iter_mut() {
                    *o = (o.0 / cf, o.1 / cf);
                }
            });
        }
        // Per (sample, channel) plane: dx, and (Σ dy, Σ dy·x̂) for db, dw.
        let plane = |pl: usize, dxp: Option<&mut [T]>| -> (f64, f64) {
            let (n, ch) = (pl / c, pl % c);
            let (gs, xs) = (&dy[pl * hw..][..hw], &x[pl * hw..][..hw]);
            let st = &stats[n * hw..][..hw];
            let (mut s1, mut s2) = (0.0, 0.0);
            for ((&g, &v), &(mu, rstd)) in gs.iter().zip(xs).zip(st) {
                let g = g.to_f64();
                s1 += g;
                s2 += g * (v.to_f64() - mu) * rstd;
            }
            if let Some(dxp) = dxp {
                let wc = w[ch].to_f64();
                let abp = &ab[n * hw..][..hw];
                for ((((o, &g), &v), &(mu, rstd)), &(a, bm)) in
                    dxp.iter_mut().zip(gs).zip(xs).zip(st).zip(abp)
                {
                    let xh = (v.to_f64() - mu) * rstd;
                    *o = T::from_f64(rstd * (g.to_f64() * wc - a - xh * bm));
                }
            }
            (s1, s2)
        };
        // SAFETY: when allocated, each parallel chunk below writes every element of its part of `dx`.
        let mut dx = unsafe { dx_buffer(need, x.len(), c) };
        let sums: Vec<(f64, f64)> = if need.dx {
            dx.par_chunks_mut(hw)
                .enumerate()
                .map(|(pl, d)| plane(pl, Some(d)))
                .collect()
        } else {
            (0..x.len() / hw)
                .into_par_iter()
                .map(|pl| plane(pl, None))
                .collect()
        };
        let (mut dw, mut db) = (vec![0f64; c], vec![0f64; c]);
        for sn in sums.chunks(c) {
            for ((&(s1, s2), w_acc), b_acc) in sn.iter().zip(&mut dw).zip(&mut db) {
                *b_acc += s1;
                *w_acc += s2;
            }
        }
        append_wb(dx, need, dw, db)
    }
}

/// Fused LayerNorm over axis 1 of `x (N, C, …)` with `w, b (C)`; the caller checks [`supported`].
pub(super) fn channel_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || dims[1] == 0 || w.elem_count() != dims[1] || b.elem_count() != dims[1] {
        return Err(crate::Error::msg(format!(
            "layer_norm_2d: input {dims:?} with weight {:?} and bias {:?}",
            w.dims(),
            b.dims()
        )));
    }
    let kind = ChannelNormKind {
        c: dims[1],
        hw: dims[2..].iter().product(),
    };
    apply_norm(kind, eps, x, w, b)
}

// ---------------------------------------------------------------------------------------------------------------
// Row-local ops without parameters (softmax over the last axis, GELU, ReLU): one generic op pair
// ---------------------------------------------------------------------------------------------------------------

/// Elements per parallel task of the row-local kernels (rounded to whole rows).
const ELEM_BLOCK: usize = 1 << 14;

/// An op whose output and gradient on a block of whole rows depend on that block only.
trait RowLocal: Copy + Send + Sync + 'static {
    const NAME: &'static str;
    const GRAD_NAME: &'static str;
    /// The backward reads the op's output (`true`) or its input (`false`) next to `dy`.
    const GRAD_FROM_OUTPUT: bool;

    /// Row length (1 for elementwise ops).
    fn row(&self) -> usize;

    fn fwd<T: Float>(&self, y: &mut [T], x: &[T]);

    /// `dx` from `dy` and the output or input `z`.
    fn grad<T: Float>(&self, dx: &mut [T], dy: &[T], z: &[T]);

    /// Elements per parallel task: whole rows, about [`ELEM_BLOCK`].
    fn block(&self) -> usize {
        let d = self.row().max(1);
        d * (ELEM_BLOCK / d).max(1)
    }
}

/// The forward op of a [`RowLocal`].
struct LocalOp<K: RowLocal>(K);

/// The backward op of a [`RowLocal`], `(dy, z) → dx` (no backward of its own).
struct LocalGrad<K: RowLocal>(K);

/// [`RowLocal::fwd`] on one block, as a [`Kernel`] compiled per vector width.
struct LocalFwd<'a, K, T> {
    kind: &'a K,
    y: &'a mut [T],
    x: &'a [T],
}

impl<K: RowLocal, T: Float> Kernel for LocalFwd<'_, K, T> {
    #[inline(always)]
    fn run(self) {
        self.kind.fwd(self.y, self.x)
    }
}

/// [`RowLocal::grad`] on one block, as a [`Kernel`] compiled per vector width.
struct LocalBwd<'a, K, T> {
    kind: &'a K,
    dx: &'a mut [T],
    dy: &'a [T],
    z: &'a [T],
}

impl<K: RowLocal, T: Float> Kernel for LocalBwd<'_, K, T> {
    #[inline(always)]
    fn run(self) {
        self.kind.grad(self.dx, self.dy, self.z)
    }
}

impl<K: RowLocal> LocalOp<K> {
    fn run<T: Float>(&self, x: &[T]) -> Vec<T> {
        let bl = self.0.block();
        // SAFETY: each parallel chunk below writes every element of its part of `y`.
        let mut y = unsafe { uninit_vec::<T>(x.len()) };
        y.par_chunks_mut(bl)
            .zip(x.par_chunks(bl))
            .for_each(|(y, x)| {
                run_widest(LocalFwd {
                    kind: &self.0,
                    y,
                    x,
                })
            });
        y
    }
}

impl<K: RowLocal> candle_core::CustomOp1 for LocalOp<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(self.run(view::<f32>(s, l, K::NAME)?)),
            CpuStorage::F64(_) => CpuStorage::F64(self.run(view::<f64>(s, l, K::NAME)?)),
            _ => candle_core::bail!("{}: only f32/f64", K::NAME),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let z = if K::GRAD_FROM_OUTPUT { y } else { x };
        Ok(Some(
            grad.contiguous()?
                .apply_op2_no_bwd(&z.contiguous()?, &LocalGrad(self.0))?,
        ))
    }
}

impl<K: RowLocal> LocalGrad<K> {
    fn run<T: Float>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (dy, z) = (
            view::<T>(s1, l1, K::GRAD_NAME)?,
            view::<T>(s2, l2, K::GRAD_NAME)?,
        );
        if dy.len() != z.len() {
            candle_core::bail!("{}: gradient and operand differ in size", K::GRAD_NAME);
        }
        let bl = self.0.block();
        // SAFETY: each parallel chunk below writes every element of its part of `dx`.
        let mut dx = unsafe { uninit_vec::<T>(z.len()) };
        dx.par_chunks_mut(bl)
            .zip(dy.par_chunks(bl).zip(z.par_chunks(bl)))
            .for_each(|(dx, (dy, z))| {
                run_widest(LocalBwd {
                    kind: &self.0,
                    dx,
                    dy,
                    z,
                })
            });
        Ok((T::to_cpu_storage_owned(dx), l2.shape().clone()))
    }
}

impl<K: RowLocal> CustomOp2 for LocalGrad<K> {
    fn name(&self) -> &'static str {
        K::GRAD_NAME
    }

    cpu_fwd_by_dtype2!();
}

/// Softmax over rows of `d`: `y = exp(x − max)/Σ exp(x − max)`, `dx = y ⊙ (dy − Σ dy⊙y)`.
#[derive(Debug, Clone, Copy)]
struct SoftmaxKind {
    d: usize,
}

impl RowLocal for SoftmaxKind {
    const NAME: &'static str = "softmax-last-dim";
    const GRAD_NAME: &'static str = "softmax-last-dim-grad";
    const GRAD_FROM_OUTPUT: bool = true;

    fn row(&self) -> usize {
        self.d
    }

    #[inline(always)]
    fn fwd<T: Float>(&self, y: &mut [T], x: &[T]) {
        for (yr, xr) in y.chunks_mut(self.d).zip(x.chunks(self.d)) {
            // `max` (not `if v > m`) so the reduction vectorises; NaN rows give NaN either way.
            let m = xr.iter().fold(xr[0], |m, &v| m.max_num(v));
            for (yv, &xv) in yr.iter_mut().zip(xr) {
                *yv = (xv - m).exp_nonpos();
            }
            let inv = T::from_f64(1.0 / lane_sum(yr, |v| v.to_f64()));
            for yv in yr.iter_mut() {
                *yv *= inv;
            }
        }
    }

    #[inline(always)]
    fn grad<T: Float>(&self, dx: &mut [T], dy: &[T], y: &[T]) {
        let d = self.d;
        for ((dxr, dyr), yr) in dx.chunks_mut(d).zip(dy.chunks(d)).zip(y.chunks(d)) {
            let s = T::from_f64(lane_sum2(dyr, yr, |g, v| g.to_f64() * v.to_f64()));
            for ((o, &g), &yv) in dxr.iter_mut().zip(dyr).zip(yr) {
                *o = yv * (g - s);
            }
        }
    }
}

/// Softmax of rows of `d` of `x` into `y`: the fused softmax's kernel, on the calling thread.
pub(super) fn softmax_rows<T: Float>(y: &mut [T], x: &[T], d: usize) {
    let kind = SoftmaxKind { d };
    run_widest(LocalFwd { kind: &kind, y, x })
}

/// The gradient `dx = y ⊙ (dy − Σ dy⊙y)` of [`softmax_rows`] from its output `y`, on the calling thread.
pub(super) fn softmax_rows_grad<T: Float>(dx: &mut [T], dy: &[T], y: &[T], d: usize) {
    let kind = SoftmaxKind { d };
    run_widest(LocalBwd {
        kind: &kind,
        dx,
        dy,
        z: y,
    })
}

/// Fused softmax over the last axis; the caller checks [`supported`].
pub(super) fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let d = x.dims().last().copied().unwrap_or(1);
    if d == 0 {
        return Ok(x.clone());
    }
    Ok(x.contiguous()?.apply_op1(LocalOp(SoftmaxKind { d }))?)
}

/// Exact GELU `y = x·Φ(x)`, `Φ(x) = (1 + erf(x/√2))/2` (PyTorch's formula); backward `dy·(Φ(x) + x·φ(x))` in one
/// pass, where `φ(x) = e^{−x²/2}/√(2π)` is the Gaussian factor the erf evaluation already computed (candle's own
/// backward takes about a dozen passes and rounds `1/√(2π)` to 0.398942).
#[derive(Debug, Clone, Copy)]
struct GeluKind;

impl RowLocal for GeluKind {
    const NAME: &'static str = "gelu-erf";
    const GRAD_NAME: &'static str = "gelu-erf-grad";
    const GRAD_FROM_OUTPUT: bool = false;

    fn row(&self) -> usize {
        1
    }

    #[inline(always)]
    fn fwd<T: Float>(&self, y: &mut [T], x: &[T]) {
        let half = T::from_f64(0.5);
        for (o, &v) in y.iter_mut().zip(x) {
            let (erf, _) = (v * T::FRAC_1_SQRT_2).erf_and_gauss();
            *o = (erf + T::one()) * half * v;
        }
    }

    #[inline(always)]
    fn grad<T: Float>(&self, dx: &mut [T], dy: &[T], x: &[T]) {
        let half = T::from_f64(0.5);
        for ((o, &g), &v) in dx.iter_mut().zip(dy).zip(x) {
            let (erf, gauss) = (v * T::FRAC_1_SQRT_2).erf_and_gauss();
            let cdf = (erf + T::one()) * half;
            *o = g * (cdf + v * gauss * T::FRAC_1_SQRT_2PI);
        }
    }
}

/// Exact GELU of `x` into `y`: the fused GELU's kernel, on the calling thread.
pub(super) fn gelu_elems<T: Float>(y: &mut [T], x: &[T]) {
    run_widest(LocalFwd {
        kind: &GeluKind,
        y,
        x,
    })
}

/// The gradient `dy·GELU'(x)` of [`gelu_elems`], on the calling thread.
pub(super) fn gelu_elems_grad<T: Float>(dx: &mut [T], dy: &[T], x: &[T]) {
    run_widest(LocalBwd {
        kind: &GeluKind,
        dx,
        dy,
        z: x,
    })
}

/// Fused exact GELU; the caller checks [`supported`].
pub(super) fn gelu(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(LocalOp(GeluKind))?)
}

/// `y = max(x, 0)`, backward `dy·[y > 0]` in one pass (PyTorch's rule: zero gradient at 0). candle's own backward
/// builds the mask with a comparison, a dtype conversion and a product (four passes); the TransUNet's ReLUs touch about
/// 55 M elements per training step at batch 4.
#[derive(Debug, Clone, Copy)]
struct ReluKind;

impl RowLocal for ReluKind {
    const NAME: &'static str = "relu";
    const GRAD_NAME: &'static str = "relu-grad";
    const GRAD_FROM_OUTPUT: bool = true;

    fn row(&self) -> usize {
        1
    }

    #[inline(always)]
    fn fwd<T: Float>(&self, y: &mut [T], x: &[T]) {
        let zero = T::zero();
        for (o, &v) in y.iter_mut().zip(x) {
            // NaN propagates as in PyTorch (`v > 0` is false for NaN, so keep v unless it is ≤ 0).
            *o = if v <= zero { zero } else { v };
        }
    }

    #[inline(always)]
    fn grad<T: Float>(&self, dx: &mut [T], dy: &[T], y: &[T]) {
        let zero = T::zero();
        for ((o, &g), &v) in dx.iter_mut().zip(dy).zip(y) {
            *o = if v > zero { g } else { zero };
        }
    }
}

/// `max(v, 0)` in place, `ReluKind`'s rule (NaN kept), for norms that end in a fused ReLU: applied to one channel's
/// plane right after it is written, while it is in cache.
pub(super) fn relu_in_place<T: WithDType>(ys: &mut [T]) {
    for v in ys {
        if *v <= T::zero() {
            *v = T::zero();
        }
    }
}

/// `dy·[y > 0]`: the gradient through a ReLU with output `y`, for the ops that end in a fused ReLU.
pub(super) fn relu_grad(dy: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
    dy.contiguous()?
        .apply_op2_no_bwd(&y.contiguous()?, &LocalGrad(ReluKind))
}

/// Fused ReLU; the caller checks [`supported`].
pub(super) fn relu(x: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(LocalOp(ReluKind))?)
}

/// `max(a + b, 0)`, the residual join of a bottleneck, as one op: one pass instead of two in the forward, and in the
/// backward one masked gradient `dy·[y > 0]` handed to both operands, without the intermediate sum's gradient buffer.
/// Values and gradients equal `relu(a + b)` bit for bit.
struct AddRelu;

/// `y = max(a + b, 0)` on one block, as a [`Kernel`] compiled per vector width.
struct AddReluBlock<'a, T> {
    y: &'a mut [T],
    a: &'a [T],
    b: &'a [T],
}

impl<T: Float> Kernel for AddReluBlock<'_, T> {
    #[inline(always)]
    fn run(self) {
        let zero = T::zero();
        for ((o, &u), &v) in self.y.iter_mut().zip(self.a).zip(self.b) {
            let s = u + v;
            *o = if s <= zero { zero } else { s };
        }
    }
}

impl AddRelu {
    fn run<T: Float>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!(
                "add-relu: operands {:?} and {:?} differ in shape",
                l1.shape(),
                l2.shape()
            );
        }
        let (a, b) = (
            view::<T>(s1, l1, "add-relu")?,
            view::<T>(s2, l2, "add-relu")?,
        );
        // SAFETY: each parallel chunk below writes every element of its part of `y`.
        let mut y = unsafe { uninit_vec::<T>(a.len()) };
        y.par_chunks_mut(ELEM_BLOCK)
            .zip(a.par_chunks(ELEM_BLOCK).zip(b.par_chunks(ELEM_BLOCK)))
            .for_each(|(y, (a, b))| run_widest(AddReluBlock { y, a, b }));
        Ok((T::to_cpu_storage_owned(y), l1.shape().clone()))
    }
}

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add-relu"
    }

    cpu_fwd_by_dtype2!();

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = relu_grad(grad, res)?;
        Ok((Some(g.clone()), Some(g)))
    }
}

/// Fused `relu(a + b)` of two tensors of one shape; the caller checks [`supported`].
pub(super) fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu)?)
}
