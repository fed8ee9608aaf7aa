//! `ultrarefiner infer` (SPEC §13.2): images without ground truth → masks at the original size.
//!
//! Per image: decode → grey (§3.3, any PNG mode) → `[0,1]` → `bilinear(ac=false)` to `S` (the dataset path
//! [`crate::data::dataset::to_sample`]) → model (the refiner's shared preprocessing §7.1 runs inside
//! [`crate::refiner::UltraRefiner`]) → probabilities at `S` → `bilinear(ac=false)` back to the original size →
//! strict `> threshold`.
use super::model::{EvalModel, LoadOptions, ModelSource};
use super::postprocess::{self, mask_iou, PostProcess};
use super::visualize::{infer_overlay_rgb, write_rgb_png};
use crate::config::Config;
use crate::data::dataset::{to_sample, Decoded};
use crate::data::pixels::{decode_png, to_gray, write_gray_png, Gray};
use crate::data::resize::resize_bilinear;
use crate::train::console::{Console, Style};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use super::postprocess::count_components;

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
    /// An image file or a folder of images (PNG in any mode, JPEG, BMP, TIFF).
    pub input: PathBuf,
    pub output: PathBuf,
    pub mode: InferMode,
    pub threshold: f32,
    pub batch_size: usize,
    /// Descend into sub-folders of `input`.
    pub recursive: bool,
    /// Also write `<name>_prob.npy` (f32, original size; refined, or coarse in `transunet` mode).
    pub save_prob: bool,
    /// §13.4 post-processing.
    pub post: PostProcess,
    /// Encoder dtype, ensemble mode, refiner flags.
    pub load: LoadOptions,
    pub device: Device,
    /// Progress bar / lines on stdout.
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
            save_prob: false,
            post: PostProcess::default(),
            load: LoadOptions::default(),
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
    /// §13.4 rejection fired (the refined output is the coarse map).
    pub rejected: bool,
    /// §13.4 boundary fusion applied.
    pub fused: bool,
    pub runtime_ms: f64,
}

#[derive(Debug, Clone)]
pub struct InferReport {
    pub output: PathBuf,
    pub rows: Vec<InferRow>,
}

/// File extensions `infer` reads.
pub const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|x| x.to_str())
        .map(|x| IMAGE_EXTENSIONS.iter().any(|e| x.eq_ignore_ascii_case(e)))
        .unwrap_or(false)
}

/// Image files of `input` (a file, or a folder; sorted; optionally recursive).
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
            } else if is_image(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(Error::file(
            input,
            format!(
                "no images found (extensions {}{})",
                IMAGE_EXTENSIONS.join(", "),
                if recursive {
                    ""
                } else {
                    "; use --recursive for sub-folders"
                }
            ),
        ));
    }
    Ok(out)
}

/// Decodes one input image to 8-bit grey (§3.3 conversion for every mode): PNG through the dataset decoder, other
/// formats (JPEG, BMP, TIFF) by content. Errors name the file.
pub fn decode_image_gray(path: &Path) -> Result<Gray> {
    let is_png = path
        .extension()
        .map(|x| x.eq_ignore_ascii_case("png"))
        .unwrap_or(false);
    let img = if is_png {
        decode_png(path)?
    } else {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        if bytes.is_empty() {
            return Err(Error::file(path, "empty file (0 bytes), not an image"));
        }
        let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| Error::file(path, format!("cannot read image: {e}")))?;
        reader
            .decode()
            .map_err(|e| Error::file(path, format!("cannot decode image: {e}")))?
    };
    let g = to_gray(&img).map_err(|e| Error::file(path, e.to_string()))?;
    if g.width == 0 || g.height == 0 {
        return Err(Error::file(path, "image has zero width or height"));
    }
    Ok(g)
}

/// Probability map at `S×S` → original `h×w` with `bilinear(ac=false)`.
pub fn prob_to_original(prob_s: &[f32], s: usize, h: usize, w: usize) -> Vec<f32> {
    resize_bilinear(prob_s, s, s, h, w, false)
}

/// The result of the §13.2 per-image path for one image (everything at its original size).
#[derive(Debug, Clone)]
pub struct ImagePrediction {
    pub width: usize,
    pub height: usize,
    /// Coarse probability (ensembles: mean over folds).
    pub coarse_prob: Vec<f32>,
    /// Refined probability after §13.4 post-processing; `None` in coarse-only mode.
    pub refined_prob: Option<Vec<f32>>,
    pub coarse_mask: Vec<bool>,
    pub refined_mask: Option<Vec<bool>>,
    pub rejected: bool,
    pub fused: bool,
}

impl ImagePrediction {
    /// The final mask: refined, or coarse in coarse-only mode.
    pub fn final_mask(&self) -> &[bool] {
        self.refined_mask.as_deref().unwrap_or(&self.coarse_mask)
    }
    /// The final probability: refined, or coarse in coarse-only mode.
    pub fn final_prob(&self) -> &[f32] {
        self.refined_prob.as_deref().unwrap_or(&self.coarse_prob)
    }
}

/// The per-image path of §13.2 for a batch of grey images of any sizes: `[0,1]` → `bilinear(ac=false)` to `S` →
/// model → §13.4 post-processing at `S` → `bilinear(ac=false)` back to each original size → strict `> threshold`.
/// `coarse_only` skips the refiner (`--mode transunet`).
pub fn predict_images(
    model: &EvalModel,
    images: &[&Gray],
    coarse_only: bool,
    post: &PostProcess,
    threshold: f32,
) -> Result<Vec<ImagePrediction>> {
    let s = model.img_size;
    let px = s * s;
    let mut flat = Vec::with_capacity(images.len() * px);
    for g in images {
        let d = Decoded {
            image: (*g).clone(),
            mask: Gray::zeros(g.width, g.height),
        };
        let (img_s, _) = to_sample(&d, s, None);
        flat.extend_from_slice(&img_s);
    }
    let x =
        Tensor::from_vec(flat, (images.len(), 1, s, s), &Device::Cpu)?.to_device(&model.device)?;
    let pred = model.predict(&x, coarse_only)?;
    let coarse: Vec<f32> = pred.coarse.flatten_all()?.to_vec1()?;
    let refined: Option<Vec<f32>> = match (&pred.refined, coarse_only) {
        (Some(r), false) => Some(r.flatten_all()?.to_vec1()?),
        _ => None,
    };
    let mut out = Vec::with_capacity(images.len());
    for (b, g) in images.iter().enumerate() {
        let (h, w) = (g.height, g.width);
        let cs = &coarse[b * px..(b + 1) * px];
        let cp = prob_to_original(cs, s, h, w);
        let coarse_mask: Vec<bool> = cp.iter().map(|&v| v > threshold).collect();
        let (refined_prob, refined_mask, rejected, fused) = match &refined {
            Some(r) => {
                let o = postprocess::apply(post, cs, &r[b * px..(b + 1) * px], s, s);
                let rp = prob_to_original(&o.refined, s, h, w);
                let rm: Vec<bool> = rp.iter().map(|&v| v > threshold).collect();
                (Some(rp), Some(rm), o.rejected.is_some(), o.fused)
            }
            None => (None, None, false, false),
        };
        out.push(ImagePrediction {
            width: w,
            height: h,
            coarse_prob: cp,
            refined_prob,
            coarse_mask,
            refined_mask,
            rejected,
            fused,
        });
    }
    Ok(out)
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

/// Runs inference on every image and writes masks, overlays, optional probabilities and `predictions.csv`.
pub fn run(opts: &InferOptions) -> Result<InferReport> {
    if opts.batch_size == 0 {
        return Err(Error::Arg("--batch-size must be at least 1".into()));
    }
    if !(opts.threshold > 0.0 && opts.threshold < 1.0) {
        return Err(Error::Arg(format!(
            "--threshold must be in (0, 1), got {}",
            opts.threshold
        )));
    }
    opts.post.validate()?;
    let files = list_images(&opts.input, opts.recursive)?;
    // Two inputs must not write the same outputs (e.g. `a.png` and `a.jpg`).
    let names: Vec<String> = files.iter().map(|f| output_name(&opts.input, f)).collect();
    let mut seen = std::collections::HashMap::new();
    for (f, n) in files.iter().zip(&names) {
        if let Some(prev) = seen.insert(n.clone(), f.clone()) {
            return Err(Error::file(
                f,
                format!(
                    "its outputs `{n}_*` would overwrite those of {}; rename one of the two",
                    prev.display()
                ),
            ));
        }
    }
    let config = Config::load(&opts.config)?;
    let model = EvalModel::load_with(&opts.source, &config, &opts.device, &opts.load)?;
    let coarse_only = opts.mode == InferMode::Transunet;
    if !coarse_only && !model.refines() {
        return Err(Error::Arg(
            "--mode full needs a refiner (a Phase 3 checkpoint or --sam-checkpoint); use --mode transunet".into(),
        ));
    }
    std::fs::create_dir_all(&opts.output).map_err(|e| Error::io(&opts.output, e))?;
    let console = Console::new(Style::detect(false, false));
    let mut progress = opts
        .verbose
        .then(|| console.progress("infer", None, files.len() as u64));
    let mut rows = Vec::with_capacity(files.len());
    for (chunk, chunk_names) in files
        .chunks(opts.batch_size)
        .zip(names.chunks(opts.batch_size))
    {
        let t0 = Instant::now();
        let greys = chunk
            .iter()
            .map(|f| decode_image_gray(f))
            .collect::<Result<Vec<_>>>()?;
        let refs: Vec<&Gray> = greys.iter().collect();
        let preds = predict_images(&model, &refs, coarse_only, &opts.post, opts.threshold)?;
        let per_ms = t0.elapsed().as_secs_f64() * 1000.0 / chunk.len() as f64;
        for ((p, g), name) in preds.iter().zip(&greys).zip(chunk_names) {
            let (h, w) = (p.height, p.width);
            write_gray_png(
                &opts.output.join(format!("{name}_coarse.png")),
                &mask_gray(&p.coarse_mask, w, h),
            )?;
            if let Some(rm) = &p.refined_mask {
                write_gray_png(
                    &opts.output.join(format!("{name}_refined.png")),
                    &mask_gray(rm, w, h),
                )?;
            }
            let ov = infer_overlay_rgb(&g.data, p.final_mask(), h, w);
            write_rgb_png(
                &opts.output.join(format!("{name}_overlay.png")),
                w as u32,
                h as u32,
                ov,
            )?;
            if opts.save_prob {
                let path = opts.output.join(format!("{name}_prob.npy"));
                crate::data::write_atomic(
                    &path,
                    &crate::augment::run::npy_bytes(p.final_prob(), h, w),
                )?;
            }
            rows.push(InferRow {
                name: name.clone(),
                width: w,
                height: h,
                coarse_area_px: p.coarse_mask.iter().filter(|&&v| v).count(),
                refined_area_px: p
                    .refined_mask
                    .as_ref()
                    .map(|r| r.iter().filter(|&&v| v).count()),
                mean_refined_prob: p
                    .refined_prob
                    .as_ref()
                    .map(|r| r.iter().map(|&v| v as f64).sum::<f64>() / r.len().max(1) as f64),
                iou_coarse_refined: p.refined_mask.as_ref().map(|r| mask_iou(r, &p.coarse_mask)),
                n_components: count_components(p.final_mask(), h, w),
                rejected: p.rejected,
                fused: p.fused,
                runtime_ms: per_ms,
            });
            if let Some(pr) = progress.as_mut() {
                pr.step(None);
            }
        }
    }
    if let Some(pr) = progress {
        pr.finish();
    }
    write_predictions_csv(&opts.output.join("predictions.csv"), &rows)?;
    Ok(InferReport {
        output: opts.output.clone(),
        rows,
    })
}

/// `predictions.csv` with the §13.2 columns (refined columns empty in `transunet` mode; `rejected`/`fused` are 0/1
/// flags of §13.4).
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
            (r.rejected as u8).to_string(),
            (r.fused as u8).to_string(),
            format!("{:.3}", r.runtime_ms),
        ])
        .map_err(werr)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| Error::file(path, e.to_string()))?;
    crate::data::write_atomic(path, &bytes)
}
