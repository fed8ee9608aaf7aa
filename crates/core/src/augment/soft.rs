//! Soft masks and the stored resolution (SPEC §8.7).
//!
//! The soft mask is computed on a region around the corrupted mask and is exactly zero outside it:
//! * `sigmoid`: `σ(−φ_m/T)`, set to 0 where `φ_m > 16T` (there `σ < 1.2·10⁻⁷`);
//! * `blur`: Gaussian blur with σ = T, radius `⌈3σ⌉`, reflect-101 border (exact: the blur of `m` vanishes outside
//!   the bounding box of `m` grown by the radius);
//! * `none`: `m` itself.
//!
//! The stored mask is `bilinear(ac=false)(soft → S×S)`, computed bit-identically to resizing the full plane.
use super::edt::{squared_distance_unit, SDF_CLAMP};
use super::sim::{bounding_box, Rect, SourceContext};

/// `--soft` (SPEC §8.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SoftKind {
    #[default]
    Sigmoid,
    Blur,
    None,
}

impl SoftKind {
    pub fn name(self) -> &'static str {
        match self {
            SoftKind::Sigmoid => "sigmoid",
            SoftKind::Blur => "blur",
            SoftKind::None => "none",
        }
    }
}

impl std::str::FromStr for SoftKind {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "sigmoid" => Ok(SoftKind::Sigmoid),
            "blur" => Ok(SoftKind::Blur),
            "none" => Ok(SoftKind::None),
            _ => Err(crate::Error::Arg(format!(
                "--soft: expected sigmoid|blur|none, got {s:?}"
            ))),
        }
    }
}

/// `--store-dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreDtype {
    #[default]
    F32,
    F16,
}

impl std::str::FromStr for StoreDtype {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "f32" => Ok(StoreDtype::F32),
            "f16" => Ok(StoreDtype::F16),
            _ => Err(crate::Error::Arg(format!(
                "--store-dtype: expected f32|f16, got {s:?}"
            ))),
        }
    }
}

/// Cut-off of the sigmoid soft mask in units of `T`.
pub const SIGMOID_CUTOFF_T: f64 = 16.0;

fn reflect101(k: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let n = n as isize;
    let mut k = k;
    loop {
        if k < 0 {
            k = -k;
        } else if k >= n {
            k = 2 * (n - 1) - k;
        } else {
            return k as usize;
        }
    }
}

/// The values of a window mask `m` (of `win`) on a rectangle `r` of the image (outside the window: background),
/// negated when `negate`.
fn window_crop(m: &[bool], win: &Rect, r: &Rect, negate: bool) -> Vec<bool> {
    let mut out = vec![negate; r.len()];
    // Columns of r inside the window.
    let c0 = win.x0.max(r.x0);
    let c1 = (win.x0 + win.w).min(r.x0 + r.w);
    if c0 >= c1 {
        return out;
    }
    for i in 0..r.h {
        let y = r.y0 + i;
        if y < win.y0 || y >= win.y0 + win.h {
            continue;
        }
        let src = &m[(y - win.y0) * win.w + (c0 - win.x0)..(y - win.y0) * win.w + (c1 - win.x0)];
        let dst = &mut out[i * r.w + (c0 - r.x0)..i * r.w + (c1 - r.x0)];
        for (d, &v) in dst.iter_mut().zip(src) {
            *d = v != negate;
        }
    }
    out
}

/// The soft mask of a window mask `m` (of `ctx.win`) on a region of the image; zero outside the returned region.
pub fn soft_mask(
    ctx: &SourceContext,
    m: &[bool],
    kind: SoftKind,
    temperature: f64,
) -> (Rect, Vec<f32>) {
    let win = ctx.win;
    let Some(b) = bounding_box(m, win.h, win.w) else {
        return (
            Rect {
                y0: 0,
                x0: 0,
                h: 0,
                w: 0,
            },
            Vec::new(),
        );
    };
    let bb = Rect {
        y0: win.y0 + b.y0,
        x0: win.x0 + b.x0,
        h: b.h,
        w: b.w,
    };
    let m_at = |i: usize, j: usize| -> bool {
        i >= win.y0
            && j >= win.x0
            && i < win.y0 + win.h
            && j < win.x0 + win.w
            && m[(i - win.y0) * win.w + (j - win.x0)]
    };
    match kind {
        SoftKind::None => {
            let vals = (0..bb.h)
                .flat_map(|i| (0..bb.w).map(move |j| (i, j)))
                .map(|(i, j)| m_at(bb.y0 + i, bb.x0 + j) as u8 as f32)
                .collect();
            (bb, vals)
        }
        SoftKind::Sigmoid => {
            let t = temperature;
            let margin = (SIGMOID_CUTOFF_T * t).ceil() as usize + 1;
            let reg = bb.expand(margin, ctx.h, ctx.w);
            let mr = window_crop(m, &win, &reg, false);
            // SDF of m (SPEC §8.1): distances to the nearest foreground pixel over the region, and to the nearest
            // background pixel over bbox(m) grown by 1 (exact: the ring around the box is background).
            let d_out = squared_distance_unit(&mr, reg.h, reg.w);
            let ib = bb.expand(1, ctx.h, ctx.w);
            let not_m = window_crop(m, &win, &ib, true);
            let any_bg = not_m.iter().any(|&b| b);
            let d_in = squared_distance_unit(&not_m, ib.h, ib.w);
            let cut = SIGMOID_CUTOFF_T * t;
            // σ(−φ/T) depends only on the side and the exact integer squared distance: memoise per distance.
            let sig = |f: f64| (1.0 / (1.0 + (f / t).exp())) as f32;
            let outside = |d: u32| {
                let f = (d as f64).sqrt() - 0.5;
                if f <= cut {
                    sig(f)
                } else {
                    0.0
                }
            };
            let inside = |d: u32| {
                let f = -((d as f64).sqrt() - 0.5);
                if f <= cut {
                    sig(f)
                } else {
                    0.0
                }
            };
            let cap = ((cut + 2.0) * (cut + 2.0)) as usize + 1;
            let mut memo_out = vec![f32::NAN; cap];
            let mut memo_in = vec![f32::NAN; cap];
            let lookup = |memo: &mut [f32], d: u32, f: &dyn Fn(u32) -> f32| -> f32 {
                match memo.get_mut(d as usize) {
                    Some(v) if !v.is_nan() => *v,
                    Some(v) => {
                        *v = f(d);
                        *v
                    }
                    None => f(d),
                }
            };
            let deep = if any_bg { 0.0 } else { sig(-SDF_CLAMP) };
            let mut vals = vec![0f32; reg.len()];
            let (oy, ox) = (ib.y0 - reg.y0, ib.x0 - reg.x0);
            for ii in 0..reg.h {
                let row = ii * reg.w;
                for jj in 0..reg.w {
                    let p = row + jj;
                    vals[p] = if mr[p] {
                        if any_bg {
                            let d = d_in[(ii - oy) * ib.w + (jj - ox)];
                            lookup(&mut memo_in, d, &inside)
                        } else {
                            deep
                        }
                    } else {
                        lookup(&mut memo_out, d_out[p], &outside)
                    };
                }
            }
            (reg, vals)
        }
        SoftKind::Blur => {
            let sigma = temperature;
            let rad = (3.0 * sigma).ceil() as isize;
            let mut k: Vec<f64> = (-rad..=rad)
                .map(|d| (-(d * d) as f64 / (2.0 * sigma * sigma)).exp())
                .collect();
            let sum: f64 = k.iter().sum();
            k.iter_mut().for_each(|v| *v /= sum);
            let reg = bb.expand(rad as usize, ctx.h, ctx.w);
            // Horizontal pass on the rows of the bounding box (other rows are zero), columns of the region.
            let mut hp = vec![0f64; bb.h * reg.w];
            for i in 0..bb.h {
                let y = bb.y0 + i;
                for jj in 0..reg.w {
                    let x = (reg.x0 + jj) as isize;
                    let mut acc = 0.0;
                    for (t, &kv) in k.iter().enumerate() {
                        let xs = reflect101(x + t as isize - rad, ctx.w);
                        if m_at(y, xs) {
                            acc += kv;
                        }
                    }
                    hp[i * reg.w + jj] = acc;
                }
            }
            let mut vals = vec![0f32; reg.len()];
            for ii in 0..reg.h {
                let y = (reg.y0 + ii) as isize;
                for jj in 0..reg.w {
                    let mut acc = 0.0;
                    for (t, &kv) in k.iter().enumerate() {
                        let ys = reflect101(y + t as isize - rad, ctx.h);
                        if ys >= bb.y0 && ys < bb.y0 + bb.h {
                            acc += kv * hp[(ys - bb.y0) * reg.w + jj];
                        }
                    }
                    vals[ii * reg.w + jj] = acc as f32;
                }
            }
            (reg, vals)
        }
    }
}

/// The stored `S×S` mask of a window mask (soft mask, then `bilinear(ac=false)` to `S`, then the storage dtype).
pub fn stored_mask(
    ctx: &SourceContext,
    m: &[bool],
    kind: SoftKind,
    temperature: f64,
    dtype: StoreDtype,
) -> Vec<f32> {
    let (reg, vals) = soft_mask(ctx, m, kind, temperature);
    let mut st = if reg.is_empty() {
        vec![0f32; ctx.store * ctx.store]
    } else {
        ctx.resize_region(&vals, &reg)
    };
    if dtype == StoreDtype::F16 {
        st.iter_mut()
            .for_each(|v| *v = half::f16::from_f32(*v).to_f32());
    }
    st
}
