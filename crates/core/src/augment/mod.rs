//! Phase 2 training data: SDF-based failure simulation (SPEC §8).
//!
//! * [`edt`]: exact Euclidean distance transform and SDF (§8.1).
//! * [`grf`]: Gaussian random fields `G_ℓ` (§8.2) — `grf::gaussian_random_field(h, w, ℓ, rng)`.
//! * [`descriptors`]: lesion descriptors and classes (§8.3).
//! * [`sim`]: failure operators and their composition (§8.4, §8.5).
//! * [`sampler`]: quality-controlled sampling with gain calibration, bin allocation (§8.6, §8.8).
//! * [`soft`]: soft masks and the stored resolution (§8.7).
//! * [`oof`]: `augment oof`, real out-of-fold TransUNet predictions (Option B, §8.10).
//! * [`run`]: `augment synthetic` orchestration and output layout (§8.8, §8.9); [`summary`]: tables and PNG.
//! * [`processed`]: minimal reader of the processed layout (to be unified with `crate::data`).
pub mod descriptors;
pub mod edt;
pub mod grf;
pub mod oof;
pub mod processed;
pub mod resize;
pub mod run;
pub mod sampler;
pub mod sim;
pub mod soft;
pub mod summary;

pub use run::{run_synthetic, RunReport, SyntheticOptions};
pub use sampler::{QualityBin, SampleResult, SimConfig};

use crate::Result;
use rand::Rng;

/// A synthetic lesion mask (`h×w`, 1 = lesion): a star-shaped region around `(cy, cx)` with radial function
/// `r·(1 + Σ_{k=2..6} a_k cos(kθ + φ_k))`, `a_k ~ U(0, irregularity/k)`. Used by tests and the throughput bench.
pub fn synthetic_lesion<R: Rng + ?Sized>(
    h: usize,
    w: usize,
    cy: f64,
    cx: f64,
    r: f64,
    irregularity: f64,
    rng: &mut R,
) -> Vec<u8> {
    let coef: Vec<(f64, f64)> = (2..=6)
        .map(|k| {
            (
                rng.gen::<f64>() * irregularity / k as f64,
                rng.gen::<f64>() * std::f64::consts::TAU,
            )
        })
        .collect();
    let mut m = vec![0u8; h * w];
    for i in 0..h {
        for j in 0..w {
            let (dy, dx) = (i as f64 - cy, j as f64 - cx);
            let d = (dy * dy + dx * dx).sqrt();
            let th = dy.atan2(dx);
            let rho = r
                * (1.0
                    + coef
                        .iter()
                        .enumerate()
                        .map(|(k, &(a, p))| a * ((k + 2) as f64 * th + p).cos())
                        .sum::<f64>());
            if d < rho {
                m[i * w + j] = 1;
            }
        }
    }
    m
}

/// Synthetic GT sources for the bench and tests: `n` lesions on `h×w` images with radii spread over tiny to large.
pub fn synthetic_sources(n: usize, h: usize, w: usize, seed: u64) -> Vec<run::Source> {
    (0..n)
        .map(|k| {
            let mut rng = crate::rng::stream_rng(seed, "augment-bench-sources", &[k as u64]);
            let mind = h.min(w) as f64;
            let r = if k % 6 == 0 {
                rng.gen_range(4.0..8.0)
            } else {
                (rng.gen_range((10.0f64).ln()..(0.2 * mind).max(12.0).ln())).exp()
            };
            let cy = rng.gen_range(0.3..0.7) * h as f64;
            let cx = rng.gen_range(0.3..0.7) * w as f64;
            let irr = if k % 3 == 0 { 0.6 } else { 0.2 };
            let m = synthetic_lesion(h, w, cy, cx, r, irr, &mut rng);
            let gt = sim::GtMask::from_full(&m, h, w).expect("synthetic lesion is non-empty");
            run::Source {
                dataset: "SYNTH".into(),
                name: format!("lesion_{k:03}"),
                gt,
                sha256: String::new(),
            }
        })
        .collect()
}

/// The GT sources of the `augment-throughput` bench: 16 synthetic 480×560 lesion masks (tiny to large).
pub fn bench_sources() -> Vec<run::Source> {
    synthetic_sources(16, 480, 560, 7)
}

/// Bench workload `augment-throughput` (SPEC §13.7): generates `n` samples (default configuration: sigmoid soft
/// masks, S = 224, default bins) at the original resolution of the [`bench_sources`] on `threads` threads, and returns
/// samples per second (generation only: no source synthesis, no disk I/O).
pub fn bench_throughput(n: usize, threads: usize) -> Result<f64> {
    bench_throughput_on(&bench_sources(), n, threads)
}

/// [`bench_throughput`] on given sources (the bench builds them once, in its untimed setup).
pub fn bench_throughput_on(sources: &[run::Source], n: usize, threads: usize) -> Result<f64> {
    let bins = sampler::parse_bins(sampler::DEFAULT_BINS, 0.0)?;
    let labels = sampler::allocate_bin_labels(&bins, n, 42);
    let cfg = SimConfig::default();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| crate::Error::msg(format!("thread pool: {e}")))?;
    let t0 = std::time::Instant::now();
    let out = pool.install(|| run::generate_range(sources, &labels, &bins, &cfg, 42, 0..n, None));
    let dt = t0.elapsed().as_secs_f64();
    Ok(out.len() as f64 / dt.max(1e-9))
}
