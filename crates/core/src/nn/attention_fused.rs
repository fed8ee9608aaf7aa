//! Multi-head scaled dot-product attention `softmax(Q·Kᵀ/√d_h)·V` as one differentiable op on the CPU.
//!
//! Composed from candle ops, one attention of a ViT block is 17 graph nodes: a reshape/transpose/copy chain per
//! projection to split the heads, the transposed key, two batched matmuls, the scale, the softmax and the
//! transpose/copy/reshape that merges the heads again. In the backward pass candle allocates a zero gradient and adds
//! into it for each of them, the copies are undone by more copies, and the batched matmuls run 48 small products one
//! after the other, each split over the threads (batch 4 × 12 heads of 196×196×64).
//!
//! Here the heads are strided views of the `(B, N, D)` projections, and the `(sample, head)` pairs run in parallel,
//! each on one thread, with `s = 1/√d_h`:
//!
//! * forward: `S = (Q·Kᵀ)·s`, `P = softmax(S)` (the fused softmax's kernel), `O = P·V`;
//! * backward: `dV = Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = s·P⊙(dP − Σ dP⊙P)`, `dQ = dS·K`, `dK = dSᵀ·Q`.
//!
//! `P` is kept from the forward pass (`B·H·N²` values, as the composed graph keeps the softmax output). The values are
//! those of the composed ops: the same products, candle's scale (`x·s + 0`) and the same softmax kernel. Attention
//! dropout is not part of the op; callers with a non-zero attention dropout use the composed ops.
use super::buffer::uninit_vec;
use super::conv_gemm::{matmul, View};
use super::cpu_data;
use super::fused::{lock, softmax_rows, softmax_rows_grad, Float};
use crate::{Error, Result};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::sync::Mutex;

/// Whether [`attention`] runs on these operands: CPU tensors of one float type (f32/f64).
pub fn attention_supported(ts: &[&Tensor]) -> bool {
    super::fused::supported(ts)
}

/// `softmax(Q·Kᵀ/√d_h)·V` over `heads` heads of `q, k, v (B, N, D)` (`d_h = D/heads`), heads merged back into
/// `(B, N, D)`: the value of `x.reshape(B, N, H, d_h).transpose(1, 2)` for each operand, attention per head, and the
/// inverse reshape. The caller checks [`attention_supported`].
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = q.dims3()?;
    if k.dims3()? != dims || v.dims3()? != dims {
        return Err(Error::msg(format!(
            "attention: query {:?}, key {:?} and value {:?} differ in shape",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if heads == 0 || !dims.2.is_multiple_of(heads) {
        return Err(Error::msg(format!(
            "attention: width {} is not divisible into {heads} heads",
            dims.2
        )));
    }
    let op = Attention {
        heads,
        probs: Mutex::new(None),
    };
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// Shapes of one attention: `b` samples of `n` tokens, width `d = heads·hd`.
#[derive(Debug, Clone, Copy)]
struct Geom {
    b: usize,
    n: usize,
    d: usize,
    heads: usize,
    hd: usize,
}

impl Geom {
    fn new(shape: &Shape, heads: usize) -> candle_core::Result<Self> {
        let (b, n, d) = shape.dims3()?;
        if heads == 0 || !d.is_multiple_of(heads) {
            candle_core::bail!("attention: width {d} is not divisible into {heads} heads");
        }
        Ok(Self {
            b,
            n,
            d,
            heads,
            hd: d / heads,
        })
    }

    /// `1/√d_h` as candle's `x / √d_h` applies it (an affine map with this factor).
    fn scale<T: WithDType>(&self) -> T {
        T::from_f64(1.0 / (self.hd as f64).sqrt())
    }

    /// Offset of the (sample, head) pair `bh` in a `(B, N, D)` operand (its `(N, d_h)` view has row stride `D`).
    fn head_offset(&self, bh: usize) -> usize {
        (bh / self.heads) * self.n * self.d + (bh % self.heads) * self.hd
    }

    /// The head view of an operand.
    fn head<'a, T>(&self, x: &'a [T], bh: usize) -> View<'a, T> {
        View::strided(&x[self.head_offset(bh)..], self.d, 1)
    }

    /// The transposed head view `(d_h, N)` of an operand.
    fn head_t<'a, T>(&self, x: &'a [T], bh: usize) -> View<'a, T> {
        View::strided(&x[self.head_offset(bh)..], 1, self.d)
    }

    /// `(B, H, N, d_h)` per-head blocks → `(B, N, D)`.
    fn merge<T: WithDType>(&self, per_head: &[T]) -> Vec<T> {
        let (n, hd, heads) = (self.n, self.hd, self.heads);
        // SAFETY: every row of `out` receives all of its `heads` blocks of `hd` values below.
        let mut out = unsafe { uninit_vec::<T>(self.b * n * self.d) };
        out.par_chunks_mut(self.d.max(1))
            .enumerate()
            .for_each(|(row, dst)| {
                let (bi, t) = (row / n, row % n);
                for (h, block) in dst.chunks_mut(hd).enumerate() {
                    block.copy_from_slice(&per_head[((bi * heads + h) * n + t) * hd..][..hd]);
                }
            });
        out
    }
}

/// The op; `probs` holds `P (B, H, N, N)` from the forward pass for the backward.
struct Attention {
    heads: usize,
    probs: Mutex<Option<CpuStorage>>,
}

/// The element types the op computes in.
trait Elem: Float + super::conv_gemm::Float {}
impl Elem for f32 {}
impl Elem for f64 {}

fn forward<T: Elem>(g: &Geom, q: &[T], k: &[T], v: &[T]) -> (Vec<T>, Vec<T>) {
    let (n, hd) = (g.n, g.hd);
    let (nn, scale) = (n * n, g.scale::<T>());
    let pairs = g.b * g.heads;
    // SAFETY: each (sample, head) task writes its whole block of `probs` (softmax rows) and of `o` (a
    // non-accumulating product).
    let mut probs = unsafe { uninit_vec::<T>(pairs * nn) };
    let mut o = unsafe { uninit_vec::<T>(pairs * n * hd) };
    probs
        .par_chunks_mut(nn.max(1))
        .zip(o.par_chunks_mut((n * hd).max(1)))
        .enumerate()
        .for_each(|(bh, (p, ob))| {
            let mut s = vec![T::zero(); nn];
            let none = gemm::Parallelism::None;
            matmul(
                &mut s,
                n,
                (n, n, hd),
                g.head(q, bh),
                g.head_t(k, bh),
                false,
                none,
            );
            for x in s.iter_mut() {
                *x = *x * scale + T::zero();
            }
            softmax_rows(p, &s, n);
            matmul(
                ob,
                hd,
                (n, hd, n),
                View::rm(p, n),
                g.head(v, bh),
                false,
                none,
            );
        });
    (g.merge(&o), probs)
}

/// `(dQ, dK, dV)`, each `(B, N, D)`.
fn backward<T: Elem>(
    g: &Geom,
    (q, k, v): (&[T], &[T], &[T]),
    probs: &[T],
    dout: &[T],
) -> [Vec<T>; 3] {
    let (n, hd) = (g.n, g.hd);
    let (nn, scale, block) = (n * n, g.scale::<T>(), (n * hd).max(1));
    let pairs = g.b * g.heads;
    // SAFETY: each (sample, head) task writes its whole block of each (non-accumulating products).
    let (mut dq, mut dk, mut dv) = unsafe {
        (
            uninit_vec::<T>(pairs * n * hd),
            uninit_vec::<T>(pairs * n * hd),
            uninit_vec::<T>(pairs * n * hd),
        )
    };
    dq.par_chunks_mut(block)
        .zip(dk.par_chunks_mut(block))
        .zip(dv.par_chunks_mut(block))
        .enumerate()
        .for_each(|(bh, ((dqb, dkb), dvb))| {
            let none = gemm::Parallelism::None;
            let p = &probs[bh * nn..][..nn];
            let p_t = View::strided(p, 1, n);
            let d_o = g.head(dout, bh);
            matmul(dvb, hd, (n, hd, n), p_t, d_o, false, none);
            let mut dp = vec![T::zero(); nn];
            matmul(&mut dp, n, (n, n, hd), d_o, g.head_t(v, bh), false, none);
            let mut ds = vec![T::zero(); nn];
            softmax_rows_grad(&mut ds, &dp, p, n);
            for x in ds.iter_mut() {
                *x *= scale;
            }
            matmul(
                dqb,
                hd,
                (n, hd, n),
                View::rm(&ds, n),
                g.head(k, bh),
                false,
                none,
            );
            let ds_t = View::strided(&ds, 1, n);
            matmul(dkb, hd, (n, hd, n), ds_t, g.head(q, bh), false, none);
        });
    [g.merge(&dq), g.merge(&dk), g.merge(&dv)]
}

impl Attention {
    fn run<T: Elem>(
        &self,
        g: &Geom,
        (s1, l1): (&CpuStorage, &Layout),
        (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
    ) -> candle_core::Result<CpuStorage> {
        let (q, k, v) = (
            cpu_data::<T>(s1, l1, "attention query")?,
            cpu_data::<T>(s2, l2, "attention key")?,
            cpu_data::<T>(s3, l3, "attention value")?,
        );
        let (out, probs) = forward(g, q, k, v);
        *lock(&self.probs, "attention")? = Some(T::to_cpu_storage_owned(probs));
        Ok(T::to_cpu_storage_owned(out))
    }

    /// The gradients of all three operands as tensors on `q`'s device.
    fn grads<T: Elem>(
        &self,
        g: &Geom,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        grad: &Tensor,
    ) -> candle_core::Result<[Tensor; 3]> {
        let guard = lock(&self.probs, "attention")?;
        let Some(probs) = guard.as_ref() else {
            candle_core::bail!("attention: backward before forward");
        };
        let probs = T::cpu_storage_as_slice(probs)?;
        let grad = grad.contiguous()?;
        let (qs, ks, vs, gs) = (
            q.storage_and_layout(),
            k.storage_and_layout(),
            v.storage_and_layout(),
            grad.storage_and_layout(),
        );
        fn cpu<'a, T: WithDType>(
            s: &'a candle_core::Storage,
            l: &Layout,
        ) -> candle_core::Result<&'a [T]> {
            match s {
                candle_core::Storage::Cpu(c) => cpu_data::<T>(c, l, "attention operand"),
                _ => candle_core::bail!("attention: CPU operands only"),
            }
        }
        let (qv, kv, vv, gv) = (
            cpu::<T>(&qs.0, qs.1)?,
            cpu::<T>(&ks.0, ks.1)?,
            cpu::<T>(&vs.0, vs.1)?,
            cpu::<T>(&gs.0, gs.1)?,
        );
        let shape = (g.b, g.n, g.d);
        let [dq, dk, dv] = backward(g, (qv, kv, vv), probs, gv);
        Ok([
            Tensor::from_vec(dq, shape, q.device())?,
            Tensor::from_vec(dk, shape, q.device())?,
            Tensor::from_vec(dv, shape, q.device())?,
        ])
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
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
        if l1.shape() != l2.shape() || l1.shape() != l3.shape() {
            candle_core::bail!("attention: query, key and value differ in shape");
        }
        let g = Geom::new(l1.shape(), self.heads)?;
        let args = ((s1, l1), (s2, l2), (s3, l3));
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                self.run::<f32>(&g, args.0, args.1, args.2)?
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                self.run::<f64>(&g, args.0, args.1, args.2)?
            }
            _ => candle_core::bail!("attention: only f32/f64 operands of one type"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = Geom::new(q.shape(), self.heads)?;
        let [dq, dk, dv] = match q.dtype() {
            DType::F32 => self.grads::<f32>(&g, (q, k, v), grad)?,
            DType::F64 => self.grads::<f64>(&g, (q, k, v), grad)?,
            dt => candle_core::bail!("attention: unsupported dtype {dt:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::conv_gemm::tests::rel_diff;
    use candle_core::{Device, Var};

    fn ramp(shape: &[usize], scale: f64, dt: DType) -> Tensor {
        crate::nn::conv_gemm::tests::ramp(shape, scale)
            .to_dtype(dt)
            .unwrap()
    }

    /// The reference: heads split with reshape/transpose, candle's matmul and its composed (differentiable)
    /// `candle_nn::ops::softmax`, heads merged again.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Tensor {
        let (b, n, d) = q.dims3().unwrap();
        let split = |x: &Tensor| {
            x.reshape((b, n, heads, d / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(q), split(k), split(v));
        let s = (q.matmul(&k.t().unwrap()).unwrap() / ((d / heads) as f64).sqrt()).unwrap();
        let p = candle_nn::ops::softmax(&s, 3).unwrap();
        p.matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b, n, d))
            .unwrap()
    }

    /// A pseudo-random pattern in `[−scale/2, scale/2)`; `mult` picks the sequence.
    fn pattern(shape: &[usize], mult: usize, scale: f64, dt: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| ((i * mult % 127) as f64 / 127.0 - 0.5) * scale)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    }

    /// Three operands with unrelated values.
    fn operands(shape: &[usize], dt: DType) -> [Var; 3] {
        [(7919, 3.0), (104_729, 2.0), (1_299_709, 2.5)]
            .map(|(mult, scale)| Var::from_tensor(&pattern(shape, mult, scale, dt)).unwrap())
    }

    /// Output and the gradients of `Σ r ⊙ attention(q, k, v)` for all three operands against the composed ops:
    /// to rounding in f64, within 1e-5 in f32; one head, several heads, and one token.
    #[test]
    fn matches_composed_ops_and_their_gradients() {
        for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            for (shape, heads) in [
                ([2, 7, 12], 3),
                ([1, 5, 8], 1),
                ([3, 1, 6], 2),
                ([2, 9, 16], 4),
            ] {
                let what = format!("{dt:?} {shape:?} heads {heads}");
                let [q, k, v] = operands(&shape, dt);
                let (qt, kt, vt) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
                let ours = attention(qt, kt, vt, heads).unwrap();
                let theirs = composed(qt, kt, vt, heads);
                assert_eq!(ours.dims(), theirs.dims(), "{what}");
                assert!(rel_diff(&ours, &theirs) < tol, "{what}: forward");
                let r = ramp(&shape, 3.0, dt);
                let loss = |y: &Tensor| (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let (go, gt) = (loss(&ours), loss(&theirs));
                for (name, var) in [("query", &q), ("key", &k), ("value", &v)] {
                    let (a, e) = (
                        go.get(var.as_tensor()).unwrap(),
                        gt.get(var.as_tensor()).unwrap(),
                    );
                    assert!(rel_diff(a, e) < tol, "{what}: {name} gradient");
                }
            }
        }
    }

    /// Each thread count gives the same bits (each (sample, head) pair is computed on one thread).
    #[test]
    fn result_does_not_depend_on_the_thread_count() {
        let [q, k, v] = operands(&[3, 11, 16], DType::F32);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let y = attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), 4).unwrap();
                let g = y.sum_all().unwrap().backward().unwrap();
                let dq = g.get(q.as_tensor()).unwrap().flatten_all().unwrap();
                (
                    y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    dq.to_vec1::<f32>().unwrap(),
                )
            })
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn bad_shapes_are_errors() {
        let a = ramp(&[2, 3, 8], 1.0, DType::F32);
        let b = ramp(&[2, 4, 8], 1.0, DType::F32);
        assert!(attention(&a, &b, &a, 2).is_err(), "mismatched shapes");
        assert!(
            attention(&a, &a, &a, 3).is_err(),
            "width not divisible by heads"
        );
        assert!(attention(&a, &a, &a, 0).is_err(), "zero heads");
        let flat = ramp(&[3, 8], 1.0, DType::F32);
        assert!(attention(&flat, &flat, &flat, 2).is_err(), "rank 2");
    }
}
