//! Gaussian random fields `G_ℓ` (SPEC §8.2), used by the failure simulator and by the phantom (§4.2).
//!
//! White noise on a padded grid, FFT, amplitude filter `A(f) = exp(−2π²ℓ²|f|²)` (white noise convolved with a Gaussian
//! of standard deviation ℓ pixels; autocorrelation `exp(−r²/(4ℓ²))`), inverse FFT, crop, normalise to zero mean and unit
//! standard deviation. **ℓ is the correlation length in pixels: a larger ℓ gives a smoother field.**
//! Fields with `ℓ ≥ 8` are generated on a grid downsampled by `⌊ℓ/4⌋` and upsampled with `bilinear(ac=false)` (§8.2 step 4).
use super::resize::bilinear_f64;
use rand::Rng;
use rustfft::num_complex::Complex;
use rustfft::FftPlanner;

/// Amplitude spectrum of the field (SPEC §8.2, `--grf-spectrum`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Spectrum {
    /// `A(f) = exp(−2π²ℓ²|f|²)`.
    #[default]
    Gaussian,
    /// `A(f) = (1 + (2πℓ|f|)²)^(−(ν+1)/2)`, `ν = 1.5`.
    Powerlaw,
}

impl std::str::FromStr for Spectrum {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s {
            "gaussian" => Ok(Spectrum::Gaussian),
            "powerlaw" => Ok(Spectrum::Powerlaw),
            _ => Err(crate::Error::Arg(format!(
                "--grf-spectrum: expected gaussian|powerlaw, got {s:?}"
            ))),
        }
    }
}

/// One standard normal variate (Box–Muller, from two uniforms of the given generator).
pub fn standard_normal<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
    let u2: f64 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Two independent standard normal variates (both outputs of one Box–Muller transform).
pub fn standard_normal_pair<R: Rng + ?Sized>(rng: &mut R) -> (f64, f64) {
    let u1: f64 = 1.0 - rng.gen::<f64>();
    let u2: f64 = rng.gen::<f64>();
    let r = (-2.0 * u1.ln()).sqrt();
    let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
    (r * c, r * s)
}

/// Smallest `m ≥ n` whose prime factors are only 2, 3 and 5 (a fast FFT length).
pub fn fast_len(n: usize) -> usize {
    let mut m = n.max(1);
    loop {
        let mut k = m;
        for p in [2, 3, 5] {
            while k.is_multiple_of(p) {
                k /= p;
            }
        }
        if k == 1 {
            return m;
        }
        m += 1;
    }
}

thread_local! {
    /// Per-thread FFT planner (it caches plans by length).
    static PLANNER: std::cell::RefCell<FftPlanner<f64>> = std::cell::RefCell::new(FftPlanner::new());
}

type ComplexBuffers = (Vec<Complex<f64>>, Vec<Complex<f64>>);

thread_local! {
    /// Per-thread noise and transpose buffers of `filtered_noise`.
    static SCRATCH: std::cell::RefCell<ComplexBuffers> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

fn fft_freq(k: usize, n: usize) -> f64 {
    if 2 * k < n {
        k as f64 / n as f64
    } else {
        (k as f64 - n as f64) / n as f64
    }
}

/// Filtered noise of size `h×w` (not normalised) with per-axis correlation lengths `(ly, lx)` in pixels,
/// no downsampling.
fn filtered_noise<R: Rng + ?Sized>(
    h: usize,
    w: usize,
    ly: f64,
    lx: f64,
    spectrum: Spectrum,
    rng: &mut R,
) -> Vec<f64> {
    let py = (3.0 * ly).ceil() as usize;
    let px = (3.0 * lx).ceil() as usize;
    let nh = fast_len(h + 2 * py);
    let nw = fast_len(w + 2 * px);
    // Per-thread buffers, reused across fields (no zeroing, no fresh pages per field).
    let (mut buf, mut col) = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    buf.clear();
    while buf.len() < nh * nw {
        let (a, b) = standard_normal_pair(rng);
        buf.push(Complex::new(a, 0.0));
        if buf.len() < nh * nw {
            buf.push(Complex::new(b, 0.0));
        }
    }
    let (fw, fh, iw, ih) = PLANNER.with(|p| {
        let mut planner = p.borrow_mut();
        (
            planner.plan_fft_forward(nw),
            planner.plan_fft_forward(nh),
            planner.plan_fft_inverse(nw),
            planner.plan_fft_inverse(nh),
        )
    });
    // Rows.
    fw.process(&mut buf);
    // Columns (transpose into a scratch buffer).
    col.resize(nh * nw, Complex::new(0.0, 0.0));
    transpose(&buf, nw, 0, &mut col, nh, nw);
    fh.process(&mut col);
    // Filter (col is laid out [j][i]).
    let two_pi2 = 2.0 * std::f64::consts::PI * std::f64::consts::PI;
    let fy: Vec<f64> = (0..nh).map(|k| fft_freq(k, nh)).collect();
    let fx: Vec<f64> = (0..nw).map(|k| fft_freq(k, nw)).collect();
    match spectrum {
        Spectrum::Gaussian => {
            // Separable: exp(−2π²(ℓy²fy² + ℓx²fx²)) = exp(−2π²ℓy²fy²)·exp(−2π²ℓx²fx²).
            let ay: Vec<f64> = fy
                .iter()
                .map(|f| (-two_pi2 * ly * ly * f * f).exp())
                .collect();
            let ax: Vec<f64> = fx
                .iter()
                .map(|f| (-two_pi2 * lx * lx * f * f).exp())
                .collect();
            for j in 0..nw {
                for i in 0..nh {
                    col[j * nh + i] *= ax[j] * ay[i];
                }
            }
        }
        Spectrum::Powerlaw => {
            let tp = std::f64::consts::TAU;
            for j in 0..nw {
                for i in 0..nh {
                    let q = (tp * ly * fy[i]).powi(2) + (tp * lx * fx[j]).powi(2);
                    col[j * nh + i] *= (1.0 + q).powf(-(1.5 + 1.0) / 2.0);
                }
            }
        }
    }
    ih.process(&mut col);
    // Only the rows kept by the crop need the inverse row transform (rows are independent).
    let rows = &mut buf[..h * nw];
    transpose(&col, nh, py, rows, nw, h);
    iw.process(rows);
    let mut out = Vec::with_capacity(h * w);
    for i in 0..h {
        out.extend(rows[i * nw + px..i * nw + px + w].iter().map(|c| c.re));
    }
    SCRATCH.with(|s| *s.borrow_mut() = (buf, col));
    out
}

/// `dst[c·rows + r] = src[r·stride + c0 + c]` for `r < rows`, `c < cols` (the transpose of a column block of a
/// row-major plane), in cache-friendly tiles.
fn transpose(
    src: &[Complex<f64>],
    stride: usize,
    c0: usize,
    dst: &mut [Complex<f64>],
    rows: usize,
    cols: usize,
) {
    const T: usize = 16;
    for r0 in (0..rows).step_by(T) {
        for cb in (0..cols).step_by(T) {
            for r in r0..(r0 + T).min(rows) {
                let srow = &src[r * stride + c0..r * stride + c0 + cols];
                for c in cb..(cb + T).min(cols) {
                    dst[c * rows + r] = srow[c];
                }
            }
        }
    }
}

/// Normalise in place to zero mean and unit standard deviation (population std). A constant field becomes all zeros.
pub fn normalise(x: &mut [f64]) {
    let n = x.len() as f64;
    if x.is_empty() {
        return;
    }
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
    let sd = var.sqrt();
    if sd > 0.0 && sd.is_finite() {
        x.iter_mut().for_each(|v| *v = (*v - mean) / sd);
    } else {
        x.iter_mut().for_each(|v| *v = 0.0);
    }
}

/// A zero-mean, unit-std random field of size `h×w` with correlation length `corr_len_px` (SPEC §8.2), any spectrum.
/// `downsample` enables step 4 (coarse grid `⌊ℓ/4⌋` for `ℓ ≥ 8`).
pub fn random_field<R: Rng + ?Sized>(
    h: usize,
    w: usize,
    corr_len_px: f64,
    spectrum: Spectrum,
    downsample: bool,
    rng: &mut R,
) -> Vec<f64> {
    if h == 0 || w == 0 {
        return Vec::new();
    }
    let l = corr_len_px.max(1e-6);
    let q = if downsample && l >= 8.0 {
        (l / 4.0).floor() as usize
    } else {
        1
    };
    let mut f = if q > 1 {
        let hc = h.div_ceil(q).max(2);
        let wc = w.div_ceil(q).max(2);
        let ly = l * hc as f64 / h as f64;
        let lx = l * wc as f64 / w as f64;
        let coarse = filtered_noise(hc, wc, ly, lx, spectrum, rng);
        bilinear_f64(&coarse, hc, wc, h, w)
    } else {
        filtered_noise(h, w, l, l, spectrum, rng)
    };
    normalise(&mut f);
    f
}

/// The canonical `G_ℓ` of SPEC §8.2: Gaussian spectrum, zero mean, unit standard deviation, correlation length
/// `corr_len_px` pixels (downsampled generation for `ℓ ≥ 8`). Multiply by an amplitude to get a displacement field.
pub fn gaussian_random_field<R: Rng + ?Sized>(
    h: usize,
    w: usize,
    corr_len_px: f64,
    rng: &mut R,
) -> Vec<f64> {
    random_field(h, w, corr_len_px, Spectrum::Gaussian, true, rng)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn fast_lengths() {
        assert_eq!(fast_len(7), 8);
        assert_eq!(fast_len(11), 12);
        assert_eq!(fast_len(97), 100);
        assert_eq!(fast_len(1), 1);
    }

    #[test]
    fn unit_statistics() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for l in [0.8, 3.0, 12.0] {
            let f = gaussian_random_field(40, 57, l, &mut rng);
            let m = f.iter().sum::<f64>() / f.len() as f64;
            let v = f.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / f.len() as f64;
            assert!(
                m.abs() < 1e-9 && (v - 1.0).abs() < 1e-9,
                "l={l} m={m} v={v}"
            );
        }
    }
}
