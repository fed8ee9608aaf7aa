//! Differentiable prompt generation from a soft coarse mask (SPEC §7.2, §7.3, §7.6).
//!
//! Every function works on `P = coarse_n` of shape `(B, N, N)` (probabilities in `[0, 1]` on the SAM input grid) and
//! is built from differentiable candle ops only, in the dtype of `P` (f32 in training, f64 in gradient checks):
//! moments go through row/column marginals (two-level sums, SPEC §7.2 / §16.4), the negative corner is chosen by a
//! host-side argmax (no gradient) and then taken with `index_select`, so its coordinates keep their gradient through
//! the box. All coordinates are index coordinates of the `N×N` grid (pixel (i, j) is the point (x = j, y = i)).
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use std::fmt;
use std::str::FromStr;

/// `ε` added to the weight sums (SPEC §7.2).
pub const WEIGHT_EPS: f64 = 1e-6;
/// `ε` added inside the square root of the box standard deviation (SPEC §7.2).
pub const SIGMA_EPS: f64 = 1e-6;
/// Scale of the mask-prompt logits: `L = (2P − 1)·10` (SPEC §7.3).
pub const MASK_LOGIT_SCALE: f64 = 10.0;

/// Mask-prompt style (`--mask-prompt-style`, SPEC §7.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MaskPromptStyle {
    /// `L = (2P − 1)·10`.
    Direct,
    /// Zero-padded Gaussian blur (k = max(3, 2⌊N/64⌋+1), σ = k/3) before the logit map.
    Gaussian,
    /// Iterated 5×5 mean/sigmoid "distance-like" weighting (optional extension of SPEC §7.3).
    Distance,
}

impl MaskPromptStyle {
    /// The canonical lower-case name (as in the CLI flag and the `best_sam.json` sidecar).
    pub fn as_str(&self) -> &'static str {
        match self {
            MaskPromptStyle::Direct => "direct",
            MaskPromptStyle::Gaussian => "gaussian",
            MaskPromptStyle::Distance => "distance",
        }
    }
}

impl fmt::Display for MaskPromptStyle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MaskPromptStyle {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "direct" => Ok(MaskPromptStyle::Direct),
            "gaussian" => Ok(MaskPromptStyle::Gaussian),
            "distance" => Ok(MaskPromptStyle::Distance),
            other => Err(Error::Config(format!(
                "mask prompt style `{other}` is unknown (expected `direct`, `gaussian` or `distance`)"
            ))),
        }
    }
}

/// Which prompts to build and their geometry constants (SPEC §7.2–§7.3).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptConfig {
    /// Positive point (`--no-point-prompt` disables it).
    pub use_point: bool,
    /// Box (`--no-box-prompt`).
    pub use_box: bool,
    /// Dense mask prompt (`--no-mask-prompt`).
    pub use_mask: bool,
    /// Negative point at the farthest box corner; only used when both the point and the box prompt are on.
    pub add_negative_point: bool,
    /// `2.5` in `c ± 2.5σ ± margin`.
    pub box_sigma_k: f64,
    /// Margin in pixels of the `N` grid (`5`).
    pub box_margin: f64,
    pub mask_style: MaskPromptStyle,
}

impl Default for PromptConfig {
    fn default() -> Self {
        Self {
            use_point: true,
            use_box: true,
            use_mask: true,
            add_negative_point: true,
            box_sigma_k: 2.5,
            box_margin: 5.0,
            mask_style: MaskPromptStyle::Direct,
        }
    }
}

impl PromptConfig {
    /// Whether the negative point is produced (needs the positive point, the box and the flag).
    pub fn negative_point_active(&self) -> bool {
        self.use_point && self.use_box && self.add_negative_point
    }
}

/// The prompts of one batch, ready for the SAM prompt encoder (SPEC §7.2 order).
#[derive(Debug, Clone)]
pub struct Prompts {
    /// `(B, K, 2)` point coordinates `[x, y]`: `[positive]` or `[positive, negative]`. `None` without point prompt.
    /// SAM's padding point (no box, SPEC §6.3) is **not** included: the prompt encoder appends it.
    pub points: Option<Tensor>,
    /// `(B, K)` labels in the dtype of `P`: 1 positive, 0 negative.
    pub labels: Option<Tensor>,
    /// `(B, 4)` box `[x1, y1, x2, y2]`; `None` without box prompt.
    pub boxes: Option<Tensor>,
    /// `(B, 1, M, M)` mask-prompt logits; `None` without mask prompt.
    pub mask: Option<Tensor>,
    /// Chosen corner per sample (0 TL, 1 TR, 2 BL, 3 BR) when the negative point is active.
    pub negative_corner: Option<Vec<u32>>,
}

fn check_pmap(what: &str, p: &Tensor) -> Result<(usize, usize, usize)> {
    let (b, h, w) = p.dims3().map_err(|_| {
        Error::Arg(format!(
            "{what}: expected a (B, N, N) probability map, got shape {:?}",
            p.dims()
        ))
    })?;
    if h == 0 || w == 0 {
        return Err(Error::Arg(format!(
            "{what}: empty probability map {:?}",
            p.dims()
        )));
    }
    if !matches!(p.dtype(), DType::F32 | DType::F64) {
        return Err(Error::Arg(format!(
            "{what}: probability map must be f32 or f64, got {:?}",
            p.dtype()
        )));
    }
    Ok((b, h, w))
}

/// Index coordinate vector `0, 1, …, n−1` as a `(1, n)` tensor in the dtype/device of `like`.
pub(crate) fn coord_row(n: usize, like: &Tensor) -> Result<Tensor> {
    let v: Vec<f64> = (0..n).map(|i| i as f64).collect();
    Ok(Tensor::from_vec(v, (1, n), like.device())?.to_dtype(like.dtype())?)
}

/// Marginals of a `(B, H, W)` map: column sums `p_x (B, W)` (`Σ_i`) and row sums `p_y (B, H)` (`Σ_j`).
fn marginals(w: &Tensor) -> Result<(Tensor, Tensor)> {
    Ok((w.sum(1)?, w.sum(2)?))
}

/// Weighted first moments `(Σw, ΣwX, ΣwY)` through marginals, each `(B,)`.
fn moments(w: &Tensor) -> Result<(Tensor, Tensor, Tensor, Tensor, Tensor)> {
    let (_, h, wd) = w.dims3()?;
    let (px, py) = marginals(w)?;
    let xs = coord_row(wd, w)?;
    let ys = coord_row(h, w)?;
    let total = px.sum(1)?;
    let sx = px.broadcast_mul(&xs)?.sum(1)?;
    let sy = py.broadcast_mul(&ys)?.sum(1)?;
    Ok((total, sx, sy, px, py))
}

/// Positive point: `P²`-weighted soft-argmax `[x⁺, y⁺]`, shape `(B, 2)` (SPEC §7.2).
pub fn positive_point(p: &Tensor) -> Result<Tensor> {
    check_pmap("positive_point", p)?;
    let w = p.sqr()?;
    let (total, sx, sy, _, _) = moments(&w)?;
    let sw = (total + WEIGHT_EPS)?;
    let x = sx.div(&sw)?;
    let y = sy.div(&sw)?;
    Ok(Tensor::stack(&[x, y], 1)?)
}

/// Box `[x1, y1, x2, y2]` `(B, 4)`: P-weighted centre ± `k·σ` ± `margin`, `x1, y1` clamped at ≥ 0 and `x2, y2` at
/// ≤ N−1 (one-sided clamps, SPEC §7.2).
pub fn soft_box(p: &Tensor, sigma_k: f64, margin: f64) -> Result<Tensor> {
    let (_, h, w) = check_pmap("soft_box", p)?;
    let [cx, cy, sx_, sy_] = center_sigma(p)?;
    let half_x = sx_.affine(sigma_k, margin)?;
    let half_y = sy_.affine(sigma_k, margin)?;
    let x1 = cx.sub(&half_x)?.maximum(0.0)?;
    let y1 = cy.sub(&half_y)?.maximum(0.0)?;
    let x2 = cx.add(&half_x)?.minimum((w - 1) as f64)?;
    let y2 = cy.add(&half_y)?.minimum((h - 1) as f64)?;
    Ok(Tensor::stack(&[x1, y1, x2, y2], 1)?)
}

/// `[c_x, c_y, σ_x, σ_y]`, each `(B,)`: the `P`-weighted centre and standard deviations of SPEC §7.2
/// (`S_p = ΣP + 1e-6`, `σ = sqrt(Σ P·(X − c)² / S_p + 1e-6)`), through marginals. Shared by the box prompt and the
/// ROI box (§7.7).
pub fn center_sigma(p: &Tensor) -> Result<[Tensor; 4]> {
    let (_, h, w) = check_pmap("center_sigma", p)?;
    let (total, sx, sy, px, py) = moments(p)?;
    let sp = (total + WEIGHT_EPS)?;
    let cx = sx.div(&sp)?;
    let cy = sy.div(&sp)?;
    // Σ P·(X − c)² = Σ_j p_x[j]·(j − c_x)² (marginal form).
    let sigma = |marg: &Tensor, c: &Tensor, n: usize| -> Result<Tensor> {
        let d = coord_row(n, p)?.broadcast_sub(&c.unsqueeze(1)?)?;
        let var = marg.mul(&d.sqr()?)?.sum(1)?.div(&sp)?;
        Ok((var + SIGMA_EPS)?.sqrt()?)
    };
    let sx_ = sigma(&px, &cx, w)?;
    let sy_ = sigma(&py, &cy, h)?;
    Ok([cx, cy, sx_, sy_])
}

/// Box corners stacked as `(B, 4, 2)` in the order TL, TR, BL, BR.
pub fn box_corners(boxes: &Tensor) -> Result<Tensor> {
    let c = |i: usize| boxes.narrow(1, i, 1);
    let (x1, y1, x2, y2) = (c(0)?, c(1)?, c(2)?, c(3)?);
    let tl = Tensor::cat(&[&x1, &y1], 1)?;
    let tr = Tensor::cat(&[&x2, &y1], 1)?;
    let bl = Tensor::cat(&[&x1, &y2], 1)?;
    let br = Tensor::cat(&[&x2, &y2], 1)?;
    Ok(Tensor::stack(&[tl, tr, bl, br], 1)?)
}

/// Negative point: the box corner farthest (Euclidean) from the positive point. The choice is an argmax without
/// gradient (first corner wins ties); the corner is then gathered with `index_select`, so its coordinates stay
/// differentiable through the box. Returns `((B, 2), chosen corner indices)`.
pub fn negative_point(boxes: &Tensor, positive: &Tensor) -> Result<(Tensor, Vec<u32>)> {
    let (b, four) = boxes.dims2()?;
    if four != 4 || positive.dims() != [b, 2] {
        return Err(Error::Arg(format!(
            "negative_point: expected boxes (B,4) and positive (B,2), got {:?} and {:?}",
            boxes.dims(),
            positive.dims()
        )));
    }
    let corners = box_corners(boxes)?; // (B,4,2)
    let dist = corners
        .detach()
        .broadcast_sub(&positive.detach().unsqueeze(1)?)?
        .sqr()?
        .sum(2)?
        .sqrt()?; // (B,4)
    let dist: Vec<Vec<f64>> = dist.to_dtype(DType::F64)?.to_vec2()?;
    let mut chosen = Vec::with_capacity(b);
    let mut flat = Vec::with_capacity(b);
    for (i, row) in dist.iter().enumerate() {
        let mut k = 0usize;
        for (j, v) in row.iter().enumerate() {
            // Strict comparison: the first maximum wins ties; a NaN never wins.
            if *v > row[k] {
                k = j;
            }
        }
        chosen.push(k as u32);
        flat.push((i * 4 + k) as u32);
    }
    let idx = Tensor::from_vec(flat, b, boxes.device())?;
    let neg = corners.reshape((b * 4, 2))?.index_select(&idx, 0)?;
    Ok((neg, chosen))
}

/// Optional sharpening of the coarse probability: `σ((P − 0.5)·T)` (SPEC §7.3; applied at `S`, before §7.1).
pub fn sharpen(p: &Tensor, temperature: f64) -> Result<Tensor> {
    crate::nn::sigmoid(&p.affine(temperature, -0.5 * temperature)?)
}

/// Normalised 1-D Gaussian of the `gaussian` style for grid size `n`: `k = max(3, 2⌊n/64⌋+1)`, `σ = k/3`.
pub fn gaussian_kernel_1d(n: usize) -> Vec<f64> {
    let k = (2 * (n / 64) + 1).max(3);
    let sigma = k as f64 / 3.0;
    let c = (k as f64 - 1.0) / 2.0;
    let g: Vec<f64> = (0..k)
        .map(|t| (-((t as f64 - c).powi(2)) / (2.0 * sigma * sigma)).exp())
        .collect();
    let s: f64 = g.iter().sum();
    g.into_iter().map(|v| v / s).collect()
}

/// Zero-padded 1-D correlation of a `(B, H, W)` map along `dim` (1 or 2) with an odd kernel (`same` size), built
/// from shifted slices (differentiable, no im2col buffer). Kernel values are cast to the map's dtype.
fn conv1d_same(x: &Tensor, dim: usize, kernel: &[f64]) -> Result<Tensor> {
    let k = kernel.len();
    let half = k / 2;
    let n = x.dim(dim)?;
    let xp = x.pad_with_zeros(dim, half, half)?;
    let mut acc: Option<Tensor> = None;
    for (t, &g) in kernel.iter().enumerate() {
        // Round the weight to the map dtype first (the reference builds its kernel in that dtype).
        let g = if x.dtype() == DType::F32 {
            g as f32 as f64
        } else {
            g
        };
        let term = xp.narrow(dim, t, n)?.affine(g, 0.0)?;
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    acc.ok_or_else(|| Error::msg("conv1d_same: empty kernel"))
}

/// Separable zero-padded Gaussian blur of `(B, N, N)` (SPEC §7.3 `gaussian`, `Q`).
pub fn gaussian_blur(p: &Tensor) -> Result<Tensor> {
    let (_, h, w) = check_pmap("gaussian_blur", p)?;
    let g = gaussian_kernel_1d(h.max(w));
    let q = conv1d_same(p, 1, &g)?;
    conv1d_same(&q, 2, &g)
}

/// The `distance` style map `C = P·(0.5 + 0.5·D)` (SPEC §7.3, optional extension).
fn distance_weighting(p: &Tensor) -> Result<Tensor> {
    let box5 = [0.2f64; 5];
    let mut u = p.clone();
    let mut d = p.zeros_like()?;
    for _ in 0..5 {
        let avg = conv1d_same(&conv1d_same(&u, 1, &box5)?, 2, &box5)?;
        let e = crate::nn::sigmoid(&avg.affine(10.0, -5.0)?)?;
        d = (d + &e)?;
        u = e;
    }
    let d = d.affine(0.2, 0.0)?;
    Ok(p.mul(&d.affine(0.5, 0.5)?)?)
}

/// Mask prompt `(B, 1, M, M)` logits from `P (B, N, N)`: the style's map, `L = (2·map − 1)·10`, then
/// `bilinear(ac=false)` to `M×M` (SPEC §7.3).
pub fn mask_prompt(p: &Tensor, style: MaskPromptStyle, m: usize) -> Result<Tensor> {
    check_pmap("mask_prompt", p)?;
    let map = match style {
        MaskPromptStyle::Direct => p.clone(),
        MaskPromptStyle::Gaussian => gaussian_blur(p)?,
        MaskPromptStyle::Distance => distance_weighting(p)?,
    };
    let logits = map
        .affine(2.0 * MASK_LOGIT_SCALE, -MASK_LOGIT_SCALE)?
        .unsqueeze(1)?;
    crate::nn::resize_bilinear(&logits.contiguous()?, m, m, false)
}

/// All prompts of SPEC §7.2–§7.3 for `P = coarse_n (B, N, N)`; the mask prompt has side `m` (`4·N/16`).
pub fn extract_prompts(p: &Tensor, cfg: &PromptConfig, m: usize) -> Result<Prompts> {
    let (b, _, _) = check_pmap("extract_prompts", p)?;
    let boxes = if cfg.use_box {
        Some(soft_box(p, cfg.box_sigma_k, cfg.box_margin)?)
    } else {
        None
    };
    let (points, labels, negative_corner) = if cfg.use_point {
        let pos = positive_point(p)?;
        match (&boxes, cfg.add_negative_point) {
            (Some(bx), true) => {
                let (neg, chosen) = negative_point(bx, &pos)?;
                let pts = Tensor::stack(&[pos, neg], 1)?; // (B,2,2)
                let lab = Tensor::from_vec([1f64, 0.0].repeat(b), (b, 2), p.device())?
                    .to_dtype(p.dtype())?;
                (Some(pts), Some(lab), Some(chosen))
            }
            _ => {
                let pts = pos.unsqueeze(1)?; // (B,1,2)
                let lab = Tensor::ones((b, 1), p.dtype(), p.device())?;
                (Some(pts), Some(lab), None)
            }
        }
    } else {
        (None, None, None)
    };
    let mask = if cfg.use_mask {
        Some(mask_prompt(p, cfg.mask_style, m)?)
    } else {
        None
    };
    Ok(Prompts {
        points,
        labels,
        boxes,
        mask,
        negative_corner,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    const STYLES: [MaskPromptStyle; 3] = [
        MaskPromptStyle::Direct,
        MaskPromptStyle::Gaussian,
        MaskPromptStyle::Distance,
    ];

    /// A smooth asymmetric soft blob on an `n×n` grid (f64), away from the borders.
    fn blob(n: usize) -> Vec<f64> {
        let mut v = vec![0.0; n * n];
        for i in 0..n {
            for j in 0..n {
                let (y, x) = (i as f64 / n as f64, j as f64 / n as f64);
                let d = ((x - 0.45) / 0.22).powi(2) + ((y - 0.55) / 0.15).powi(2);
                let ramp = 0.6 + 0.4 * x;
                v[i * n + j] = ramp * (1.0 / (1.0 + (6.0 * (d - 1.0)).exp()));
            }
        }
        v
    }

    fn scalars(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// A scalar combining every prompt output with fixed pseudo-random weights.
    fn objective(p: &Tensor, style: MaskPromptStyle, m: usize) -> Result<Tensor> {
        let cfg = PromptConfig {
            mask_style: style,
            ..PromptConfig::default()
        };
        let pr = extract_prompts(p, &cfg, m)?;
        let mut parts = vec![
            pr.points.unwrap().flatten_all()?,
            pr.boxes.unwrap().flatten_all()?,
        ];
        parts.push(pr.mask.unwrap().flatten_all()?.affine(0.05, 0.0)?);
        let all = Tensor::cat(&parts, 0)?;
        let n = all.dim(0)?;
        let w: Vec<f64> = (0..n)
            .map(|i| ((i * 7919 % 17) as f64 - 8.0) / 8.0)
            .collect();
        let w = Tensor::from_vec(w, n, p.device())?.to_dtype(p.dtype())?;
        Ok(all.mul(&w)?.sum_all()?)
    }

    #[test]
    fn style_names_round_trip() -> Result<()> {
        for s in STYLES {
            assert_eq!(s.as_str().parse::<MaskPromptStyle>()?, s);
        }
        assert!("blurry".parse::<MaskPromptStyle>().is_err());
        Ok(())
    }

    #[test]
    fn gaussian_kernel_size_and_sigma() {
        assert_eq!(gaussian_kernel_1d(1024).len(), 33);
        assert_eq!(gaussian_kernel_1d(256).len(), 9);
        assert_eq!(gaussian_kernel_1d(64).len(), 3);
        assert_eq!(gaussian_kernel_1d(24).len(), 3);
        let g = gaussian_kernel_1d(1024);
        assert!((g.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        // σ = 11: g[16±11]/g[16] = e^{-1/2}.
        assert!((g[27] / g[16] - (-0.5f64).exp()).abs() < 1e-12);
    }

    /// Closed-form prompts of a uniform rectangle (hand-computed moments).
    #[test]
    fn rectangle_prompts_closed_form() -> Result<()> {
        let n = 64;
        let mut v = vec![0f64; n * n];
        for i in 20..30 {
            for j in 10..40 {
                v[i * n + j] = 1.0;
            }
        }
        let p = Tensor::from_vec(v, (1, n, n), &Device::Cpu)?;
        let pos = scalars(&positive_point(&p)?);
        assert!(
            (pos[0] - 24.5).abs() < 1e-6 && (pos[1] - 24.5).abs() < 1e-6,
            "{pos:?}"
        );
        let bx = scalars(&soft_box(&p, 2.5, 5.0)?);
        // σ² of a discrete uniform on L consecutive integers = (L² − 1)/12.
        let sx = ((900.0 - 1.0) / 12.0 + 1e-6f64).sqrt();
        let sy = ((100.0 - 1.0) / 12.0 + 1e-6f64).sqrt();
        let want = [
            24.5 - 2.5 * sx - 5.0,
            24.5 - 2.5 * sy - 5.0,
            24.5 + 2.5 * sx + 5.0,
            24.5 + 2.5 * sy + 5.0,
        ];
        let want = [
            want[0].max(0.0),
            want[1].max(0.0),
            want[2].min(63.0),
            want[3].min(63.0),
        ];
        for k in 0..4 {
            assert!(
                (bx[k] - want[k]).abs() < 1e-5,
                "box[{k}] {} vs {}",
                bx[k],
                want[k]
            );
        }
        Ok(())
    }

    /// SPEC §7.6: all-zero P gives pos (0,0), box ≈ [0,0,5.0025,5.0025], negative = BR, direct logits −10, and
    /// finite values and gradients for every style; all-one P is finite too.
    #[test]
    fn degenerate_masks_are_finite() -> Result<()> {
        let n = 64;
        let dev = Device::Cpu;
        for dt in [DType::F32, DType::F64] {
            let zero = Tensor::zeros((1, n, n), dt, &dev)?;
            let pr = extract_prompts(&zero, &PromptConfig::default(), 16)?;
            let pts = scalars(pr.points.as_ref().unwrap());
            let bx = scalars(pr.boxes.as_ref().unwrap());
            assert_eq!(&pts[..2], &[0.0, 0.0]);
            assert_eq!(pr.negative_corner.as_deref(), Some(&[3u32][..]));
            let e = 5.0 + 2.5 * 1e-3;
            for (k, w) in [0.0, 0.0, e, e].iter().enumerate() {
                assert!((bx[k] - w).abs() < 1e-4, "zero box[{k}] = {}", bx[k]);
            }
            assert!(
                (pts[2] - e).abs() < 1e-4 && (pts[3] - e).abs() < 1e-4,
                "negative {pts:?}"
            );
            assert!(scalars(pr.mask.as_ref().unwrap())
                .iter()
                .all(|v| (*v + 10.0).abs() < 1e-5));
            for fill in [0.0, 1.0] {
                for style in STYLES {
                    let var =
                        Var::from_tensor(&Tensor::full(fill, (2, n, n), &dev)?.to_dtype(dt)?)?;
                    let f = objective(var.as_tensor(), style, 16)?;
                    assert!(
                        scalars(&f)[0].is_finite(),
                        "{style} fill {fill}: objective not finite"
                    );
                    let g = f.backward()?;
                    let g = g.get(var.as_tensor()).expect("gradient reaches P");
                    assert!(
                        scalars(g).iter().all(|v| v.is_finite()),
                        "{style} fill {fill} {dt:?}: gradient not finite"
                    );
                }
            }
        }
        Ok(())
    }

    /// Finite differences (f64, central) of the prompt generator: point, box, negative corner and every mask style
    /// (SPEC §16.5).
    #[test]
    fn prompt_generator_finite_differences() -> Result<()> {
        let n = 48;
        let dev = Device::Cpu;
        let base = blob(n);
        // No clamp may sit within reach of the finite-difference step.
        let pt = Tensor::from_vec(base.clone(), (1, n, n), &dev)?;
        let c = scalars(&soft_box(&pt, 0.0, 0.0)?);
        let cs = scalars(&soft_box(&pt, 1.0, 0.0)?);
        for k in 0..4 {
            let unclamped = c[k] + 2.5 * (cs[k] - c[k]) + if k < 2 { -5.0 } else { 5.0 };
            let bound = if k < 2 { 0.0 } else { (n - 1) as f64 };
            assert!(
                (unclamped - bound).abs() > 0.1,
                "box[{k}] = {unclamped} is too close to its clamp"
            );
        }
        for style in STYLES {
            let var = Var::from_tensor(&Tensor::from_vec(base.clone(), (1, n, n), &dev)?)?;
            let g = objective(var.as_tensor(), style, 12)?.backward()?;
            let g = scalars(g.get(var.as_tensor()).unwrap());
            let h = 1e-6;
            for idx in [
                0usize,
                3 * n + 5,
                10 * n + 11,
                13 * n + 8,
                15 * n + 16,
                n * n - 1,
                12 * n + 2,
            ] {
                let f = |d: f64| -> Result<f64> {
                    let mut v = base.clone();
                    v[idx] += d;
                    Ok(scalars(&objective(
                        &Tensor::from_vec(v, (1, n, n), &dev)?,
                        style,
                        12,
                    )?)[0])
                };
                let fd = (f(h)? - f(-h)?) / (2.0 * h);
                assert!(
                    (fd - g[idx]).abs() <= 1e-6 * (1.0 + fd.abs()),
                    "{style} pixel {idx}: finite difference {fd} vs analytic {}",
                    g[idx]
                );
            }
        }
        Ok(())
    }

    /// The negative corner is differentiable through the box (index_select keeps the graph).
    #[test]
    fn negative_point_keeps_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let bx = Var::from_tensor(&Tensor::new(
            &[[1.0f64, 2.0, 10.0, 12.0], [0.0, 0.0, 5.0, 5.0]],
            &dev,
        )?)?;
        let pos = Tensor::new(&[[3.0f64, 3.0], [4.9, 4.9]], &dev)?;
        let (neg, k) = negative_point(bx.as_tensor(), &pos)?;
        assert_eq!(k, vec![3, 0]);
        assert_eq!(scalars(&neg), vec![10.0, 12.0, 0.0, 0.0]);
        let g = neg.sum_all()?.backward()?;
        assert_eq!(
            scalars(g.get(bx.as_tensor()).unwrap()),
            vec![0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]
        );
        Ok(())
    }

    #[test]
    fn prompt_flags_shape_the_output() -> Result<()> {
        let n = 32;
        let p = Tensor::from_vec(blob(n), (1, n, n), &Device::Cpu)?;
        let no_box = PromptConfig {
            use_box: false,
            ..PromptConfig::default()
        };
        let pr = extract_prompts(&p, &no_box, 8)?;
        assert_eq!(pr.points.unwrap().dims(), &[1, 1, 2]);
        assert!(pr.boxes.is_none() && pr.negative_corner.is_none());
        let no_neg = PromptConfig {
            add_negative_point: false,
            ..PromptConfig::default()
        };
        let pr = extract_prompts(&p, &no_neg, 8)?;
        assert_eq!(pr.points.unwrap().dims(), &[1, 1, 2]);
        assert_eq!(scalars(&pr.labels.unwrap()), vec![1.0]);
        let full = extract_prompts(&p, &PromptConfig::default(), 8)?;
        assert_eq!(full.points.unwrap().dims(), &[1, 2, 2]);
        assert_eq!(scalars(&full.labels.unwrap()), vec![1.0, 0.0]);
        assert_eq!(full.mask.unwrap().dims(), &[1, 1, 8, 8]);
        let no_pts = PromptConfig {
            use_point: false,
            use_mask: false,
            ..PromptConfig::default()
        };
        let pr = extract_prompts(&p, &no_pts, 8)?;
        assert!(
            pr.points.is_none() && pr.labels.is_none() && pr.mask.is_none() && pr.boxes.is_some()
        );
        Ok(())
    }
}
