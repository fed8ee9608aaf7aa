//! Quality-controlled sampling with gain calibration (SPEC §8.6) and bin allocation (§8.8).
use super::grf::Spectrum;
use super::sim::{BinClass, Composition, Mode, ModeDraw, SourceContext};
use super::soft::{stored_mask, SoftKind, StoreDtype};
use crate::{Error, Result};
use rand::seq::SliceRandom;
use rand::Rng;

/// One quality bin `[lo, hi)` with its share of the samples.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct QualityBin {
    pub name: String,
    pub lo: f64,
    pub hi: f64,
    pub share: f64,
    pub class: BinClass,
}

impl QualityBin {
    pub fn contains(&self, d: f64) -> bool {
        self.lo <= d && d < self.hi
    }
    /// Distance of a Dice value to the bin (`lo − d` below, `d − hi` at or above, 0 inside).
    pub fn distance(&self, d: f64) -> f64 {
        if d < self.lo {
            self.lo - d
        } else if d >= self.hi {
            d - self.hi
        } else {
            0.0
        }
    }
}

/// The default `--bins` string.
pub const DEFAULT_BINS: &str = "0.90-0.99:0.25,0.80-0.90:0.40,0.60-0.80:0.35";

/// Parses `--bins` (`lo-hi:share,…`) and applies `--critical-fraction f` (adds `critical [0, 0.6)` with share `f`, the
/// other shares multiplied by `1 − f`). Bins must satisfy `0 ≤ lo < hi ≤ 0.99` and shares must sum to 1 (±1e-6).
pub fn parse_bins(spec: &str, critical_fraction: f64) -> Result<Vec<QualityBin>> {
    let mut bins = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || {
            Error::Arg(format!(
                "--bins: cannot parse {part:?}; expected lo-hi:share, e.g. 0.90-0.99:0.25"
            ))
        };
        let (range, share) = part.split_once(':').ok_or_else(bad)?;
        let (lo, hi) = range.split_once('-').ok_or_else(bad)?;
        let lo: f64 = lo.trim().parse().map_err(|_| bad())?;
        let hi: f64 = hi.trim().parse().map_err(|_| bad())?;
        let share: f64 = share.trim().parse().map_err(|_| bad())?;
        if !(0.0..=0.99).contains(&lo) || !(lo < hi && hi <= 0.99) || !(share >= 0.0) {
            return Err(Error::Arg(format!(
                "--bins: {part:?} needs 0 <= lo < hi <= 0.99 (a Dice >= 0.99 is never inside a bin) and share >= 0"
            )));
        }
        let class = BinClass::from_lo(lo);
        bins.push(QualityBin {
            name: class.name().to_string(),
            lo,
            hi,
            share,
            class,
        });
    }
    if bins.is_empty() {
        return Err(Error::Arg("--bins: no bin given".into()));
    }
    let total: f64 = bins.iter().map(|b| b.share).sum();
    if (total - 1.0).abs() > 1e-6 {
        return Err(Error::Arg(format!(
            "--bins: shares sum to {total}, expected 1"
        )));
    }
    if !(0.0..1.0).contains(&critical_fraction) {
        return Err(Error::Arg(format!(
            "--critical-fraction must be in [0, 1), got {critical_fraction}"
        )));
    }
    if critical_fraction > 0.0 {
        bins.iter_mut()
            .for_each(|b| b.share *= 1.0 - critical_fraction);
        bins.push(QualityBin {
            name: "critical".into(),
            lo: 0.0,
            hi: 0.6,
            share: critical_fraction,
            class: BinClass::Critical,
        });
    }
    // Unique names (a custom bin list may reuse a class).
    let mut seen = std::collections::HashMap::new();
    for b in bins.iter_mut() {
        let c = seen.entry(b.name.clone()).or_insert(0usize);
        *c += 1;
        if *c > 1 {
            b.name = format!("{}{}", b.name, c);
        }
    }
    Ok(bins)
}

/// Exact per-bin counts: `round(share·T)` per bin, the last bin takes the remainder (SPEC §8.8).
pub fn bin_counts(bins: &[QualityBin], total: usize) -> Vec<usize> {
    let mut counts: Vec<usize> = bins
        .iter()
        .map(|b| (b.share * total as f64).round() as usize)
        .collect();
    let n = counts.len();
    let head: usize = counts[..n - 1].iter().sum();
    counts[n - 1] = total.saturating_sub(head);
    // For tiny totals the rounded head may exceed T; trim from the front bins.
    let mut excess = counts.iter().sum::<usize>().saturating_sub(total);
    for c in counts.iter_mut() {
        let d = excess.min(*c);
        *c -= d;
        excess -= d;
    }
    counts
}

/// Bin label of every sample: exact counts, shuffled with the project RNG `("failure-sim-bins")`.
pub fn allocate_bin_labels(bins: &[QualityBin], total: usize, seed: u64) -> Vec<u16> {
    let counts = bin_counts(bins, total);
    let mut labels: Vec<u16> = counts
        .iter()
        .enumerate()
        .flat_map(|(i, &c)| std::iter::repeat_n(i as u16, c))
        .collect();
    let mut rng = crate::rng::stream_rng(seed, "failure-sim-bins", &[]);
    labels.shuffle(&mut rng);
    labels
}

/// Seed of sample `j`'s stream `("failure-sim", j)` (recorded in samples.csv).
pub fn sample_seed(seed: u64, j: u64) -> u64 {
    crate::rng::mix(seed, "failure-sim", &[j])
}

/// Simulation parameters of SPEC §8.6–§8.7.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SimConfig {
    pub temperature: (f64, f64),
    pub soft: SoftKind,
    pub spectrum: Spectrum,
    pub store_size: usize,
    pub store_dtype: StoreDtype,
    pub max_attempts: usize,
    pub bisection_steps: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            temperature: (2.0, 8.0),
            soft: SoftKind::Sigmoid,
            spectrum: Spectrum::Gaussian,
            store_size: 224,
            store_dtype: StoreDtype::F32,
            max_attempts: 12,
            bisection_steps: 8,
        }
    }
}

/// One generated sample.
#[derive(Clone, Debug)]
pub struct SampleResult {
    /// `S×S` stored mask, values in [0,1].
    pub stored: Vec<f32>,
    /// `quality` = Dice(stored > 0.5, GT_S).
    pub dice: f64,
    pub in_bin: bool,
    /// Modes with intensities, application order.
    pub modes: Vec<ModeDraw>,
    pub gain: f64,
    /// Attempts used (1-based); `max_attempts + 1` marks the minimal erosion/dilation fallback.
    pub attempts: usize,
    pub temperature: f64,
}

struct Candidate {
    dist: f64,
    modes: Vec<ModeDraw>,
    gain: f64,
    attempt: usize,
    temperature: f64,
    mask: Vec<bool>,
    /// `(stored, true quality)` if already computed.
    exact: Option<(Vec<f32>, f64)>,
}

/// Quality-controlled sampling of one corrupted mask for `bin` (SPEC §8.6). Never returns a mask whose stored
/// hard mask equals `GT_S` (unless `GT_S` is empty and nothing can differ, which callers exclude).
pub fn sample_for_bin<R: Rng + ?Sized>(
    ctx: &SourceContext,
    bin: &QualityBin,
    cfg: &SimConfig,
    rng: &mut R,
) -> SampleResult {
    let mut best: Option<Candidate> = None;
    let store = |m: &[bool], t: f64| stored_mask(ctx, m, cfg.soft, t, cfg.store_dtype);
    for attempt in 0..cfg.max_attempts {
        let comp = Composition::draw(ctx, bin.class, cfg.temperature, cfg.spectrum, rng);
        let t = comp.temperature;
        let (mut g, mut g_lo, mut g_hi) = (1.0f64, 0.0f64, f64::INFINITY);
        for _step in 0..cfg.bisection_steps.max(1) {
            let m = comp.render(ctx, g);
            let proxy = ctx.proxy_dice(&m);
            let mut d = proxy;
            let mut exact = None;
            if bin.contains(proxy) {
                let st = store(&m, t);
                let q = ctx.dice_s(&st);
                if bin.contains(q) {
                    return SampleResult {
                        stored: st,
                        dice: q,
                        in_bin: true,
                        modes: comp.modes.clone(),
                        gain: g,
                        attempts: attempt + 1,
                        temperature: t,
                    };
                }
                d = q;
                exact = Some((st, q));
            }
            if d < 1.0 && !ctx.equals_gt(&m) {
                let dist = bin.distance(d);
                if best.as_ref().is_none_or(|b| dist < b.dist) {
                    best = Some(Candidate {
                        dist,
                        modes: comp.modes.clone(),
                        gain: g,
                        attempt: attempt + 1,
                        temperature: t,
                        mask: m,
                        exact,
                    });
                }
            }
            let g_new = if d >= bin.hi {
                g_lo = g;
                if g_hi.is_infinite() {
                    (2.0 * g).min(8.0)
                } else {
                    0.5 * (g_lo + g_hi)
                }
            } else {
                g_hi = g;
                0.5 * (g_lo + g_hi)
            };
            if g_new == g {
                break;
            }
            g = g_new;
        }
    }
    // Nothing accepted: the candidate closest to the bin, if its stored mask differs from GT_S.
    if let Some(c) = best {
        let (st, q) = match c.exact {
            Some(e) => e,
            None => {
                let st = store(&c.mask, c.temperature);
                let q = ctx.dice_s(&st);
                (st, q)
            }
        };
        if q < 1.0 {
            return SampleResult {
                in_bin: bin.contains(q),
                stored: st,
                dice: q,
                modes: c.modes,
                gain: c.gain,
                attempts: c.attempt,
                temperature: c.temperature,
            };
        }
    }
    minimal_change_fallback(ctx, bin, cfg, rng)
}

/// The smallest global erosion or dilation that changes at least one pixel at `S` (whichever Dice is closer to the
/// bin). Recorded as mode `erosion`/`dilation` with `s = 0` and the equivalent gain `c/(0.04R)`.
fn minimal_change_fallback<R: Rng + ?Sized>(
    ctx: &SourceContext,
    bin: &QualityBin,
    cfg: &SimConfig,
    rng: &mut R,
) -> SampleResult {
    let t = if cfg.temperature.1 > cfg.temperature.0 {
        rng.gen_range(cfg.temperature.0..cfg.temperature.1)
    } else {
        cfg.temperature.0
    };
    let r = ctx.desc.radius.max(1e-6);
    let max_c = 4.0 * r + 64.0;
    let mut options: Vec<(f64, SampleResult)> = Vec::new();
    for (sign, mode) in [(1.0, Mode::Erosion), (-1.0, Mode::Dilation)] {
        let mut c = 0.25;
        while c <= max_c {
            let m: Vec<bool> = ctx.phi.iter().map(|&f| f + sign * c < 0.0).collect();
            if ctx.proxy_dice(&m) < 1.0 || !ctx.equals_gt(&m) {
                let st = stored_mask(ctx, &m, cfg.soft, t, cfg.store_dtype);
                let q = ctx.dice_s(&st);
                if q < 1.0 {
                    let res = SampleResult {
                        in_bin: bin.contains(q),
                        stored: st,
                        dice: q,
                        modes: vec![ModeDraw { mode, s: 0.0 }],
                        gain: c / (0.04 * r),
                        attempts: cfg.max_attempts + 1,
                        temperature: t,
                    };
                    options.push((bin.distance(q), res));
                    break;
                }
            }
            c = if c < 4.0 { c + 0.25 } else { c * 1.25 };
        }
    }
    options.sort_by(|a, b| a.0.total_cmp(&b.0));
    match options.into_iter().next() {
        Some((_, r)) => r,
        None => {
            // Unreachable for a non-empty GT_S (the empty mask differs); keep a defined, non-GT result.
            SampleResult {
                stored: vec![0.0; ctx.store * ctx.store],
                dice: if ctx.gt_s_count == 0 { 1.0 } else { 0.0 },
                in_bin: bin.contains(0.0) && ctx.gt_s_count > 0,
                modes: vec![ModeDraw {
                    mode: Mode::Disappearance,
                    s: 1.0,
                }],
                gain: 1.0,
                attempts: cfg.max_attempts + 1,
                temperature: t,
            }
        }
    }
}

/// Generates sample `j` (SPEC §8.8): everything from the project RNG `("failure-sim", j)`.
pub fn generate_sample(
    ctx: &SourceContext,
    bin: &QualityBin,
    cfg: &SimConfig,
    seed: u64,
    j: u64,
) -> SampleResult {
    let mut rng = crate::rng::stream_rng(seed, "failure-sim", &[j]);
    sample_for_bin(ctx, bin, cfg, &mut rng)
}
