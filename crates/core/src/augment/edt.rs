//! Exact Euclidean distance transform and signed distance function (SPEC §8.1).
//!
//! `edt` is the separable Felzenszwalb–Huttenlocher squared-distance transform (lower envelope of parabolas), columns
//! first, then rows, in f64. For integer geometry the squared distances are exact integers, so the result equals a brute
//! force search (and `scipy.ndimage.distance_transform_edt`) bit for bit. Unit sampling (the simulator's case) runs the
//! same exact transform in integer arithmetic ([`squared_distance_unit`]: two column scans and Meijster's row pass),
//! which gives the same values several times faster.

/// Value used for the SDF of an empty mask (`+`) or a full mask (`−`), SPEC §8.1.
pub const SDF_CLAMP: f64 = 1.0e4;

/// One-dimensional squared distance transform of `f` (0 at sites, `+∞` elsewhere) with squared spacing `s2`.
/// Writes `d[q] = min_v f[v] + s2·(q−v)²`; all-infinite input gives all-infinite output.
fn dt1d(f: &[f64], d: &mut [f64], s2: f64, v: &mut [usize], z: &mut [f64]) {
    let n = f.len();
    let mut k: isize = -1;
    for q in 0..n {
        if !f[q].is_finite() {
            continue;
        }
        let fq = f[q] + s2 * (q * q) as f64;
        loop {
            if k < 0 {
                k = 0;
                v[0] = q;
                z[0] = f64::NEG_INFINITY;
                break;
            }
            let vk = v[k as usize];
            let fv = f[vk] + s2 * (vk * vk) as f64;
            let s = (fq - fv) / (2.0 * s2 * (q - vk) as f64);
            if s <= z[k as usize] {
                k -= 1;
                continue;
            }
            k += 1;
            v[k as usize] = q;
            z[k as usize] = s;
            break;
        }
    }
    if k < 0 {
        d.iter_mut().for_each(|x| *x = f64::INFINITY);
        return;
    }
    z[(k + 1) as usize] = f64::INFINITY;
    let mut j = 0usize;
    for (q, dq) in d.iter_mut().enumerate() {
        while z[j + 1] < q as f64 {
            j += 1;
        }
        let vj = v[j];
        let dv = q as f64 - vj as f64;
        *dq = s2 * dv * dv + f[vj];
    }
}

/// Marker of "no site at all" in [`squared_distance_unit`].
pub const NO_SITE: u32 = u32::MAX;

/// The integer EDT handles planes with `h + w` below this (squared distances fit in u32).
pub const UNIT_MAX_EXTENT: usize = 65_535;

/// Squared EDT on the unit grid in integer arithmetic: for every pixel the squared distance (an exact integer) to the
/// nearest pixel where `is_site` is true; all [`NO_SITE`] when there is no site. Columns by two linear scans, rows by
/// the Felzenszwalb–Huttenlocher lower envelope with every intersection comparison cross-multiplied in exact integers
/// (no division). Equal to [`squared_distance_to_sites`] with unit sampling (both are exact), several times faster.
pub fn squared_distance_unit(is_site: &[bool], h: usize, w: usize) -> Vec<u32> {
    assert_eq!(is_site.len(), h * w, "mask length must be h*w");
    assert!(
        h + w < UNIT_MAX_EXTENT,
        "integer EDT needs h + w < {UNIT_MAX_EXTENT}"
    );
    if h == 0 || w == 0 {
        return Vec::new();
    }
    EDT_SCRATCH.with(|sc| {
        let mut sc = sc.borrow_mut();
        let EdtScratch { g, v, f } = &mut *sc;
        // Column distances g (unsquared), `inf` where the column has no site above/below.
        let inf = (h + w) as u32;
        g.clear();
        g.resize(h * w, 0);
        for (gv, &s) in g[..w].iter_mut().zip(&is_site[..w]) {
            *gv = if s { 0 } else { inf };
        }
        let mut any = is_site[..w].iter().any(|&s| s);
        for i in 1..h {
            let (prev, cur) = g[(i - 1) * w..(i + 1) * w].split_at_mut(w);
            let sites = &is_site[i * w..(i + 1) * w];
            for ((c, &p), &s) in cur.iter_mut().zip(prev.iter()).zip(sites) {
                *c = if s { 0 } else { (p + 1).min(inf) };
            }
            any |= sites.iter().any(|&s| s);
        }
        if !any {
            return vec![NO_SITE; h * w];
        }
        for i in (0..h - 1).rev() {
            let (cur, next) = g[i * w..(i + 2) * w].split_at_mut(w);
            for (c, &n) in cur.iter_mut().zip(next.iter()) {
                *c = (*c).min(n + 1);
            }
        }
        // Rows: lower envelope of the parabolas (x − p)² + g(p)² over the columns p with a finite g (every row has
        // one as soon as any site exists). F(p) = p² + g(p)²; the intersection of parabolas a < b is
        // (F(b) − F(a)) / (2(b − a)), compared by cross-multiplication.
        let mut out = vec![0u32; h * w];
        v.clear();
        v.resize(w, 0);
        f.clear();
        f.resize(w, 0);
        for i in 0..h {
            let gr = &g[i * w..(i + 1) * w];
            let mut k = 0usize;
            for (q, &gq) in gr.iter().enumerate() {
                if gq >= inf {
                    continue;
                }
                let q = q as i64;
                let fq = q * q + gq as i64 * gq as i64;
                // Pop the top while its interval is empty: x(q, top) ≤ x(top, below).
                while k >= 2 {
                    let (a, fa) = (v[k - 2], f[k - 2]);
                    let (b, fb) = (v[k - 1], f[k - 1]);
                    if (fq - fb) * (b - a) <= (fb - fa) * (q - b) {
                        k -= 1;
                    } else {
                        break;
                    }
                }
                v[k] = q;
                f[k] = fq;
                k += 1;
            }
            let row = &mut out[i * w..(i + 1) * w];
            let mut j = 0usize;
            for (u, d) in row.iter_mut().enumerate() {
                let u = u as i64;
                // Move to the next parabola once it is strictly lower: x(j, j+1) < u.
                while j + 1 < k && f[j + 1] - f[j] < 2 * u * (v[j + 1] - v[j]) {
                    j += 1;
                }
                *d = (f[j] - 2 * u * v[j] + u * u) as u32;
            }
        }
        out
    })
}

/// Reusable buffers of [`squared_distance_unit`] (one set per thread).
#[derive(Default)]
struct EdtScratch {
    g: Vec<u32>,
    v: Vec<i64>,
    f: Vec<i64>,
}

thread_local! {
    static EDT_SCRATCH: std::cell::RefCell<EdtScratch> = std::cell::RefCell::new(EdtScratch::default());
}

/// Squared EDT: for every pixel, the squared distance to the nearest pixel where `is_site` is true.
/// `sampling = (s_y, s_x)`. No site at all gives `+∞` everywhere. Unit sampling takes the exact integer path
/// ([`squared_distance_unit`]); other samplings the f64 Felzenszwalb–Huttenlocher passes.
pub fn squared_distance_to_sites(
    is_site: &[bool],
    h: usize,
    w: usize,
    sampling: (f64, f64),
) -> Vec<f64> {
    assert_eq!(is_site.len(), h * w, "mask length must be h*w");
    if sampling == (1.0, 1.0) && h + w < UNIT_MAX_EXTENT {
        return squared_distance_unit(is_site, h, w)
            .into_iter()
            .map(|d| {
                if d == NO_SITE {
                    f64::INFINITY
                } else {
                    d as f64
                }
            })
            .collect();
    }
    squared_distance_float(is_site, h, w, sampling)
}

/// The f64 Felzenszwalb–Huttenlocher passes of [`squared_distance_to_sites`] (any sampling).
fn squared_distance_float(is_site: &[bool], h: usize, w: usize, sampling: (f64, f64)) -> Vec<f64> {
    let n = h.max(w);
    if h == 0 || w == 0 {
        return Vec::new();
    }
    let mut v = vec![0usize; n];
    let mut z = vec![0f64; n + 1];
    let mut f = vec![0f64; w];
    let mut d = vec![0f64; w];
    let (sy, sx) = sampling;
    let mut out: Vec<f64> = is_site
        .iter()
        .map(|&s| if s { 0.0 } else { f64::INFINITY })
        .collect();
    // Columns, gathered in blocks of 8 adjacent columns (one cache line of f64 per row) to avoid strided misses.
    const B: usize = 8;
    let mut fb = vec![0f64; B * h];
    let mut db = vec![0f64; B * h];
    let mut j0 = 0;
    while j0 < w {
        let nb = B.min(w - j0);
        for i in 0..h {
            let row = &out[i * w + j0..i * w + j0 + nb];
            for (c, &x) in row.iter().enumerate() {
                fb[c * h + i] = x;
            }
        }
        for c in 0..nb {
            let col = &fb[c * h..(c + 1) * h];
            if col.iter().all(|x| x.is_infinite()) {
                db[c * h..(c + 1) * h]
                    .iter_mut()
                    .for_each(|x| *x = f64::INFINITY);
            } else {
                dt1d(col, &mut db[c * h..(c + 1) * h], sy * sy, &mut v, &mut z);
            }
        }
        for i in 0..h {
            let row = &mut out[i * w + j0..i * w + j0 + nb];
            for (c, x) in row.iter_mut().enumerate() {
                *x = db[c * h + i];
            }
        }
        j0 += nb;
    }
    // Rows.
    for i in 0..h {
        let row = &mut out[i * w..(i + 1) * w];
        f[..w].copy_from_slice(row);
        dt1d(&f[..w], &mut d[..w], sx * sx, &mut v, &mut z);
        row.copy_from_slice(&d[..w]);
    }
    out
}

/// `edt(M)[x]`: Euclidean distance from pixel centre `x` to the nearest pixel centre where `M` is false (SPEC §8.1).
/// An all-true mask returns `+∞` everywhere.
pub fn edt(mask: &[bool], h: usize, w: usize, sampling: (f64, f64)) -> Vec<f64> {
    let sites: Vec<bool> = mask.iter().map(|&m| !m).collect();
    let mut d = squared_distance_to_sites(&sites, h, w, sampling);
    d.iter_mut().for_each(|x| *x = x.sqrt());
    d
}

/// `edt` of a u8 mask (non-zero = true).
pub fn edt_u8(mask: &[u8], h: usize, w: usize, sampling: (f64, f64)) -> Vec<f64> {
    let m: Vec<bool> = mask.iter().map(|&v| v != 0).collect();
    edt(&m, h, w, sampling)
}

/// Signed distance function, negative inside (SPEC §8.1): background `edt(¬G) − 0.5`, foreground `−(edt(G) − 0.5)`.
/// `φ < 0` reproduces `G` exactly. Empty mask → `+10⁴`, full mask → `−10⁴` everywhere.
pub fn sdf(mask: &[bool], h: usize, w: usize, sampling: (f64, f64)) -> Vec<f64> {
    assert_eq!(mask.len(), h * w, "mask length must be h*w");
    if sampling == (1.0, 1.0) {
        return sdf_unit_with_sq(mask, h, w).0;
    }
    let n_fg = mask.iter().filter(|&&m| m).count();
    if n_fg == 0 {
        return vec![SDF_CLAMP; h * w];
    }
    if n_fg == h * w {
        return vec![-SDF_CLAMP; h * w];
    }
    // Distance to the nearest foreground pixel (for background pixels) and to the nearest background pixel
    // (for foreground pixels).
    let d_out = squared_distance_to_sites(mask, h, w, sampling);
    let not_mask: Vec<bool> = mask.iter().map(|&m| !m).collect();
    let d_in = squared_distance_to_sites(&not_mask, h, w, sampling);
    mask.iter()
        .zip(d_out.iter().zip(d_in.iter()))
        .map(|(&m, (&o, &i))| if m { -(i.sqrt() - 0.5) } else { o.sqrt() - 0.5 })
        .map(|v| v.clamp(-SDF_CLAMP, SDF_CLAMP))
        .collect()
}

/// Unit-sampling [`sdf`] together with every pixel's squared distance to the nearest pixel of the other class (an
/// exact integer: to the background for foreground pixels, to the foreground for background pixels). The squared
/// distances are all [`NO_SITE`] for an empty or full mask (or a plane too large for the integer EDT), where `φ` is
/// the clamp value. `φ` equals `sdf(mask, h, w, (1, 1))` bit for bit.
pub fn sdf_unit_with_sq(mask: &[bool], h: usize, w: usize) -> (Vec<f64>, Vec<u32>) {
    assert_eq!(mask.len(), h * w, "mask length must be h*w");
    let n_fg = mask.iter().filter(|&&m| m).count();
    if n_fg == 0 {
        return (vec![SDF_CLAMP; h * w], vec![NO_SITE; h * w]);
    }
    if n_fg == h * w {
        return (vec![-SDF_CLAMP; h * w], vec![NO_SITE; h * w]);
    }
    if h + w >= UNIT_MAX_EXTENT {
        let d_out = squared_distance_float(mask, h, w, (1.0, 1.0));
        let not_mask: Vec<bool> = mask.iter().map(|&m| !m).collect();
        let d_in = squared_distance_float(&not_mask, h, w, (1.0, 1.0));
        let phi = mask
            .iter()
            .zip(d_out.iter().zip(d_in.iter()))
            .map(|(&m, (&o, &i))| if m { -(i.sqrt() - 0.5) } else { o.sqrt() - 0.5 })
            .map(|v| v.clamp(-SDF_CLAMP, SDF_CLAMP))
            .collect();
        return (phi, vec![NO_SITE; h * w]);
    }
    let mut sq = squared_distance_unit(mask, h, w);
    let not_mask: Vec<bool> = mask.iter().map(|&m| !m).collect();
    let d_in = squared_distance_unit(&not_mask, h, w);
    for ((d, &m), &i) in sq.iter_mut().zip(mask).zip(&d_in) {
        if m {
            *d = i;
        }
    }
    let phi = mask
        .iter()
        .zip(&sq)
        .map(|(&m, &d)| {
            let r = (d as f64).sqrt();
            if m {
                -(r - 0.5)
            } else {
                r - 0.5
            }
        })
        .map(|v| v.clamp(-SDF_CLAMP, SDF_CLAMP))
        .collect();
    (phi, sq)
}

/// `sdf` of a u8 mask (non-zero = foreground), unit sampling.
pub fn sdf_u8(mask: &[u8], h: usize, w: usize) -> Vec<f64> {
    let m: Vec<bool> = mask.iter().map(|&v| v != 0).collect();
    sdf(&m, h, w, (1.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_site_row() {
        let m = [true, true, false, true, true];
        let d = edt(&m, 1, 5, (1.0, 1.0));
        assert_eq!(d, vec![2.0, 1.0, 0.0, 1.0, 2.0]);
    }

    /// The integer EDT equals the f64 Felzenszwalb–Huttenlocher passes (both exact) bit for bit.
    #[test]
    fn integer_edt_equals_float_edt() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for case in 0..300 {
            let h = rng.gen_range(1..40);
            let w = rng.gen_range(1..40);
            let p = [0.0, 0.002, 0.02, 0.2, 0.6, 0.97, 1.0][case % 7];
            let m: Vec<bool> = (0..h * w).map(|_| rng.gen::<f64>() < p).collect();
            let fast = squared_distance_unit(&m, h, w);
            let slow = squared_distance_float(&m, h, w, (1.0, 1.0));
            for (a, b) in fast.iter().zip(&slow) {
                if b.is_infinite() {
                    assert_eq!(*a, NO_SITE, "case {case}");
                } else {
                    assert_eq!(*a as f64, *b, "case {case} {h}x{w}");
                }
            }
        }
    }

    #[test]
    fn all_true_is_infinite() {
        let d = edt(&[true; 6], 2, 3, (1.0, 1.0));
        assert!(d.iter().all(|x| x.is_infinite()));
    }
}
