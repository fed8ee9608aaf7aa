//! `ultrarefiner evaluate` (SPEC §13.1): coarse vs refined per-image metrics (§10.2–§10.4) on a processed split,
//! with result files, `summary.png` and optional overlays.
//!
//! ```ignore
//! let report = eval::evaluate::run(&EvaluateOptions { source, datasets: vec!["PHANTOM".into()], ..Default::default() })?;
//! println!("{}", eval::evaluate::demo_summary_line(&report)); // demo: coarse Dice 0.xxxx, refined Dice 0.yyyy
//! ```
use super::infer::prob_to_original;
use super::metrics::{
    aggregate, binarize, image_metrics, AggregateReport, AggregateRow, ImageMetrics,
};
use super::model::{EvalModel, LoadOptions, ModelSource};
use super::postprocess::{self, PostProcess};
use super::visualize::{change_counts, overlay_png, summary_png, OverlayCase};
use crate::config::Config;
use crate::data::dataset::{Dataset, SegDataset, Split};
use crate::data::loader::Batch;
use crate::train::checkpoint::atomic_write_json;
use crate::train::console::{Console, Style};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use serde_json::json;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The five training datasets (default of `--datasets`).
pub const DEFAULT_DATASETS: [&str; 5] = ["BUSI", "BUSBRA", "BUS", "BUS_UC", "BUS_UCLM"];

/// Which part of the processed data to evaluate (`--split`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalSplit {
    /// The held-out test split.
    Test,
    /// Validation part of fold `--fold`.
    Val,
    /// The whole training split.
    Train,
    /// Training part of fold `--fold`.
    KfoldTrain,
}

impl EvalSplit {
    pub fn as_str(&self) -> &'static str {
        match self {
            EvalSplit::Test => "test",
            EvalSplit::Val => "val",
            EvalSplit::Train => "train",
            EvalSplit::KfoldTrain => "kfold-train",
        }
    }
}

impl std::str::FromStr for EvalSplit {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "test" => Ok(EvalSplit::Test),
            "val" => Ok(EvalSplit::Val),
            "train" => Ok(EvalSplit::Train),
            "kfold-train" | "kfold_train" => Ok(EvalSplit::KfoldTrain),
            _ => Err(Error::Arg(format!(
                "--split `{s}` is not one of test, val, train, kfold-train"
            ))),
        }
    }
}

/// `--eval-size`: the grid the metrics are computed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EvalSize {
    /// The TransUNet grid `S×S` (prediction and the nearest-resized processed mask).
    #[default]
    S,
    /// The processed image size: probabilities resampled with `bilinear(ac=false)`, compared with the processed mask.
    Original,
}

impl std::str::FromStr for EvalSize {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "original" | "orig" => Ok(EvalSize::Original),
            "s" => Ok(EvalSize::S),
            v if v.parse::<usize>().is_ok() => Ok(EvalSize::S),
            _ => Err(Error::Arg(format!(
                "--eval-size `{s}` is not `original` or the TransUNet size (e.g. 224)"
            ))),
        }
    }
}

/// Pixel spacings `(s_y, s_x)` in mm at the original resolution, keyed by `(dataset, name)` (`--spacing-csv`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Spacings(HashMap<(String, String), (f64, f64)>);

impl Spacings {
    /// Reads a CSV with the columns `dataset,name,spacing_x_mm,spacing_y_mm` (other columns ignored).
    pub fn load(path: &Path) -> Result<Self> {
        let mut r = csv::Reader::from_path(path).map_err(|e| Error::file(path, e.to_string()))?;
        let hdr = r
            .headers()
            .map_err(|e| Error::file(path, e.to_string()))?
            .clone();
        let col = |n: &str| {
            hdr.iter().position(|h| h.trim() == n).ok_or_else(|| {
                Error::file(
                    path,
                    format!("missing column `{n}` (need dataset,name,spacing_x_mm,spacing_y_mm)"),
                )
            })
        };
        let (cd, cn, cx, cy) = (
            col("dataset")?,
            col("name")?,
            col("spacing_x_mm")?,
            col("spacing_y_mm")?,
        );
        let mut map = HashMap::new();
        for (i, rec) in r.records().enumerate() {
            let rec = rec.map_err(|e| Error::file(path, e.to_string()))?;
            let num = |c: usize, what: &str| -> Result<f64> {
                let v = rec.get(c).unwrap_or("").trim();
                v.parse::<f64>()
                    .ok()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .ok_or_else(|| {
                        Error::file(
                            path,
                            format!("row {}: {what} `{v}` is not a positive number", i + 2),
                        )
                    })
            };
            let (sx, sy) = (num(cx, "spacing_x_mm")?, num(cy, "spacing_y_mm")?);
            let ds = rec.get(cd).unwrap_or("").trim().to_string();
            let name = rec.get(cn).unwrap_or("").trim().to_string();
            map.insert((ds, name), (sy, sx));
        }
        Ok(Spacings(map))
    }

    /// `(s_y, s_x)` of an image, matching the name with or without its extension.
    pub fn get(&self, dataset: &str, name: &str) -> Option<(f64, f64)> {
        let stem = Path::new(name)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| name.to_string());
        self.0
            .get(&(dataset.to_string(), name.to_string()))
            .or_else(|| self.0.get(&(dataset.to_string(), stem.clone())))
            .or_else(|| {
                self.0.iter().find_map(|((d, n), v)| {
                    (d == dataset
                        && Path::new(n).file_stem().map(|s| s.to_string_lossy())
                            == Some(stem.as_str().into()))
                    .then_some(v)
                })
            })
            .copied()
    }
}

/// Everything `evaluate` needs.
#[derive(Debug, Clone)]
pub struct EvaluateOptions {
    pub source: ModelSource,
    /// Preset name or TOML path (`--config`); the model geometry and default refiner settings.
    pub config: String,
    pub data_root: PathBuf,
    pub datasets: Vec<String>,
    pub split: EvalSplit,
    /// Fold for `val` / `kfold-train` (default 0 there); with `test`/`train` only labels the output.
    pub fold: Option<usize>,
    pub n_splits: usize,
    pub batch_size: usize,
    pub threshold: f32,
    /// `None`: `./results/<split>_evaluation` or `./results/<split>_fold<k>_evaluation`.
    pub output_dir: Option<PathBuf>,
    pub visualize: bool,
    /// Number of overlays per dataset (0 or negative = all).
    pub num_visualize: i64,
    pub visualize_best_worst: bool,
    /// Grid of the metrics (`--eval-size 224|original`).
    pub eval_size: EvalSize,
    /// `--spacing-csv`: adds HD95/ASSD in mm.
    pub spacing_csv: Option<PathBuf>,
    /// §13.4 post-processing of the refined probabilities.
    pub post: PostProcess,
    /// Encoder dtype, ensemble mode, refiner flags.
    pub load: LoadOptions,
    pub device: Device,
    /// Progress bar (TTY) or progress lines on stdout.
    pub verbose: bool,
}

impl Default for EvaluateOptions {
    fn default() -> Self {
        Self {
            source: ModelSource::TransUnetOnly {
                transunet: PathBuf::new(),
            },
            config: "paper".into(),
            data_root: PathBuf::from("./dataset/processed"),
            datasets: DEFAULT_DATASETS.iter().map(|s| s.to_string()).collect(),
            split: EvalSplit::Test,
            fold: None,
            n_splits: 5,
            batch_size: 4,
            threshold: 0.5,
            output_dir: None,
            visualize: false,
            num_visualize: 10,
            visualize_best_worst: false,
            eval_size: EvalSize::S,
            spacing_csv: None,
            post: PostProcess::default(),
            load: LoadOptions::default(),
            device: Device::Cpu,
            verbose: false,
        }
    }
}

impl EvaluateOptions {
    /// Effective fold: `--fold`, or 0 for the fold-based splits.
    pub fn effective_fold(&self) -> Option<usize> {
        match self.split {
            EvalSplit::Val | EvalSplit::KfoldTrain => Some(self.fold.unwrap_or(0)),
            _ => self.fold,
        }
    }
    /// `<split>` or `<split>_fold<k>`.
    pub fn label(&self) -> String {
        match self.effective_fold() {
            Some(k) => format!("{}_fold{k}", self.split.as_str()),
            None => self.split.as_str().to_string(),
        }
    }
    /// The output folder (explicit or the §13.1 default).
    pub fn resolved_output_dir(&self) -> PathBuf {
        self.output_dir.clone().unwrap_or_else(|| {
            PathBuf::from("./results").join(format!("{}_evaluation", self.label()))
        })
    }
    fn data_split(&self) -> Split {
        match self.split {
            EvalSplit::Test => Split::Test,
            EvalSplit::Train => Split::Train,
            EvalSplit::Val => Split::FoldVal(self.effective_fold().unwrap_or(0)),
            EvalSplit::KfoldTrain => Split::FoldTrain(self.effective_fold().unwrap_or(0)),
        }
    }
    fn args_json(&self) -> serde_json::Value {
        json!({
            "source": self.source.describe(),
            "config": self.config,
            "data_root": self.data_root.display().to_string(),
            "datasets": self.datasets,
            "split": self.split.as_str(),
            "fold": self.effective_fold(),
            "n_splits": self.n_splits,
            "batch_size": self.batch_size,
            "threshold": self.threshold,
            "eval_size": match self.eval_size { EvalSize::S => "S", EvalSize::Original => "original" },
            "spacing_csv": self.spacing_csv.as_ref().map(|p| p.display().to_string()),
            "post_processing": serde_json::to_value(&self.post).unwrap_or_default(),
            "encoder_dtype": format!("{:?}", self.load.encoder_dtype).to_lowercase(),
            "ensemble_mode": format!("{:?}", self.load.ensemble_mode),
            "override_refiner": self.load.refiner_flags.override_sidecar,
            "visualize": self.visualize,
            "num_visualize": self.num_visualize,
            "visualize_best_worst": self.visualize_best_worst,
        })
    }
}

/// One evaluated image.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub dataset: String,
    pub name: String,
    /// Index within its dataset split.
    pub index: usize,
    pub coarse: ImageMetrics,
    pub refined: Option<ImageMetrics>,
    /// §13.4: the refinement was rejected (refined = coarse).
    pub rejected: bool,
    /// §13.4: boundary fusion was applied.
    pub fused: bool,
}

impl CaseResult {
    /// Refined − coarse Dice (0 without a refiner).
    pub fn dice_improvement(&self) -> f64 {
        self.refined
            .as_ref()
            .map(|r| r.dice - self.coarse.dice)
            .unwrap_or(0.0)
    }
}

/// All cases of one dataset.
#[derive(Debug, Clone)]
pub struct DatasetResult {
    pub name: String,
    pub cases: Vec<CaseResult>,
    /// Cases whose refinement was rejected / fused (§13.4).
    pub n_rejected: usize,
    pub n_fused: usize,
    /// Paths of the overlays written.
    pub visualizations: Vec<PathBuf>,
}

/// What [`run`] returns.
#[derive(Debug, Clone)]
pub struct EvaluateReport {
    pub output_dir: PathBuf,
    /// `<split>` or `<split>_fold<k>`.
    pub label: String,
    pub datasets: Vec<DatasetResult>,
    pub coarse: AggregateReport,
    /// `None` for a TransUNet-only model.
    pub refined: Option<AggregateReport>,
}

impl EvaluateReport {
    /// Mean per-image coarse Dice over all images (ALL row).
    pub fn mean_coarse_dice(&self) -> f64 {
        self.coarse
            .all
            .get("dice")
            .map(|m| m.mean)
            .unwrap_or(f64::NAN)
    }
    /// Mean per-image refined Dice over all images (ALL row), if refined.
    pub fn mean_refined_dice(&self) -> Option<f64> {
        self.refined
            .as_ref()
            .and_then(|r| r.all.get("dice").map(|m| m.mean))
    }
    pub fn n_images(&self) -> usize {
        self.datasets.iter().map(|d| d.cases.len()).sum()
    }
}

/// `demo: coarse Dice 0.xxxx, refined Dice 0.yyyy` (`n/a` without a refiner) — the line `make demo` prints.
pub fn demo_summary_line(r: &EvaluateReport) -> String {
    let refined = r
        .mean_refined_dice()
        .map(|v| format!("{v:.4}"))
        .unwrap_or_else(|| "n/a".into());
    format!(
        "demo: coarse Dice {:.4}, refined Dice {refined}",
        r.mean_coarse_dice()
    )
}

fn mean_of(row: &AggregateRow, k: &str) -> f64 {
    row.get(k).map(|m| m.mean).unwrap_or(f64::NAN)
}

/// The console table of §13.1: per dataset `Samples | Coarse Dice/IoU/HD95 | Refined Dice/IoU/HD95 | ΔDice ΔHD95`,
/// AVERAGE and ALL rows, then a detailed metrics block (ALL row, mean ± std).
pub fn console_table(r: &EvaluateReport) -> String {
    let rule = "=".repeat(118);
    let thin = "-".repeat(118);
    let mut s = String::new();
    s.push_str(&format!(
        "{rule}\n{:>20}EVALUATION RESULTS ({})\n{rule}\n",
        "", r.label
    ));
    s.push_str(&format!(
        "{:<16}{:>8} | {:^24} | {:^24} | {:^18}\n",
        "", "", "Coarse", "Refined", "Refined - Coarse"
    ));
    s.push_str(&format!(
        "{:<16}{:>8} | {:>8}{:>8}{:>8} | {:>8}{:>8}{:>8} | {:>9}{:>9}\n",
        "Dataset", "Samples", "Dice", "IoU", "HD95", "Dice", "IoU", "HD95", "ΔDice", "ΔHD95"
    ));
    s.push_str(&format!("{thin}\n"));
    let row = |name: &str, n: usize, c: &AggregateRow, rf: Option<&AggregateRow>| -> String {
        let (cd, ci, ch) = (mean_of(c, "dice"), mean_of(c, "iou"), mean_of(c, "hd95"));
        match rf {
            Some(rr) => {
                let (rd, ri, rh) = (mean_of(rr, "dice"), mean_of(rr, "iou"), mean_of(rr, "hd95"));
                format!(
                    "{name:<16}{n:>8} | {cd:>8.4}{ci:>8.4}{ch:>8.2} | {rd:>8.4}{ri:>8.4}{rh:>8.2} | {:>+9.4}{:>+9.2}\n",
                    rd - cd,
                    rh - ch
                )
            }
            None => format!(
                "{name:<16}{n:>8} | {cd:>8.4}{ci:>8.4}{ch:>8.2} | {:>8}{:>8}{:>8} | {:>9}{:>9}\n",
                "-", "-", "-", "-", "-"
            ),
        }
    };
    for (i, d) in r.coarse.datasets.iter().enumerate() {
        let rf = r.refined.as_ref().map(|x| &x.datasets[i]);
        s.push_str(&row(&d.name, d.n_images, d, rf));
    }
    s.push_str(&format!("{thin}\n"));
    s.push_str(&row(
        "AVERAGE",
        r.coarse.datasets.len(),
        &r.coarse.average,
        r.refined.as_ref().map(|x| &x.average),
    ));
    s.push_str(&row(
        "ALL",
        r.coarse.all.n_images,
        &r.coarse.all,
        r.refined.as_ref().map(|x| &x.all),
    ));
    s.push_str(&format!(
        "{rule}\n\nDetailed metrics (ALL images, mean ± std)\n"
    ));
    s.push_str(&format!(
        "{:<14}{:>22}{:>22}{:>10}\n",
        "Metric", "Coarse", "Refined", "Delta"
    ));
    for (name, c) in &r.coarse.all.metrics {
        let rf = r.refined.as_ref().and_then(|x| x.all.get(name));
        let cs = format!("{:.4} ± {:.4}", c.mean, c.std);
        match rf {
            Some(m) => s.push_str(&format!(
                "{name:<14}{cs:>22}{:>22}{:>+10.4}\n",
                format!("{:.4} ± {:.4}", m.mean, m.std),
                m.mean - c.mean
            )),
            None => s.push_str(&format!("{name:<14}{cs:>22}{:>22}{:>10}\n", "-", "-")),
        }
    }
    if r.refined.is_none() {
        s.push_str("model has no SAM refiner: coarse (TransUNet) path only\n");
    }
    s.push_str(&format!(
        "empty predictions: coarse {}{}; empty ground truth: {}\n",
        r.coarse.all.n_pred_empty,
        r.refined
            .as_ref()
            .map(|x| format!(", refined {}", x.all.n_pred_empty))
            .unwrap_or_default(),
        r.coarse.all.n_gt_empty
    ));
    let (nrej, nfus): (usize, usize) = r
        .datasets
        .iter()
        .fold((0, 0), |(a, b), d| (a + d.n_rejected, b + d.n_fused));
    if nrej + nfus > 0 {
        s.push_str(&format!(
            "post-processing: refinement rejected in {nrej} case(s) (coarse kept), boundary fusion in {nfus}\n"
        ));
    }
    if let (Some(_), true) = (&r.refined, r.n_images() > 0) {
        let c: Vec<f64> = r
            .datasets
            .iter()
            .flat_map(|d| d.cases.iter().map(|x| x.coarse.dice))
            .collect();
        let f: Vec<f64> = r
            .datasets
            .iter()
            .flat_map(|d| {
                d.cases
                    .iter()
                    .filter_map(|x| x.refined.as_ref().map(|m| m.dice))
            })
            .collect();
        let (i, d, u) = change_counts(&c, &f);
        s.push_str(&format!(
            "cases improved {i}, degraded {d}, unchanged {u} (|ΔDice| < 1e-3)\n"
        ));
    }
    s.push_str(&format!("results: {}\n", r.output_dir.display()));
    s
}

fn stats_json(row: &AggregateRow) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (k, v) in &row.metrics {
        m.insert(
            k.clone(),
            json!({"mean": finite(v.mean), "std": finite(v.std), "n": v.n}),
        );
    }
    serde_json::Value::Object(m)
}

fn finite(v: f64) -> serde_json::Value {
    if v.is_finite() {
        json!(v)
    } else {
        serde_json::Value::Null
    }
}

fn row_json(c: &AggregateRow, r: Option<&AggregateRow>) -> serde_json::Value {
    json!({
        "name": c.name,
        "n_images": c.n_images,
        "coarse": stats_json(c),
        "refined": r.map(stats_json),
        "n_pred_empty": {"coarse": c.n_pred_empty, "refined": r.map(|x| x.n_pred_empty)},
        "n_gt_empty": c.n_gt_empty,
        "hd95_excl": {"coarse": finite(mean_of(c, "hd95_excl")), "refined": r.map(|x| finite(mean_of(x, "hd95_excl")))},
        "delta_dice": r.map(|x| finite(mean_of(x, "dice") - mean_of(c, "dice"))),
    })
}

const CASE_METRICS: [&str; 8] = [
    "dice",
    "iou",
    "precision",
    "recall",
    "accuracy",
    "specificity",
    "hd95",
    "assd",
];

fn metric_value(m: &ImageMetrics, k: &str) -> f64 {
    match k {
        "dice" => m.dice,
        "iou" => m.iou,
        "precision" => m.precision,
        "recall" => m.recall,
        "accuracy" => m.accuracy,
        "specificity" => m.specificity,
        "hd95" => m.hd95,
        _ => m.assd,
    }
}

fn mm_cells(m: &ImageMetrics) -> [String; 2] {
    let f = |v: Option<f64>| v.map(|x| format!("{x:.6}")).unwrap_or_default();
    [f(m.hd95_mm), f(m.assd_mm)]
}

fn write_per_case(path: &Path, cases: &[CaseResult], refined: bool, mm: bool) -> Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let mut header: Vec<String> = vec!["name".into(), "index".into()];
    header.extend(CASE_METRICS.iter().map(|k| format!("coarse_{k}")));
    if mm {
        header.extend(["coarse_hd95_mm".to_string(), "coarse_assd_mm".to_string()]);
    }
    if refined {
        header.extend(CASE_METRICS.iter().map(|k| format!("refined_{k}")));
        if mm {
            header.extend(["refined_hd95_mm".to_string(), "refined_assd_mm".to_string()]);
        }
        header.extend(
            ["delta_dice", "delta_iou", "delta_hd95"]
                .iter()
                .map(|s| s.to_string()),
        );
    }
    header.extend(
        ["gt_empty", "coarse_pred_empty"]
            .iter()
            .map(|s| s.to_string()),
    );
    if refined {
        header.push("refined_pred_empty".into());
    }
    header.extend(["rejected", "fused"].iter().map(|s| s.to_string()));
    let werr = |e: csv::Error| Error::file(path, e.to_string());
    w.write_record(&header).map_err(werr)?;
    for c in cases {
        let mut rec: Vec<String> = vec![c.name.clone(), c.index.to_string()];
        rec.extend(
            CASE_METRICS
                .iter()
                .map(|k| format!("{:.6}", metric_value(&c.coarse, k))),
        );
        if mm {
            rec.extend(mm_cells(&c.coarse));
        }
        if let Some(r) = &c.refined {
            rec.extend(
                CASE_METRICS
                    .iter()
                    .map(|k| format!("{:.6}", metric_value(r, k))),
            );
            if mm {
                rec.extend(mm_cells(r));
            }
            rec.push(format!("{:.6}", r.dice - c.coarse.dice));
            rec.push(format!("{:.6}", r.iou - c.coarse.iou));
            rec.push(format!("{:.6}", r.hd95 - c.coarse.hd95));
        } else if refined {
            let extra = if mm { 5 } else { 3 };
            rec.extend(std::iter::repeat_n(
                String::new(),
                CASE_METRICS.len() + extra,
            ));
        }
        rec.push((c.coarse.gt_empty as u8).to_string());
        rec.push((c.coarse.pred_empty as u8).to_string());
        if refined {
            rec.push(
                c.refined
                    .as_ref()
                    .map(|r| (r.pred_empty as u8).to_string())
                    .unwrap_or_default(),
            );
        }
        rec.push((c.rejected as u8).to_string());
        rec.push((c.fused as u8).to_string());
        w.write_record(&rec).map_err(werr)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| Error::file(path, e.to_string()))?;
    crate::data::write_atomic(path, &bytes)
}

fn write_summary_csv(path: &Path, r: &EvaluateReport) -> Result<()> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let names: Vec<String> = r
        .coarse
        .all
        .metrics
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    let mut header: Vec<String> = vec!["name".into(), "n_images".into()];
    for k in &names {
        header.push(format!("coarse_{k}_mean"));
        header.push(format!("coarse_{k}_std"));
    }
    if r.refined.is_some() {
        for k in &names {
            header.push(format!("refined_{k}_mean"));
            header.push(format!("refined_{k}_std"));
        }
        header.push("delta_dice".into());
    }
    header.push("coarse_n_pred_empty".into());
    if r.refined.is_some() {
        header.push("refined_n_pred_empty".into());
    }
    header.push("n_gt_empty".into());
    let werr = |e: csv::Error| Error::file(path, e.to_string());
    w.write_record(&header).map_err(werr)?;
    let mut rows: Vec<(&AggregateRow, Option<&AggregateRow>)> = Vec::new();
    for (i, c) in r.coarse.datasets.iter().enumerate() {
        rows.push((c, r.refined.as_ref().map(|x| &x.datasets[i])));
    }
    rows.push((&r.coarse.average, r.refined.as_ref().map(|x| &x.average)));
    rows.push((&r.coarse.all, r.refined.as_ref().map(|x| &x.all)));
    let f = |v: f64| {
        if v.is_finite() {
            format!("{v:.6}")
        } else {
            String::new()
        }
    };
    for (c, rf) in rows {
        let mut rec = vec![c.name.clone(), c.n_images.to_string()];
        for k in &names {
            let m = c.get(k);
            rec.push(f(m.map(|m| m.mean).unwrap_or(f64::NAN)));
            rec.push(f(m.map(|m| m.std).unwrap_or(f64::NAN)));
        }
        if let Some(rr) = rf {
            for k in &names {
                let m = rr.get(k);
                rec.push(f(m.map(|m| m.mean).unwrap_or(f64::NAN)));
                rec.push(f(m.map(|m| m.std).unwrap_or(f64::NAN)));
            }
            rec.push(f(mean_of(rr, "dice") - mean_of(c, "dice")));
        }
        rec.push(c.n_pred_empty.to_string());
        if let Some(rr) = rf {
            rec.push(rr.n_pred_empty.to_string());
        }
        rec.push(c.n_gt_empty.to_string());
        w.write_record(&rec).map_err(werr)?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| Error::file(path, e.to_string()))?;
    crate::data::write_atomic(path, &bytes)
}

/// Indices (into `cases`) to visualise: evenly spaced, or with `best_worst` the n/2 largest and n/2 smallest Dice
/// improvements. `n ≤ 0` = all.
pub fn select_cases(cases: &[CaseResult], n: i64, best_worst: bool) -> Vec<usize> {
    let len = cases.len();
    let n = if n <= 0 { len } else { (n as usize).min(len) };
    if n == 0 {
        return Vec::new();
    }
    if n == len {
        return (0..len).collect();
    }
    let mut out: Vec<usize> = if best_worst {
        let mut order: Vec<usize> = (0..len).collect();
        order.sort_by(|&a, &b| {
            cases[b]
                .dice_improvement()
                .total_cmp(&cases[a].dice_improvement())
                .then(a.cmp(&b))
        });
        let top = n.div_ceil(2);
        let bottom = n - top;
        let mut v: Vec<usize> = order[..top].to_vec();
        v.extend(order[len - bottom..].iter().copied());
        v
    } else {
        (0..n)
            .map(|i| if n == 1 { 0 } else { i * (len - 1) / (n - 1) })
            .collect()
    };
    out.sort_unstable();
    out.dedup();
    out
}

/// Coarse and (post-processed) refined probabilities at `S` of one image, with the §13.4 flags.
#[derive(Debug, Clone)]
pub struct CaseMaps {
    pub coarse: Vec<f32>,
    pub refined: Option<Vec<f32>>,
    pub rejected: bool,
    pub fused: bool,
}

/// Model probabilities of a batch `(B,1,S,S)` at `S`, with §13.4 post-processing applied to the refined maps.
pub fn predict_maps(
    model: &EvalModel,
    images: &Tensor,
    post: &PostProcess,
) -> Result<Vec<CaseMaps>> {
    let s = model.img_size;
    let px = s * s;
    let pred = model.predict(images, false)?;
    let coarse: Vec<f32> = pred.coarse.flatten_all()?.to_vec1()?;
    let refined: Option<Vec<f32>> = match &pred.refined {
        Some(r) => Some(r.flatten_all()?.to_vec1()?),
        None => None,
    };
    let b = coarse.len() / px;
    Ok((0..b)
        .map(|i| {
            let c = coarse[i * px..(i + 1) * px].to_vec();
            match &refined {
                Some(r) => {
                    let o = postprocess::apply(post, &c, &r[i * px..(i + 1) * px], s, s);
                    CaseMaps {
                        coarse: c,
                        refined: Some(o.refined),
                        rejected: o.rejected.is_some(),
                        fused: o.fused,
                    }
                }
                None => CaseMaps {
                    coarse: c,
                    refined: None,
                    rejected: false,
                    fused: false,
                },
            }
        })
        .collect())
}

/// Runs the evaluation and writes every artefact; returns the report (the CLI prints [`console_table`]).
pub fn run(opts: &EvaluateOptions) -> Result<EvaluateReport> {
    if opts.batch_size == 0 {
        return Err(Error::Arg("--batch-size must be at least 1".into()));
    }
    if !(opts.threshold > 0.0 && opts.threshold < 1.0) {
        return Err(Error::Arg(format!(
            "--threshold must be in (0, 1), got {}",
            opts.threshold
        )));
    }
    if let Some(k) = opts.effective_fold() {
        if k >= opts.n_splits {
            return Err(Error::Arg(format!(
                "--fold {k} is out of range for --n-splits {}",
                opts.n_splits
            )));
        }
    }
    if opts.datasets.is_empty() {
        return Err(Error::Arg("no dataset given (--datasets)".into()));
    }
    opts.post.validate()?;
    let spacings = match &opts.spacing_csv {
        Some(p) => Some(Spacings::load(p)?),
        None => None,
    };
    let config = Config::load(&opts.config)?;
    let model = EvalModel::load_with(&opts.source, &config, &opts.device, &opts.load)?;
    let s = model.img_size;
    let out_dir = opts.resolved_output_dir();
    std::fs::create_dir_all(&out_dir).map_err(|e| Error::io(&out_dir, e))?;
    let label = opts.label();
    let console = Console::new(Style::detect(false, false));
    let mut results = Vec::new();
    let mut missing_spacing = 0usize;
    for ds_name in &opts.datasets {
        let ds = SegDataset::open(&opts.data_root, &[ds_name.as_str()], opts.data_split(), s)?
            .without_cache();
        let n = ds.len();
        if n == 0 {
            return Err(Error::Arg(format!(
                "dataset {ds_name}: split {label} has no images"
            )));
        }
        let mut progress = opts
            .verbose
            .then(|| console.progress(&format!("evaluate {ds_name}"), None, n as u64));
        let mut cases: Vec<CaseResult> = Vec::with_capacity(n);
        for start in (0..n).step_by(opts.batch_size) {
            let idx: Vec<usize> = (start..(start + opts.batch_size).min(n)).collect();
            let samples = idx
                .iter()
                .map(|&i| ds.get_eval(i))
                .collect::<Result<Vec<_>>>()?;
            let batch = Batch::from_samples(samples)?;
            let imgs = batch.images.to_device(&opts.device)?;
            let maps = predict_maps(&model, &imgs, &opts.post)?;
            let gt: Vec<f32> = batch.masks.flatten_all()?.to_vec1()?;
            let px = s * s;
            let batch_cases = (0..idx.len())
                .into_par_iter()
                .map(|b| -> Result<(CaseResult, bool)> {
                    let m = &maps[b];
                    let (h0, w0) = batch.original_sizes[b];
                    let sp = spacings
                        .as_ref()
                        .and_then(|sp| sp.get(ds_name, &batch.names[b]));
                    let (c, r, g, h, w, spacing) = match opts.eval_size {
                        EvalSize::S => (
                            binarize(&m.coarse, opts.threshold),
                            m.refined.as_ref().map(|r| binarize(r, opts.threshold)),
                            binarize(&gt[b * px..(b + 1) * px], 0.5),
                            s,
                            s,
                            sp.map(|(sy, sx)| {
                                (sy * h0 as f64 / s as f64, sx * w0 as f64 / s as f64)
                            }),
                        ),
                        EvalSize::Original => {
                            let d = ds.decoded(idx[b])?;
                            let (h, w) = (d.image.height, d.image.width);
                            let g: Vec<bool> = d.mask.data.iter().map(|&v| v > 0).collect();
                            (
                                binarize(&prob_to_original(&m.coarse, s, h, w), opts.threshold),
                                m.refined.as_ref().map(|r| {
                                    binarize(&prob_to_original(r, s, h, w), opts.threshold)
                                }),
                                g,
                                h,
                                w,
                                sp,
                            )
                        }
                    };
                    let cm = image_metrics(&c, &g, h, w, spacing)?;
                    let rm = match &r {
                        Some(r) => Some(image_metrics(r, &g, h, w, spacing)?),
                        None => None,
                    };
                    Ok((
                        CaseResult {
                            dataset: ds_name.clone(),
                            name: batch.names[b].clone(),
                            index: idx[b],
                            coarse: cm,
                            refined: rm,
                            rejected: m.rejected,
                            fused: m.fused,
                        },
                        spacings.is_some() && sp.is_none(),
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            for (c, miss) in batch_cases {
                missing_spacing += miss as usize;
                cases.push(c);
                if let Some(p) = progress.as_mut() {
                    p.step(None);
                }
            }
        }
        if let Some(p) = progress {
            p.finish();
        }
        let ds_dir = out_dir.join(ds_name);
        std::fs::create_dir_all(&ds_dir).map_err(|e| Error::io(&ds_dir, e))?;
        let mut visualizations = Vec::new();
        if opts.visualize {
            let vis_dir = ds_dir.join("visualizations");
            std::fs::create_dir_all(&vis_dir).map_err(|e| Error::io(&vis_dir, e))?;
            for ci in select_cases(&cases, opts.num_visualize, opts.visualize_best_worst) {
                let case = &cases[ci];
                let sample = ds.get_eval(case.index)?;
                let img = Tensor::from_vec(sample.image.clone(), (1, 1, s, s), &Device::Cpu)?
                    .to_device(&opts.device)?;
                let m = predict_maps(&model, &img, &opts.post)?.remove(0);
                let coarse = binarize(&m.coarse, opts.threshold);
                let refined = m.refined.as_ref().map(|r| binarize(r, opts.threshold));
                let gt = binarize(&sample.mask, 0.5);
                let grey: Vec<u8> = sample
                    .image
                    .iter()
                    .map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
                    .collect();
                let imp = case.dice_improvement();
                let path = vis_dir.join(format!("sample_{:04}_imp{imp:+.4}.png", case.index));
                let mut notes = Vec::new();
                if opts.eval_size == EvalSize::Original {
                    notes.push(format!(
                        "metrics at {}x{} (shown at {s}x{s})",
                        sample.original_size.1, sample.original_size.0
                    ));
                }
                if case.rejected {
                    notes.push("refinement rejected (coarse kept)".into());
                }
                if case.fused {
                    notes.push("boundary fusion applied".into());
                }
                overlay_png(
                    &path,
                    &OverlayCase {
                        title: format!("{ds_name} {}", case.name),
                        grey: &grey,
                        gt: &gt,
                        coarse: &coarse,
                        refined: refined.as_deref(),
                        size: s,
                        coarse_m: (case.coarse.dice, case.coarse.iou, case.coarse.hd95),
                        refined_m: case.refined.as_ref().map(|r| (r.dice, r.iou, r.hd95)),
                        notes,
                    },
                )?;
                visualizations.push(path);
            }
        }
        let n_rejected = cases.iter().filter(|c| c.rejected).count();
        let n_fused = cases.iter().filter(|c| c.fused).count();
        results.push(DatasetResult {
            name: ds_name.clone(),
            cases,
            n_rejected,
            n_fused,
            visualizations,
        });
    }
    if missing_spacing > 0 {
        eprintln!(
            "warning: {missing_spacing} image(s) have no row in --spacing-csv; the mm columns cover only datasets \
             where every image has a spacing"
        );
    }

    // Aggregation (§10.4).
    let coarse_groups: Vec<(String, Vec<ImageMetrics>)> = results
        .iter()
        .map(|d| {
            (
                d.name.clone(),
                d.cases.iter().map(|c| c.coarse.clone()).collect(),
            )
        })
        .collect();
    let coarse = aggregate(&coarse_groups);
    let refined = if model.refines() {
        let g: Vec<(String, Vec<ImageMetrics>)> = results
            .iter()
            .map(|d| {
                (
                    d.name.clone(),
                    d.cases.iter().filter_map(|c| c.refined.clone()).collect(),
                )
            })
            .collect();
        Some(aggregate(&g))
    } else {
        None
    };
    let report = EvaluateReport {
        output_dir: out_dir.clone(),
        label: label.clone(),
        datasets: results,
        coarse,
        refined,
    };

    // Per-dataset files.
    for (i, d) in report.datasets.iter().enumerate() {
        let ds_dir = out_dir.join(&d.name);
        let c = &report.coarse.datasets[i];
        let r = report.refined.as_ref().map(|x| &x.datasets[i]);
        let result = json!({
            "dataset": d.name,
            "split": opts.split.as_str(),
            "fold": opts.effective_fold(),
            "n_samples": d.cases.len(),
            "args": opts.args_json(),
            "model": {
                "source": opts.source.describe(),
                "img_size": s,
                "refiner": model.refiner.as_ref().map(|x| serde_json::to_value(x).unwrap_or_default()),
                "members": model.members.len(),
            },
            "coarse": stats_json(c),
            "refined": r.map(stats_json),
            "n_pred_empty": {"coarse": c.n_pred_empty, "refined": r.map(|x| x.n_pred_empty)},
            "n_gt_empty": c.n_gt_empty,
            "hd95_excl": {"coarse": finite(mean_of(c, "hd95_excl")), "refined": r.map(|x| finite(mean_of(x, "hd95_excl")))},
            "stabilization": {"rejected": d.n_rejected, "fused": d.n_fused},
        });
        atomic_write_json(&ds_dir.join(format!("{label}_result.json")), &result)?;
        write_per_case(
            &ds_dir.join("per_case.csv"),
            &d.cases,
            report.refined.is_some(),
            opts.spacing_csv.is_some(),
        )?;
    }
    // Summary files.
    let mut ds_rows = Vec::new();
    for (i, c) in report.coarse.datasets.iter().enumerate() {
        let mut row = row_json(c, report.refined.as_ref().map(|x| &x.datasets[i]));
        let d = &report.datasets[i];
        row["stabilization"] = json!({"rejected": d.n_rejected, "fused": d.n_fused});
        ds_rows.push(row);
    }
    let summary = json!({
        "split": opts.split.as_str(),
        "fold": opts.effective_fold(),
        "label": label,
        "args": opts.args_json(),
        "datasets": ds_rows,
        "average": row_json(&report.coarse.average, report.refined.as_ref().map(|x| &x.average)),
        "all": row_json(&report.coarse.all, report.refined.as_ref().map(|x| &x.all)),
        "mean_coarse_dice": finite(report.mean_coarse_dice()),
        "mean_refined_dice": report.mean_refined_dice().map(finite),
    });
    atomic_write_json(&out_dir.join("summary.json"), &summary)?;
    write_summary_csv(&out_dir.join("summary.csv"), &report)?;
    let cd: Vec<f64> = report
        .datasets
        .iter()
        .flat_map(|d| d.cases.iter().map(|c| c.coarse.dice))
        .collect();
    let rd: Option<Vec<f64>> = report.refined.as_ref().map(|_| {
        report
            .datasets
            .iter()
            .flat_map(|d| {
                d.cases
                    .iter()
                    .filter_map(|c| c.refined.as_ref().map(|m| m.dice))
            })
            .collect()
    });
    summary_png(
        &out_dir.join("summary.png"),
        &format!(
            "{} evaluation: {} ({} images)",
            label,
            opts.datasets.join(", "),
            cd.len()
        ),
        &cd,
        rd.as_deref(),
    )?;
    Ok(report)
}
