//! Training losses of the three phases (SPEC §9). Every function builds its result from differentiable candle ops
//! only (no fused softmax, no candle BCE), returns the total and its named components, and works for f32 and f64.
//!
//! * [`phase1_loss`]: `0.5·CE + 0.5·Dice₂` on two-class logits (§9.1).
//! * [`phase2_loss`]: BCE + per-sample Dice + IoU-prediction MSE + quality-weighted change penalty (§9.2).
//! * [`phase3_loss`]: `λ_c·L_coarse + λ_r·L_refined (+ anchor)` (§9.3), with [`refined_loss`], [`weight_anchor`],
//!   [`scale_refined_grad`] and [`nearest_target`] for the pieces a Phase 3 trainer assembles.
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, D};

/// A loss value with its named components (scalar tensors, all part of the graph) and non-differentiable
/// diagnostics (`aux`, e.g. the Phase 2 per-sample input quality).
#[derive(Debug, Clone)]
pub struct LossOutput {
    /// The scalar to call `.backward()` on.
    pub total: Tensor,
    /// Named scalar components, in logging order. Their (weighted) sum is `total` unless stated otherwise.
    pub components: Vec<(String, Tensor)>,
    /// Detached per-sample diagnostics.
    pub aux: Vec<(String, Tensor)>,
}

impl LossOutput {
    /// A component or diagnostic by name.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.components.iter().chain(self.aux.iter()).find(|(n, _)| n == name).map(|(_, t)| t)
    }
    /// The total as an `f64`.
    pub fn total_f64(&self) -> Result<f64> {
        scalar_f64(&self.total)
    }
    /// Component values as `f64`, in logging order (for the history row and the console tree).
    pub fn component_values(&self) -> Result<Vec<(String, f64)>> {
        self.components.iter().map(|(n, t)| Ok((n.clone(), scalar_f64(t)?))).collect()
    }
}

/// A scalar tensor (any float dtype, any rank with one element) as `f64`.
pub fn scalar_f64(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?.first().copied().ok_or_else(|| {
        Error::msg("scalar_f64: empty tensor")
    })?)
}

fn check_dims(name: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        return Err(Error::Arg(format!("{name}: shape {:?}, expected {:?}", t.dims(), want)));
    }
    Ok(())
}

/// Numerically stable `log_softmax` along `dim` (the maximum is detached: it cancels analytically).
pub fn log_softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    let m = x.max_keepdim(dim)?.detach();
    let d = x.broadcast_sub(&m)?;
    let lse = d.exp()?.sum_keepdim(dim)?.log()?;
    Ok(d.broadcast_sub(&lse)?)
}

/// Generic differentiable softmax along `dim` (exp / sum with a detached maximum).
pub fn softmax(x: &Tensor, dim: usize) -> Result<Tensor> {
    let m = x.max_keepdim(dim)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(dim)?;
    Ok(e.broadcast_div(&s)?)
}

/// Element-wise stable BCE with logits `ℓ(z, t) = max(z, 0) − z·t + log(1 + exp(−|z|))` (§9).
// TODO(nn): switch to `crate::nn::bce_with_logits` once the nn module lands (same formula).
pub fn bce_with_logits(z: &Tensor, t: &Tensor) -> Result<Tensor> {
    let t = t.to_dtype(z.dtype())?;
    let soft = z.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?;
    Ok(((z.relu()? - (z * &t)?)? + soft)?)
}

/// Logistic sigmoid with a backward rule (candle-nn's custom op; `σ` is stable for large `|z|`).
pub fn sigmoid(z: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::sigmoid(z)?)
}

/// One-hot `(B,C,H,W)` of a class-index target `(B,H,W)` (any dtype holding integral values).
fn one_hot(target: &Tensor, n_classes: usize, dtype: DType) -> Result<Tensor> {
    let t = target.to_dtype(DType::F32)?;
    let planes = (0..n_classes)
        .map(|c| t.eq(c as f64)?.to_dtype(dtype)?.unsqueeze(1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&planes, 1)?)
}

/// §9.1 `L₁ = 0.5·CE + 0.5·Dice₂` on logits `(B,C,S,S)` (C = 2 in this system) and a class-index target `(B,S,S)`.
/// Components: `ce`, `dice` (unweighted; `total = 0.5·ce + 0.5·dice`).
pub fn phase1_loss(logits: &Tensor, target: &Tensor) -> Result<LossOutput> {
    let (b, c, h, w) = logits.dims4()?;
    check_dims("phase1_loss target", target, &[b, h, w])?;
    let t = one_hot(target, c, logits.dtype())?;
    let logp = log_softmax(logits, 1)?;
    let ce = (t.mul(&logp)?.sum_keepdim(1)?.mean_all()?.neg())?;
    let p = logp.exp()?;
    let mut dice_terms = Vec::with_capacity(c);
    for k in 0..c {
        let pk = p.narrow(1, k, 1)?;
        let tk = t.narrow(1, k, 1)?;
        let inter = pk.mul(&tk)?.sum_all()?;
        let den = (pk.sqr()?.sum_all()? + tk.sqr()?.sum_all()?)?;
        let ratio = inter.affine(2.0, 1e-5)?.div(&den.affine(1.0, 1e-5)?)?;
        dice_terms.push(ratio.affine(-1.0, 1.0)?);
    }
    let dice = (Tensor::stack(&dice_terms, 0)?.sum_all()? / c as f64)?;
    let total = (ce.affine(0.5, 0.0)? + dice.affine(0.5, 0.0)?)?;
    Ok(LossOutput { total, components: vec![("ce".into(), ce), ("dice".into(), dice)], aux: vec![] })
}

/// Settings of the Phase 2 loss (§9.2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Phase2LossConfig {
    /// `--iou-loss-weight` (default 1.0).
    pub iou_loss_weight: f64,
    /// `--change-penalty-weight` λ (default 0.1).
    pub change_penalty_weight: f64,
}

impl Default for Phase2LossConfig {
    fn default() -> Self {
        Phase2LossConfig { iou_loss_weight: 1.0, change_penalty_weight: 0.1 }
    }
}

/// Per-sample Dice loss `mean_b [1 − (2Σσ(z)g + 1)/(Σσ(z) + Σg + 1)]` on logits `(B,H,W)` (§9.2).
pub fn dice_loss_per_sample(z: &Tensor, g: &Tensor) -> Result<Tensor> {
    let s = sigmoid(z)?.flatten_from(1)?;
    let g = g.to_dtype(z.dtype())?.flatten_from(1)?;
    let inter = s.mul(&g)?.sum(1)?;
    let den = (s.sum(1)? + g.sum(1)?)?;
    let ratio = inter.affine(2.0, 1.0)?.div(&den.affine(1.0, 1.0)?)?;
    Ok(ratio.affine(-1.0, 1.0)?.mean_all()?)
}

/// Input quality `q_b = (2|c̄∧ḡ| + 1)/(|c̄| + |ḡ| + 1)` (thresholds `> 0.5`) and penalty weight
/// `w_b = clamp((q_b − 0.6)/0.4, 0, 1)`, both `(B)` and detached (§9.2).
pub fn change_penalty_weights(coarse: &Tensor, gt: &Tensor) -> Result<(Tensor, Tensor)> {
    let dt = coarse.dtype();
    let cb = coarse.detach().gt(0.5)?.to_dtype(dt)?.flatten_from(1)?;
    let gb = gt.detach().to_dtype(dt)?.gt(0.5)?.to_dtype(dt)?.flatten_from(1)?;
    let inter = cb.mul(&gb)?.sum(1)?;
    let q = inter.affine(2.0, 1.0)?.div(&(cb.sum(1)? + gb.sum(1)?)?.affine(1.0, 1.0)?)?;
    let w = q.affine(1.0 / 0.4, -0.6 / 0.4)?.clamp(0.0, 1.0)?;
    Ok((q, w))
}

/// Unweighted change penalty `mean_b [ w_b · mean_pixels (σ(z) − c)² ]` (= `L_chg/λ`, §9.2).
pub fn change_penalty(z: &Tensor, coarse: &Tensor, w: &Tensor) -> Result<Tensor> {
    let s = sigmoid(z)?.flatten_from(1)?;
    let c = coarse.detach().to_dtype(z.dtype())?.flatten_from(1)?;
    let per = s.sub(&c)?.sqr()?.mean(1)?;
    Ok(per.mul(&w.to_dtype(z.dtype())?)?.mean_all()?)
}

/// Constant IoU targets `IoU_{b,k} = (Σpg + 1)/(Σp + Σg − Σpg + 1)`, `p = σ(cand[b,k])`, shape `(B,K)`, detached.
pub fn iou_targets(cand: &Tensor, gt: &Tensor) -> Result<Tensor> {
    let (b, k, h, w) = cand.dims4()?;
    check_dims("iou_targets gt", gt, &[b, h, w])?;
    let p = sigmoid(&cand.detach())?.reshape((b, k, h * w))?;
    let g = gt.detach().to_dtype(cand.dtype())?.reshape((b, 1, h * w))?;
    let inter = p.broadcast_mul(&g)?.sum(2)?;
    let sp = p.sum(2)?;
    let sg = g.sum(2)?; // (B,1)
    let union = sp.broadcast_add(&sg)?.sub(&inter)?;
    Ok(inter.affine(1.0, 1.0)?.div(&union.affine(1.0, 1.0)?)?)
}

/// §9.2 `L₂ = L_bce + L_dice + w_iou·L_iou + L_chg` on refined logits `z (B,N,N)`, target `g (B,N,N)`, soft coarse
/// `c (B,N,N)`, optional candidate logits `(B,3,N,N)` with IoU predictions `(B,3)` (both or neither; without them
/// `L_iou = 0`). Components (logged separately): `bce`, `dice` (per sample), `iou` (unweighted MSE), `change`
/// (`L_chg`, already multiplied by λ). `aux`: `input_quality` `q_b`, `penalty_weight` `w_b`.
pub fn phase2_loss(
    refined: &Tensor,
    gt: &Tensor,
    coarse: &Tensor,
    candidates: Option<(&Tensor, &Tensor)>,
    cfg: &Phase2LossConfig,
) -> Result<LossOutput> {
    let (b, h, w) = refined.dims3()?;
    check_dims("phase2_loss gt", gt, &[b, h, w])?;
    check_dims("phase2_loss coarse", coarse, &[b, h, w])?;
    let g = gt.to_dtype(refined.dtype())?;
    let bce = bce_with_logits(refined, &g)?.mean_all()?;
    let dice = dice_loss_per_sample(refined, &g)?;
    let iou = match candidates {
        Some((cand, pred)) => {
            let (cb, k, ch, cw) = cand.dims4()?;
            if (cb, ch, cw) != (b, h, w) {
                return Err(Error::Arg(format!(
                    "phase2_loss candidates: shape {:?}, expected ({b},K,{h},{w})",
                    cand.dims()
                )));
            }
            check_dims("phase2_loss iou predictions", pred, &[b, k])?;
            let target = iou_targets(cand, &g)?;
            pred.to_dtype(refined.dtype())?.sub(&target)?.sqr()?.mean_all()?
        }
        None => Tensor::zeros((), refined.dtype(), refined.device())?,
    };
    let (q, wb) = change_penalty_weights(coarse, &g)?;
    let change = change_penalty(refined, coarse, &wb)?.affine(cfg.change_penalty_weight, 0.0)?;
    let total = (((&bce + &dice)? + iou.affine(cfg.iou_loss_weight, 0.0)?)? + &change)?;
    Ok(LossOutput {
        total,
        components: vec![("bce".into(), bce), ("dice".into(), dice), ("iou".into(), iou), ("change".into(), change)],
        aux: vec![("input_quality".into(), q), ("penalty_weight".into(), wb)],
    })
}

/// `L_refined = 0.5·mean ℓ(z, y) + 0.5·(1 − (2Σσ(z)y + 1e-5)/(Σσ(z) + Σy + 1e-5))`, Dice pooled over the batch
/// (§9.3). `z` and `y` are `(B,M,M)` at the same size (see [`nearest_target`]).
pub fn refined_loss(z: &Tensor, y: &Tensor) -> Result<Tensor> {
    if z.dims() != y.dims() {
        return Err(Error::Arg(format!("refined_loss: logits {:?} vs target {:?}", z.dims(), y.dims())));
    }
    let y = y.to_dtype(z.dtype())?;
    let bce = bce_with_logits(z, &y)?.mean_all()?;
    let s = sigmoid(z)?;
    let inter = s.mul(&y)?.sum_all()?;
    let den = (s.sum_all()? + y.sum_all()?)?;
    let dice = inter.affine(2.0, 1e-5)?.div(&den.affine(1.0, 1e-5)?)?.affine(-1.0, 1.0)?;
    Ok((bce.affine(0.5, 0.0)? + dice.affine(0.5, 0.0)?)?)
}

/// Phase 3 loss weights (§9.3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Phase3LossConfig {
    /// `--coarse-loss-weight` λ_c (default 0.3).
    pub coarse_weight: f64,
    /// `--refined-loss-weight` λ_r (default 0.7).
    pub refined_weight: f64,
}

impl Default for Phase3LossConfig {
    fn default() -> Self {
        Phase3LossConfig { coarse_weight: 0.3, refined_weight: 0.7 }
    }
}

/// §9.3 `L₃ = λ_c·L₁(coarse_logits, y_S) + λ_r·L_refined(z, y_z) (+ anchor)`.
/// `coarse_logits (B,2,S,S)`, `target_s (B,S,S)`; `refined (B,M,M)` with `target_refined (B,M,M)` at the refined-loss
/// size (M = N: `nearest_target(y_S, N)`; M = S: `refined_S` with `y_S`). `anchor` is the already-weighted
/// `β·Σ(θ − θ₁)²` from [`weight_anchor`], if any.
/// Components: `coarse` (= `L_coarse`), `refined` (= `L_refined`), `anchor` (only when given), unweighted;
/// `aux`: `coarse_ce`, `coarse_dice`.
pub fn phase3_loss(
    coarse_logits: &Tensor,
    target_s: &Tensor,
    refined: &Tensor,
    target_refined: &Tensor,
    cfg: &Phase3LossConfig,
    anchor: Option<&Tensor>,
) -> Result<LossOutput> {
    let l1 = phase1_loss(coarse_logits, target_s)?;
    let lr = refined_loss(refined, target_refined)?;
    let mut total = (l1.total.affine(cfg.coarse_weight, 0.0)? + lr.affine(cfg.refined_weight, 0.0)?)?;
    let mut components = vec![("coarse".to_string(), l1.total.clone()), ("refined".to_string(), lr)];
    if let Some(a) = anchor {
        total = (total + a.to_dtype(coarse_logits.dtype())?)?;
        components.push(("anchor".to_string(), a.clone()));
    }
    let mut aux = Vec::new();
    for (n, t) in l1.components {
        aux.push((format!("coarse_{n}"), t.detach()));
    }
    Ok(LossOutput { total, components, aux })
}

/// Weight anchoring `β·Σ_θ (θ − θ₁)²` over `(current, snapshot)` pairs (the snapshots are plain tensors). Returns a
/// scalar; `β = 0` or no pairs gives a zero scalar on `device`.
pub fn weight_anchor(pairs: &[(&Tensor, &Tensor)], beta: f64, dtype: DType, device: &Device) -> Result<Tensor> {
    let mut acc = Tensor::zeros((), dtype, device)?;
    if beta == 0.0 {
        return Ok(acc);
    }
    for (cur, snap) in pairs {
        let d = cur.sub(&snap.detach().to_dtype(cur.dtype())?)?;
        acc = (acc + d.sqr()?.sum_all()?.to_dtype(dtype)?)?;
    }
    Ok(acc.affine(beta, 0.0)?)
}

/// `α·P + (1 − α)·detach(P)`: the value is `P`, the gradient arriving through it is scaled by `α`
/// (`--transunet-grad-scale`, applied only to the probability passed to the refiner, §9.3). `α = 1` returns `P`.
pub fn scale_refined_grad(p: &Tensor, alpha: f64) -> Result<Tensor> {
    if alpha == 1.0 {
        return Ok(p.clone());
    }
    Ok((p.affine(alpha, 0.0)? + p.detach().affine(1.0 - alpha, 0.0)?)?)
}

/// §0 nearest indices for one axis: `min(⌊o·n_in/n_out⌋, n_in − 1)` (exact integer arithmetic).
pub fn nearest_indices(n_in: usize, n_out: usize) -> Vec<u32> {
    (0..n_out).map(|o| ((o * n_in) / n_out).min(n_in - 1) as u32).collect()
}

/// Nearest resize of a target `(B,H,W)` to `(B,n,n)` with the §0 kernel (no gradient needed; targets only).
pub fn nearest_target(y: &Tensor, n: usize) -> Result<Tensor> {
    let (_, h, w) = y.dims3()?;
    let dev = y.device();
    let iy = Tensor::from_vec(nearest_indices(h, n), n, dev)?;
    let ix = Tensor::from_vec(nearest_indices(w, n), n, dev)?;
    Ok(y.detach().index_select(&iy, 1)?.index_select(&ix, 2)?.contiguous()?)
}

/// Mean over the last two dimensions, kept for callers that need per-sample pixel means.
pub fn mean_hw(x: &Tensor) -> Result<Tensor> {
    Ok(x.mean(D::Minus1)?.mean(D::Minus1)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn fd_check<F>(x0: &Tensor, f: F, n_probe: usize)
    where
        F: Fn(&Tensor) -> Result<Tensor>,
    {
        let v = Var::from_tensor(x0).unwrap();
        let out = f(v.as_tensor()).unwrap();
        let g = out.backward().unwrap();
        let grad: Vec<f64> = g.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = x0.flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-6;
        let step = (base.len() / n_probe).max(1);
        for i in (0..base.len()).step_by(step) {
            let mut p = base.clone();
            p[i] += eps;
            let mut m = base.clone();
            m[i] -= eps;
            let tp = Tensor::from_vec(p, x0.shape(), x0.device()).unwrap();
            let tm = Tensor::from_vec(m, x0.shape(), x0.device()).unwrap();
            let fp = scalar_f64(&f(&tp).unwrap()).unwrap();
            let fm = scalar_f64(&f(&tm).unwrap()).unwrap();
            let num = (fp - fm) / (2.0 * eps);
            assert!((num - grad[i]).abs() <= 1e-6 + 1e-5 * num.abs(), "index {i}: fd {num} vs autograd {}", grad[i]);
        }
    }

    fn randn(shape: &[usize], scale: f64, seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| (rng.gen::<f64>() * 2.0 - 1.0) * scale).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn binary(shape: &[usize], seed: u64) -> Tensor {
        randn(shape, 1.0, seed).gt(0.0).unwrap().to_dtype(DType::F64).unwrap()
    }

    #[test]
    fn stable_bce_extreme_logits() {
        let z = Tensor::new(&[-200.0f32, -20.0, 0.0, 20.0, 200.0], &Device::Cpu).unwrap();
        let t = Tensor::new(&[1.0f32, 0.0, 1.0, 1.0, 0.0], &Device::Cpu).unwrap();
        let l: Vec<f32> = bce_with_logits(&z, &t).unwrap().to_vec1().unwrap();
        assert!((l[0] - 200.0).abs() < 1e-3);
        assert!(l[1] < 1e-8 && l[1] >= 0.0);
        assert!((l[2] - std::f32::consts::LN_2).abs() < 1e-7);
        assert!((l[4] - 200.0).abs() < 1e-3);
        let v = Var::new(&[-200.0f32, 200.0], &Device::Cpu).unwrap();
        let tt = Tensor::new(&[1.0f32, 0.0], &Device::Cpu).unwrap();
        let g = bce_with_logits(v.as_tensor(), &tt).unwrap().sum_all().unwrap().backward().unwrap();
        let gv: Vec<f32> = g.get(v.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(gv, vec![-1.0, 1.0]);
    }

    #[test]
    fn fd_stable_bce() {
        let t = binary(&[2, 5, 5], 2);
        fd_check(&randn(&[2, 5, 5], 4.0, 1), |z| Ok(bce_with_logits(z, &t)?.mean_all()?), 50);
    }

    #[test]
    fn fd_phase1_loss() {
        let t = binary(&[2, 6, 6], 3);
        fd_check(&randn(&[2, 2, 6, 6], 3.0, 4), |z| phase1_loss(z, &t).map(|o| o.total), 40);
    }

    #[test]
    fn fd_dice_losses_and_change_penalty() {
        let g = binary(&[3, 6, 6], 5);
        let c = randn(&[3, 6, 6], 0.5, 6).affine(1.0, 0.5).unwrap();
        let (_, w) = change_penalty_weights(&c, &g).unwrap();
        fd_check(&randn(&[3, 6, 6], 3.0, 7), |z| dice_loss_per_sample(z, &g), 40);
        fd_check(&randn(&[3, 6, 6], 3.0, 8), |z| refined_loss(z, &g), 40);
        let w1 = Tensor::new(&[1.0f64, 0.5, 0.25], &Device::Cpu).unwrap();
        fd_check(&randn(&[3, 6, 6], 3.0, 9), |z| change_penalty(z, &c, &w1), 40);
        let _ = w;
        let cand = randn(&[3, 3, 6, 6], 2.0, 10);
        fd_check(&randn(&[3, 6, 6], 3.0, 11), |z| {
            let iou = Tensor::new(&[[0.1f64, 0.5, 0.9], [0.2, 0.3, 0.4], [0.9, 0.8, 0.7]], &Device::Cpu)?;
            phase2_loss(z, &g, &c, Some((&cand, &iou)), &Phase2LossConfig::default()).map(|o| o.total)
        }, 40);
    }

    #[test]
    fn iou_loss_gradient_reaches_predictions_only() {
        let g = binary(&[2, 4, 4], 12);
        let c = randn(&[2, 4, 4], 0.5, 13).affine(1.0, 0.5).unwrap();
        let cand = Var::from_tensor(&randn(&[2, 3, 4, 4], 2.0, 14)).unwrap();
        let pred = Var::from_tensor(&Tensor::new(&[[0.1f64, 0.5, 0.9], [0.2, 0.3, 0.4]], &Device::Cpu).unwrap()).unwrap();
        let z = randn(&[2, 4, 4], 1.0, 15);
        let out =
            phase2_loss(&z, &g, &c, Some((cand.as_tensor(), pred.as_tensor())), &Phase2LossConfig::default()).unwrap();
        let gs = out.total.backward().unwrap();
        assert!(gs.get(cand.as_tensor()).is_none(), "IoU target must be a constant");
        let gp: Vec<Vec<f64>> = gs.get(pred.as_tensor()).unwrap().to_vec2().unwrap();
        let tgt: Vec<Vec<f64>> = iou_targets(cand.as_tensor(), &g).unwrap().to_vec2().unwrap();
        let p: Vec<Vec<f64>> = pred.as_tensor().to_vec2().unwrap();
        for b in 0..2 {
            for k in 0..3 {
                let want = 2.0 * (p[b][k] - tgt[b][k]) / 6.0;
                assert!((gp[b][k] - want).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn grad_scale_only_scales_gradient() {
        let p = Var::new(&[0.2f64, 0.7], &Device::Cpu).unwrap();
        let s = scale_refined_grad(p.as_tensor(), 0.25).unwrap();
        let v: Vec<f64> = s.to_vec1().unwrap();
        assert!((v[0] - 0.2).abs() < 1e-15 && (v[1] - 0.7).abs() < 1e-15);
        let g = s.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gv: Vec<f64> = g.get(p.as_tensor()).unwrap().to_vec1().unwrap();
        assert!((gv[0] - 0.25 * 0.4).abs() < 1e-15 && (gv[1] - 0.25 * 1.4).abs() < 1e-15);
    }

    #[test]
    fn anchor_sum_of_squares() {
        let a = Var::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
        let snap = Tensor::new(&[0.5f64, 2.5], &Device::Cpu).unwrap();
        let l = weight_anchor(&[(a.as_tensor(), &snap)], 2.0, DType::F64, &Device::Cpu).unwrap();
        assert!((scalar_f64(&l).unwrap() - 1.0).abs() < 1e-15);
        let z = weight_anchor(&[(a.as_tensor(), &snap)], 0.0, DType::F64, &Device::Cpu).unwrap();
        assert_eq!(scalar_f64(&z).unwrap(), 0.0);
    }

    #[test]
    fn nearest_index_rule() {
        assert_eq!(nearest_indices(28, 128)[..6], [0, 0, 0, 0, 0, 1]);
        assert_eq!(*nearest_indices(28, 128).last().unwrap(), 27);
        assert_eq!(nearest_indices(4, 2), vec![0, 2]);
    }
}
