//! Optional post-processing of SPEC §13.4 (per image, at `S`, on probabilities; evaluation and inference):
//! rejection rules (fall back to the coarse map when the refinement looks implausible) and boundary fusion (take the
//! refined probability only in a band around the coarse boundary). Rejection runs before fusion.
use crate::{Error, Result};

/// Post-processing settings (`--use-rejection-rules`, `--use-boundary-fusion` and their parameters).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PostProcess {
    pub use_rejection_rules: bool,
    /// Reject when IoU(coarse, refined) < this (`--reject-iou-threshold`, default 0.5).
    pub reject_iou_threshold: f64,
    /// Reject when refined/coarse area < this (coarse area > 0; `--reject-area-ratio-min`, default 0.3).
    pub reject_area_ratio_min: f64,
    /// Reject when refined/coarse area > this (coarse area > 0; `--reject-area-ratio-max`, default 3.0).
    pub reject_area_ratio_max: f64,
    /// Reject when the refined mask has more 4-connected components than this (`--reject-max-components`, 5).
    pub reject_max_components: usize,
    pub use_boundary_fusion: bool,
    /// Band width `w` (`--boundary-band-width`, default 15): dilation/erosion by a 3×3 square `⌊w/2⌋` times.
    pub boundary_band_width: usize,
}

impl Default for PostProcess {
    fn default() -> Self {
        Self {
            use_rejection_rules: false,
            reject_iou_threshold: 0.5,
            reject_area_ratio_min: 0.3,
            reject_area_ratio_max: 3.0,
            reject_max_components: 5,
            use_boundary_fusion: false,
            boundary_band_width: 15,
        }
    }
}

impl PostProcess {
    /// Whether any post-processing is enabled.
    pub fn enabled(&self) -> bool {
        self.use_rejection_rules || self.use_boundary_fusion
    }

    /// Checks the parameters (named after their flags).
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.reject_iou_threshold) {
            return Err(Error::Arg(format!(
                "--reject-iou-threshold must be in [0, 1], got {}",
                self.reject_iou_threshold
            )));
        }
        if !(self.reject_area_ratio_min >= 0.0
            && self.reject_area_ratio_min <= self.reject_area_ratio_max)
        {
            return Err(Error::Arg(format!(
                "--reject-area-ratio-min ({}) must be ≥ 0 and ≤ --reject-area-ratio-max ({})",
                self.reject_area_ratio_min, self.reject_area_ratio_max
            )));
        }
        Ok(())
    }
}

/// Why a refinement was rejected (the first rule that fired), or `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    LowIou,
    AreaRatio,
    Components,
}

/// The post-processed refined probability of one image and what happened to it.
#[derive(Debug, Clone, PartialEq)]
pub struct PostOutcome {
    /// `S×S` probability that replaces the refined map.
    pub refined: Vec<f32>,
    pub rejected: Option<Rejection>,
    /// Boundary fusion was applied (enabled and not rejected).
    pub fused: bool,
}

/// Number of 4-connected components of a binary `h×w` mask.
pub fn count_components(mask: &[bool], h: usize, w: usize) -> usize {
    let mut seen = vec![false; h * w];
    let mut n = 0;
    let mut stack = Vec::new();
    for start in 0..h * w {
        if !mask[start] || seen[start] {
            continue;
        }
        n += 1;
        seen[start] = true;
        stack.push(start);
        while let Some(k) = stack.pop() {
            let (i, j) = (k / w, k % w);
            let mut visit = |q: usize| {
                if mask[q] && !seen[q] {
                    seen[q] = true;
                    stack.push(q);
                }
            };
            if i > 0 {
                visit(k - w);
            }
            if i + 1 < h {
                visit(k + w);
            }
            if j > 0 {
                visit(k - 1);
            }
            if j + 1 < w {
                visit(k + 1);
            }
        }
    }
    n
}

/// IoU of two binary masks; both empty → 1 (§10.2 policy).
pub fn mask_iou(a: &[bool], b: &[bool]) -> f64 {
    let inter = a.iter().zip(b).filter(|(x, y)| **x && **y).count();
    let union = a.iter().zip(b).filter(|(x, y)| **x || **y).count();
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

/// Separable square (Chebyshev radius `r`) max filter (`dilate = true`) or min filter (`dilate = false`) of a binary
/// mask; pixels outside the image are background for both (a mask touching the border erodes from it).
fn square_filter(mask: &[bool], h: usize, w: usize, r: usize, dilate: bool) -> Vec<bool> {
    if r == 0 {
        return mask.to_vec();
    }
    let pass = |src: &[bool], along_rows: bool| -> Vec<bool> {
        let mut out = vec![false; h * w];
        let (outer, inner) = if along_rows { (h, w) } else { (w, h) };
        let idx = |o: usize, i: usize| if along_rows { o * w + i } else { i * w + o };
        for o in 0..outer {
            // prefix counts of true pixels along the line
            let mut pre = vec![0usize; inner + 1];
            for i in 0..inner {
                pre[i + 1] = pre[i] + src[idx(o, i)] as usize;
            }
            for i in 0..inner {
                let lo = i.saturating_sub(r);
                let hi_full = i + r; // inclusive, may be outside
                let hi = hi_full.min(inner - 1);
                let cnt = pre[hi + 1] - pre[lo];
                out[idx(o, i)] = if dilate {
                    cnt > 0
                } else {
                    // every pixel of the window (including those outside, which are background) must be set
                    i >= r && hi_full < inner && cnt == 2 * r + 1
                };
            }
        }
        out
    };
    let a = pass(mask, true);
    pass(&a, false)
}

/// `dilate(m)` by a 3×3 square applied `r` times.
pub fn dilate_square(mask: &[bool], h: usize, w: usize, r: usize) -> Vec<bool> {
    square_filter(mask, h, w, r, true)
}

/// `erode(m)` by a 3×3 square applied `r` times (outside the image is background).
pub fn erode_square(mask: &[bool], h: usize, w: usize, r: usize) -> Vec<bool> {
    square_filter(mask, h, w, r, false)
}

/// The fusion band `dilate(c̄) ∧ ¬erode(c̄)` with `⌊width/2⌋` applications of the 3×3 square.
pub fn boundary_band(coarse_bin: &[bool], h: usize, w: usize, width: usize) -> Vec<bool> {
    let r = width / 2;
    let d = dilate_square(coarse_bin, h, w, r);
    let e = erode_square(coarse_bin, h, w, r);
    d.iter().zip(&e).map(|(a, b)| *a && !*b).collect()
}

/// The rejection rule that fires for binarised coarse `c` and refined `r` (first in §13.4 order), if any.
pub fn rejection(
    pp: &PostProcess,
    c: &[bool],
    r: &[bool],
    h: usize,
    w: usize,
) -> Option<Rejection> {
    if mask_iou(c, r) < pp.reject_iou_threshold {
        return Some(Rejection::LowIou);
    }
    let ca = c.iter().filter(|&&v| v).count();
    if ca > 0 {
        let ratio = r.iter().filter(|&&v| v).count() as f64 / ca as f64;
        if ratio < pp.reject_area_ratio_min || ratio > pp.reject_area_ratio_max {
            return Some(Rejection::AreaRatio);
        }
    }
    if count_components(r, h, w) > pp.reject_max_components {
        return Some(Rejection::Components);
    }
    None
}

/// Applies §13.4 to one image's coarse and refined probabilities (`h×w`, normally `S×S`). Masks for the rules and
/// the band are binarised at 0.5 (strict `>`), independent of `--threshold`.
pub fn apply(pp: &PostProcess, coarse: &[f32], refined: &[f32], h: usize, w: usize) -> PostOutcome {
    let c: Vec<bool> = coarse.iter().map(|&v| v > 0.5).collect();
    let rejected = if pp.use_rejection_rules {
        let r: Vec<bool> = refined.iter().map(|&v| v > 0.5).collect();
        rejection(pp, &c, &r, h, w)
    } else {
        None
    };
    if rejected.is_some() {
        return PostOutcome {
            refined: coarse.to_vec(),
            rejected,
            fused: false,
        };
    }
    if pp.use_boundary_fusion {
        let band = boundary_band(&c, h, w, pp.boundary_band_width);
        let fused = coarse
            .iter()
            .zip(refined)
            .zip(&band)
            .map(|((&cv, &rv), &b)| if b { rv } else { cv })
            .collect();
        return PostOutcome {
            refined: fused,
            rejected: None,
            fused: true,
        };
    }
    PostOutcome {
        refined: refined.to_vec(),
        rejected: None,
        fused: false,
    }
}
