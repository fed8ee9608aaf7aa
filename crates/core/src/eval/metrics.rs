//! Per-image segmentation metrics (SPEC §10.2–§10.4): Dice, IoU, precision, recall, accuracy, specificity, HD95
//! and ASSD with the explicit empty-mask policy, and the per-dataset / AVERAGE / ALL aggregation.
//!
//! Everything here is host-side on binary masks (`&[bool]`, row-major `H×W`). Use [`binarize`] /
//! [`binarize_tensor`] to threshold probabilities with the strict `> threshold` rule (a value exactly at the threshold
//! is background).
//!
//! The exact Euclidean distance transform used for HD95/ASSD is a local Felzenszwalb–Huttenlocher implementation
//! ([`edt_sq`]); `crate::augment` has its own EDT for the SDF tools (§8.1). Both are exact, so they agree; unifying
//! them is a later clean-up.
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// Confusion counts of one binary prediction against one binary ground truth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    pub tp: u64,
    pub fp: u64,
    pub fn_: u64,
    pub tn: u64,
}

impl Confusion {
    /// Counts TP/FP/FN/TN over two masks of equal length.
    pub fn from_masks(pred: &[bool], gt: &[bool]) -> Result<Self> {
        if pred.len() != gt.len() {
            return Err(Error::Arg(format!(
                "confusion counts: prediction has {} pixels but ground truth has {}",
                pred.len(),
                gt.len()
            )));
        }
        let mut c = Confusion::default();
        for (&p, &g) in pred.iter().zip(gt) {
            match (p, g) {
                (true, true) => c.tp += 1,
                (true, false) => c.fp += 1,
                (false, true) => c.fn_ += 1,
                (false, false) => c.tn += 1,
            }
        }
        Ok(c)
    }
    pub fn n_pixels(&self) -> u64 {
        self.tp + self.fp + self.fn_ + self.tn
    }
    pub fn pred_count(&self) -> u64 {
        self.tp + self.fp
    }
    pub fn gt_count(&self) -> u64 {
        self.tp + self.fn_
    }
    /// Sum of two count sets (pooling).
    pub fn add(&self, o: &Confusion) -> Confusion {
        Confusion { tp: self.tp + o.tp, fp: self.fp + o.fp, fn_: self.fn_ + o.fn_, tn: self.tn + o.tn }
    }
}

/// The six ratio metrics of §10.2 for one image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RatioMetrics {
    pub dice: f64,
    pub iou: f64,
    pub precision: f64,
    pub recall: f64,
    pub accuracy: f64,
    pub specificity: f64,
}

/// `num/den`, with the §10.2 rule that any other zero denominator gives 1.
fn ratio_or_one(num: u64, den: u64) -> f64 {
    if den == 0 {
        1.0
    } else {
        num as f64 / den as f64
    }
}

impl RatioMetrics {
    /// §10.2 ratios with the empty-mask policy: both empty → Dice = IoU = precision = recall = 1; exactly one empty →
    /// 0 for those four; any other zero denominator → 1.
    pub fn from_confusion(c: &Confusion) -> Self {
        let pred_empty = c.pred_count() == 0;
        let gt_empty = c.gt_count() == 0;
        let accuracy = ratio_or_one(c.tp + c.tn, c.n_pixels());
        let specificity = ratio_or_one(c.tn, c.tn + c.fp);
        let (dice, iou, precision, recall) = match (pred_empty, gt_empty) {
            (true, true) => (1.0, 1.0, 1.0, 1.0),
            (true, false) | (false, true) => (0.0, 0.0, 0.0, 0.0),
            (false, false) => (
                ratio_or_one(2 * c.tp, 2 * c.tp + c.fp + c.fn_),
                ratio_or_one(c.tp, c.tp + c.fp + c.fn_),
                ratio_or_one(c.tp, c.tp + c.fp),
                ratio_or_one(c.tp, c.tp + c.fn_),
            ),
        };
        RatioMetrics { dice, iou, precision, recall, accuracy, specificity }
    }
}

/// All per-image metrics of §10.2/§10.3 for one image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageMetrics {
    pub dice: f64,
    pub iou: f64,
    pub precision: f64,
    pub recall: f64,
    pub accuracy: f64,
    pub specificity: f64,
    /// HD95 in pixels of the evaluation grid (one-empty: the grid diagonal).
    pub hd95: f64,
    /// ASSD in pixels of the evaluation grid (one-empty: the grid diagonal).
    pub assd: f64,
    /// HD95 in millimetres (only when a pixel spacing is known).
    pub hd95_mm: Option<f64>,
    /// ASSD in millimetres (only when a pixel spacing is known).
    pub assd_mm: Option<f64>,
    pub pred_empty: bool,
    pub gt_empty: bool,
    pub counts: Confusion,
}

impl ImageMetrics {
    /// Exactly one of prediction and ground truth is empty (the diagonal-penalty case).
    pub fn one_empty(&self) -> bool {
        self.pred_empty != self.gt_empty
    }
}

/// Strict binarisation `v > threshold` (a value exactly at the threshold is background).
pub fn binarize(values: &[f32], threshold: f32) -> Vec<bool> {
    values.iter().map(|&v| v > threshold).collect()
}

/// Binarises a `(B,H,W)` (or `(B,1,H,W)`) probability tensor per image with the strict `> threshold` rule.
/// Returns one row-major mask per image and `(H, W)`.
pub fn binarize_tensor(t: &Tensor, threshold: f32) -> Result<(Vec<Vec<bool>>, usize, usize)> {
    let dims = t.dims().to_vec();
    let (b, h, w) = match dims.as_slice() {
        [b, h, w] => (*b, *h, *w),
        [b, 1, h, w] => (*b, *h, *w),
        _ => {
            return Err(Error::Arg(format!("binarize_tensor: expected (B,H,W) or (B,1,H,W), got {dims:?}")));
        }
    };
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let masks = (0..b).map(|i| binarize(&v[i * h * w..(i + 1) * h * w], threshold)).collect();
    Ok((masks, h, w))
}

/// Boundary `∂M = M ∧ ¬erode(M)` with the 4-neighbour cross; pixels outside the image are background, so a mask
/// touching the border has boundary pixels there.
pub fn boundary(mask: &[bool], h: usize, w: usize) -> Vec<bool> {
    let mut out = vec![false; h * w];
    for i in 0..h {
        for j in 0..w {
            let k = i * w + j;
            if !mask[k] {
                continue;
            }
            let interior = i > 0
                && i + 1 < h
                && j > 0
                && j + 1 < w
                && mask[k - w]
                && mask[k + w]
                && mask[k - 1]
                && mask[k + 1];
            out[k] = !interior;
        }
    }
    out
}

/// One-dimensional squared distance transform of sampled function `f` (values may be `+∞`) at sample spacing `s`
/// (Felzenszwalb & Huttenlocher): `d[p] = min_q ((p − q)·s)² + f[q]`.
fn edt_1d(f: &[f64], s: f64, d: &mut [f64], v: &mut [usize], z: &mut [f64]) {
    let n = f.len();
    let mut k: isize = -1;
    for q in 0..n {
        if !f[q].is_finite() {
            continue;
        }
        let xq = q as f64 * s;
        loop {
            if k < 0 {
                k = 0;
                v[0] = q;
                z[0] = f64::NEG_INFINITY;
                z[1] = f64::INFINITY;
                break;
            }
            let vk = v[k as usize];
            let xv = vk as f64 * s;
            let inter = ((f[q] + xq * xq) - (f[vk] + xv * xv)) / (2.0 * (xq - xv));
            if inter <= z[k as usize] {
                k -= 1;
                continue;
            }
            k += 1;
            v[k as usize] = q;
            z[k as usize] = inter;
            z[k as usize + 1] = f64::INFINITY;
            break;
        }
    }
    if k < 0 {
        d.iter_mut().for_each(|x| *x = f64::INFINITY);
        return;
    }
    let mut k = 0usize;
    for (p, dp) in d.iter_mut().enumerate() {
        let xp = p as f64 * s;
        while z[k + 1] < xp {
            k += 1;
        }
        let xv = v[k] as f64 * s;
        *dp = (xp - xv) * (xp - xv) + f[v[k]];
    }
}

/// Exact squared Euclidean distance from every pixel to the nearest `true` pixel of `feature` (row-major `H×W`),
/// with pixel spacing `(s_y, s_x)`. All `+∞` when `feature` has no `true` pixel.
pub fn edt_sq(feature: &[bool], h: usize, w: usize, spacing: (f64, f64)) -> Vec<f64> {
    let (sy, sx) = spacing;
    let n = h.max(w);
    let mut f = vec![0.0f64; n];
    let mut d = vec![0.0f64; n];
    let mut v = vec![0usize; n];
    let mut z = vec![0.0f64; n + 1];
    let mut grid: Vec<f64> = feature.iter().map(|&b| if b { 0.0 } else { f64::INFINITY }).collect();
    // columns (along y)
    for j in 0..w {
        for i in 0..h {
            f[i] = grid[i * w + j];
        }
        edt_1d(&f[..h], sy, &mut d[..h], &mut v, &mut z);
        for i in 0..h {
            grid[i * w + j] = d[i];
        }
    }
    // rows (along x)
    for i in 0..h {
        f[..w].copy_from_slice(&grid[i * w..(i + 1) * w]);
        edt_1d(&f[..w], sx, &mut d[..w], &mut v, &mut z);
        grid[i * w..(i + 1) * w].copy_from_slice(&d[..w]);
    }
    grid
}

/// The multiset `D = {dt_P(x) : x ∈ ∂G} ∪ {dt_G(x) : x ∈ ∂P}` of §10.3 (both masks must be non-empty).
pub fn surface_distances(pred: &[bool], gt: &[bool], h: usize, w: usize, spacing: (f64, f64)) -> Vec<f64> {
    let bp = boundary(pred, h, w);
    let bg = boundary(gt, h, w);
    let dp = edt_sq(&bp, h, w, spacing);
    let dg = edt_sq(&bg, h, w, spacing);
    let mut out = Vec::new();
    for k in 0..h * w {
        if bg[k] {
            out.push(dp[k].sqrt());
        }
        if bp[k] {
            out.push(dg[k].sqrt());
        }
    }
    out
}

/// 95th percentile with linear interpolation (numpy's default): sort ascending, `r = 0.95(n − 1)`.
pub fn percentile_linear(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let r = q * (values.len() - 1) as f64;
    let lo = r.floor() as usize;
    let frac = r - lo as f64;
    if lo + 1 < values.len() {
        values[lo] + frac * (values[lo + 1] - values[lo])
    } else {
        values[lo]
    }
}

/// `(HD95, ASSD)` with the empty-mask policy: both empty → `(0, 0)`; exactly one empty → the diagonal
/// `sqrt((H·s_y)² + (W·s_x)²)` for both.
pub fn hd95_assd(pred: &[bool], gt: &[bool], h: usize, w: usize, spacing: (f64, f64)) -> (f64, f64) {
    let pe = !pred.iter().any(|&b| b);
    let ge = !gt.iter().any(|&b| b);
    match (pe, ge) {
        (true, true) => (0.0, 0.0),
        (true, false) | (false, true) => {
            let diag = ((h as f64 * spacing.0).powi(2) + (w as f64 * spacing.1).powi(2)).sqrt();
            (diag, diag)
        }
        (false, false) => {
            let mut d = surface_distances(pred, gt, h, w, spacing);
            let assd = d.iter().sum::<f64>() / d.len() as f64;
            let hd95 = percentile_linear(&mut d, 0.95);
            (hd95, assd)
        }
    }
}

/// Every per-image metric of §10.2–§10.3. `spacing_mm = Some((s_y, s_x))` (at this evaluation grid) adds the mm
/// distances.
pub fn image_metrics(
    pred: &[bool],
    gt: &[bool],
    h: usize,
    w: usize,
    spacing_mm: Option<(f64, f64)>,
) -> Result<ImageMetrics> {
    if pred.len() != h * w || gt.len() != h * w {
        return Err(Error::Arg(format!(
            "image_metrics: masks have {} and {} pixels, expected {h}×{w} = {}",
            pred.len(),
            gt.len(),
            h * w
        )));
    }
    let counts = Confusion::from_masks(pred, gt)?;
    let r = RatioMetrics::from_confusion(&counts);
    let (hd95, assd) = hd95_assd(pred, gt, h, w, (1.0, 1.0));
    let (hd95_mm, assd_mm) = match spacing_mm {
        Some(s) => {
            let (a, b) = hd95_assd(pred, gt, h, w, s);
            (Some(a), Some(b))
        }
        None => (None, None),
    };
    Ok(ImageMetrics {
        dice: r.dice,
        iou: r.iou,
        precision: r.precision,
        recall: r.recall,
        accuracy: r.accuracy,
        specificity: r.specificity,
        hd95,
        assd,
        hd95_mm,
        assd_mm,
        pred_empty: counts.pred_count() == 0,
        gt_empty: counts.gt_count() == 0,
        counts,
    })
}

/// Mean and (population, ddof = 0) standard deviation of one metric over a set of values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanStd {
    pub mean: f64,
    pub std: f64,
    pub n: usize,
}

impl MeanStd {
    pub fn of(values: &[f64]) -> Self {
        let n = values.len();
        if n == 0 {
            return MeanStd { mean: f64::NAN, std: f64::NAN, n };
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
        MeanStd { mean, std: var.sqrt(), n }
    }
}

/// Names of the aggregated metric columns, in report order. `hd95_excl`/`assd_excl` are the means over images where
/// not exactly one mask is empty; `*_mm` columns exist only when every image has a spacing.
pub const METRIC_NAMES: [&str; 8] = ["dice", "iou", "precision", "recall", "accuracy", "specificity", "hd95", "assd"];

/// One aggregated row (a dataset, `AVERAGE` or `ALL`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AggregateRow {
    pub name: String,
    pub n_images: usize,
    /// Images whose binarised prediction is empty (both-empty cases included).
    pub n_pred_empty: usize,
    /// Images whose ground truth is empty (both-empty cases included).
    pub n_gt_empty: usize,
    /// Metric name → mean/std, in [`METRIC_NAMES`] order, then `hd95_excl`, `assd_excl`, then mm columns if present.
    pub metrics: Vec<(String, MeanStd)>,
}

impl AggregateRow {
    pub fn get(&self, name: &str) -> Option<&MeanStd> {
        self.metrics.iter().find(|(n, _)| n == name).map(|(_, m)| m)
    }
}

/// Per-dataset rows, the AVERAGE row (unweighted mean over datasets of the per-dataset means; its `std` is the
/// standard deviation of those dataset means) and the ALL row (all images pooled).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AggregateReport {
    pub datasets: Vec<AggregateRow>,
    pub average: AggregateRow,
    pub all: AggregateRow,
}

fn metric_columns(imgs: &[&ImageMetrics]) -> Vec<(String, Vec<f64>)> {
    let mut cols: Vec<(String, Vec<f64>)> = Vec::new();
    let pick = |f: &dyn Fn(&ImageMetrics) -> f64| imgs.iter().map(|m| f(m)).collect::<Vec<f64>>();
    cols.push(("dice".into(), pick(&|m| m.dice)));
    cols.push(("iou".into(), pick(&|m| m.iou)));
    cols.push(("precision".into(), pick(&|m| m.precision)));
    cols.push(("recall".into(), pick(&|m| m.recall)));
    cols.push(("accuracy".into(), pick(&|m| m.accuracy)));
    cols.push(("specificity".into(), pick(&|m| m.specificity)));
    cols.push(("hd95".into(), pick(&|m| m.hd95)));
    cols.push(("assd".into(), pick(&|m| m.assd)));
    let excl: Vec<&&ImageMetrics> = imgs.iter().filter(|m| !m.one_empty()).collect();
    cols.push(("hd95_excl".into(), excl.iter().map(|m| m.hd95).collect()));
    cols.push(("assd_excl".into(), excl.iter().map(|m| m.assd).collect()));
    if !imgs.is_empty() && imgs.iter().all(|m| m.hd95_mm.is_some()) {
        cols.push(("hd95_mm".into(), imgs.iter().map(|m| m.hd95_mm.unwrap_or(f64::NAN)).collect()));
        cols.push(("assd_mm".into(), imgs.iter().map(|m| m.assd_mm.unwrap_or(f64::NAN)).collect()));
        cols.push((
            "hd95_mm_excl".into(),
            excl.iter().map(|m| m.hd95_mm.unwrap_or(f64::NAN)).collect(),
        ));
    }
    cols
}

fn row_of(name: &str, imgs: &[&ImageMetrics]) -> AggregateRow {
    AggregateRow {
        name: name.to_string(),
        n_images: imgs.len(),
        n_pred_empty: imgs.iter().filter(|m| m.pred_empty).count(),
        n_gt_empty: imgs.iter().filter(|m| m.gt_empty).count(),
        metrics: metric_columns(imgs).into_iter().map(|(n, v)| (n, MeanStd::of(&v))).collect(),
    }
}

/// §10.4 aggregation. `groups` are `(dataset name, its per-image metrics)`.
pub fn aggregate(groups: &[(String, Vec<ImageMetrics>)]) -> AggregateReport {
    let datasets: Vec<AggregateRow> =
        groups.iter().map(|(n, v)| row_of(n, &v.iter().collect::<Vec<_>>())).collect();
    let all_imgs: Vec<&ImageMetrics> = groups.iter().flat_map(|(_, v)| v.iter()).collect();
    let all = row_of("ALL", &all_imgs);
    // AVERAGE: unweighted mean over datasets of the per-dataset means (datasets whose mean is NaN — e.g. no image
    // contributes to an `_excl` column — are left out of that column).
    let mut avg_metrics = Vec::new();
    for (name, _) in &all.metrics {
        let means: Vec<f64> = datasets
            .iter()
            .filter_map(|r| r.get(name).map(|m| m.mean))
            .filter(|v| !v.is_nan())
            .collect();
        avg_metrics.push((name.clone(), MeanStd::of(&means)));
    }
    let average = AggregateRow {
        name: "AVERAGE".into(),
        n_images: all.n_images,
        n_pred_empty: all.n_pred_empty,
        n_gt_empty: all.n_gt_empty,
        metrics: avg_metrics,
    };
    AggregateReport { datasets, average, all }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn brute_edt(feature: &[bool], h: usize, w: usize, s: (f64, f64)) -> Vec<f64> {
        let mut out = vec![f64::INFINITY; h * w];
        for i in 0..h {
            for j in 0..w {
                for a in 0..h {
                    for b in 0..w {
                        if feature[a * w + b] {
                            let dy = (i as f64 - a as f64) * s.0;
                            let dx = (j as f64 - b as f64) * s.1;
                            let d = dy * dy + dx * dx;
                            if d < out[i * w + j] {
                                out[i * w + j] = d;
                            }
                        }
                    }
                }
            }
        }
        out
    }

    #[test]
    fn edt_matches_brute_force() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for &(h, w, s) in &[(13usize, 17usize, (1.0, 1.0)), (9, 5, (0.7, 1.3)), (1, 8, (1.0, 2.0)), (6, 1, (0.5, 1.0))] {
            for density in [0.02, 0.2, 0.7] {
                let f: Vec<bool> = (0..h * w).map(|_| rng.gen::<f64>() < density).collect();
                let a = edt_sq(&f, h, w, s);
                let b = brute_edt(&f, h, w, s);
                for (x, y) in a.iter().zip(&b) {
                    assert!((x.is_infinite() && y.is_infinite()) || (x - y).abs() <= 1e-9, "{x} vs {y}");
                }
            }
        }
    }

    #[test]
    fn boundary_touches_border_and_single_pixel() {
        // 3x3 full mask: only the centre is interior
        let m = vec![true; 9];
        let b = boundary(&m, 3, 3);
        assert_eq!(b.iter().filter(|&&x| x).count(), 8);
        assert!(!b[4]);
        let mut one = vec![false; 25];
        one[12] = true;
        assert_eq!(boundary(&one, 5, 5), one);
    }

    #[test]
    fn empty_mask_policy() {
        let h = 4;
        let w = 3;
        let empty = vec![false; 12];
        let mut some = vec![false; 12];
        some[4] = true;
        let both = image_metrics(&empty, &empty, h, w, None).unwrap();
        assert_eq!((both.dice, both.iou, both.precision, both.recall), (1.0, 1.0, 1.0, 1.0));
        assert_eq!((both.hd95, both.assd, both.accuracy, both.specificity), (0.0, 0.0, 1.0, 1.0));
        let miss = image_metrics(&empty, &some, h, w, Some((2.0, 1.0))).unwrap();
        assert_eq!((miss.dice, miss.iou, miss.precision, miss.recall), (0.0, 0.0, 0.0, 0.0));
        assert_eq!(miss.hd95, 5.0);
        assert_eq!(miss.hd95_mm, Some((64.0f64 + 9.0).sqrt()));
        assert!(miss.pred_empty && !miss.gt_empty && miss.one_empty());
        let fa = image_metrics(&some, &empty, h, w, None).unwrap();
        assert_eq!((fa.dice, fa.iou, fa.precision, fa.recall), (0.0, 0.0, 0.0, 0.0));
        assert_eq!(fa.specificity, 11.0 / 12.0);
        // all-foreground GT and prediction: TN + FP = 0 → specificity 1
        let full = vec![true; 12];
        let f = image_metrics(&full, &full, h, w, None).unwrap();
        assert_eq!(f.specificity, 1.0);
        assert_eq!(f.dice, 1.0);
    }

    #[test]
    fn hd95_of_shifted_squares() {
        let (h, w) = (20, 20);
        let sq = |i0: usize, j0: usize| {
            let mut m = vec![false; h * w];
            for i in i0..i0 + 5 {
                for j in j0..j0 + 5 {
                    m[i * w + j] = true;
                }
            }
            m
        };
        let a = sq(5, 5);
        let b = sq(5, 8);
        let (hd, assd) = hd95_assd(&a, &b, h, w, (1.0, 1.0));
        // boundary points of each square: 16; distances computed by brute force below
        let d = surface_distances(&a, &b, h, w, (1.0, 1.0));
        assert_eq!(d.len(), 32);
        let mean = d.iter().sum::<f64>() / 32.0;
        assert!((assd - mean).abs() < 1e-12);
        assert!(hd > 0.0 && hd <= 3.0 + 1e-12);
    }

    #[test]
    fn percentile_matches_numpy_linear() {
        let mut v = vec![3.0, 1.0, 2.0, 10.0];
        // numpy.percentile([1,2,3,10], 95) = 3 + 0.85*7 = 8.95
        assert!((percentile_linear(&mut v, 0.95) - 8.95).abs() < 1e-12);
    }

    #[test]
    fn aggregation_rows() {
        let mk = |d: f64, pe: bool, ge: bool, hd: f64| ImageMetrics {
            dice: d,
            iou: d,
            precision: d,
            recall: d,
            accuracy: 1.0,
            specificity: 1.0,
            hd95: hd,
            assd: hd,
            hd95_mm: None,
            assd_mm: None,
            pred_empty: pe,
            gt_empty: ge,
            counts: Confusion::default(),
        };
        let groups = vec![
            ("A".to_string(), vec![mk(1.0, false, false, 2.0), mk(0.0, true, false, 100.0)]),
            ("B".to_string(), vec![mk(0.5, false, false, 4.0)]),
        ];
        let r = aggregate(&groups);
        assert_eq!(r.datasets[0].get("dice").unwrap().mean, 0.5);
        assert_eq!(r.datasets[0].n_pred_empty, 1);
        assert_eq!(r.datasets[0].get("hd95").unwrap().mean, 51.0);
        assert_eq!(r.datasets[0].get("hd95_excl").unwrap().mean, 2.0);
        assert_eq!(r.average.get("dice").unwrap().mean, 0.5);
        assert!((r.all.get("dice").unwrap().mean - 0.5).abs() < 1e-12);
        assert_eq!(r.average.get("hd95").unwrap().mean, 27.5);
        assert!((r.all.get("hd95").unwrap().mean - 106.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.all.n_images, 3);
        assert!(r.all.get("hd95_mm").is_none());
    }
}
