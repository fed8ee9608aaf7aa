//! ROI-crop refinement (SPEC §7.7, `--use-roi-crop`, `--roi-expand-ratio r`).
//!
//! The refiner looks at an enlarged crop around the coarse lesion instead of the whole image:
//! 1. [`roi_box`]: `c, σ` of `P = coarse_n` as in §7.2 (no margin), half-extent `2.5σ`, each side expanded by
//!    `r·size`, a minimum size of 64 px (`c ∓ 32`), clamped to `[0, N−1]`;
//! 2. [`crop`]: a differentiable affine bilinear sampler (zeros outside): output pixel `j` samples the input index
//!    coordinate `x1 − 0.5 + (j + 0.5)(x2 − x1)/n_out`;
//! 3. the refiner runs on the crop (embeddings, prompts, SAM, soft selection) → crop logits `z_c`;
//! 4. [`paste`] back: full pixel `i` samples the crop coordinate `(i + 0.5 − x1)·n_crop/(x2 − x1 + 1e-6) − 0.5`;
//!    [`window`] `ω` and [`blend`]: `ω·z_p + (1 − ω)·logit(clamp(coarse_n, 1e-4, 1 − 1e-4))`.
//!
//! Gradients: everything here is differentiable, including the box coordinates (SPEC §7 marks no ROI step
//! *no gradient*): the crop and paste samplers are differentiable in their input **and** in the sampling positions
//! (the bilinear weights are `s − ⌊s⌋`, `⌊s⌋` is taken on the host without gradient), and `ω` depends on the box.
//! Only the crop of the SAM *image* uses a detached box, because the image never carries a gradient (§7.1) and the
//! frozen encoder detaches its input anyway.
//!
//! The samplers are built like [`crate::nn::resize_bilinear`]: per axis two `index_select`s and a lerp (backward
//! through `index_add`), here with per-sample taps; no `scatter`, no `upsample_bilinear2d` (§16).
use crate::refiner::prompts::{center_sigma, coord_row};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// Default `--roi-expand-ratio`.
pub const DEFAULT_EXPAND_RATIO: f64 = 0.2;
/// `k` of the half-extent `k·σ`.
pub const ROI_SIGMA_K: f64 = 2.5;
/// Minimum ROI side in pixels of the `N` grid (smaller boxes become `c ∓ 32`).
pub const ROI_MIN_SIZE: f64 = 64.0;
/// Slope of the soft window `σ(5·(X − x1))…`.
pub const WINDOW_SLOPE: f64 = 5.0;
/// `ε` of the paste-back scale `n_crop / (x2 − x1 + ε)`.
pub const PASTE_EPS: f64 = 1e-6;
/// Clamp of the coarse probability before its logit: `[1e-4, 1 − 1e-4]`.
pub const COARSE_CLAMP: f64 = 1e-4;

/// Checks an expand ratio (`--roi-expand-ratio`): finite and ≥ 0.
pub fn check_expand_ratio(r: f64) -> Result<()> {
    if !r.is_finite() || r < 0.0 {
        return Err(Error::Config(format!(
            "roi_expand_ratio must be a finite number ≥ 0, got {r}"
        )));
    }
    Ok(())
}

/// ROI boxes `(B, 4)` `[x1, y1, x2, y2]` (index coordinates of the `N×N` grid) from `coarse_n (B, N, N)`
/// (SPEC §7.7.1). Expanding each side of the `2·2.5σ` box by `r·size` gives the half-extent `2.5σ(1 + 2r)`; a side
/// below 64 px becomes `c ∓ 32` (the expanded box's midpoint is `c`), i.e. half-extent `max(2.5σ(1 + 2r), 32)`;
/// then `x1, y1 ≥ 0` and `x2, y2 ≤ N − 1`. Differentiable in `coarse_n`.
pub fn roi_box(coarse_n: &Tensor, expand_ratio: f64) -> Result<Tensor> {
    check_expand_ratio(expand_ratio)?;
    let (_, h, w) = coarse_n.dims3().map_err(|_| {
        Error::Arg(format!(
            "roi_box: expected a (B, N, N) probability map, got {:?}",
            coarse_n.dims()
        ))
    })?;
    let [cx, cy, sx, sy] = center_sigma(coarse_n)?;
    let k = ROI_SIGMA_K * (1.0 + 2.0 * expand_ratio);
    let half_x = sx.affine(k, 0.0)?.maximum(ROI_MIN_SIZE / 2.0)?;
    let half_y = sy.affine(k, 0.0)?.maximum(ROI_MIN_SIZE / 2.0)?;
    let x1 = cx.sub(&half_x)?.maximum(0.0)?;
    let y1 = cy.sub(&half_y)?.maximum(0.0)?;
    let x2 = cx.add(&half_x)?.minimum((w - 1) as f64)?;
    let y2 = cy.add(&half_y)?.minimum((h - 1) as f64)?;
    Ok(Tensor::stack(&[x1, y1, x2, y2], 1)?)
}

fn check_boxes(what: &str, boxes: &Tensor, b: usize) -> Result<()> {
    if boxes.dims() != [b, 4] {
        return Err(Error::Arg(format!(
            "{what}: expected boxes (B = {b}, 4), got {:?}",
            boxes.dims()
        )));
    }
    Ok(())
}

/// Column `k` of `(B, 4)` boxes as `(B, 1)`.
fn col(boxes: &Tensor, k: usize) -> Result<Tensor> {
    Ok(boxes.narrow(1, k, 1)?)
}

/// A `(1, n)` row `f(0), …, f(n−1)` in the dtype and on the device of `like`.
fn row(n: usize, like: &Tensor, f: impl Fn(usize) -> f64) -> Result<Tensor> {
    let v: Vec<f64> = (0..n).map(f).collect();
    Ok(Tensor::from_vec(v, (1, n), &Device::Cpu)?
        .to_dtype(like.dtype())?
        .to_device(like.device())?)
}

/// Crop sampling positions `(B, n_out)`: `lo − 0.5 + (j + 0.5)·(hi − lo)/n_out` for `lo, hi (B, 1)`.
fn crop_positions(lo: &Tensor, hi: &Tensor, n_out: usize) -> Result<Tensor> {
    let t = row(n_out, lo, |j| (j as f64 + 0.5) / n_out as f64)?;
    Ok(hi
        .sub(lo)?
        .broadcast_mul(&t)?
        .broadcast_add(&lo.affine(1.0, -0.5)?)?)
}

/// Paste-back positions `(B, n_out)` in crop coordinates: `(i + 0.5 − lo)·n_crop/(hi − lo + 1e-6) − 0.5`.
fn paste_positions(lo: &Tensor, hi: &Tensor, n_out: usize, n_crop: usize) -> Result<Tensor> {
    let i = row(n_out, lo, |i| i as f64 + 0.5)?;
    let scale = hi
        .sub(lo)?
        .affine(1.0, PASTE_EPS)?
        .recip()?
        .affine(n_crop as f64, 0.0)?;
    Ok(i.broadcast_sub(lo)?
        .broadcast_mul(&scale)?
        .affine(1.0, -0.5)?)
}

/// Per-sample linear resampling along axis 1 of `x (B, L, R)` at positions `pos (B, n)` (index coordinates):
/// `y[b, o] = (1 − f)·x[b, ⌊s⌋]·[⌊s⌋ inside] + f·x[b, ⌊s⌋ + 1]·[⌊s⌋ + 1 inside]`, `f = s − ⌊s⌋` (zeros outside
/// `[0, L − 1]`, as `grid_sample` with zero padding). Differentiable in `x` and in `pos`.
pub fn sample_rows(x: &Tensor, pos: &Tensor) -> Result<Tensor> {
    let (b, l, r) = x.dims3()?;
    let (pb, n) = pos.dims2()?;
    if pb != b || l == 0 {
        return Err(Error::Arg(format!(
            "sample_rows: {:?} positions for an input of shape {:?}",
            pos.dims(),
            x.dims()
        )));
    }
    let pv: Vec<f64> = pos
        .detach()
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1()?;
    let (mut base, mut i0, mut i1, mut v0, mut v1) = (
        Vec::with_capacity(b * n),
        Vec::with_capacity(b * n),
        Vec::with_capacity(b * n),
        Vec::with_capacity(b * n),
        Vec::with_capacity(b * n),
    );
    let inside = |i: i64| (0..l as i64).contains(&i);
    for (k, s) in pv.iter().enumerate() {
        // A non-finite position has no tap (its output is 0 + NaN·0 = NaN only through `pos` itself).
        let f = if s.is_finite() { s.floor() } else { 0.0 };
        let a = f as i64;
        let off = (k / n * l) as i64;
        let clampi = |i: i64| (off + i.clamp(0, l as i64 - 1)) as u32;
        base.push(f);
        i0.push(clampi(a));
        i1.push(clampi(a + 1));
        v0.push(if inside(a) { 1.0 } else { 0.0 });
        v1.push(if inside(a + 1) { 1.0 } else { 0.0 });
    }
    let dev = x.device();
    let host = |v: Vec<f64>| -> Result<Tensor> {
        Ok(Tensor::from_vec(v, (b, n), &Device::Cpu)?
            .to_dtype(x.dtype())?
            .to_device(dev)?)
    };
    let frac = pos.sub(&host(base)?)?;
    let w1 = frac.mul(&host(v1)?)?.unsqueeze(2)?;
    let w0 = frac.affine(-1.0, 1.0)?.mul(&host(v0)?)?.unsqueeze(2)?;
    let idx = |v: Vec<u32>| Tensor::from_vec(v, b * n, dev);
    let flat = x.reshape((b * l, r))?;
    let a = flat.index_select(&idx(i0)?, 0)?.reshape((b, n, r))?;
    let c = flat.index_select(&idx(i1)?, 0)?.reshape((b, n, r))?;
    Ok((a.broadcast_mul(&w0)? + c.broadcast_mul(&w1)?)?)
}

/// Separable per-sample bilinear sampling of `x (B, C, H, W)`: rows at `py (B, ny)`, columns at `px (B, nx)` →
/// `(B, C, ny, nx)` (zeros outside).
pub fn sample_separable(x: &Tensor, py: &Tensor, px: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (ny, nx) = (py.dim(1)?, px.dim(1)?);
    let xr = x
        .permute((0, 2, 1, 3))?
        .contiguous()?
        .reshape((b, h, c * w))?;
    let y = sample_rows(&xr, py)?; // (B, ny, C·W)
    let y = y
        .reshape((b, ny, c, w))?
        .permute((0, 3, 1, 2))?
        .contiguous()?
        .reshape((b, w, ny * c))?;
    let z = sample_rows(&y, px)?; // (B, nx, ny·C)
    Ok(z.reshape((b, nx, ny, c))?
        .permute((0, 3, 2, 1))?
        .contiguous()?)
}

/// Crops `x (B, C, H, W)` to the boxes `(B, 4)` `[x1, y1, x2, y2]`, stretched to `(out_h, out_w)` (SPEC §7.7.2).
/// With the box `[0, 0, W, H]` and `out = (H, W)` this is the identity.
pub fn crop(x: &Tensor, boxes: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (b, _, _, _) = x.dims4()?;
    check_boxes("roi::crop", boxes, b)?;
    let py = crop_positions(&col(boxes, 1)?, &col(boxes, 3)?, out_h)?;
    let px = crop_positions(&col(boxes, 0)?, &col(boxes, 2)?, out_w)?;
    sample_separable(x, &py, &px)
}

/// Pastes crops `z (B, C, h_c, w_c)` back onto a `(out_h, out_w)` grid (SPEC §7.7.4), zeros outside the box.
pub fn paste(z: &Tensor, boxes: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (b, _, hc, wc) = z.dims4()?;
    check_boxes("roi::paste", boxes, b)?;
    let py = paste_positions(&col(boxes, 1)?, &col(boxes, 3)?, out_h, hc)?;
    let px = paste_positions(&col(boxes, 0)?, &col(boxes, 2)?, out_w, wc)?;
    sample_separable(z, &py, &px)
}

/// `(B, N, N)` map version of [`crop`] (for `coarse_n`).
pub fn crop_map(p: &Tensor, boxes: &Tensor, n: usize) -> Result<Tensor> {
    Ok(crop(&p.unsqueeze(1)?, boxes, n, n)?.squeeze(1)?)
}

/// `(B, n_c, n_c)` map version of [`paste`] onto `n×n`.
pub fn paste_map(z: &Tensor, boxes: &Tensor, n: usize) -> Result<Tensor> {
    Ok(paste(&z.unsqueeze(1)?, boxes, n, n)?.squeeze(1)?)
}

/// Soft window `ω = σ(5(X − x1))·σ(5(x2 − X))·σ(5(Y − y1))·σ(5(y2 − Y))` `(B, h, w)` (SPEC §7.7.4).
pub fn window(boxes: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    check_boxes("roi::window", boxes, boxes.dim(0)?)?;
    let axis = |lo: Tensor, hi: Tensor, n: usize| -> Result<Tensor> {
        let c = coord_row(n, boxes)?; // (1, n)
        let a = crate::nn::sigmoid(&c.broadcast_sub(&lo)?.affine(WINDOW_SLOPE, 0.0)?)?;
        let b = crate::nn::sigmoid(&hi.broadcast_sub(&c)?.affine(WINDOW_SLOPE, 0.0)?)?;
        Ok(a.mul(&b)?)
    };
    let wx = axis(col(boxes, 0)?, col(boxes, 2)?, w)?; // (B, w)
    let wy = axis(col(boxes, 1)?, col(boxes, 3)?, h)?; // (B, h)
    Ok(wy.unsqueeze(2)?.broadcast_mul(&wx.unsqueeze(1)?)?)
}

/// `logit(clamp(p, 1e-4, 1 − 1e-4))`, the refined logits outside the ROI.
pub fn coarse_logits(p: &Tensor) -> Result<Tensor> {
    let q = p.clamp(COARSE_CLAMP, 1.0 - COARSE_CLAMP)?;
    Ok((q.log()? - q.affine(-1.0, 1.0)?.log()?)?)
}

/// `ω·z_p + (1 − ω)·coarse_logits` (shapes broadcast).
pub fn blend(z_p: &Tensor, omega: &Tensor, coarse_logits: &Tensor) -> Result<Tensor> {
    Ok(z_p
        .broadcast_mul(omega)?
        .broadcast_add(&coarse_logits.broadcast_mul(&omega.affine(-1.0, 1.0)?)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn pseudo(n: usize, seed: usize) -> Vec<f64> {
        (0..n)
            .map(|i| (((i + seed) * 7919 % 101) as f64 - 50.0) / 37.0)
            .collect()
    }

    fn vals(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn boxes(v: &[[f64; 4]]) -> Tensor {
        let flat: Vec<f64> = v.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (v.len(), 4), &Device::Cpu).unwrap()
    }

    /// A map with value 1 on a square `[a, b)²` (index coordinates), else 0.
    fn square(n: usize, a: usize, b: usize) -> Tensor {
        let mut v = vec![0f64; n * n];
        for i in a..b {
            for j in a..b {
                v[i * n + j] = 1.0;
            }
        }
        Tensor::from_vec(v, (1, n, n), &Device::Cpu).unwrap()
    }

    /// Central differences of `f` (a scalar) w.r.t. the inputs `x` and `bx`, against the autograd gradient.
    fn fd_check(
        f: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor>,
        x: Vec<f64>,
        xs: &[usize],
        bx: Vec<f64>,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let nb = bx.len() / 4;
        let xv = Var::from_tensor(&Tensor::from_vec(x.clone(), xs, &dev)?)?;
        let bv = Var::from_tensor(&Tensor::from_vec(bx.clone(), (nb, 4), &dev)?)?;
        let g = f(xv.as_tensor(), bv.as_tensor())?.backward()?;
        let gx = vals(g.get(xv.as_tensor()).expect("input gradient"));
        let gb = vals(g.get(bv.as_tensor()).expect("box gradient"));
        let eval = |x: &[f64], b: &[f64]| -> f64 {
            let xt = Tensor::from_vec(x.to_vec(), xs, &dev).unwrap();
            let bt = Tensor::from_vec(b.to_vec(), (nb, 4), &dev).unwrap();
            f(&xt, &bt).unwrap().to_scalar::<f64>().unwrap()
        };
        let h = 1e-6;
        for k in (0..x.len()).step_by((x.len() / 23).max(1)) {
            let (mut a, mut b) = (x.clone(), x.clone());
            a[k] += h;
            b[k] -= h;
            let fd = (eval(&a, &bx) - eval(&b, &bx)) / (2.0 * h);
            assert!(
                (fd - gx[k]).abs() <= 1e-6 * (1.0 + fd.abs()),
                "x[{k}]: fd {fd} vs {}",
                gx[k]
            );
        }
        for k in 0..bx.len() {
            let (mut a, mut b) = (bx.clone(), bx.clone());
            a[k] += h;
            b[k] -= h;
            let fd = (eval(&x, &a) - eval(&x, &b)) / (2.0 * h);
            assert!(
                (fd - gb[k]).abs() <= 1e-5 * (1.0 + fd.abs()),
                "box[{k}]: fd {fd} vs {}",
                gb[k]
            );
        }
        Ok(())
    }

    /// SPEC §16.5: finite differences (f64) of the crop sampler w.r.t. its input and the box coordinates. Box values
    /// are chosen so that no sampling position sits on an integer (the bilinear weights are piecewise linear there).
    #[test]
    fn crop_finite_differences() -> Result<()> {
        let (b, c, h, w) = (2usize, 2usize, 9usize, 11usize);
        let r = Tensor::from_vec(pseudo(b * c * 6 * 7, 3), (b, c, 6, 7), &Device::Cpu)?;
        let f = |x: &Tensor, bx: &Tensor| -> Result<Tensor> {
            Ok(crop(x, bx, 6, 7)?.mul(&r)?.sum_all()?)
        };
        let bx = vec![1.13, 0.71, 8.37, 7.29, -1.61, 2.33, 12.07, 10.41];
        fd_check(&f, pseudo(b * c * h * w, 1), &[b, c, h, w], bx)
    }

    /// SPEC §16.5: finite differences (f64) of the paste sampler and of the whole blend (paste, window, coarse
    /// logits) w.r.t. the crop logits and the box.
    #[test]
    fn paste_and_blend_finite_differences() -> Result<()> {
        let (b, n, nc) = (2usize, 10usize, 8usize);
        let r = Tensor::from_vec(pseudo(b * n * n, 5), (b, 1, n, n), &Device::Cpu)?;
        let f = |z: &Tensor, bx: &Tensor| -> Result<Tensor> {
            Ok(paste(z, bx, n, n)?.mul(&r)?.sum_all()?)
        };
        let bx = vec![1.37, 2.11, 7.53, 8.29, 0.0, 0.0, 9.0, 9.0];
        fd_check(&f, pseudo(b * nc * nc, 2), &[b, 1, nc, nc], bx.clone())?;
        let coarse: Vec<f64> = pseudo(b * n * n, 9)
            .iter()
            .map(|v| 0.5 + 0.3 * v.tanh())
            .collect();
        let coarse = Tensor::from_vec(coarse, (b, n, n), &Device::Cpu)?;
        let r2 = r.squeeze(1)?;
        let g = |z: &Tensor, bx: &Tensor| -> Result<Tensor> {
            let zp = paste_map(z, bx, n)?;
            let om = window(bx, n, n)?;
            Ok(blend(&zp, &om, &coarse_logits(&coarse)?)?
                .mul(&r2)?
                .sum_all()?)
        };
        fd_check(&g, pseudo(b * nc * nc, 4), &[b, nc, nc], bx)
    }

    /// The box `[0, 0, W, H]` cropped to `(H, W)` samples every pixel at its own index: the identity.
    #[test]
    fn full_image_box_is_identity() -> Result<()> {
        let (h, w) = (12usize, 9usize);
        let x = Tensor::from_vec(pseudo(2 * 3 * h * w, 7), (2, 3, h, w), &Device::Cpu)?;
        let bx = boxes(&[
            [0.0, 0.0, w as f64, h as f64],
            [0.0, 0.0, w as f64, h as f64],
        ]);
        let y = crop(&x, &bx, h, w)?;
        let d = (y - &x)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(d < 1e-12, "max |crop − x| = {d}");
        // f32 as well (the training dtype), up to the rounding of the positions.
        let x32 = x.to_dtype(DType::F32)?;
        let y32 = crop(&x32, &bx.to_dtype(DType::F32)?, h, w)?;
        let d = (y32 - &x32)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "f32: max |crop − x| = {d}");
        // Paste of a full-image crop is the identity up to the 1e-6 of the scale.
        let p = paste(&x, &bx, h, w)?;
        let d = (p - &x)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(d < 1e-4, "max |paste − x| = {d}");
        Ok(())
    }

    /// Crop then paste restores the input inside the box (away from its border) for an upscaling crop.
    #[test]
    fn crop_then_paste_restores_inside() -> Result<()> {
        let n = 16usize;
        // A linear ramp is reproduced exactly by bilinear interpolation.
        let v: Vec<f64> = (0..n * n)
            .map(|k| (k / n) as f64 * 0.5 + (k % n) as f64 * 0.25)
            .collect();
        let x = Tensor::from_vec(v, (1, 1, n, n), &Device::Cpu)?;
        let bx = boxes(&[[4.0, 3.0, 12.0, 11.0]]);
        let c = crop(&x, &bx, n, n)?;
        let p = vals(&paste(&c, &bx, n, n)?);
        let xv = vals(&x);
        for i in 4..10 {
            for j in 5..11 {
                assert!(
                    (p[i * n + j] - xv[i * n + j]).abs() < 1e-4,
                    "({i},{j}): {} vs {}",
                    p[i * n + j],
                    xv[i * n + j]
                );
            }
        }
        Ok(())
    }

    /// Box rules on hand-computed examples (SPEC §7.7.1).
    #[test]
    fn box_rules() -> Result<()> {
        let n = 256usize;
        // Uniform square [100, 140)²: c = 119.5, σ² = (40² − 1)/12 = 133.25 (+1e-6), the ΣP + 1e-6 is negligible.
        let sq = square(n, 100, 140);
        let sigma = (133.25f64 + 1e-6).sqrt();
        let b = vals(&roi_box(&sq, 0.2)?);
        let half = 2.5 * sigma * 1.4; // 40.40…: the expanded side 80.8 ≥ 64
        for (k, want) in [119.5 - half, 119.5 - half, 119.5 + half, 119.5 + half]
            .iter()
            .enumerate()
        {
            assert!((b[k] - want).abs() < 1e-3, "box[{k}] = {} vs {want}", b[k]);
        }
        // Without expansion 2.5σ·2 = 57.7 < 64 → c ∓ 32.
        let b = vals(&roi_box(&sq, 0.0)?);
        for (k, want) in [87.5, 87.5, 151.5, 151.5].iter().enumerate() {
            assert!((b[k] - want).abs() < 1e-3, "box[{k}] = {} vs {want}", b[k]);
        }
        // A small square near the top-left corner: c = 4.5 → x1 = max(4.5 − 32, 0) = 0, x2 = 36.5.
        let b = vals(&roi_box(&square(n, 0, 10), 0.2)?);
        for (k, want) in [0.0, 0.0, 36.5, 36.5].iter().enumerate() {
            assert!((b[k] - want).abs() < 1e-3, "box[{k}] = {} vs {want}", b[k]);
        }
        // Bottom-right, indices 246..=254: c = 250 → x1 = 218, x2 = min(282, 255) = 255.
        let b = vals(&roi_box(&square(n, 246, 255), 0.2)?);
        assert!(
            (b[0] - 218.0).abs() < 1e-3 && (b[2] - 255.0).abs() < 1e-12,
            "{b:?}"
        );
        // All-zero map (SPEC §7.6): c = 0, σ = 1e-3 → [0, 0, 32, 32], finite.
        let z = Tensor::zeros((1, n, n), DType::F64, &Device::Cpu)?;
        let b = vals(&roi_box(&z, 0.2)?);
        assert_eq!(b, vec![0.0, 0.0, 32.0, 32.0]);
        // The whole image: clamped to [0, N − 1].
        let one = Tensor::ones((1, n, n), DType::F64, &Device::Cpu)?;
        assert_eq!(vals(&roi_box(&one, 0.2)?), vec![0.0, 0.0, 255.0, 255.0]);
        assert!(roi_box(&one, -0.1).is_err() && roi_box(&one, f64::NAN).is_err());
        Ok(())
    }

    /// Outside the ROI (ω ≈ 0) the blended logits equal the coarse logits; deep inside (ω ≈ 1) the pasted crop.
    #[test]
    fn blend_outside_is_coarse_inside_is_crop() -> Result<()> {
        let n = 64usize;
        let bx = boxes(&[[20.0, 16.0, 40.0, 44.0]]);
        let om = vals(&window(&bx, n, n)?);
        let coarse: Vec<f64> = (0..n * n)
            .map(|k| ((k * 31 % 97) as f64 + 0.5) / 98.0)
            .collect();
        let coarse = Tensor::from_vec(coarse, (1, n, n), &Device::Cpu)?;
        let cl = coarse_logits(&coarse)?;
        let zc = Tensor::from_vec(pseudo(n * n, 11), (1, n, n), &Device::Cpu)?.affine(3.0, 1.0)?;
        let zp = paste_map(&zc, &bx, n)?;
        let out = vals(&blend(&zp, &window(&bx, n, n)?, &cl)?);
        let (clv, zpv) = (vals(&cl), vals(&zp));
        for i in 0..n {
            for j in 0..n {
                let k = i * n + j;
                let (x, y) = (j as f64, i as f64);
                let dist_out = (20.0 - x).max(x - 40.0).max(16.0 - y).max(y - 44.0);
                if dist_out >= 4.0 {
                    assert!(om[k] < 1e-8, "ω({i},{j}) = {}", om[k]);
                    assert!((out[k] - clv[k]).abs() < 1e-6, "({i},{j}) outside");
                }
                if dist_out <= -4.0 {
                    assert!(om[k] > 1.0 - 1e-8);
                    assert!((out[k] - zpv[k]).abs() < 1e-6, "({i},{j}) inside");
                }
            }
        }
        // logit(clamp(·)) at the extremes.
        let e = vals(&coarse_logits(&Tensor::new(
            &[0.0f64, 1.0, 0.5],
            &Device::Cpu,
        )?)?);
        let l = (1e-4f64 / (1.0 - 1e-4)).ln();
        assert!((e[0] - l).abs() < 1e-9 && (e[1] + l).abs() < 1e-9 && e[2].abs() < 1e-15);
        Ok(())
    }
}
