//! Host-side resampling with the three kernels of SPEC §0 (f32 arithmetic exactly as PyTorch computes it).
//! The differentiable tensor versions live in `crate::nn`.

/// Per-axis bilinear taps: `(i0, i1, λ0 = 1−λ, λ1 = λ)` for each output index.
pub fn bilinear_taps(
    n_in: usize,
    n_out: usize,
    align_corners: bool,
) -> Vec<(usize, usize, f32, f32)> {
    let last = n_in.saturating_sub(1);
    let r: f32 = if align_corners {
        if n_out > 1 {
            (n_in as f32 - 1.0) / (n_out as f32 - 1.0)
        } else {
            0.0
        }
    } else {
        n_in as f32 / n_out as f32
    };
    (0..n_out)
        .map(|o| {
            let s = if align_corners {
                r * o as f32
            } else {
                (r * (o as f32 + 0.5) - 0.5).max(0.0)
            };
            let i0 = (s.floor() as usize).min(last);
            let i1 = (i0 + 1).min(last);
            let l = s - i0 as f32;
            (i0, i1, 1.0 - l, l)
        })
        .collect()
}

/// Nearest source index for each output index: `min(⌊o·n_in/n_out⌋, n_in−1)` (exact integer arithmetic).
pub fn nearest_index(n_in: usize, n_out: usize) -> Vec<usize> {
    (0..n_out)
        .map(|o| ((o * n_in) / n_out).min(n_in.saturating_sub(1)))
        .collect()
}

/// Bilinear resize of one `h×w` plane (row-major) to `oh×ow`.
pub fn resize_bilinear(
    src: &[f32],
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    align_corners: bool,
) -> Vec<f32> {
    debug_assert_eq!(src.len(), h * w);
    if h == oh && w == ow {
        return src.to_vec();
    }
    let ty = bilinear_taps(h, oh, align_corners);
    let tx = bilinear_taps(w, ow, align_corners);
    let mut out = vec![0f32; oh * ow];
    for (oy, &(y0, y1, wy0, wy1)) in ty.iter().enumerate() {
        let r0 = &src[y0 * w..(y0 + 1) * w];
        let r1 = &src[y1 * w..(y1 + 1) * w];
        let orow = &mut out[oy * ow..(oy + 1) * ow];
        for (o, &(x0, x1, wx0, wx1)) in orow.iter_mut().zip(&tx) {
            // Same evaluation order as PyTorch's CPU kernel: h0λ·(w0λ·a + w1λ·b) + h1λ·(w0λ·c + w1λ·d).
            *o = wy0 * (wx0 * r0[x0] + wx1 * r0[x1]) + wy1 * (wx0 * r1[x0] + wx1 * r1[x1]);
        }
    }
    out
}

/// Nearest resize of one plane of any copyable element type.
pub fn resize_nearest<T: Copy>(src: &[T], h: usize, w: usize, oh: usize, ow: usize) -> Vec<T> {
    debug_assert_eq!(src.len(), h * w);
    let iy = nearest_index(h, oh);
    let ix = nearest_index(w, ow);
    let mut out = Vec::with_capacity(oh * ow);
    for &y in &iy {
        let row = &src[y * w..(y + 1) * w];
        out.extend(ix.iter().map(|&x| row[x]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_form_cases() {
        // 2 → 4, ac=false: s = (o+0.5)/2 − 0.5 → [0 (clamped), 0.25, 0.75, 1.25→i0=1]
        let y = resize_bilinear(&[0.0, 4.0], 1, 2, 1, 4, false);
        assert_eq!(y, vec![0.0, 1.0, 3.0, 4.0]);
        // 2 → 3, ac=true: s = o·0.5
        let y = resize_bilinear(&[0.0, 4.0], 1, 2, 1, 3, true);
        assert_eq!(y, vec![0.0, 2.0, 4.0]);
        // 4 → 2 ac=false: s = 2(o+0.5) − 0.5 = 0.5, 2.5
        let y = resize_bilinear(&[0.0, 1.0, 2.0, 3.0], 1, 4, 1, 2, false);
        assert_eq!(y, vec![0.5, 2.5]);
        assert_eq!(nearest_index(3, 7), vec![0, 0, 0, 1, 1, 2, 2]);
        assert_eq!(resize_nearest(&[1u8, 2, 3, 4], 2, 2, 1, 1), vec![1]);
    }
}
