//! Gaussian random fields `G_ℓ` (SPEC §8.2) and 1-D random curves.
//!
//! White noise on a grid padded by `⌈3ℓ⌉` (rounded up to a fast FFT length) is filtered in the Fourier domain with
//! `A(f) = exp(−2π²ℓ²|f|²)` (= convolution with a Gaussian of standard deviation ℓ pixels, autocorrelation
//! `exp(−r²/(4ℓ²))`), cropped and normalised to zero mean and unit standard deviation. The Gaussian filter is
//! separable, so the 2-D filter is applied as 1-D FFT filters along rows and then columns (identical result).
//! Fields with `ℓ ≥ 8` are generated on a grid downsampled by `⌊ℓ/4⌋` and upsampled with `bilinear(ac=false)`.
use rand::Rng;
use rustfft::num_complex::Complex;
use rustfft::FftPlanner;

/// Spectrum of the field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Spectrum {
    /// `A(f) = exp(−2π²ℓ²|f|²)` (default).
    Gaussian,
    /// `A(f) = (1 + (2πℓ|f|)²)^(−(ν+1)/2)`.
    PowerLaw { nu: f64 },
}

/// One standard normal draw (Box–Muller on two uniforms from `rng`).
pub fn randn<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// `n` standard normal draws (both Box–Muller outputs are used).
pub fn randn_vec<R: Rng + ?Sized>(rng: &mut R, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = 1.0 - rng.gen::<f64>();
        let u2: f64 = rng.gen();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        out.push((r * c) as f32);
        out.push((r * s) as f32);
    }
    out.truncate(n);
    out
}

/// Smallest `m ≥ n` whose prime factors are 2, 3 and 5.
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

/// FFT frequency of bin `k` of an `n`-point transform, in cycles per sample.
fn freq(k: usize, n: usize) -> f64 {
    if 2 * k < n {
        k as f64 / n as f64
    } else {
        (k as f64 - n as f64) / n as f64
    }
}

fn amplitude(f: f64, ell: f64, spectrum: Spectrum) -> f64 {
    match spectrum {
        Spectrum::Gaussian => (-2.0 * std::f64::consts::PI.powi(2) * ell * ell * f * f).exp(),
        Spectrum::PowerLaw { nu } => {
            (1.0 + (std::f64::consts::TAU * ell * f.abs()).powi(2)).powf(-(nu + 1.0) / 2.0)
        }
    }
}

/// Filters `rows` contiguous sequences of length `n` (in place) with the 1-D spectral filter of correlation length ℓ.
fn filter_rows(
    planner: &mut FftPlanner<f32>,
    data: &mut [Complex<f32>],
    n: usize,
    ell: f64,
    spectrum: Spectrum,
) {
    let fwd = planner.plan_fft_forward(n);
    let inv = planner.plan_fft_inverse(n);
    fwd.process(data);
    let gain: Vec<f32> = (0..n)
        .map(|k| (amplitude(freq(k, n), ell, spectrum) / n as f64) as f32)
        .collect();
    for row in data.chunks_exact_mut(n) {
        for (v, g) in row.iter_mut().zip(&gain) {
            *v *= *g;
        }
    }
    inv.process(data);
}

fn normalise(v: &mut [f32]) {
    if v.is_empty() {
        return;
    }
    let n = v.len() as f64;
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    let sd = var.sqrt().max(1e-12);
    for x in v.iter_mut() {
        *x = ((*x as f64 - mean) / sd) as f32;
    }
}

/// Unit-variance, zero-mean 2-D Gaussian random field of size `h×w` (row-major) with correlation length `ell`
/// pixels (SPEC §8.2), Gaussian spectrum.
pub fn gaussian_field<R: Rng + ?Sized>(rng: &mut R, h: usize, w: usize, ell: f64) -> Vec<f32> {
    field(rng, h, w, ell, Spectrum::Gaussian)
}

/// As [`gaussian_field`] with a chosen spectrum. `ell ≤ 0` gives normalised white noise.
pub fn field<R: Rng + ?Sized>(
    rng: &mut R,
    h: usize,
    w: usize,
    ell: f64,
    spectrum: Spectrum,
) -> Vec<f32> {
    if h == 0 || w == 0 {
        return Vec::new();
    }
    if ell <= 0.0 {
        let mut v = randn_vec(rng, h * w);
        normalise(&mut v);
        return v;
    }
    if ell >= 8.0 {
        let d = (ell / 4.0).floor() as usize;
        let (hs, ws) = (h.div_ceil(d).max(2), w.div_ceil(d).max(2));
        let coarse = raw_field(rng, hs, ws, ell / d as f64, spectrum);
        let mut up = super::resize::resize_bilinear(&coarse, hs, ws, h, w, false);
        normalise(&mut up);
        return up;
    }
    let mut v = raw_field(rng, h, w, ell, spectrum);
    normalise(&mut v);
    v
}

/// Filtered, cropped (not yet normalised) field.
fn raw_field<R: Rng + ?Sized>(
    rng: &mut R,
    h: usize,
    w: usize,
    ell: f64,
    spectrum: Spectrum,
) -> Vec<f32> {
    let p = (3.0 * ell).ceil() as usize;
    let (ph, pw) = (fast_len(h + 2 * p), fast_len(w + 2 * p));
    let noise = randn_vec(rng, ph * pw);
    let mut planner = FftPlanner::<f32>::new();
    // Rows.
    let mut buf: Vec<Complex<f32>> = noise.iter().map(|&x| Complex::new(x, 0.0)).collect();
    filter_rows(&mut planner, &mut buf, pw, ell, spectrum);
    // Columns (transpose, filter, transpose back while cropping).
    let mut t = vec![Complex::new(0.0f32, 0.0); ph * pw];
    for y in 0..ph {
        for x in 0..pw {
            t[x * ph + y] = Complex::new(buf[y * pw + x].re, 0.0);
        }
    }
    filter_rows(&mut planner, &mut t, ph, ell, spectrum);
    let mut out = Vec::with_capacity(h * w);
    for y in 0..h {
        for x in 0..w {
            out.push(t[(x + p) * ph + (y + p)].re);
        }
    }
    out
}

/// Unit-variance, zero-mean 1-D random curve of `n` samples with correlation length `ell` (Gaussian spectrum).
pub fn curve<R: Rng + ?Sized>(rng: &mut R, n: usize, ell: f64) -> Vec<f32> {
    if n == 0 {
        return Vec::new();
    }
    if ell <= 0.0 {
        let mut v = randn_vec(rng, n);
        normalise(&mut v);
        return v;
    }
    let p = (3.0 * ell).ceil() as usize;
    let m = fast_len(n + 2 * p);
    let noise = randn_vec(rng, m);
    let mut planner = FftPlanner::<f32>::new();
    let mut buf: Vec<Complex<f32>> = noise.iter().map(|&x| Complex::new(x, 0.0)).collect();
    filter_rows(&mut planner, &mut buf, m, ell, Spectrum::Gaussian);
    let mut v: Vec<f32> = buf[p..p + n].iter().map(|c| c.re).collect();
    normalise(&mut v);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn autocorr(f: &[f32], h: usize, w: usize, lag: usize) -> f64 {
        let (mut s, mut n) = (0.0f64, 0usize);
        for y in 0..h {
            for x in 0..w - lag {
                s += f[y * w + x] as f64 * f[y * w + x + lag] as f64;
                n += 1;
            }
        }
        for y in 0..h - lag {
            for x in 0..w {
                s += f[y * w + x] as f64 * f[(y + lag) * w + x] as f64;
                n += 1;
            }
        }
        s / n as f64
    }

    #[test]
    fn field_statistics_match_spec() {
        // SPEC §8.2: ℓ = 8 → ρ(ℓ) = exp(−1/4) ≈ 0.78, ρ(3ℓ) = exp(−9/4) ≈ 0.105. (40 fields keep the test fast.)
        let (h, w, ell) = (256, 256, 8.0);
        let (mut a1, mut a3) = (0.0, 0.0);
        let n = 40;
        for k in 0..n {
            let mut rng = crate::rng::stream_rng(3, "grf-test", &[k]);
            let f = gaussian_field(&mut rng, h, w, ell);
            let mean: f64 = f.iter().map(|&v| v as f64).sum::<f64>() / f.len() as f64;
            assert!(mean.abs() < 1e-4);
            a1 += autocorr(&f, h, w, 8);
            a3 += autocorr(&f, h, w, 24);
        }
        a1 /= n as f64;
        a3 /= n as f64;
        assert!((a1 - 0.78).abs() < 0.05, "ρ(ℓ) = {a1}");
        assert!(a3 <= 0.15, "ρ(3ℓ) = {a3}");
    }

    const TAU_F: f64 = std::f64::consts::TAU;
    #[test]
    fn spectral_energy_above_cutoff_is_negligible() {
        // SPEC §8.2: < 0.1 % of the spectral energy above 1/(2ℓ) cycles/pixel (ℓ = 8, 256², downsampled path).
        let (n, ell) = (256usize, 8.0);
        // A Hann window removes the periodogram leakage of the non-periodic crop (without it the edges alone put
        // ~1.5 % of the energy above the cut-off, whatever the field).
        let (ell_gen, hann) = (ell, true);
        let mut planner = FftPlanner::<f32>::new();
        let fft = planner.plan_fft_forward(n);
        let (mut hi, mut tot) = (0.0f64, 0.0f64);
        for k in 0..10 {
            let mut rng = crate::rng::stream_rng(5, "grf-test", &[k]);
            let f = gaussian_field(&mut rng, n, n, ell_gen);
            let win = |i: usize| {
                if hann {
                    (0.5 - 0.5 * (TAU_F * i as f64 / n as f64).cos()) as f32
                } else {
                    1.0
                }
            };
            let mut buf: Vec<Complex<f32>> = f
                .iter()
                .enumerate()
                .map(|(i, &x)| Complex::new(x * win(i / n) * win(i % n), 0.0))
                .collect();
            fft.process(&mut buf);
            let mut t = vec![Complex::new(0.0f32, 0.0); n * n];
            for y in 0..n {
                for x in 0..n {
                    t[x * n + y] = buf[y * n + x];
                }
            }
            fft.process(&mut t);
            for fx in 0..n {
                for fy in 0..n {
                    let p = t[fx * n + fy].norm_sqr() as f64;
                    let r = (freq(fx, n).powi(2) + freq(fy, n).powi(2)).sqrt();
                    tot += p;
                    if r > 1.0 / (2.0 * ell) {
                        hi += p;
                    }
                }
            }
        }
        assert!(
            hi / tot < 1e-3,
            "high-frequency energy fraction {}",
            hi / tot
        );
    }

    #[test]
    fn small_ell_field_and_curve() {
        let mut rng = crate::rng::stream_rng(1, "grf-test", &[]);
        let f = gaussian_field(&mut rng, 64, 80, 2.0);
        let a2 = autocorr(&f, 64, 80, 2);
        assert!((a2 - (-0.25f64).exp()).abs() < 0.08, "{a2}");
        let c = curve(&mut rng, 500, 30.0);
        let sd = (c.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / 500.0).sqrt();
        assert!((sd - 1.0).abs() < 1e-3);
        assert_eq!(fast_len(7), 8);
        assert_eq!(fast_len(97), 100);
    }
}
