//! In-place CPU updates for [`super::optim`]'s SGD and AdamW.
//!
//! The composed updates allocate a fresh tensor for every intermediate (SGD: seven full passes over each parameter,
//! AdamW: about twelve) and then copy the result into the `Var`. For the R50-ViT-B/16 TransUNet (105 M parameters,
//! 420 MB per pass in f32) that is several GB of memory traffic per step. Here SGD is two passes and AdamW three,
//! writing into the parameter and the optimiser state in place.
//!
//! Each kernel evaluates exactly the composed expression, operation by operation and in the tensor's dtype
//! (candle's `affine(a, b)` is `x·T(a) + T(b)`, kept literally, `+ 0` included), so both paths give the same bits; the
//! tests in `optim.rs` check that. Callers check [`supported`] and fall back to the composed ops elsewhere (CUDA,
//! half precision, strided tensors).
use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, WithDType};
use rayon::prelude::*;

/// Elements per parallel task.
const BLOCK: usize = 1 << 15;

/// Whether the in-place kernels handle these tensors: CPU, one dtype (f32 or f64), contiguous, equal sizes.
pub(super) fn supported(ts: &[&Tensor]) -> bool {
    let Some(first) = ts.first() else {
        return false;
    };
    matches!(first.dtype(), DType::F32 | DType::F64)
        && ts.iter().all(|t| {
            t.device().is_cpu()
                && t.dtype() == first.dtype()
                && t.is_contiguous()
                && t.elem_count() == first.elem_count()
        })
}

fn slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&T::cpu_storage_as_slice(s)?[a..b]),
        None => candle_core::bail!("{op}: operand is not contiguous"),
    }
}

fn slice_mut<'a, T: Real>(
    s: &'a mut CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a mut [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: destination is not contiguous");
    };
    match T::vec_mut(s) {
        Some(v) if b <= v.len() => Ok(&mut v[a..b]),
        Some(_) => candle_core::bail!("{op}: layout out of bounds"),
        None => candle_core::bail!("{op}: dtype mismatch"),
    }
}

/// f32/f64: mutable access to a CPU storage of that dtype, and `sqrt` exactly as candle's `sqrt` op computes it.
trait Real: WithDType {
    fn vec_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>>;
    fn sqrt(self) -> Self;
}

impl Real for f32 {
    fn vec_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>> {
        match s {
            CpuStorage::F32(v) => Some(v),
            _ => None,
        }
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
}

impl Real for f64 {
    fn vec_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>> {
        match s {
            CpuStorage::F64(v) => Some(v),
            _ => None,
        }
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
}

/// An elementwise update `dst ← f(dst, a, b)` (the two-operand ops pass `b = 0`), evaluated in the tensors' dtype.
trait Update: Sync {
    const NAME: &'static str;
    fn apply<T: Real>(&self, dst: T, a: T, b: T) -> T;
}

/// The candle in-place op of an [`Update`].
struct InPlace<U: Update>(U);

impl<U: Update> InPlace<U> {
    fn run<T: Real>(
        &self,
        (s1, l1): (&mut CpuStorage, &Layout),
        a: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<()> {
        let a = slice::<T>(a.0, a.1, U::NAME)?;
        let b = b.map(|(s, l)| slice::<T>(s, l, U::NAME)).transpose()?;
        let dst = slice_mut::<T>(s1, l1, U::NAME)?;
        if a.len() != dst.len() || b.is_some_and(|b| b.len() != dst.len()) {
            candle_core::bail!("{}: operands differ in size", U::NAME);
        }
        let u = &self.0;
        match b {
            Some(b) => dst
                .par_chunks_mut(BLOCK)
                .zip(a.par_chunks(BLOCK).zip(b.par_chunks(BLOCK)))
                .for_each(|(d, (a, b))| {
                    for ((d, &a), &b) in d.iter_mut().zip(a).zip(b) {
                        *d = u.apply(*d, a, b);
                    }
                }),
            None => dst
                .par_chunks_mut(BLOCK)
                .zip(a.par_chunks(BLOCK))
                .for_each(|(d, a)| {
                    for (d, &a) in d.iter_mut().zip(a) {
                        *d = u.apply(*d, a, T::zero());
                    }
                }),
        }
        Ok(())
    }

    fn dispatch(
        &self,
        d: (&mut CpuStorage, &Layout),
        a: (&CpuStorage, &Layout),
        b: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<()> {
        match d.0 {
            CpuStorage::F32(_) => self.run::<f32>(d, a, b),
            CpuStorage::F64(_) => self.run::<f64>(d, a, b),
            _ => candle_core::bail!("{}: only f32/f64", U::NAME),
        }
    }
}

impl<U: Update> InplaceOp2 for InPlace<U> {
    fn name(&self) -> &'static str {
        U::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        self.dispatch((s1, l1), (s2, l2), None)
    }
}

impl<U: Update> InplaceOp3 for InPlace<U> {
    fn name(&self) -> &'static str {
        U::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        self.dispatch((s1, l1), (s2, l2), Some((s3, l3)))
    }
}

/// SGD momentum buffer `b ← (b·m + 0) + d` with `d = g + (θ·wd + 0)` (`d = g` without weight decay);
/// `dst = b, a = θ, b = g`.
struct SgdBuffer {
    momentum: f64,
    weight_decay: f64,
}

impl Update for SgdBuffer {
    const NAME: &'static str = "sgd-momentum-buffer";
    fn apply<T: Real>(&self, buf: T, theta: T, g: T) -> T {
        let zero = T::zero();
        let d = if self.weight_decay != 0.0 {
            g + (theta * T::from_f64(self.weight_decay) + zero)
        } else {
            g
        };
        (buf * T::from_f64(self.momentum) + zero) + d
    }
}

/// `θ ← θ − (u·lr + 0)`, the SGD step from the momentum buffer or the decayed gradient `u`.
struct SgdApply {
    lr: f64,
}

impl Update for SgdApply {
    const NAME: &'static str = "sgd-apply";
    fn apply<T: Real>(&self, theta: T, u: T, _: T) -> T {
        theta - (u * T::from_f64(self.lr) + T::zero())
    }
}

/// AdamW first moment `m ← m + ((g − m)·(1 − β₁) + 0)`.
struct AdamFirst {
    beta1: f64,
}

impl Update for AdamFirst {
    const NAME: &'static str = "adamw-exp-avg";
    fn apply<T: Real>(&self, m: T, g: T, _: T) -> T {
        m + ((g - m) * T::from_f64(1.0 - self.beta1) + T::zero())
    }
}

/// AdamW second moment `v ← (v·β₂ + 0) + ((g·g)·(1 − β₂) + 0)`.
struct AdamSecond {
    beta2: f64,
}

impl Update for AdamSecond {
    const NAME: &'static str = "adamw-exp-avg-sq";
    fn apply<T: Real>(&self, v: T, g: T, _: T) -> T {
        let zero = T::zero();
        (v * T::from_f64(self.beta2) + zero) + ((g * g) * T::from_f64(1.0 - self.beta2) + zero)
    }
}

/// The AdamW parameter update `θ ← θ' − ((m / (√v·(1/√bc₂) + ε))·step_size + 0)`, with `θ' = θ·decay + 0` under
/// decoupled weight decay and `θ' = θ` without; `dst = θ, a = m, b = v`.
struct AdamApply {
    decay: Option<f64>,
    step_size: f64,
    inv_sqrt_bc2: f64,
    eps: f64,
}

impl Update for AdamApply {
    const NAME: &'static str = "adamw-apply";
    fn apply<T: Real>(&self, theta: T, m: T, v: T) -> T {
        let zero = T::zero();
        let base = match self.decay {
            Some(c) => theta * T::from_f64(c) + zero,
            None => theta,
        };
        let denom = v.sqrt() * T::from_f64(self.inv_sqrt_bc2) + T::from_f64(self.eps);
        base - ((m / denom) * T::from_f64(self.step_size) + zero)
    }
}

/// SGD with an existing momentum buffer `buf`, in place: `buf ← μ·buf + d`, `θ ← θ − lr·buf` with `d = g + wd·θ`.
pub(super) fn sgd_momentum_step(
    theta: &Tensor,
    buf: &Tensor,
    g: &Tensor,
    lr: f64,
    momentum: f64,
    weight_decay: f64,
) -> candle_core::Result<()> {
    let update = SgdBuffer {
        momentum,
        weight_decay,
    };
    buf.inplace_op3(theta, g, &InPlace(update))?;
    sgd_apply(theta, buf, lr)
}

/// `θ ← θ − lr·u`, in place.
pub(super) fn sgd_apply(theta: &Tensor, u: &Tensor, lr: f64) -> candle_core::Result<()> {
    theta.inplace_op2(u, &InPlace(SgdApply { lr }))
}

/// One AdamW update of `θ`, `m`, `v` in place (the caller tracks the step count and bias corrections).
#[allow(clippy::too_many_arguments)]
pub(super) fn adamw_step(
    theta: &Tensor,
    m: &Tensor,
    v: &Tensor,
    g: &Tensor,
    (beta1, beta2, eps): (f64, f64, f64),
    decay: Option<f64>,
    step_size: f64,
    inv_sqrt_bc2: f64,
) -> candle_core::Result<()> {
    m.inplace_op2(g, &InPlace(AdamFirst { beta1 }))?;
    v.inplace_op2(g, &InPlace(AdamSecond { beta2 }))?;
    let update = AdamApply {
        decay,
        step_size,
        inv_sqrt_bc2,
        eps,
    };
    theta.inplace_op3(m, v, &InPlace(update))
}
