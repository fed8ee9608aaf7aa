//! `ultrarefiner infer` (SPEC §13.2): images without ground truth → masks at the original size.
//!
//! Per image: decode → grey (§3.3, any PNG mode) → `[0,1]` → `bilinear(ac=false)` to `S` (the dataset path
//! [`crate::data::dataset::to_sample`]) → model (the refiner's shared preprocessing §7.1 runs inside
//! [`crate::refiner::UltraRefiner`]) → probabilities at `S` → `bilinear(ac=false)` back to the original size →
//! strict `> threshold`.
use super::model::{EvalModel, ModelSource};
use super::visualize::{infer_overlay_rgb, write_rgb_png};
use crate::config::Config;
use crate::data::dataset::{decode_pair, to_sample};
use crate::data::pixels::{write_gray_png, Gray};
use crate::data::resize::resize_bilinear;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// `--mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InferMode {
    /// TransUNet + SAM refiner.
    Full,
    /// TransUNet (coarse) only.
    Transunet,
}

impl std::str::FromStr for InferMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "full" => Ok(InferMode::Full),
            "transunet" | "coarse" => Ok(InferMode::Transunet),
            _ => Err(Error::Arg(format!(
                "--mode `{s}` is not one of full, transunet"
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct InferOptions {
    pub source: ModelSource,
    pub config: String,
    /// A PNG file or a folder of PNGs.
    pub input: PathBuf,
    pub output: PathBuf,
    pub mode: InferMode,
    pub threshold: f32,
    pub batch_size: usize,
    /// Descend into sub-folders of `input`.
    pub recursive: bool,
    pub device: Device,
    pub verbose: bool,
}

impl Default for InferOptions {
    fn default() -> Self {
        Self {
            source: ModelSource::TransUnetOnly {
                transunet: PathBuf::new(),
            },
            config: "paper".into(),
            input: PathBuf::new(),
            output: PathBuf::from("./predictions"),
            mode: InferMode::Full,
            threshold: 0.5,
            batch_size: 8,
            recursive: false,
            device: Device::Cpu,
            verbose: false,
        }
    }
}

/// One row of `predictions.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRow {
    pub name: String,
    pub width: usize,
    pub height: usize,
    pub coarse_area_px: usize,
    /// `None` in `--mode transunet`.
    pub refined_area_px: Option<usize>,
    pub mean_refined_prob: Option<f64>,
    pub iou_coarse_refined: Option<f64>,
    /// 4-connected components of the final mask (refined, or coarse in `transunet` mode).
    pub n_components: usize,
    pub runtime_ms: f64,
}

#[derive(Debug, Clone)]
pub struct InferReport {
    pub output: PathBuf,
    pub rows: Vec<InferRow>,
}

/// PNG files of `input` (a file, or a folder; sorted; optionally recursive).
pub fn list_images(input: &Path, recursive: bool) -> Result<Vec<PathBuf>> {
    if input.is_file() {
        return Ok(vec![input.to_path_buf()]);
    }
    if !input.is_dir() {
        return Err(Error::file(input, "input is neither a file nor a folder"));
    }
    let mut out = Vec::new();
    let mut stack = vec![input.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let p = e.map_err(|e| Error::io(&d, e))?.path();
            if p.is_dir() {
                if recursive {
                    stack.push(p);
                }
            } else if p
                .extension()
                .map(|x| x.eq_ignore_ascii_case("png"))
                .unwrap_or(false)
            {
                out.push(p);
            }
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(Error::file(input, "no .png images found"));
    }
    Ok(out)
}

/// Number of 4-connected components of a binary mask.
pub fn count_components(mask: &[bool], h: usize, w: usize) -> usize {
    let mut seen = vec![false; h * w];
    let mut n = 0;
    let mut stack = Vec::new();
    for start in 0..h * w {
        if !mask[start] || seen[start] {
            continue;
        }
        n += 1;
        seen[start] = true;
        stack.push(start);
        while let Some(k) = stack.pop() {
            let (i, j) = (k / w, k % w);
            let mut visit = |q: usize| {
                if mask[q] && !seen[q] {
                    seen[q] = true;
                    stack.push(q);
                }
            };
            if i > 0 {
                visit(k - w);
            }
            if i + 1 < h {
                visit(k + w);
            }
            if j > 0 {
                visit(k - 1);
            }
            if j + 1 < w {
                visit(k + 1);
            }
        }
    }
    n
}

/// Probability map at `S×S` → original `h×w` with `bilinear(ac=false)`.
pub fn prob_to_original(prob_s: &[f32], s: usize, h: usize, w: usize) -> Vec<f32> {
    resize_bilinear(prob_s, s, s, h, w, false)
}

fn mask_gray(mask: &[bool], w: usize, h: usize) -> Gray {
    Gray::new(
        w,
        h,
        mask.iter().map(|&b| if b { 255 } else { 0 }).collect(),
    )
}

fn output_name(input: &Path, file: &Path) -> String {
    let rel = if input.is_dir() {
        file.strip_prefix(input).unwrap_or(file)
    } else {
        Path::new(file.file_name().unwrap_or_default())
    };
    let rel = rel.with_extension("");
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join("__")
}

/// Runs inference on every image and writes masks, overlays and `predictions.csv`.
pub fn run(opts: &InferOptions) -> Result<InferReport> {
    if opts.batch_size == 0 {
        return Err(Error::Arg("--batch-size must be at least 1".into()));
    }
    let config = Config::load(&opts.config)?;
    let model = EvalModel::load(&opts.source, &config, &opts.device)?;
    let coarse_only = opts.mode == InferMode::Transunet;
    if !coarse_only && !model.refines() {
        return Err(Error::Arg(
            "--mode full needs a refiner (a Phase 3 checkpoint or --sam-checkpoint); use --mode transunet".into(),
        ));
    }
    let files = list_images(&opts.input, opts.recursive)?;
    std::fs::create_dir_all(&opts.output).map_err(|e| Error::io(&opts.output, e))?;
    let s = model.img_size;
    let mut rows = Vec::with_capacity(files.len());
    for chunk in files.chunks(opts.batch_size) {
        let t0 = Instant::now();
        let mut decoded = Vec::with_capacity(chunk.len());
        let mut flat = Vec::with_capacity(chunk.len() * s * s);
        for f in chunk {
            let d = decode_pair(f, None)?;
            let (img_s, _) = to_sample(&d, s, None);
            flat.extend_from_slice(&img_s);
            decoded.push(d);
        }
        let x = Tensor::from_vec(flat, (chunk.len(), 1, s, s), &Device::Cpu)?
            .to_device(&opts.device)?;
        let pred = model.predict(&x, coarse_only)?;
        let coarse: Vec<f32> = pred.coarse.flatten_all()?.to_vec1()?;
        let refined: Option<Vec<f32>> = match (&pred.refined, coarse_only) {
            (Some(r), false) => Some(r.flatten_all()?.to_vec1()?),
            _ => None,
        };
        let per_ms = t0.elapsed().as_secs_f64() * 1000.0 / chunk.len() as f64;
        let px = s * s;
        for (b, f) in chunk.iter().enumerate() {
            let d = &decoded[b];
            let (h, w) = (d.image.height, d.image.width);
            let name = output_name(&opts.input, f);
            let cp = prob_to_original(&coarse[b * px..(b + 1) * px], s, h, w);
            let cm: Vec<bool> = cp.iter().map(|&v| v > opts.threshold).collect();
            write_gray_png(
                &opts.output.join(format!("{name}_coarse.png")),
                &mask_gray(&cm, w, h),
            )?;
            let (rm, rp) = match &refined {
                Some(r) => {
                    let rp = prob_to_original(&r[b * px..(b + 1) * px], s, h, w);
                    let rm: Vec<bool> = rp.iter().map(|&v| v > opts.threshold).collect();
                    write_gray_png(
                        &opts.output.join(format!("{name}_refined.png")),
                        &mask_gray(&rm, w, h),
                    )?;
                    (Some(rm), Some(rp))
                }
                None => (None, None),
            };
            let final_mask: &[bool] = rm.as_deref().unwrap_or(&cm[..]);
            let ov = infer_overlay_rgb(&d.image.data, final_mask, h, w);
            write_rgb_png(
                &opts.output.join(format!("{name}_overlay.png")),
                w as u32,
                h as u32,
                ov,
            )?;
            let iou = rm.as_ref().map(|r| {
                let inter = r.iter().zip(&cm).filter(|(a, b)| **a && **b).count();
                let uni = r.iter().zip(&cm).filter(|(a, b)| **a || **b).count();
                if uni == 0 {
                    1.0
                } else {
                    inter as f64 / uni as f64
                }
            });
            rows.push(InferRow {
                name,
                width: w,
                height: h,
                coarse_area_px: cm.iter().filter(|&&v| v).count(),
                refined_area_px: rm.as_ref().map(|r| r.iter().filter(|&&v| v).count()),
                mean_refined_prob: rp
                    .as_ref()
                    .map(|p| p.iter().map(|&v| v as f64).sum::<f64>() / p.len().max(1) as f64),
                iou_coarse_refined: iou,
                n_components: count_components(final_mask, h, w),
                runtime_ms: per_ms,
            });
        }
        if opts.verbose {
            eprintln!("[infer] {}/{} images", rows.len(), files.len());
        }
    }
    write_predictions_csv(&opts.output.join("predictions.csv"), &rows)?;
    Ok(InferReport {
        output: opts.output.clone(),
        rows,
    })
}

/// `predictions.csv` with the §13.2 columns (refined columns empty in `transunet` mode; `rejected`/`fused` are 0
/// since post-processing (§13.4) is not applied).
pub fn write_predictions_csv(path: &Path, rows: &[InferRow]) -> Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let werr = |e: csv::Error| Error::file(path, e.to_string());
    w.write_record([
        "name",
        "width",
        "height",
        "coarse_area_px",
        "refined_area_px",
        "mean_refined_prob",
        "iou_coarse_refined",
        "n_components",
        "rejected",
        "fused",
        "runtime_ms",
    ])
    .map_err(werr)?;
    for r in rows {
        w.write_record([
            r.name.clone(),
            r.width.to_string(),
            r.height.to_string(),
            r.coarse_area_px.to_string(),
            r.refined_area_px.map(|v| v.to_string()).unwrap_or_default(),
            r.mean_refined_prob
                .map(|v| format!("{v:.6}"))
                .unwrap_or_default(),
            r.iou_coarse_refined
                .map(|v| format!("{v:.6}"))
                .unwrap_or_default(),
            r.n_components.to_string(),
            "0".into(),
            "0".into(),
            format!("{:.3}", r.runtime_ms),
        ])
        .map_err(werr)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| Error::file(path, e.to_string()))?;
    crate::data::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn components_4_connected() {
        // two diagonal pixels are two components under 4-connectivity
        let m = vec![true, false, false, true];
        assert_eq!(count_components(&m, 2, 2), 2);
        let m = vec![true, true, false, true];
        assert_eq!(count_components(&m, 2, 2), 1);
        assert_eq!(count_components(&[false; 6], 2, 3), 0);
    }
}
