//! Run summary of the failure simulator: counts per bin and mode, Dice statistics and histogram, printed as a table
//! and drawn as a PNG (no text in the image: the numbers are in the printed table and in `manifest.json`).
use super::run::SampleRecord;
use super::sampler::QualityBin;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Number of Dice histogram bins over `[0, 1]`.
pub const HIST_BINS: usize = 100;

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BinCounts {
    pub target: usize,
    pub in_bin: usize,
    pub out_of_bin: usize,
}

#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DiceStats {
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

/// Aggregates of a run.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Keyed by bin name, in bin order in `bin_order`.
    pub counts_by_bin: BTreeMap<String, BinCounts>,
    pub dice_by_bin: BTreeMap<String, DiceStats>,
    pub mode_counts: BTreeMap<String, usize>,
    /// `HIST_BINS` equal bins over [0,1] (1.0 falls in the last), per target bin (outer index = bin order).
    pub histogram: Vec<Vec<usize>>,
    pub bin_order: Vec<String>,
    pub total: usize,
}

pub fn summarize(records: &[SampleRecord], bins: &[QualityBin]) -> Summary {
    let mut s = Summary {
        bin_order: bins.iter().map(|b| b.name.clone()).collect(),
        total: records.len(),
        ..Default::default()
    };
    s.histogram = vec![vec![0; HIST_BINS]; bins.len()];
    let mut dice: Vec<Vec<f64>> = vec![Vec::new(); bins.len()];
    for b in bins {
        s.counts_by_bin.insert(b.name.clone(), BinCounts::default());
    }
    for r in records {
        let bi = bins.iter().position(|b| b.name == r.bin).unwrap_or(0);
        let c = s.counts_by_bin.get_mut(&r.bin).expect("bin present");
        c.target += 1;
        if r.in_bin {
            c.in_bin += 1;
        } else {
            c.out_of_bin += 1;
        }
        dice[bi].push(r.dice);
        let h = ((r.dice * HIST_BINS as f64).floor() as usize).min(HIST_BINS - 1);
        s.histogram[bi][h] += 1;
        for m in r.modes.split('|').filter(|m| !m.is_empty()) {
            let name = m.split(':').next().unwrap_or(m).to_string();
            *s.mode_counts.entry(name).or_insert(0) += 1;
        }
    }
    for (b, d) in bins.iter().zip(dice.iter()) {
        let st = if d.is_empty() {
            DiceStats::default()
        } else {
            let n = d.len() as f64;
            let mean = d.iter().sum::<f64>() / n;
            let var = d.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
            DiceStats {
                mean,
                std: var.sqrt(),
                min: d.iter().cloned().fold(f64::INFINITY, f64::min),
                max: d.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
            }
        };
        s.dice_by_bin.insert(b.name.clone(), st);
    }
    s
}

/// Human-readable table (bins, modes, Dice histogram in 0.05 steps from 0.50).
pub fn format_table(s: &Summary, bins: &[QualityBin]) -> String {
    let mut out = String::new();
    out.push_str(&format!("{} samples\n", s.total));
    out.push_str("bin        range         target  share   in_bin  out   hit%    dice mean ± std   [min, max]\n");
    for b in bins {
        let c = &s.counts_by_bin[&b.name];
        let d = &s.dice_by_bin[&b.name];
        let share = if s.total > 0 {
            100.0 * c.target as f64 / s.total as f64
        } else {
            0.0
        };
        let hit = if c.target > 0 {
            100.0 * c.in_bin as f64 / c.target as f64
        } else {
            0.0
        };
        out.push_str(&format!(
            "{:<10} [{:.2}, {:.2})  {:>6}  {:>5.1}%  {:>6}  {:>4}  {:>5.1}%  {:.4} ± {:.4}   [{:.4}, {:.4}]\n",
            b.name, b.lo, b.hi, c.target, share, c.in_bin, c.out_of_bin, hit, d.mean, d.std, d.min, d.max
        ));
    }
    out.push_str("modes: ");
    out.push_str(
        &s.mode_counts
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    out.push('\n');
    out.push_str("dice histogram:\n");
    let total_hist: Vec<usize> = (0..HIST_BINS)
        .map(|h| s.histogram.iter().map(|v| v[h]).sum())
        .collect();
    let below: usize = total_hist[..HIST_BINS / 2].iter().sum();
    let max = total_hist.iter().copied().max().unwrap_or(0).max(1);
    if below > 0 {
        out.push_str(&format!("  [0.00, 0.50) {below:>7}\n"));
    }
    let step = HIST_BINS / 20; // 0.05 per row
    for row in 10..20 {
        let n: usize = total_hist[row * step..(row + 1) * step].iter().sum();
        let bar = "#".repeat((40 * n).div_ceil(max * step).min(40));
        out.push_str(&format!(
            "  [{:.2}, {:.2}) {:>7} {}\n",
            row as f64 * 0.05,
            (row + 1) as f64 * 0.05,
            n,
            bar
        ));
    }
    out
}

/// Draws the Dice histogram (one colour per target bin, stacked; bin edges as vertical lines) into a PNG.
pub fn write_png(path: &Path, s: &Summary, bins: &[QualityBin]) -> Result<()> {
    use plotters::prelude::*;
    let (w, h) = (800u32, 400u32);
    let err = |e: String| Error::file(path, format!("cannot draw summary PNG: {e}"));
    {
        let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let colors = [
            RGBColor(31, 119, 180),
            RGBColor(255, 127, 14),
            RGBColor(44, 160, 44),
            RGBColor(214, 39, 40),
            RGBColor(148, 103, 189),
        ];
        let (x0, x1, y0, y1) = (40i32, (w - 20) as i32, 20i32, (h - 30) as i32);
        let max = (0..HIST_BINS)
            .map(|k| s.histogram.iter().map(|v| v[k]).sum::<usize>())
            .max()
            .unwrap_or(0)
            .max(1);
        let bw = (x1 - x0) as f64 / HIST_BINS as f64;
        for k in 0..HIST_BINS {
            let mut base = 0usize;
            for (bi, hist) in s.histogram.iter().enumerate() {
                let n = hist[k];
                if n == 0 {
                    continue;
                }
                let ya = y1 - ((base as f64 / max as f64) * (y1 - y0) as f64) as i32;
                let yb = y1 - (((base + n) as f64 / max as f64) * (y1 - y0) as f64) as i32;
                let xa = x0 + (k as f64 * bw) as i32 + 1;
                let xb = x0 + ((k + 1) as f64 * bw) as i32 - 1;
                root.draw(&Rectangle::new(
                    [(xa, yb), (xb, ya)],
                    colors[bi % colors.len()].filled(),
                ))
                .map_err(|e| err(e.to_string()))?;
                base += n;
            }
        }
        // Axes and bin edges.
        root.draw(&PathElement::new(vec![(x0, y1), (x1, y1)], BLACK))
            .map_err(|e| err(e.to_string()))?;
        root.draw(&PathElement::new(vec![(x0, y0), (x0, y1)], BLACK))
            .map_err(|e| err(e.to_string()))?;
        for t in 0..=10 {
            let x = x0 + (t as f64 * 0.1 * (x1 - x0) as f64) as i32;
            root.draw(&PathElement::new(vec![(x, y1), (x, y1 + 6)], BLACK))
                .map_err(|e| err(e.to_string()))?;
        }
        for b in bins {
            for e in [b.lo, b.hi] {
                let x = x0 + (e * (x1 - x0) as f64) as i32;
                root.draw(&PathElement::new(
                    vec![(x, y0), (x, y1)],
                    RGBColor(120, 120, 120),
                ))
                .map_err(|e| err(e.to_string()))?;
            }
        }
        root.present().map_err(|e| err(e.to_string()))?;
    }
    Ok(())
}
