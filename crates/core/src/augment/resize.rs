//! The two resampling kernels this module needs (SPEC §0): `bilinear(ac=false)` and `nearest`, on row-major planes.
//!
//! The f32 bilinear path computes exactly as PyTorch does for f32 tensors (scale rounded to f32, source position,
//! `λ` and `1 − λ` in f32), rows (W axis) first, then columns (H axis).

/// Per-output-index taps `(i0, i1, λ)` of `bilinear(ac=false)` along one axis, computed in f32.
pub fn bilinear_taps_f32(n_in: usize, n_out: usize) -> Vec<(usize, usize, f32)> {
    let r = n_in as f32 / n_out as f32;
    (0..n_out)
        .map(|o| {
            let s = (r * (o as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (s.floor() as usize).min(n_in - 1);
            let i1 = (i0 + 1).min(n_in - 1);
            let lam = s - i0 as f32;
            (i0, i1, lam)
        })
        .collect()
}

/// Per-output-index taps of `bilinear(ac=false)` computed in f64.
pub fn bilinear_taps_f64(n_in: usize, n_out: usize) -> Vec<(usize, usize, f64)> {
    let r = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|o| {
            let s = (r * (o as f64 + 0.5) - 0.5).max(0.0);
            let i0 = (s.floor() as usize).min(n_in - 1);
            let i1 = (i0 + 1).min(n_in - 1);
            (i0, i1, s - i0 as f64)
        })
        .collect()
}

/// `bilinear(ac=false)` of an f32 plane `h×w → oh×ow`.
pub fn bilinear_f32(x: &[f32], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f32> {
    assert_eq!(x.len(), h * w);
    let tx = bilinear_taps_f32(w, ow);
    let ty = bilinear_taps_f32(h, oh);
    let mut tmp = vec![0f32; h * ow];
    for i in 0..h {
        let row = &x[i * w..(i + 1) * w];
        let out = &mut tmp[i * ow..(i + 1) * ow];
        for (o, &(i0, i1, l)) in tx.iter().enumerate() {
            out[o] = (1.0 - l) * row[i0] + l * row[i1];
        }
    }
    let mut out = vec![0f32; oh * ow];
    for (o, &(i0, i1, l)) in ty.iter().enumerate() {
        let r0 = &tmp[i0 * ow..(i0 + 1) * ow];
        let r1 = &tmp[i1 * ow..(i1 + 1) * ow];
        let dst = &mut out[o * ow..(o + 1) * ow];
        for j in 0..ow {
            dst[j] = (1.0 - l) * r0[j] + l * r1[j];
        }
    }
    out
}

/// `bilinear(ac=false)` of an f64 plane.
pub fn bilinear_f64(x: &[f64], h: usize, w: usize, oh: usize, ow: usize) -> Vec<f64> {
    assert_eq!(x.len(), h * w);
    let tx = bilinear_taps_f64(w, ow);
    let ty = bilinear_taps_f64(h, oh);
    let mut tmp = vec![0f64; h * ow];
    for i in 0..h {
        let row = &x[i * w..(i + 1) * w];
        for (o, &(i0, i1, l)) in tx.iter().enumerate() {
            tmp[i * ow + o] = (1.0 - l) * row[i0] + l * row[i1];
        }
    }
    let mut out = vec![0f64; oh * ow];
    for (o, &(i0, i1, l)) in ty.iter().enumerate() {
        for j in 0..ow {
            out[o * ow + j] = (1.0 - l) * tmp[i0 * ow + j] + l * tmp[i1 * ow + j];
        }
    }
    out
}

/// Source index of `nearest` for each output index along one axis: `min(⌊o·n_in/n_out⌋, n_in−1)` (integer arithmetic).
pub fn nearest_taps(n_in: usize, n_out: usize) -> Vec<usize> {
    (0..n_out)
        .map(|o| ((o * n_in) / n_out).min(n_in - 1))
        .collect()
}

/// `nearest` resize of a u8 plane.
pub fn nearest_u8(x: &[u8], h: usize, w: usize, oh: usize, ow: usize) -> Vec<u8> {
    assert_eq!(x.len(), h * w);
    let tx = nearest_taps(w, ow);
    let ty = nearest_taps(h, oh);
    let mut out = vec![0u8; oh * ow];
    for (o, &si) in ty.iter().enumerate() {
        for (p, &sj) in tx.iter().enumerate() {
            out[o * ow + p] = x[si * w + sj];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_and_constant() {
        let x: Vec<f32> = (0..12).map(|v| v as f32).collect();
        assert_eq!(bilinear_f32(&x, 3, 4, 3, 4), x);
        let c = vec![0.25f32; 35];
        assert!(bilinear_f32(&c, 5, 7, 3, 2)
            .iter()
            .all(|&v| (v - 0.25).abs() < 1e-7));
    }

    #[test]
    fn downsample_by_two_averages_pairs() {
        let x = [0f32, 1.0, 2.0, 3.0];
        let y = bilinear_f32(&x, 1, 4, 1, 2);
        assert_eq!(y, vec![0.5, 2.5]);
        assert_eq!(nearest_u8(&[1, 2, 3, 4], 1, 4, 1, 2), vec![1, 3]);
    }
}
