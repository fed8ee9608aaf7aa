//! Soft selection of the multimask candidates (SPEC §7.4 step 3).
use crate::{Error, Result};
use candle_core::Tensor;

/// Selection weights `softmax(iou/τ)` over the candidate axis: `iou (B, K)` → `(B, K)`.
pub fn selection_weights(iou: &Tensor, temperature: f64) -> Result<Tensor> {
    if !(temperature > 0.0) || !temperature.is_finite() {
        return Err(Error::Config(format!(
            "selection temperature must be > 0, got {temperature}"
        )));
    }
    crate::nn::softmax(&iou.affine(1.0 / temperature, 0.0)?, 1)
}

/// `Σ_k w_k · low_k` of `low (B, K, M, M)` with `w = softmax(iou/τ)`: the refined logits at `M`, `(B, M, M)`.
/// The resize to `N` is applied afterwards (cheaper order; the resize is linear).
pub fn soft_select(low: &Tensor, iou: &Tensor, temperature: f64) -> Result<Tensor> {
    let (b, k, _, _) = low.dims4().map_err(|_| {
        Error::Arg(format!(
            "soft_select: candidates must be (B, K, M, M), got {:?}",
            low.dims()
        ))
    })?;
    if iou.dims() != [b, k] {
        return Err(Error::Arg(format!(
            "soft_select: IoU predictions {:?} do not match candidates {:?}",
            iou.dims(),
            low.dims()
        )));
    }
    let w = selection_weights(iou, temperature)?.reshape((b, k, 1, 1))?;
    Ok(low.broadcast_mul(&w)?.sum(1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    #[test]
    fn soft_select_matches_manual_weighting() -> Result<()> {
        let dev = Device::Cpu;
        let low = Tensor::arange(0f32, 2.0 * 3.0 * 4.0, &dev)?.reshape((2, 3, 2, 2))?;
        let iou = Tensor::new(&[[0.1f32, 0.5, 0.2], [0.9, 0.9, 0.0]], &dev)?;
        let got = soft_select(&low, &iou, 0.1)?;
        let lv: Vec<f32> = low.flatten_all()?.to_vec1()?;
        let iv: Vec<Vec<f32>> = iou.to_vec2()?;
        let gv: Vec<f32> = got.flatten_all()?.to_vec1()?;
        for b in 0..2 {
            let e: Vec<f64> = iv[b].iter().map(|v| (*v as f64 / 0.1).exp()).collect();
            let s: f64 = e.iter().sum();
            for p in 0..4 {
                let want: f64 = (0..3)
                    .map(|k| e[k] / s * lv[b * 12 + k * 4 + p] as f64)
                    .sum();
                assert!(
                    (gv[b * 4 + p] as f64 - want).abs() < 1e-4,
                    "b{b} p{p}: {} vs {want}",
                    gv[b * 4 + p]
                );
            }
        }
        Ok(())
    }

    /// Finite-difference check (f64, central differences) of the soft selection w.r.t. candidates and IoU (SPEC §16.5).
    #[test]
    fn soft_select_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let lowv: Vec<f64> = (0..2 * 3 * 3 * 3)
            .map(|i| ((i * 37 % 23) as f64 - 11.0) * 0.3)
            .collect();
        let iouv: Vec<f64> = vec![0.2, 0.35, 0.3, 0.8, 0.1, 0.79];
        let r: Vec<f64> = (0..2 * 3 * 3)
            .map(|i| ((i * 13 % 7) as f64 - 3.0) * 0.5)
            .collect();
        let rt = Tensor::from_vec(r, (2, 3, 3), &dev)?;
        let f = |low: &Tensor, iou: &Tensor| -> Result<Tensor> {
            Ok(soft_select(low, iou, 0.1)?.mul(&rt)?.sum_all()?)
        };
        let low = Var::from_tensor(&Tensor::from_vec(lowv.clone(), (2, 3, 3, 3), &dev)?)?;
        let iou = Var::from_tensor(&Tensor::from_vec(iouv.clone(), (2, 3), &dev)?)?;
        let grads = f(low.as_tensor(), iou.as_tensor())?.backward()?;
        let gl: Vec<f64> = grads
            .get(low.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1()?;
        let gi: Vec<f64> = grads
            .get(iou.as_tensor())
            .unwrap()
            .flatten_all()?
            .to_vec1()?;
        let h = 1e-6;
        let eval = |lv: &[f64], iv: &[f64]| -> Result<f64> {
            let l = Tensor::from_vec(lv.to_vec(), (2, 3, 3, 3), &dev)?;
            let i = Tensor::from_vec(iv.to_vec(), (2, 3), &dev)?;
            Ok(f(&l, &i)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
        };
        for idx in [0usize, 5, 13, 27, 40, 53] {
            let (mut a, mut b) = (lowv.clone(), lowv.clone());
            a[idx] += h;
            b[idx] -= h;
            let fd = (eval(&a, &iouv)? - eval(&b, &iouv)?) / (2.0 * h);
            assert!(
                (fd - gl[idx]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "low[{idx}]: fd {fd} vs {}",
                gl[idx]
            );
        }
        for idx in 0..6 {
            let (mut a, mut b) = (iouv.clone(), iouv.clone());
            a[idx] += h;
            b[idx] -= h;
            let fd = (eval(&lowv, &a)? - eval(&lowv, &b)?) / (2.0 * h);
            assert!(
                (fd - gi[idx]).abs() <= 1e-5 * (1.0 + fd.abs()),
                "iou[{idx}]: fd {fd} vs {}",
                gi[idx]
            );
        }
        Ok(())
    }
}
