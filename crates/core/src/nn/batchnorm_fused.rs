//! Train-mode BatchNorm2d as one CPU kernel with a hand-derived backward.
//!
//! The composed form (mean over `(0,2,3)`, centre, square, mean, add eps, sqrt, divide, scale, shift) records ten
//! graph nodes per layer, each a full pass over the activation in the forward and two to three in the backward
//! (candle allocates a zero gradient and adds into it for every node); the reductions over `(0,2,3)` are strided.
//! The TransUNet decoder runs five of these layers at up to 224² per training step. Here the forward is two passes
//! (statistics, normalise) and the backward two more, with `N = B·H·W`, `x̂ = (x − μ_c)·r_c`, `r_c = 1/√(σ²_c+eps)`:
//!
//! `∂b_c = Σ dy`, `∂w_c = Σ dy·x̂`, `∂x = w_c·r_c·(dy − ∂b_c/N − x̂·∂w_c/N)`.
//!
//! Statistics are accumulated in f64 whatever the dtype.
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Per-channel batch mean and biased variance of the last forward.
#[derive(Debug, Clone, Default)]
pub(super) struct BatchStats {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
}

type Shared = Arc<Mutex<Option<BatchStats>>>;

/// `y = BN_train(x; w, b)`; the statistics are left in `stats` for the running-statistics update and the backward.
struct Forward {
    eps: f64,
    /// Apply `max(·, 0)` to the output (Conv-BN-ReLU); the backward then masks `dy` by `y > 0`.
    relu: bool,
    stats: Shared,
}

/// Packed `[∂x (B·C·H·W) | ∂w (C) | ∂b (C)]` from `(x, dy, w)`.
struct Backward {
    eps: f64,
    stats: BatchStats,
}

/// `(B, C, H·W)` of an NCHW layout.
fn geometry(l: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let (b, c, h, w) = l.shape().dims4()?;
    Ok((b, c, h * w))
}

/// Per channel `(Σ f(i, x_i)) ` over every sample's plane of channel `c`.
fn channel_sums<T: WithDType>(
    x: &[T],
    (b, c, hw): (usize, usize, usize),
    f: impl Fn(usize, usize, &[T]) -> f64 + Sync,
) -> Vec<f64> {
    (0..c)
        .into_par_iter()
        .map(|ch| {
            (0..b)
                .map(|bi| {
                    let off = (bi * c + ch) * hw;
                    f(ch, off, &x[off..off + hw])
                })
                .sum()
        })
        .collect()
}

fn forward<T: WithDType>(
    eps: f64,
    relu: bool,
    x: &[T],
    w: &[T],
    bias: &[T],
    g: (usize, usize, usize),
) -> (Vec<T>, BatchStats) {
    let (b, c, hw) = g;
    let n = (b * hw) as f64;
    let sum = |p: &[T]| p.iter().map(|v| v.to_f64()).sum::<f64>();
    let mean: Vec<f64> = channel_sums(x, g, |_, _, p| sum(p))
        .into_iter()
        .map(|s| s / n)
        .collect();
    let var: Vec<f64> = channel_sums(x, g, |ch, _, p| {
        p.iter().map(|v| (v.to_f64() - mean[ch]).powi(2)).sum()
    })
    .into_iter()
    .map(|s| s / n)
    .collect();
    // SAFETY: every (sample, channel) plane of `y` is written below.
    let mut y = unsafe { super::buffer::uninit_vec::<T>(x.len()) };
    y.par_chunks_mut(hw).enumerate().for_each(|(plane, out)| {
        let ch = plane % c;
        let r = 1.0 / (var[ch] + eps).sqrt();
        let scale = w[ch].to_f64() * r;
        let shift = bias[ch].to_f64() - mean[ch] * scale;
        for (o, v) in out.iter_mut().zip(&x[plane * hw..(plane + 1) * hw]) {
            *o = T::from_f64(v.to_f64() * scale + shift);
        }
        if relu {
            super::fused::relu_in_place(out);
        }
    });
    (y, BatchStats { mean, var })
}

fn backward<T: WithDType>(
    eps: f64,
    st: &BatchStats,
    x: &[T],
    dy: &[T],
    w: &[T],
    g: (usize, usize, usize),
) -> Vec<T> {
    let (b, c, hw) = g;
    let n = (b * hw) as f64;
    let r: Vec<f64> = st.var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let db = channel_sums(dy, g, |_, _, p| p.iter().map(|v| v.to_f64()).sum());
    let dw = channel_sums(dy, g, |ch, off, p| {
        p.iter()
            .zip(&x[off..off + hw])
            .map(|(d, v)| d.to_f64() * (v.to_f64() - st.mean[ch]) * r[ch])
            .sum()
    });
    let mut out = vec![T::zero(); x.len() + 2 * c];
    let (dx, dwb) = out.split_at_mut(x.len());
    dx.par_chunks_mut(hw).enumerate().for_each(|(plane, o)| {
        let ch = plane % c;
        let k = w[ch].to_f64() * r[ch];
        let (mb, mw, mu) = (db[ch] / n, dw[ch] / n, st.mean[ch]);
        let src = plane * hw..(plane + 1) * hw;
        for ((o, d), v) in o.iter_mut().zip(&dy[src.clone()]).zip(&x[src]) {
            let xhat = (v.to_f64() - mu) * r[ch];
            *o = T::from_f64(k * (d.to_f64() - mb - xhat * mw));
        }
    });
    for ch in 0..c {
        dwb[ch] = T::from_f64(dw[ch]);
        dwb[c + ch] = T::from_f64(db[ch]);
    }
    out
}

impl CustomOp3 for Forward {
    fn name(&self) -> &'static str {
        "batch-norm-train"
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
        let g = geometry(l1)?;
        fn run<T: WithDType>(
            op: &Forward,
            g: (usize, usize, usize),
            (s1, l1, s2, l2, s3, l3): (
                &CpuStorage,
                &Layout,
                &CpuStorage,
                &Layout,
                &CpuStorage,
                &Layout,
            ),
        ) -> candle_core::Result<(CpuStorage, BatchStats)> {
            let (y, st) = forward(
                op.eps,
                op.relu,
                super::cpu_data::<T>(s1, l1, "batch_norm input")?,
                super::cpu_data::<T>(s2, l2, "batch_norm weight")?,
                super::cpu_data::<T>(s3, l3, "batch_norm bias")?,
                g,
            );
            Ok((T::to_cpu_storage_owned(y), st))
        }
        let args = (s1, l1, s2, l2, s3, l3);
        let (y, st) = match s1 {
            CpuStorage::F32(_) => run::<f32>(self, g, args)?,
            CpuStorage::F64(_) => run::<f64>(self, g, args)?,
            _ => candle_core::bail!("batch_norm: only f32/f64"),
        };
        *self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("batch_norm: poisoned lock".into()))? = Some(st);
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let masked;
        let grad = if self.relu {
            masked = super::fused::relu_grad(grad, res)?;
            &masked
        } else {
            grad
        };
        let stats = self
            .stats
            .lock()
            .map_err(|_| candle_core::Error::Msg("batch_norm: poisoned lock".into()))?
            .clone();
        let Some(stats) = stats else {
            candle_core::bail!("batch_norm: backward before forward");
        };
        let (n, c) = (x.elem_count(), w.elem_count());
        let packed = x.contiguous()?.apply_op3_no_bwd(
            &grad.contiguous()?,
            &w.contiguous()?,
            &Backward {
                eps: self.eps,
                stats,
            },
        )?;
        let dx = x
            .track_op()
            .then(|| packed.narrow(0, 0, n)?.reshape(x.shape()));
        let dw = w.track_op().then(|| packed.narrow(0, n, c));
        let db = b.track_op().then(|| packed.narrow(0, n + c, c));
        Ok((dx.transpose()?, dw.transpose()?, db.transpose()?))
    }
}

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "batch-norm-train-grad"
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
        let g = geometry(l1)?;
        let len = l1.shape().elem_count() + 2 * g.1;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(backward(
                    self.eps,
                    &self.stats,
                    super::cpu_data(s1, l1, "batch_norm input")?,
                    super::cpu_data(s2, l2, "batch_norm gradient")?,
                    super::cpu_data(s3, l3, "batch_norm weight")?,
                    g,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(backward(
                    self.eps,
                    &self.stats,
                    super::cpu_data(s1, l1, "batch_norm input")?,
                    super::cpu_data(s2, l2, "batch_norm gradient")?,
                    super::cpu_data(s3, l3, "batch_norm weight")?,
                    g,
                ))
            }
            _ => candle_core::bail!("batch_norm: only f32/f64 operands of one dtype"),
        };
        Ok((out, Shape::from(len)))
    }
}

/// Whether [`train_forward`] applies: a CPU tensor in f32/f64 with weight and bias of the same dtype.
pub(super) fn applies(x: &Tensor, w: &Tensor, b: &Tensor) -> bool {
    x.device().is_cpu()
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
        && w.dtype() == x.dtype()
        && b.dtype() == x.dtype()
}

/// Train-mode BatchNorm of `x (B, C, H, W)` with per-channel affine `w`, `b` (then ReLU when `relu`); returns the
/// output and the batch statistics (mean, biased variance) for the running-statistics update.
pub(super) fn train_forward(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    relu: bool,
) -> candle_core::Result<(Tensor, BatchStats)> {
    let stats: Shared = Arc::new(Mutex::new(None));
    let y = x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        Forward {
            eps,
            relu,
            stats: stats.clone(),
        },
    )?;
    let st = stats
        .lock()
        .map_err(|_| candle_core::Error::Msg("batch_norm: poisoned lock".into()))?
        .clone();
    match st {
        Some(st) => Ok((y, st)),
        None => candle_core::bail!("batch_norm: the forward left no statistics"),
    }
}

#[cfg(test)]
mod tests {
    use super::super::BatchNorm2d;
    use candle_core::{DType, Device, Tensor, Var};
    use candle_nn::VarBuilder;
    use std::collections::HashMap;

    fn ramp(shape: &[usize], seed: usize, lo: f64, hi: f64) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| lo + (hi - lo) * (((i + seed) * 7919 % 113) as f64 / 112.0))
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let scale = b
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .max(1e-30);
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            / scale
    }

    /// BatchNorm with the fused ReLU equals BatchNorm followed by the ReLU op bit for bit (output, input/weight/bias
    /// gradients, running statistics), in f32 and f64; about half the outputs are clamped.
    #[test]
    fn fused_relu_equals_batch_norm_then_relu() {
        for dtype in [DType::F64, DType::F32] {
            let shape = [2usize, 3, 5, 4];
            let x = Var::from_tensor(&ramp(&shape, 5, -2.0, 3.0).to_dtype(dtype).unwrap()).unwrap();
            let w = Var::from_tensor(&ramp(&[3], 6, 0.5, 1.5).to_dtype(dtype).unwrap()).unwrap();
            let b = Var::from_tensor(&ramp(&[3], 7, -0.5, 0.5).to_dtype(dtype).unwrap()).unwrap();
            let bn = || {
                let mut m = HashMap::new();
                m.insert("weight".to_string(), w.as_tensor().clone());
                m.insert("bias".to_string(), b.as_tensor().clone());
                BatchNorm2d::new(
                    3,
                    1e-5,
                    0.1,
                    VarBuilder::from_tensors(m, dtype, &Device::Cpu),
                )
                .unwrap()
            };
            let (fused_bn, ref_bn) = (bn(), bn());
            let yf = fused_bn.forward_relu_t(x.as_tensor(), true).unwrap();
            let yr = super::super::relu(&ref_bn.forward_t(x.as_tensor(), true).unwrap()).unwrap();
            let bits = |t: &Tensor| -> Vec<u64> {
                let v = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                v.to_vec1::<f64>()
                    .unwrap()
                    .into_iter()
                    .map(f64::to_bits)
                    .collect()
            };
            assert_eq!(bits(&yf), bits(&yr), "{dtype:?} output");
            let zeros = yf
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let clamped = zeros.iter().filter(|&&v| v == 0.0).count();
            assert!(clamped > 20 && clamped < 100, "{clamped} of 120 clamped");
            let r = ramp(&shape, 8, -1.0, 1.0).to_dtype(dtype).unwrap();
            let gf = (&yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &w, &b] {
                let (a, e) = (
                    gf.get(v.as_tensor()).unwrap(),
                    gr.get(v.as_tensor()).unwrap(),
                );
                assert_eq!(bits(a), bits(e), "{dtype:?} gradient");
            }
            assert_eq!(
                bits(&fused_bn.running_var().unwrap()),
                bits(&ref_bn.running_var().unwrap())
            );
            // Eval mode takes the composed path: the same rule.
            let ye = fused_bn.forward_relu_t(x.as_tensor(), false).unwrap();
            let we =
                super::super::relu(&fused_bn.forward_t(x.as_tensor(), false).unwrap()).unwrap();
            assert_eq!(bits(&ye), bits(&we), "{dtype:?} eval output");
        }
    }

    /// The fused kernel gives the composed ops' output, input/weight/bias gradients and running statistics, in f64
    /// (to 1e-12) and f32 (to 1e-5), for batch 1 and odd plane sizes.
    #[test]
    fn fused_matches_composed_values_gradients_and_running_stats() {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            for (shape, seed) in [
                ([3usize, 4, 5, 3], 1usize),
                ([1, 3, 7, 1], 2),
                ([2, 5, 4, 4], 3),
            ] {
                let c = shape[1];
                let x = Var::from_tensor(&ramp(&shape, seed, -2.0, 3.0).to_dtype(dtype).unwrap())
                    .unwrap();
                let w = Var::from_tensor(&ramp(&[c], seed + 1, 0.5, 1.5).to_dtype(dtype).unwrap())
                    .unwrap();
                let b = Var::from_tensor(&ramp(&[c], seed + 2, -0.5, 0.5).to_dtype(dtype).unwrap())
                    .unwrap();
                let bn = |w: &Tensor, b: &Tensor| {
                    let mut m = HashMap::new();
                    m.insert("weight".to_string(), w.clone());
                    m.insert("bias".to_string(), b.clone());
                    BatchNorm2d::new(
                        c,
                        1e-5,
                        0.1,
                        VarBuilder::from_tensors(m, dtype, &Device::Cpu),
                    )
                    .unwrap()
                };
                let (fused_bn, ref_bn) = (
                    bn(w.as_tensor(), b.as_tensor()),
                    bn(w.as_tensor(), b.as_tensor()),
                );
                let yf = fused_bn.forward_t(x.as_tensor(), true).unwrap();
                let yr = ref_bn.train_output_composed(x.as_tensor()).unwrap();
                let case = format!("{dtype:?} {shape:?}");
                assert!(max_rel(&yf, &yr) < tol, "{case}: output");
                let r = ramp(&shape, seed + 3, -1.0, 1.0).to_dtype(dtype).unwrap();
                let gf = (&yf * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
                for (name, v) in [("input", &x), ("weight", &w), ("bias", &b)] {
                    let (a, e) = (
                        gf.get(v.as_tensor()).unwrap(),
                        gr.get(v.as_tensor()).unwrap(),
                    );
                    assert!(max_rel(a, e) < tol * 10.0, "{case}: {name} gradient");
                }
                // Running statistics: momentum 0.1 towards the batch mean and the unbiased batch variance.
                let n = (shape[0] * shape[2] * shape[3]) as f64;
                let mean = x.as_tensor().mean_keepdim((0, 2, 3)).unwrap();
                let var = x
                    .as_tensor()
                    .broadcast_sub(&mean)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .mean_keepdim((0, 2, 3))
                    .unwrap();
                let want_rm = (mean.flatten_all().unwrap() * 0.1).unwrap();
                let want_rv =
                    ((var.flatten_all().unwrap() * (0.1 * n / (n - 1.0))).unwrap() + 0.9).unwrap();
                assert!(
                    max_rel(&fused_bn.running_mean().unwrap(), &want_rm) < tol,
                    "{case}: running mean"
                );
                assert!(
                    max_rel(&fused_bn.running_var().unwrap(), &want_rv) < tol,
                    "{case}: running var"
                );
            }
        }
    }
}
