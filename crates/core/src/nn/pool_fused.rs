//! 3×3 / stride-2 max-pool as one CPU kernel that remembers where each maximum came from.
//!
//! The composed pool (six `index_select`s and four `maximum`s) backs up through candle's `maximum` rule, which builds
//! two equality masks, casts and divides per op, and through four `index_add`s: on TransUNet's root map (64 channels
//! at 112²) that is a dozen full passes. Here the forward scans each window once and keeps the flat index of its
//! maximum, and the backward adds each output gradient to that one input element. Ties go to the first maximum in
//! row-major window order (PyTorch's rule); values are identical to the composed pool.
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

type Argmax = Arc<Mutex<Option<Vec<u32>>>>;

struct Pool {
    argmax: Argmax,
}

/// `dx` from `dy` and the forward's argmax (no backward of its own).
struct PoolGrad {
    argmax: Arc<Vec<u32>>,
    in_h: usize,
    in_w: usize,
}

fn out_size(n: usize) -> usize {
    (n - 3) / 2 + 1
}

fn forward<T: WithDType>(x: &[T], planes: usize, h: usize, w: usize) -> (Vec<T>, Vec<u32>) {
    let (oh, ow) = (out_size(h), out_size(w));
    let mut y = vec![T::zero(); planes * oh * ow];
    let mut idx = vec![0u32; planes * oh * ow];
    y.par_chunks_mut(oh * ow)
        .zip(idx.par_chunks_mut(oh * ow))
        .enumerate()
        .for_each(|(p, (out, arg))| {
            let src = &x[p * h * w..(p + 1) * h * w];
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut best_i = (2 * oy) * w + 2 * ox;
                    let mut best = src[best_i];
                    for i in 0..3 {
                        for j in 0..3 {
                            let k = (2 * oy + i) * w + 2 * ox + j;
                            let v = src[k];
                            // NaN wins, as in PyTorch (and as `maximum` propagates it).
                            if v > best || (v.to_f64().is_nan() && !best.to_f64().is_nan()) {
                                best = v;
                                best_i = k;
                            }
                        }
                    }
                    out[oy * ow + ox] = best;
                    arg[oy * ow + ox] = best_i as u32;
                }
            }
        });
    (y, idx)
}

fn backward<T: WithDType>(dy: &[T], argmax: &[u32], planes: usize, h: usize, w: usize) -> Vec<T> {
    let per_out = dy.len() / planes.max(1);
    let mut dx = vec![T::zero(); planes * h * w];
    dx.par_chunks_mut(h * w).enumerate().for_each(|(p, plane)| {
        let r = p * per_out..(p + 1) * per_out;
        for (&g, &k) in dy[r.clone()].iter().zip(&argmax[r]) {
            plane[k as usize] += g;
        }
    });
    dx
}

impl CustomOp1 for Pool {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, h, w) = l.shape().dims4()?;
        let (y, idx) = match s {
            CpuStorage::F32(_) => {
                let (y, i) = forward(super::cpu_data::<f32>(s, l, "max_pool input")?, b * c, h, w);
                (CpuStorage::F32(y), i)
            }
            CpuStorage::F64(_) => {
                let (y, i) = forward(super::cpu_data::<f64>(s, l, "max_pool input")?, b * c, h, w);
                (CpuStorage::F64(y), i)
            }
            _ => candle_core::bail!("max_pool: the fused kernel takes f32/f64"),
        };
        *self
            .argmax
            .lock()
            .map_err(|_| candle_core::Error::Msg("max_pool: poisoned lock".into()))? = Some(idx);
        Ok((y, Shape::from((b, c, out_size(h), out_size(w)))))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let argmax = self
            .argmax
            .lock()
            .map_err(|_| candle_core::Error::Msg("max_pool: poisoned lock".into()))?
            .clone();
        let Some(argmax) = argmax else {
            candle_core::bail!("max_pool: backward before forward");
        };
        let (_, _, in_h, in_w) = x.dims4()?;
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&PoolGrad {
            argmax: Arc::new(argmax),
            in_h,
            in_w,
        })?))
    }
}

impl CustomOp1 for PoolGrad {
    fn name(&self) -> &'static str {
        "max-pool-3x3-s2-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, c, _, _) = l.shape().dims4()?;
        let (h, w) = (self.in_h, self.in_w);
        let dx = match s {
            CpuStorage::F32(_) => CpuStorage::F32(backward(
                super::cpu_data::<f32>(s, l, "max_pool input")?,
                &self.argmax,
                b * c,
                h,
                w,
            )),
            CpuStorage::F64(_) => CpuStorage::F64(backward(
                super::cpu_data::<f64>(s, l, "max_pool input")?,
                &self.argmax,
                b * c,
                h,
                w,
            )),
            _ => candle_core::bail!("max_pool: the fused kernel takes f32/f64"),
        };
        Ok((dx, Shape::from((b, c, h, w))))
    }
}

/// Whether [`max_pool_3x3_s2`] applies: a CPU tensor in f32/f64.
pub(super) fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// `MaxPool2d(3, stride 2, padding 0)` of a CPU `(B, C, H, W)` tensor with `H, W ≥ 3`, differentiable.
pub(super) fn max_pool_3x3_s2(x: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Pool {
        argmax: Arc::new(Mutex::new(None)),
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    /// Values equal the composed (gather + maximum) pool; with distinct values the gradient is the composed one
    /// exactly; on a tie the whole gradient goes to the first maximum (PyTorch's rule).
    #[test]
    fn matches_composed_pool_and_gives_ties_to_the_first_maximum() {
        for dtype in [DType::F32, DType::F64] {
            for (h, w) in [(7, 9), (3, 3), (8, 6)] {
                let n = 2 * 3 * h * w;
                // A permutation-like ramp: all values distinct.
                let v: Vec<f64> = (0..n).map(|i| ((i * 7919) % n) as f64 / n as f64).collect();
                let x = Var::from_tensor(
                    &Tensor::from_vec(v, (2, 3, h, w), &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap(),
                )
                .unwrap();
                let fused = super::max_pool_3x3_s2(x.as_tensor()).unwrap();
                let reference = super::super::pool::max_pool_composed(x.as_tensor()).unwrap();
                let f64s = |t: &Tensor| -> Vec<f64> {
                    t.to_dtype(DType::F64)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                };
                assert_eq!(f64s(&fused), f64s(&reference), "{dtype:?} {h}x{w}: values");
                let r = Tensor::rand(0.5, 1.5, fused.dims(), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let gf = (&fused * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let gr = (&reference * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let (a, b) = (
                    f64s(gf.get(x.as_tensor()).unwrap()),
                    f64s(gr.get(x.as_tensor()).unwrap()),
                );
                let worst = a
                    .iter()
                    .zip(&b)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0.0, f64::max);
                assert!(
                    worst < 1e-6,
                    "{dtype:?} {h}x{w}: gradient differs by {worst}"
                );
            }
        }
        let x = Var::from_tensor(&Tensor::ones((1, 1, 3, 3), DType::F64, &Device::Cpu).unwrap())
            .unwrap();
        let g = super::max_pool_3x3_s2(x.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g: Vec<f64> = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(g, vec![1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }
}
