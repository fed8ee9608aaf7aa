//! Failure operators and their size/shape-conditioned composition (SPEC §8.4, §8.5).
//!
//! A [`SourceContext`] holds everything computed once per GT (working window, GT SDF, descriptors, candidate pixel
//! lists, `GT_S`). A [`Composition`] is one random draw of modes, intensities, fields and geometry; it is rendered at a
//! global gain `g` by [`Composition::render`] into a binary mask on the working window (`m = [φ' < 0]`).
//!
//! Working window: the bounding box of the GT expanded by `⌈3.5R⌉ + 12` pixels and clipped to the image. Every
//! operator acts inside it (the corrupted mask is background outside it). Its margin covers dilation and islands at
//! every gain that can keep Dice above 0.6 for a compact lesion; only renders far below every bin are truncated.
use super::descriptors::{describe, LesionDescriptors};
use super::edt::{sdf_unit_with_sq, NO_SITE};
use super::grf::{random_field, Spectrum};
use super::resize::{bilinear_taps_f32, nearest_taps};
use rand::Rng;

/// A failure mode (SPEC §8.4). The order of [`Mode::ALL`] is the order of the §8.5 table.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Erosion,
    Dilation,
    Deform,
    Jitter,
    Shrinkage,
    Breakage,
    Holes,
    FpIslands,
    Attachment,
    Disappearance,
}

impl Mode {
    pub const ALL: [Mode; 10] = [
        Mode::Erosion,
        Mode::Dilation,
        Mode::Deform,
        Mode::Jitter,
        Mode::Shrinkage,
        Mode::Breakage,
        Mode::Holes,
        Mode::FpIslands,
        Mode::Attachment,
        Mode::Disappearance,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Erosion => "erosion",
            Mode::Dilation => "dilation",
            Mode::Deform => "deform",
            Mode::Jitter => "jitter",
            Mode::Shrinkage => "shrinkage",
            Mode::Breakage => "breakage",
            Mode::Holes => "holes",
            Mode::FpIslands => "fp_islands",
            Mode::Attachment => "attachment",
            Mode::Disappearance => "disappearance",
        }
    }

    /// Application order rank (SPEC §8.4): additive → breakage → holes → attachment → fp_islands → jitter.
    pub fn application_rank(self) -> u8 {
        match self {
            Mode::Erosion => 0,
            Mode::Dilation => 1,
            Mode::Shrinkage => 2,
            Mode::Deform => 3,
            Mode::Breakage => 4,
            Mode::Holes => 5,
            Mode::Attachment => 6,
            Mode::FpIslands => 7,
            Mode::Jitter => 8,
            Mode::Disappearance => 9,
        }
    }

    /// Base weight per bin class (SPEC §8.5 table).
    pub fn base_weight(self, class: BinClass) -> f64 {
        let row: [f64; 4] = match self {
            Mode::Erosion => [1.0, 1.0, 1.0, 0.5],
            Mode::Dilation => [1.0, 1.0, 1.0, 0.0],
            Mode::Deform => [1.0, 1.0, 1.2, 0.5],
            Mode::Jitter => [1.0, 0.7, 0.5, 0.0],
            Mode::Shrinkage => [0.0, 0.2, 0.5, 1.0],
            Mode::Breakage => [0.0, 0.4, 0.8, 0.5],
            Mode::Holes => [0.2, 0.5, 0.7, 0.0],
            Mode::FpIslands => [0.3, 0.6, 0.8, 0.5],
            Mode::Attachment => [0.0, 0.6, 0.8, 0.0],
            Mode::Disappearance => [0.0, 0.0, 0.0, 1.0],
        };
        row[class as usize]
    }

    /// Product of the multipliers of the lesion's classes (SPEC §8.5: tiny, small, irregular).
    pub fn multiplier(self, d: &LesionDescriptors) -> f64 {
        let (t, s, i) = match self {
            Mode::Erosion => (1.5, 1.2, 1.0),
            Mode::Dilation => (1.0, 1.0, 1.0),
            Mode::Deform => (1.0, 1.0, 1.5),
            Mode::Jitter => (1.0, 1.0, 1.5),
            Mode::Shrinkage => (3.0, 1.5, 1.0),
            Mode::Breakage => (0.3, 0.7, 2.0),
            Mode::Holes => (0.0, 0.5, 1.0),
            Mode::FpIslands => (1.0, 1.0, 1.0),
            Mode::Attachment => (0.5, 1.0, 1.2),
            Mode::Disappearance => (1.0, 0.5, 1.0),
        };
        let mut m = 1.0;
        if d.tiny {
            m *= t;
        }
        if d.small {
            m *= s;
        }
        if d.irregular {
            m *= i;
        }
        m
    }
}

impl std::str::FromStr for Mode {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        Mode::ALL
            .iter()
            .copied()
            .find(|m| m.name() == s)
            .ok_or_else(|| crate::Error::Arg(format!("unknown failure mode {s:?}")))
    }
}

/// Quality class of a bin (selects the §8.5 weights, mode counts and intensities).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BinClass {
    High = 0,
    Medium = 1,
    Low = 2,
    Critical = 3,
}

impl BinClass {
    /// Class of a bin from its lower edge: ≥ 0.9 high, ≥ 0.8 medium, ≥ 0.6 low, otherwise critical.
    pub fn from_lo(lo: f64) -> BinClass {
        if lo >= 0.9 - 1e-9 {
            BinClass::High
        } else if lo >= 0.8 - 1e-9 {
            BinClass::Medium
        } else if lo >= 0.6 - 1e-9 {
            BinClass::Low
        } else {
            BinClass::Critical
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            BinClass::High => "high",
            BinClass::Medium => "medium",
            BinClass::Low => "low",
            BinClass::Critical => "critical",
        }
    }
    fn mode_count_range(self) -> (usize, usize) {
        match self {
            BinClass::High => (1, 2),
            BinClass::Medium => (1, 3),
            BinClass::Low => (2, 4),
            BinClass::Critical => (1, 2),
        }
    }
    fn intensity_range(self) -> (f64, f64) {
        match self {
            BinClass::High => (0.05, 0.35),
            BinClass::Medium => (0.25, 0.65),
            BinClass::Low => (0.5, 1.0),
            BinClass::Critical => (0.7, 1.0),
        }
    }
}

/// An axis-aligned rectangle of the image grid.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rect {
    pub y0: usize,
    pub x0: usize,
    pub h: usize,
    pub w: usize,
}

impl Rect {
    pub fn len(&self) -> usize {
        self.h * self.w
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Expanded by `m` pixels on every side, clipped to an `ih×iw` image.
    pub fn expand(&self, m: usize, ih: usize, iw: usize) -> Rect {
        let y0 = self.y0.saturating_sub(m);
        let x0 = self.x0.saturating_sub(m);
        let y1 = (self.y0 + self.h + m).min(ih);
        let x1 = (self.x0 + self.w + m).min(iw);
        Rect {
            y0,
            x0,
            h: y1 - y0,
            w: x1 - x0,
        }
    }
}

/// Bounding box of the true pixels of an `h×w` mask (None if empty).
pub fn bounding_box(mask: &[bool], h: usize, w: usize) -> Option<Rect> {
    let (mut y0, mut y1, mut x0, mut x1) = (usize::MAX, 0, usize::MAX, 0);
    for i in 0..h {
        let row = &mask[i * w..(i + 1) * w];
        if let Some(a) = row.iter().position(|&m| m) {
            let b = row.iter().rposition(|&m| m).unwrap_or(a);
            y0 = y0.min(i);
            y1 = y1.max(i);
            x0 = x0.min(a);
            x1 = x1.max(b);
        }
    }
    if y0 == usize::MAX {
        None
    } else {
        Some(Rect {
            y0,
            x0,
            h: y1 - y0 + 1,
            w: x1 - x0 + 1,
        })
    }
}

/// A GT mask kept compactly: image size and the crop of its bounding box.
#[derive(Clone, Debug)]
pub struct GtMask {
    pub h: usize,
    pub w: usize,
    pub bbox: Rect,
    /// `bbox.h × bbox.w`, true = lesion.
    pub crop: Vec<bool>,
}

impl GtMask {
    /// From a full `h×w` mask (non-zero = lesion). None for an empty mask.
    pub fn from_full(mask: &[u8], h: usize, w: usize) -> Option<GtMask> {
        let b: Vec<bool> = mask.iter().map(|&v| v != 0).collect();
        let bbox = bounding_box(&b, h, w)?;
        let mut crop = Vec::with_capacity(bbox.len());
        for i in 0..bbox.h {
            crop.extend_from_slice(
                &b[(bbox.y0 + i) * w + bbox.x0..(bbox.y0 + i) * w + bbox.x0 + bbox.w],
            );
        }
        Some(GtMask { h, w, bbox, crop })
    }
    /// Value at image pixel (i, j).
    pub fn at(&self, i: usize, j: usize) -> bool {
        let b = &self.bbox;
        i >= b.y0
            && j >= b.x0
            && i < b.y0 + b.h
            && j < b.x0 + b.w
            && self.crop[(i - b.y0) * b.w + (j - b.x0)]
    }
    /// Crop to a rectangle (outside the bbox: background).
    pub fn window(&self, r: &Rect) -> Vec<bool> {
        let mut out = vec![false; r.len()];
        for i in 0..r.h {
            for j in 0..r.w {
                out[i * r.w + j] = self.at(r.y0 + i, r.x0 + j);
            }
        }
        out
    }
    pub fn area(&self) -> usize {
        self.crop.iter().filter(|&&m| m).count()
    }
}

/// Everything computed once per GT source (SPEC §8.8 work unit).
#[derive(Clone, Debug)]
pub struct SourceContext {
    pub h: usize,
    pub w: usize,
    /// Working window in image coordinates.
    pub win: Rect,
    /// GT on the working window.
    pub gt_win: Vec<bool>,
    /// GT SDF (§8.1) on the working window.
    pub phi: Vec<f64>,
    pub desc: LesionDescriptors,
    /// Foreground window pixels sorted by φ ascending (deepest first).
    pub fg_sorted: Vec<(f64, u32)>,
    /// Background window pixels sorted by φ ascending.
    pub bg_sorted: Vec<(f64, u32)>,
    /// Window pixels with `|φ| < 1`.
    pub boundary: Vec<u32>,
    /// Stored grid size `S`.
    pub store: usize,
    /// `GT_S = nearest(GT → S×S)` (1 = lesion).
    pub gt_s: Vec<u8>,
    pub gt_s_count: usize,
    /// Taps of `bilinear(ac=false)` from the image to `S` along rows (W axis) and columns (H axis).
    pub taps_x: Vec<(usize, usize, f32)>,
    pub taps_y: Vec<(usize, usize, f32)>,
}

impl SourceContext {
    pub fn new(gt: &GtMask, store: usize) -> SourceContext {
        let (h, w) = (gt.h, gt.w);
        let bbox_mask = &gt.crop;
        let desc = describe(bbox_mask, gt.bbox.h, gt.bbox.w);
        // Descriptors use a = A/(H·W) of the full image.
        let desc = LesionDescriptors {
            area_frac: desc.area as f64 / (h * w) as f64,
            tiny: (desc.area as f64 / (h * w) as f64) < 0.003,
            small: (0.003..0.012).contains(&(desc.area as f64 / (h * w) as f64)),
            ..desc
        };
        let margin = (3.5 * desc.radius).ceil() as usize + 12;
        let win = gt.bbox.expand(margin, h, w);
        let gt_win = gt.window(&win);
        let (phi, sq) = sdf_unit_with_sq(&gt_win, win.h, win.w);
        let boundary = phi
            .iter()
            .enumerate()
            .filter(|(_, f)| f.abs() < 1.0)
            .map(|(p, _)| p as u32)
            .collect();
        let fg_sorted = sorted_by_phi(&phi, &sq, &gt_win, true);
        let bg_sorted = sorted_by_phi(&phi, &sq, &gt_win, false);
        let ny = nearest_taps(h, store);
        let nx = nearest_taps(w, store);
        let mut gt_s = vec![0u8; store * store];
        let mut gt_s_count = 0;
        for (o, &si) in ny.iter().enumerate() {
            for (p, &sj) in nx.iter().enumerate() {
                if gt.at(si, sj) {
                    gt_s[o * store + p] = 1;
                    gt_s_count += 1;
                }
            }
        }
        SourceContext {
            h,
            w,
            win,
            gt_win,
            phi,
            desc,
            fg_sorted,
            bg_sorted,
            boundary,
            store,
            gt_s,
            gt_s_count,
            taps_x: bilinear_taps_f32(w, store),
            taps_y: bilinear_taps_f32(h, store),
        }
    }

    /// `bilinear(ac=false)` to `S×S` of an image-sized plane that is zero outside `region` (values given on the
    /// region). Bit-identical to resizing the full plane.
    pub fn resize_region(&self, vals: &[f32], region: &Rect) -> Vec<f32> {
        let s = self.store;
        let cols = region_cols(&self.taps_x, region.x0, region.w);
        let nc = cols.len();
        let mut tmp = vec![0f32; region.h * nc];
        for i in 0..region.h {
            let row = &vals[i * region.w..(i + 1) * region.w];
            let out = &mut tmp[i * nc..(i + 1) * nc];
            for (o, c) in out.iter_mut().zip(&cols) {
                let a = c.j0.map_or(0.0, |j| row[j]);
                let b = c.j1.map_or(0.0, |j| row[j]);
                *o = (1.0 - c.lam) * a + c.lam * b;
            }
        }
        let mut out = vec![0f32; s * s];
        let (ry0, ry1) = (region.y0, region.y0 + region.h);
        for o in 0..s {
            let (i0, i1, l) = self.taps_y[o];
            let in0 = i0 >= ry0 && i0 < ry1;
            let in1 = i1 >= ry0 && i1 < ry1;
            if !in0 && !in1 {
                continue;
            }
            let dst = &mut out[o * s..(o + 1) * s];
            for (k, c) in cols.iter().enumerate() {
                let a = if in0 { tmp[(i0 - ry0) * nc + k] } else { 0.0 };
                let b = if in1 { tmp[(i1 - ry0) * nc + k] } else { 0.0 };
                dst[c.o] = (1.0 - l) * a + l * b;
            }
        }
        out
    }

    /// Dice of a thresholded `S×S` plane (`v > 0.5`) against `GT_S`; both empty → 1.
    pub fn dice_s(&self, stored: &[f32]) -> f64 {
        let mut inter = 0usize;
        let mut n = 0usize;
        for (v, g) in stored.iter().zip(self.gt_s.iter()) {
            if *v > 0.5 {
                n += 1;
                inter += *g as usize;
            }
        }
        let denom = n + self.gt_s_count;
        if denom == 0 {
            1.0
        } else {
            2.0 * inter as f64 / denom as f64
        }
    }

    /// Cheap quality proxy of a window mask: Dice of `bilinear(m → S) > 0.5` against `GT_S`. Computes exactly what
    /// resizing the 0/1 plane with [`Self::resize_region`] and [`Self::dice_s`] would, without materialising it.
    pub fn proxy_dice(&self, m: &[bool]) -> f64 {
        let win = &self.win;
        assert_eq!(m.len(), win.len(), "window mask length");
        let s = self.store;
        let cols = region_cols(&self.taps_x, win.x0, win.w);
        // Horizontal pass on 0/1 values: the four possible results per output column, computed by the same f32
        // expression `(1 − λ)·a + λ·b` as the plane resize.
        let lut: Vec<[f32; 4]> = cols
            .iter()
            .map(|c| {
                let f = |a: f32, b: f32| (1.0 - c.lam) * a + c.lam * b;
                [f(0.0, 0.0), f(0.0, 1.0), f(1.0, 0.0), f(1.0, 1.0)]
            })
            .collect();
        let nc = cols.len();
        let mut inter = 0usize;
        let mut n = 0usize;
        PROXY_TMP.with(|t| {
            let mut tmp = t.borrow_mut();
            tmp.clear();
            tmp.resize(win.h * nc, 0.0);
            for i in 0..win.h {
                let row = &m[i * win.w..(i + 1) * win.w];
                let out = &mut tmp[i * nc..(i + 1) * nc];
                for ((o, c), l) in out.iter_mut().zip(&cols).zip(&lut) {
                    let a = c.j0.is_some_and(|j| row[j]) as usize;
                    let b = c.j1.is_some_and(|j| row[j]) as usize;
                    *o = l[2 * a + b];
                }
            }
            let (ry0, ry1) = (win.y0, win.y0 + win.h);
            for o in 0..s {
                let (i0, i1, l) = self.taps_y[o];
                let in0 = i0 >= ry0 && i0 < ry1;
                let in1 = i1 >= ry0 && i1 < ry1;
                if !in0 && !in1 {
                    continue;
                }
                let row_of = |i: usize| &tmp[(i - ry0) * nc..(i - ry0 + 1) * nc];
                let ra: &[f32] = if in0 { row_of(i0) } else { &[] };
                let rb: &[f32] = if in1 { row_of(i1) } else { &[] };
                let gt = &self.gt_s[o * s..(o + 1) * s];
                for (k, c) in cols.iter().enumerate() {
                    let a = if in0 { ra[k] } else { 0.0 };
                    let b = if in1 { rb[k] } else { 0.0 };
                    if (1.0 - l) * a + l * b > 0.5 {
                        n += 1;
                        inter += gt[c.o] as usize;
                    }
                }
            }
        });
        let denom = n + self.gt_s_count;
        if denom == 0 {
            1.0
        } else {
            2.0 * inter as f64 / denom as f64
        }
    }

    /// Whether a window mask equals the GT on the window.
    pub fn equals_gt(&self, m: &[bool]) -> bool {
        m == &self.gt_win[..]
    }
}

thread_local! {
    /// Scratch plane of [`SourceContext::proxy_dice`] (one per thread, reused across calls).
    static PROXY_TMP: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One output column of a horizontal `bilinear(ac=false)` pass whose taps touch a region: output index `o`, the taps
/// as region-relative column indices (None: outside the region, value 0) and `λ`.
struct RegionCol {
    o: usize,
    j0: Option<usize>,
    j1: Option<usize>,
    lam: f32,
}

/// The output columns whose taps touch the image columns `[x0, x0 + w)`.
fn region_cols(taps: &[(usize, usize, f32)], x0: usize, w: usize) -> Vec<RegionCol> {
    let rel = |j: usize| (j >= x0 && j < x0 + w).then(|| j - x0);
    taps.iter()
        .enumerate()
        .filter_map(|(o, &(i0, i1, lam))| {
            let (j0, j1) = (rel(i0), rel(i1));
            (j0.is_some() || j1.is_some()).then_some(RegionCol { o, j0, j1, lam })
        })
        .collect()
}

/// The pixels of one class of the window (`fg`: GT foreground) as `(φ, p)` sorted by φ ascending, ties by pixel
/// index: the order of sorting the pairs with `total_cmp`. Counting sort on the exact integer squared distances when
/// they are available (φ is strictly monotone in them: decreasing for the foreground, increasing for the background).
fn sorted_by_phi(phi: &[f64], sq: &[u32], gt_win: &[bool], fg: bool) -> Vec<(f64, u32)> {
    let members = || {
        gt_win
            .iter()
            .enumerate()
            .filter(move |(_, &g)| g == fg)
            .map(|(p, _)| p)
    };
    let max_sq = members().map(|p| sq[p]).max().unwrap_or(0);
    let counting = max_sq != NO_SITE && (max_sq as usize) <= 4 * gt_win.len() + 4096;
    if !counting {
        let mut v: Vec<(f64, u32)> = members().map(|p| (phi[p], p as u32)).collect();
        // Keys are unique (pixel index tie-break), so an unstable sort is deterministic.
        v.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        return v;
    }
    let key = |p: usize| -> usize {
        if fg {
            (max_sq - sq[p]) as usize
        } else {
            sq[p] as usize
        }
    };
    let mut start = vec![0u32; max_sq as usize + 2];
    for p in members() {
        start[key(p) + 1] += 1;
    }
    for k in 1..start.len() {
        start[k] += start[k - 1];
    }
    let n = start[start.len() - 1] as usize;
    let mut out = vec![(0.0, 0u32); n];
    for p in members() {
        let k = key(p);
        out[start[k] as usize] = (phi[p], p as u32);
        start[k] += 1;
    }
    out
}

/// Shape of one random blob (hole, island, tip blob): ellipse with axis ratio `q`, angle, boundary perturbed by
/// `0.2r·G` (a field drawn once in radius-normalised coordinates, so a blob keeps its shape when the gain rescales it).
#[derive(Clone, Debug)]
pub struct BlobShape {
    pub ratio: f64,
    pub angle: f64,
    /// Field on a `BLOB_N×BLOB_N` grid covering normalised coordinates `[−BLOB_EXT, BLOB_EXT]²`.
    pub field: Vec<f64>,
}

const BLOB_N: usize = 49;
const BLOB_EXT: f64 = 3.0;

impl BlobShape {
    /// `corr_norm`: correlation length of the boundary field in units of the radius (`max(1, r/2)/r`).
    fn draw<R: Rng + ?Sized>(rng: &mut R, corr_norm: f64, spectrum: Spectrum) -> BlobShape {
        let ratio = rng.gen_range(0.6..1.0);
        let angle = rng.gen_range(0.0..std::f64::consts::PI);
        let px_per_unit = (BLOB_N - 1) as f64 / (2.0 * BLOB_EXT);
        let field = random_field(
            BLOB_N,
            BLOB_N,
            corr_norm * px_per_unit,
            spectrum,
            false,
            rng,
        );
        BlobShape {
            ratio,
            angle,
            field,
        }
    }

    fn field_at(&self, u: f64, v: f64) -> f64 {
        let s = (BLOB_N - 1) as f64 / (2.0 * BLOB_EXT);
        let x = ((u + BLOB_EXT) * s).clamp(0.0, (BLOB_N - 1) as f64);
        let y = ((v + BLOB_EXT) * s).clamp(0.0, (BLOB_N - 1) as f64);
        let (x0, y0) = (x.floor() as usize, y.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(BLOB_N - 1), (y0 + 1).min(BLOB_N - 1));
        let (lx, ly) = (x - x0 as f64, y - y0 as f64);
        let f = |i: usize, j: usize| self.field[i * BLOB_N + j];
        (1.0 - ly) * ((1.0 - lx) * f(y0, x0) + lx * f(y0, x1))
            + ly * ((1.0 - lx) * f(y1, x0) + lx * f(y1, x1))
    }

    /// Approximate signed distance (negative inside) of the blob of radius `r` centred at `(cy, cx)` at `(y, x)`.
    fn psi(&self, r: f64, cy: f64, cx: f64, y: f64, x: f64) -> f64 {
        let (dy, dx) = (y - cy, x - cx);
        let (sa, ca) = self.angle.sin_cos();
        let u = ca * dx + sa * dy;
        let v = -sa * dx + ca * dy;
        let b = r * self.ratio;
        let k = ((u / r).powi(2) + (v / b).powi(2)).sqrt();
        (k - 1.0) * (r * b).sqrt() + 0.2 * r * self.field_at(u / r, v / r)
    }

    #[allow(clippy::too_many_arguments)]
    /// Combine the blob into `phi` (window values) by union (`min`) or subtraction (`max(φ, −ψ)`), over a box.
    fn apply(
        &self,
        phi: &mut [f64],
        win: &Rect,
        r: f64,
        cy: f64,
        cx: f64,
        union: bool,
        extra: f64,
    ) {
        let half = (1.6 * r + extra + 2.0).ceil() as isize;
        let (icy, icx) = (cy.round() as isize, cx.round() as isize);
        let i0 = (icy - half).max(0) as usize;
        let i1 = ((icy + half + 1).max(0) as usize).min(win.h);
        let j0 = (icx - half).max(0) as usize;
        let j1 = ((icx + half + 1).max(0) as usize).min(win.w);
        for i in i0..i1 {
            for j in j0..j1 {
                let p = self.psi(r, cy, cx, i as f64, j as f64);
                let v = &mut phi[i * win.w + j];
                *v = if union { v.min(p) } else { v.max(-p) };
            }
        }
    }
}

/// One mode with its (adjusted) intensity `s`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModeDraw {
    pub mode: Mode,
    pub s: f64,
}

#[derive(Clone, Debug)]
struct StripDraw {
    cy: f64,
    cx: f64,
    angle: f64,
}

#[derive(Clone, Debug)]
struct BlobDraw {
    u_r: f64,
    u_pos: f64,
    shape: BlobShape,
}

#[derive(Clone, Debug)]
struct AttachDraw {
    /// Start pixel (window coordinates) and outward direction (unit, rotated).
    sy: f64,
    sx: f64,
    dir: (f64, f64),
    tip: Option<(f64, BlobShape)>,
    bridge: bool,
}

/// One random composition (SPEC §8.5) ready to render at any gain.
#[derive(Clone, Debug)]
pub struct Composition {
    /// Drawn modes in application order.
    pub modes: Vec<ModeDraw>,
    /// Soft-mask temperature `T` (working-grid pixels).
    pub temperature: f64,
    deform_field: Option<Vec<f64>>,
    shrink_field: Option<Vec<f64>>,
    jitter_field: Option<Vec<f64>>,
    strips: Vec<StripDraw>,
    holes: Vec<BlobDraw>,
    islands: Vec<BlobDraw>,
    attach: Option<AttachDraw>,
}

/// Draws `k` distinct indices with probabilities proportional to `weights`, without replacement.
fn weighted_without_replacement<R: Rng + ?Sized>(
    weights: &[f64],
    k: usize,
    rng: &mut R,
) -> Vec<usize> {
    let mut w = weights.to_vec();
    let mut out = Vec::new();
    for _ in 0..k {
        let total: f64 = w.iter().sum();
        if total <= 0.0 {
            break;
        }
        let mut u = rng.gen::<f64>() * total;
        let mut pick = None;
        for (i, &wi) in w.iter().enumerate() {
            if wi <= 0.0 {
                continue;
            }
            pick = Some(i);
            if u < wi {
                break;
            }
            u -= wi;
        }
        let i = pick.expect("positive total weight has a positive entry");
        out.push(i);
        w[i] = 0.0;
    }
    out
}

impl Composition {
    /// Draws a composition for a bin class from the sample's RNG (SPEC §8.5). `temperature` is the `U(lo, hi)` range of `T`.
    pub fn draw<R: Rng + ?Sized>(
        ctx: &SourceContext,
        class: BinClass,
        temperature: (f64, f64),
        spectrum: Spectrum,
        rng: &mut R,
    ) -> Composition {
        let d = &ctx.desc;
        let (kmin, kmax) = class.mode_count_range();
        let k = rng.gen_range(kmin..=kmax);
        let weights: Vec<f64> = Mode::ALL
            .iter()
            .map(|&m| {
                if m == Mode::Disappearance && !(d.tiny || d.small) {
                    0.0
                } else {
                    m.base_weight(class) * m.multiplier(d)
                }
            })
            .collect();
        let picks = weighted_without_replacement(&weights, k, rng);
        let (slo, shi) = class.intensity_range();
        let boost =
            1.0 + 0.5 * d.tiny as u8 as f64 + 0.25 * d.irregular as u8 as f64 + 0.25 * d.complexity;
        let mut modes: Vec<ModeDraw> = picks
            .iter()
            .map(|&i| {
                let s: f64 = rng.gen_range(slo..shi);
                ModeDraw {
                    mode: Mode::ALL[i],
                    s: (s * boost).min(1.0),
                }
            })
            .collect();
        modes.sort_by_key(|m| m.mode.application_rank());
        let temperature = if temperature.1 > temperature.0 {
            rng.gen_range(temperature.0..temperature.1)
        } else {
            temperature.0
        };
        let mut c = Composition {
            modes: modes.clone(),
            temperature,
            deform_field: None,
            shrink_field: None,
            jitter_field: None,
            strips: Vec::new(),
            holes: Vec::new(),
            islands: Vec::new(),
            attach: None,
        };
        let r = d.radius;
        let win = ctx.win;
        let has_islands = modes.iter().any(|m| m.mode == Mode::FpIslands);
        for md in &modes {
            let s = md.s;
            match md.mode {
                Mode::Deform => {
                    let l = (r * rng.gen_range(0.3..0.8)).clamp(2.0, 64.0);
                    c.deform_field = Some(random_field(win.h, win.w, l, spectrum, true, rng));
                }
                Mode::Shrinkage => {
                    let l = (r / 2.0).max(2.0);
                    c.shrink_field = Some(random_field(win.h, win.w, l, spectrum, true, rng));
                }
                Mode::Jitter => {
                    let l = rng.gen_range(0.7..1.5);
                    c.jitter_field = Some(random_field(win.h, win.w, l, spectrum, true, rng));
                }
                Mode::Breakage => {
                    let n = 1 + (2.0 * s).floor() as usize;
                    let deep = ctx.fg_sorted.partition_point(|&(f, _)| f < -0.25 * r);
                    let pool = if deep > 0 { deep } else { ctx.fg_sorted.len() };
                    for _ in 0..n {
                        let idx = ((rng.gen::<f64>() * pool as f64) as usize).min(pool - 1);
                        let p = ctx.fg_sorted[idx].1 as usize;
                        let angle = rng.gen_range(0.0..std::f64::consts::PI);
                        c.strips.push(StripDraw {
                            cy: (p / win.w) as f64,
                            cx: (p % win.w) as f64,
                            angle,
                        });
                    }
                }
                Mode::Holes => {
                    let n = 1 + (3.0 * s).floor() as usize;
                    for _ in 0..n {
                        let u_r = rng.gen::<f64>();
                        let u_pos = rng.gen::<f64>();
                        let r1 = r * (0.08 + u_r * (0.04 + 0.18 * s));
                        let shape =
                            BlobShape::draw(rng, (1.0f64).max(r1 / 2.0) / r1.max(1e-6), spectrum);
                        c.holes.push(BlobDraw { u_r, u_pos, shape });
                    }
                }
                Mode::FpIslands => {
                    let n = 1 + (4.0 * s).floor() as usize;
                    for _ in 0..n {
                        let u_r = rng.gen::<f64>();
                        let u_pos = rng.gen::<f64>();
                        let r1 = (r * (0.05 + u_r * (0.05 + 0.25 * s))).max(1.5);
                        let shape = BlobShape::draw(rng, (1.0f64).max(r1 / 2.0) / r1, spectrum);
                        c.islands.push(BlobDraw { u_r, u_pos, shape });
                    }
                }
                Mode::Attachment => {
                    let (sy, sx, normal) = if ctx.boundary.is_empty() {
                        let p = ctx.fg_sorted.last().map(|x| x.1 as usize).unwrap_or(0);
                        ((p / win.w) as f64, (p % win.w) as f64, (0.0, 1.0))
                    } else {
                        let idx = ((rng.gen::<f64>() * ctx.boundary.len() as f64) as usize)
                            .min(ctx.boundary.len() - 1);
                        let p = ctx.boundary[idx] as usize;
                        let (i, j) = (p / win.w, p % win.w);
                        let at = |i: usize, j: usize| ctx.phi[i * win.w + j];
                        let gy = at((i + 1).min(win.h - 1), j) - at(i.saturating_sub(1), j);
                        let gx = at(i, (j + 1).min(win.w - 1)) - at(i, j.saturating_sub(1));
                        let n = (gy * gy + gx * gx).sqrt();
                        let normal = if n > 1e-12 {
                            (gy / n, gx / n)
                        } else {
                            (0.0, 1.0)
                        };
                        (i as f64, j as f64, normal)
                    };
                    let rot =
                        rng.gen_range(-std::f64::consts::FRAC_PI_4..std::f64::consts::FRAC_PI_4);
                    let (sr, cr) = rot.sin_cos();
                    let dir = (
                        cr * normal.0 + sr * normal.1,
                        -sr * normal.0 + cr * normal.1,
                    );
                    let tip = if rng.gen::<f64>() < 0.5 {
                        let rb = r * rng.gen_range(0.1..0.3);
                        let shape =
                            BlobShape::draw(rng, (1.0f64).max(rb / 2.0) / rb.max(1e-6), spectrum);
                        Some((rb, shape))
                    } else {
                        None
                    };
                    let bridge = has_islands && rng.gen::<f64>() < 0.5;
                    c.attach = Some(AttachDraw {
                        sy,
                        sx,
                        dir,
                        tip,
                        bridge,
                    });
                }
                Mode::Erosion | Mode::Dilation | Mode::Disappearance => {}
            }
        }
        c
    }

    /// Whether the composition contains a mode.
    pub fn has(&self, m: Mode) -> bool {
        self.modes.iter().any(|d| d.mode == m)
    }

    fn s_of(&self, m: Mode) -> f64 {
        self.modes
            .iter()
            .find(|d| d.mode == m)
            .map(|d| d.s)
            .unwrap_or(0.0)
    }

    /// The final field `φ'` on the working window at gain `g` (before thresholding).
    pub fn field(&self, ctx: &SourceContext, g: f64) -> Vec<f64> {
        let r = ctx.desc.radius;
        let win = ctx.win;
        let mut phi = ctx.phi.clone();
        // Additive modes.
        let mut offset = 0.0;
        if self.has(Mode::Erosion) {
            offset += g * r * (0.04 + 0.30 * self.s_of(Mode::Erosion));
        }
        if self.has(Mode::Dilation) {
            offset -= g * r * (0.04 + 0.30 * self.s_of(Mode::Dilation));
        }
        let mut shrink_o = 0.0;
        if self.has(Mode::Shrinkage) {
            shrink_o = g * r * (0.30 + 0.50 * self.s_of(Mode::Shrinkage));
            offset += shrink_o;
        }
        let deform_a = g * r * (0.05 + 0.30 * self.s_of(Mode::Deform));
        // Each operator applies only if its mode is part of the composition.
        let shrink_field = self
            .shrink_field
            .as_ref()
            .filter(|_| self.has(Mode::Shrinkage));
        let deform_field = self
            .deform_field
            .as_ref()
            .filter(|_| self.has(Mode::Deform));
        // dv = offset (+ 0.2·o_shrink·f_shrink) (+ a_deform·f_deform), one loop per combination.
        let ks = 0.2 * shrink_o;
        match (shrink_field, deform_field) {
            (None, None) => phi.iter_mut().for_each(|v| *v += offset),
            (Some(fs), None) => {
                for (v, &a) in phi.iter_mut().zip(fs) {
                    *v += offset + ks * a;
                }
            }
            (None, Some(fd)) => {
                for (v, &b) in phi.iter_mut().zip(fd) {
                    *v += offset + deform_a * b;
                }
            }
            (Some(fs), Some(fd)) => {
                for ((v, &a), &b) in phi.iter_mut().zip(fs).zip(fd) {
                    *v += offset + ks * a + deform_a * b;
                }
            }
        }
        // Margin of the jitter band, so set operations are evaluated wherever the band could reach.
        let jit_a = if self.has(Mode::Jitter) {
            g * (0.5 + 2.0 * self.s_of(Mode::Jitter))
        } else {
            0.0
        };
        let extra = 3.0 + 3.0 * jit_a;
        // Breakage: subtract straight strips.
        if self.has(Mode::Breakage) {
            let s = self.s_of(Mode::Breakage);
            let hw = g * (0.75f64).max(r * (0.03 + 0.10 * s));
            let half_len = 1.25 * r;
            for st in &self.strips {
                let (sa, ca) = st.angle.sin_cos();
                let (ay, ax) = (st.cy - sa * half_len, st.cx - ca * half_len);
                segment_csg(
                    &mut phi,
                    &win,
                    (ay, ax),
                    (sa, ca),
                    2.0 * half_len,
                    hw,
                    hw,
                    false,
                    extra,
                );
            }
        }
        // Holes: subtract blobs centred at pixels with φ < −(r + 1.5).
        if self.has(Mode::Holes) {
            let s = self.s_of(Mode::Holes);
            for hd in &self.holes {
                let rh = g * r * (0.08 + hd.u_r * (0.04 + 0.18 * s));
                let n = ctx.fg_sorted.partition_point(|&(f, _)| f < -(rh + 1.5));
                if n == 0 || rh <= 0.0 {
                    continue;
                }
                let idx = ((hd.u_pos * n as f64) as usize).min(n - 1);
                let p = ctx.fg_sorted[idx].1 as usize;
                let (cy, cx) = ((p / win.w) as f64, (p % win.w) as f64);
                hd.shape.apply(&mut phi, &win, rh, cy, cx, false, extra);
            }
        }
        // Islands (positions needed by a bridge).
        let mut island_pos: Vec<(f64, f64, f64, usize)> = Vec::new();
        if self.has(Mode::FpIslands) {
            let s = self.s_of(Mode::FpIslands);
            for (bk, bd) in self.islands.iter().enumerate() {
                let ri = (g * r * (0.05 + bd.u_r * (0.05 + 0.25 * s))).max(1.5);
                let lo = ctx.bg_sorted.partition_point(|&(f, _)| f <= 0.5 * r + ri);
                let hi = ctx.bg_sorted.partition_point(|&(f, _)| f < 3.0 * r + ri);
                if hi <= lo {
                    continue;
                }
                let n = hi - lo;
                let start = ((bd.u_pos * n as f64) as usize).min(n - 1);
                // Uniform pick; if it is closer than r to the image border, take the next valid one (cyclically).
                let mut found = None;
                for t in 0..n {
                    let p = ctx.bg_sorted[lo + (start + t) % n].1 as usize;
                    let (iy, ix) = (win.y0 + p / win.w, win.x0 + p % win.w);
                    let dist_border = (iy as f64)
                        .min(ix as f64)
                        .min((ctx.h - 1 - iy) as f64)
                        .min((ctx.w - 1 - ix) as f64);
                    if dist_border >= ri {
                        found = Some(p);
                        break;
                    }
                }
                if let Some(p) = found {
                    island_pos.push(((p / win.w) as f64, (p % win.w) as f64, ri, bk));
                }
            }
        }
        // Attachment (bridge or strip to a nearby structure).
        if let Some(at) = self.attach.as_ref().filter(|_| self.has(Mode::Attachment)) {
            let s = self.s_of(Mode::Attachment);
            let mut len = g * r * (0.3 + 0.7 * s);
            let mut dir = at.dir;
            if at.bridge && !island_pos.is_empty() {
                let nearest = island_pos
                    .iter()
                    .min_by(|a, b| {
                        let da = (a.0 - at.sy).powi(2) + (a.1 - at.sx).powi(2);
                        let db = (b.0 - at.sy).powi(2) + (b.1 - at.sx).powi(2);
                        da.total_cmp(&db)
                    })
                    .copied()
                    .expect("non-empty");
                let (dy, dx) = (nearest.0 - at.sy, nearest.1 - at.sx);
                let dn = (dy * dy + dx * dx).sqrt();
                if dn > 1e-9 {
                    dir = (dy / dn, dx / dn);
                    len = dn;
                }
            }
            let h0 = (1.0f64).max(r * (0.06 + 0.12 * s));
            segment_csg(
                &mut phi,
                &win,
                (at.sy, at.sx),
                dir,
                len,
                h0,
                0.4 * h0,
                true,
                extra,
            );
            if let Some((rb, shape)) = &at.tip {
                let (ty, tx) = (at.sy + dir.0 * len, at.sx + dir.1 * len);
                shape.apply(&mut phi, &win, *rb, ty, tx, true, extra);
            }
        }
        for &(cy, cx, ri, bk) in &island_pos {
            self.islands[bk]
                .shape
                .apply(&mut phi, &win, ri, cy, cx, true, extra);
        }
        // Jitter, last: only inside the band |φ'| < 3 + 2a.
        if let Some(f) = self
            .jitter_field
            .as_ref()
            .filter(|_| self.has(Mode::Jitter))
        {
            let band = 3.0 + 2.0 * jit_a;
            for (v, &fv) in phi.iter_mut().zip(f.iter()) {
                if v.abs() < band {
                    *v += jit_a * fv;
                }
            }
        }
        phi
    }

    /// The corrupted binary mask `m = [φ' < 0]` on the working window at gain `g`.
    pub fn render(&self, ctx: &SourceContext, g: f64) -> Vec<bool> {
        if self.has(Mode::Disappearance) {
            return vec![false; ctx.win.len()];
        }
        self.field(ctx, g).iter().map(|&v| v < 0.0).collect()
    }

    /// `"erosion:0.42|deform:0.31"` (application order).
    pub fn modes_string(&self) -> String {
        modes_string(&self.modes)
    }
}

/// `"erosion:0.42|deform:0.31"`.
pub fn modes_string(modes: &[ModeDraw]) -> String {
    modes
        .iter()
        .map(|m| format!("{}:{:.2}", m.mode.name(), m.s))
        .collect::<Vec<_>>()
        .join("|")
}

/// Signed-distance CSG of a (tapered) segment from `a` along unit `dir` with length `len`, half-width `h_start`
/// at `a` linearly tapering to `h_end`. `union`: `φ ← min(φ, ψ)`; otherwise subtraction `φ ← max(φ, −ψ)`.
#[allow(clippy::too_many_arguments)]
fn segment_csg(
    phi: &mut [f64],
    win: &Rect,
    a: (f64, f64),
    dir: (f64, f64),
    len: f64,
    h_start: f64,
    h_end: f64,
    union: bool,
    extra: f64,
) {
    let b = (a.0 + dir.0 * len, a.1 + dir.1 * len);
    let m = h_start.max(h_end) + extra + 1.0;
    let i0 = (a.0.min(b.0) - m).floor().max(0.0) as usize;
    let i1 = ((a.0.max(b.0) + m).ceil().max(0.0) as usize + 1).min(win.h);
    let j0 = (a.1.min(b.1) - m).floor().max(0.0) as usize;
    let j1 = ((a.1.max(b.1) + m).ceil().max(0.0) as usize + 1).min(win.w);
    let len = len.max(1e-9);
    for i in i0..i1 {
        for j in j0..j1 {
            let (py, px) = (i as f64 - a.0, j as f64 - a.1);
            let t = (py * dir.0 + px * dir.1).clamp(0.0, len);
            let (qy, qx) = (py - t * dir.0, px - t * dir.1);
            let d = (qy * qy + qx * qx).sqrt();
            let hw = h_start + (h_end - h_start) * (t / len);
            let psi = d - hw;
            let v = &mut phi[i * win.w + j];
            *v = if union { v.min(psi) } else { v.max(-psi) };
        }
    }
}
