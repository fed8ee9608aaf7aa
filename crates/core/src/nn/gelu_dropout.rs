//! `dropout(GELU(x))` (the ViT MLP's hidden activation in training) as one op on the CPU.
//!
//! As two ops, the `(B·N, 3072)` hidden layer of each ViT-B block is written twice in the forward pass, and in the
//! backward pass the dropout's gradient is written, then candle allocates a zero buffer and adds it in before the
//! GELU's gradient reads it. Here both directions are one pass per element: forward `y = GELU(x)·m`, backward
//! `dx = (dy·m)·GELU'(x)` with `m = 1/(1−p)` where kept and `0` elsewhere. The mask is the dropout's own (same stream,
//! same keep decisions), and every value is computed in the order of the two ops, so results are bit-identical.
use super::cpu_data;
use super::dropout::bernoulli_keep_flags;
use super::fused::{gelu_elems, gelu_elems_grad, supported, Float};
use super::Dropout;
use crate::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::sync::Arc;

/// Elements per parallel task.
const BLOCK: usize = 1 << 14;

/// `dropout.forward_t(&gelu(x), seed)`, fused on the CPU in f32/f64 when the dropout is active.
pub fn gelu_dropout(x: &Tensor, dropout: &Dropout, seed: Option<u64>) -> Result<Tensor> {
    let p = dropout.p();
    let active = seed.is_some() && p > 0.0 && p < 1.0;
    match seed {
        Some(seed) if active && supported(&[x]) => {
            let op = GeluDropout {
                keep: Arc::new(bernoulli_keep_flags(x.elem_count(), p, seed)),
                scale: 1.0 / (1.0 - p),
            };
            Ok(x.contiguous()?.apply_op1(op)?)
        }
        _ => dropout.forward_t(&super::gelu(x)?, seed),
    }
}

/// The op; `keep[i]` is the dropout's decision for element `i`.
#[derive(Clone)]
struct GeluDropout {
    keep: Arc<Vec<bool>>,
    scale: f64,
}

/// The backward op `(dy, x) → dx`.
struct GeluDropoutGrad(GeluDropout);

/// `v·scale` where kept, `v·0` elsewhere (the dropout's own arithmetic, so NaN and −0 behave the same).
#[inline(always)]
fn mask<T: WithDType>(v: &mut [T], keep: &[bool], scale: T) {
    for (o, &k) in v.iter_mut().zip(keep) {
        *o = if k { *o * scale } else { *o * T::zero() };
    }
}

impl GeluDropout {
    fn check(&self, l: &Layout) -> candle_core::Result<()> {
        if l.shape().elem_count() != self.keep.len() {
            candle_core::bail!(
                "gelu-dropout: mask of {} for {} elements",
                self.keep.len(),
                l.shape().elem_count()
            );
        }
        Ok(())
    }

    fn fwd<T: Float>(&self, x: &[T]) -> Vec<T> {
        let scale = T::from_f64(self.scale);
        // SAFETY: each block below writes all of its part of `y` (GELU) before masking it in place.
        let mut y = unsafe { super::buffer::uninit_vec::<T>(x.len()) };
        y.par_chunks_mut(BLOCK)
            .zip(x.par_chunks(BLOCK).zip(self.keep.par_chunks(BLOCK)))
            .for_each(|(y, (x, keep))| {
                gelu_elems(y, x);
                mask(y, keep, scale);
            });
        y
    }

    fn grad<T: Float>(&self, dy: &[T], x: &[T]) -> Vec<T> {
        let scale = T::from_f64(self.scale);
        // SAFETY: each block below writes all of its part of `dx`.
        let mut dx = unsafe { super::buffer::uninit_vec::<T>(x.len()) };
        dx.par_chunks_mut(BLOCK)
            .zip(dy.par_chunks(BLOCK).zip(x.par_chunks(BLOCK)))
            .zip(self.keep.par_chunks(BLOCK))
            .for_each(|((dx, (dy, x)), keep)| {
                let mut g = dy.to_vec();
                mask(&mut g, keep, scale);
                gelu_elems_grad(dx, &g, x);
            });
        dx
    }
}

impl CustomOp1 for GeluDropout {
    fn name(&self) -> &'static str {
        "gelu-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.check(l)?;
        let y = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(self.fwd(cpu_data::<f32>(s, l, "gelu-dropout input")?))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(self.fwd(cpu_data::<f64>(s, l, "gelu-dropout input")?))
            }
            _ => candle_core::bail!("gelu-dropout: only f32/f64"),
        };
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op2_no_bwd(
            &x.contiguous()?,
            &GeluDropoutGrad(self.clone()),
        )?))
    }
}

impl CustomOp2 for GeluDropoutGrad {
    fn name(&self) -> &'static str {
        "gelu-dropout-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.0.check(l1)?;
        self.0.check(l2)?;
        let dx = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(self.0.grad(
                cpu_data::<f32>(s1, l1, "gelu-dropout gradient")?,
                cpu_data::<f32>(s2, l2, "gelu-dropout input")?,
            )),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(self.0.grad(
                cpu_data::<f64>(s1, l1, "gelu-dropout gradient")?,
                cpu_data::<f64>(s2, l2, "gelu-dropout input")?,
            )),
            _ => candle_core::bail!("gelu-dropout-grad: only f32/f64 operands of one type"),
        };
        Ok((dx, l2.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Values and input gradient equal `dropout(gelu(x))` composed, bit for bit, in f32 and f64, on a size that
    /// spans several blocks; evaluation mode and `p = 0` are plain GELU.
    #[test]
    fn equals_gelu_then_dropout_bit_for_bit() {
        for dt in [DType::F32, DType::F64] {
            let n = 7 * 7040; // four blocks, the last one short
            let v: Vec<f64> = (0..n)
                .map(|i| ((i * 7919 % 1013) as f64 / 1013.0 - 0.5) * 8.0)
                .collect();
            let x = Var::from_tensor(
                &Tensor::from_vec(v, (n / 7, 7), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap(),
            )
            .unwrap();
            let r = Tensor::from_vec(
                (0..n).map(|i| (i % 13) as f64 - 6.0).collect::<Vec<_>>(),
                (n / 7, 7),
                &Device::Cpu,
            )
            .unwrap()
            .to_dtype(dt)
            .unwrap();
            let d = Dropout::new(0.1);
            for seed in [None, Some(5u64)] {
                let ours = gelu_dropout(x.as_tensor(), &d, seed).unwrap();
                let theirs = d
                    .forward_t(&super::super::gelu(x.as_tensor()).unwrap(), seed)
                    .unwrap();
                let flat = |t: &Tensor| {
                    t.to_dtype(DType::F64)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1::<f64>()
                        .unwrap()
                };
                let bits = |v: Vec<f64>| v.into_iter().map(f64::to_bits).collect::<Vec<_>>();
                assert_eq!(
                    bits(flat(&ours)),
                    bits(flat(&theirs)),
                    "{dt:?} {seed:?}: values"
                );
                let go = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let gt = (&theirs * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let (a, e) = (
                    go.get(x.as_tensor()).unwrap(),
                    gt.get(x.as_tensor()).unwrap(),
                );
                assert_eq!(bits(flat(a)), bits(flat(e)), "{dt:?} {seed:?}: gradient");
                if seed.is_some() {
                    let dropped = flat(&ours).iter().filter(|&&v| v == 0.0).count();
                    assert!(
                        dropped > n / 20 && dropped < n / 5,
                        "{dropped} of {n} dropped"
                    );
                }
            }
            let p0 = gelu_dropout(x.as_tensor(), &Dropout::new(0.0), Some(5)).unwrap();
            let g = super::super::gelu(x.as_tensor()).unwrap();
            assert_eq!(
                p0.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap(),
                g.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            );
        }
    }

    #[test]
    fn invalid_probability_is_an_error() {
        let x = Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(gelu_dropout(&x, &Dropout::new(1.5), Some(1)).is_err());
    }
}
