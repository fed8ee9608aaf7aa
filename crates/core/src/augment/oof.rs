//! Option B of the Phase 2 training data (SPEC §8.10): real out-of-fold TransUNet predictions (`augment oof`).
//!
//! For every dataset and fold `k`, the Phase 1 checkpoint of fold `k` predicts (eval mode, no augmentation) the
//! fold-`k` **validation** images at `S`; `P = softmax(logits)[:, 1]` is stored in the §8.9 layout under
//! `<output-root>/<RUN>_oof/` with `bin = real`, `modes = oof:fold_k` and the actual Dice of `P > 0.5` against `GT_S`.
//! Every training image of a dataset thus gets exactly one prediction from a model that never trained on it. The run
//! is read by Phase 2 like any `augment synthetic` run (`--dataset <RUN>_oof`, or mixed in with `--real-data DIR`).
//!
//! ```ignore
//! let mut o = OofOptions::new(vec!["BUSI".into()]);
//! o.checkpoints = "./checkpoints/transunet/{DS}/fold_{k}/best.safetensors".into();
//! let report = ultrarefiner::augment::oof::run_oof(&o)?;
//! println!("{}", report.table);
//! ```
//!
//! Model loading and prediction are those of evaluation ([`EvalModel`], transunet-only); the per-image Dice is the
//! Phase 1 validation one ([`per_image_dice`]); shards, `samples.csv` and descriptors are written with the helpers of
//! [`super::run`]. The run is assembled in `<output-root>/.<RUN>_oof.partial/` and renamed to `<RUN>_oof` when complete
//! (an earlier run of the same name is replaced only then).
use super::processed::{read_mask, read_splits, sha256_file};
use super::run::{
    coarse_shard_bytes, gt_descriptors, records_csv, run_name, shard_path, write_atomic,
    SampleRecord, GENERATOR_VERSION,
};
use super::sampler::QualityBin;
use super::sim::{BinClass, GtMask};
use super::soft::StoreDtype;
use super::summary::{format_table, summarize, Summary};
use crate::config::Config;
use crate::data::dataset::{SegDataset, Split};
use crate::data::loader::{Loader, LoaderOptions};
use crate::device::DeviceSpec;
use crate::eval::model::{read_sidecar_json, sidecar_settings, EvalModel, ModelSource};
use crate::train::phase1::per_image_dice;
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Default checkpoint pattern (§8.10): `{DS}` is replaced by the dataset name, `{k}` by the fold.
pub const DEFAULT_CHECKPOINTS: &str = "./checkpoints/transunet/{DS}/fold_{k}/best.safetensors";
/// Suffix of the run directory name.
pub const OOF_SUFFIX: &str = "_oof";
/// Bin name of every out-of-fold sample.
pub const REAL_BIN: &str = "real";

/// Options of `ultrarefiner augment oof`.
#[derive(Clone, Debug)]
pub struct OofOptions {
    pub processed_root: PathBuf,
    pub output_root: PathBuf,
    pub datasets: Vec<String>,
    /// Checkpoint path pattern with `{k}` (fold) and optionally `{DS}` (dataset).
    pub checkpoints: String,
    /// Folds to predict; `None` = every fold listed in each dataset's `splits.json`.
    pub folds: Option<Vec<usize>>,
    /// Preset or TOML for the model geometry when a checkpoint has no sidecar with `config.model`.
    pub config: String,
    pub batch_size: usize,
    pub shard_size: usize,
    pub store_dtype: StoreDtype,
    /// `None`: CUDA when built with it and a GPU exists, else CPU.
    pub device: Option<DeviceSpec>,
    /// Image decoding threads.
    pub num_workers: usize,
}

impl OofOptions {
    /// The defaults of §8.10/§8.11 for `datasets`.
    pub fn new(datasets: Vec<String>) -> Self {
        OofOptions {
            processed_root: PathBuf::from("./dataset/processed"),
            output_root: PathBuf::from("./dataset/augmented"),
            datasets,
            checkpoints: DEFAULT_CHECKPOINTS.to_string(),
            folds: None,
            config: "paper".into(),
            batch_size: 8,
            shard_size: 1024,
            store_dtype: StoreDtype::F32,
            device: None,
            num_workers: 4,
        }
    }
}

/// Per dataset and fold: the checkpoint used, the number of validation images predicted and their mean Dice.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct FoldReport {
    pub dataset: String,
    pub fold: usize,
    pub checkpoint: PathBuf,
    pub n: usize,
    pub mean_dice: f64,
}

/// Outcome of a run.
#[derive(Clone, Debug)]
pub struct OofReport {
    pub run_dir: PathBuf,
    pub run_name: String,
    pub folds: Vec<FoldReport>,
    pub summary: Summary,
    /// Printed table (per fold, then the Dice summary).
    pub table: String,
    pub seconds: f64,
}

/// The checkpoint of `dataset`, fold `k`, from a pattern with `{k}` (and optionally `{DS}`).
pub fn checkpoint_path(pattern: &str, dataset: &str, k: usize) -> Result<PathBuf> {
    if !pattern.contains("{k}") {
        return Err(Error::Arg(format!(
            "--checkpoints `{pattern}` has no `{{k}}` placeholder for the fold"
        )));
    }
    Ok(PathBuf::from(
        pattern
            .replace("{DS}", dataset)
            .replace("{k}", &k.to_string()),
    ))
}

/// The one quality bin of an out-of-fold run (`real`, the whole Dice range).
fn real_bin() -> QualityBin {
    QualityBin {
        name: REAL_BIN.into(),
        lo: 0.0,
        hi: 1.0,
        share: 1.0,
        class: BinClass::Critical,
    }
}

/// Refuses a checkpoint whose sidecar says it was trained on another fold or on other splits: its "validation"
/// images could then be training images of the model.
fn check_sidecar_data(
    v: &serde_json::Value,
    ckpt: &Path,
    dataset: &str,
    k: usize,
    splits_sha: &str,
) -> Result<()> {
    let data = &v["data"];
    if let Some(f) = data["fold"].as_u64() {
        if f as usize != k {
            return Err(Error::file(
                ckpt,
                format!("was trained for fold {f}, not fold {k} of {dataset}"),
            ));
        }
    }
    let datasets: Vec<&str> = data["datasets"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    if datasets.len() == 1 {
        if datasets[0] != dataset {
            return Err(Error::file(
                ckpt,
                format!("was trained on {}, not {dataset}", datasets[0]),
            ));
        }
        if let Some(s) = data["splits_sha256"].as_str() {
            if s != splits_sha {
                return Err(Error::file(
                    ckpt,
                    format!("was trained with other splits than {dataset}/splits.json (SHA-256 differs): its fold-{k} validation images may be training images"),
                ));
            }
        }
    } else if !datasets.is_empty() && !datasets.contains(&dataset) {
        return Err(Error::file(
            ckpt,
            format!("was trained on {datasets:?}, which does not include {dataset}"),
        ));
    }
    Ok(())
}

/// Loads the fold's TransUNet (geometry from its sidecar's `config.model`, else from `config`).
fn load_fold_model(
    ckpt: &Path,
    config: &Config,
    dataset: &str,
    k: usize,
    splits_sha: &str,
    device: &candle_core::Device,
) -> Result<EvalModel> {
    let mut cfg = config.clone();
    match read_sidecar_json(ckpt)? {
        Some(v) => {
            check_sidecar_data(&v, ckpt, dataset, k, splits_sha)?;
            if let (_, Some(m)) = sidecar_settings(&v, ckpt)? {
                cfg.model = m;
            }
        }
        None => tracing::warn!(
            "{}: no JSON sidecar; model geometry from --config {} and the fold is not verified",
            ckpt.display(),
            config.preset
        ),
    }
    EvalModel::load(
        &ModelSource::TransUnetOnly {
            transunet: ckpt.to_path_buf(),
        },
        &cfg,
        device,
    )
}

/// Buffers records and planes and writes full shards as they fill.
struct ShardWriter<'a> {
    run_dir: &'a Path,
    shard_size: usize,
    s: usize,
    dtype: StoreDtype,
    config_hash: String,
    next_shard: usize,
    records: Vec<SampleRecord>,
    planes: Vec<Vec<f32>>,
    all: Vec<SampleRecord>,
}

impl ShardWriter<'_> {
    fn push(&mut self, r: SampleRecord, plane: Vec<f32>) -> Result<()> {
        self.records.push(r);
        self.planes.push(plane);
        if self.records.len() == self.shard_size {
            self.flush()?;
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<()> {
        if self.records.is_empty() {
            return Ok(());
        }
        let index: Vec<u32> = self.records.iter().map(|r| r.index as u32).collect();
        let planes: Vec<&[f32]> = self.planes.iter().map(Vec::as_slice).collect();
        let bytes = coarse_shard_bytes(
            &index,
            &planes,
            &self.records,
            self.s,
            self.dtype,
            &self.config_hash,
        )?;
        write_atomic(&shard_path(self.run_dir, self.next_shard), &bytes)?;
        self.next_shard += 1;
        self.all.append(&mut self.records);
        self.planes.clear();
        Ok(())
    }
}

/// Runs `augment oof` end to end.
pub fn run_oof(o: &OofOptions) -> Result<OofReport> {
    let t0 = std::time::Instant::now();
    if o.datasets.is_empty() {
        return Err(Error::Arg(
            "--datasets: at least one dataset is required".into(),
        ));
    }
    if o.batch_size == 0 || o.shard_size == 0 {
        return Err(Error::Arg(
            "--batch-size and --shard-size must be > 0".into(),
        ));
    }
    let mut datasets = o.datasets.clone();
    datasets.sort();
    datasets.dedup();
    let config = Config::load(&o.config)?;
    let device_spec = o.device.unwrap_or_else(DeviceSpec::default_for_build);
    let device = device_spec.open()?;
    let name = format!("{}{OOF_SUFFIX}", run_name(&datasets));
    let run_dir = o.output_root.join(&name);
    // Everything is written into a hidden sibling directory that replaces `run_dir` only when complete, so a failed
    // or interrupted run never leaves a mixed or partial `<RUN>_oof` behind.
    let work_dir = o.output_root.join(format!(".{name}.partial"));

    // Which folds, and their checkpoints (all resolved before any prediction, so a missing one fails fast).
    let mut plan: Vec<(String, usize, PathBuf, String)> = Vec::new();
    for d in &datasets {
        let splits = read_splits(&o.processed_root, d)?;
        let splits_sha =
            crate::train::checkpoint::sha256_file(&o.processed_root.join(d).join("splits.json"))?;
        let folds: Vec<usize> = match &o.folds {
            Some(f) => f.clone(),
            None => (0..splits.folds.len()).collect(),
        };
        if folds.is_empty() {
            return Err(Error::file(
                o.processed_root.join(d).join("splits.json"),
                "lists no folds",
            ));
        }
        for k in folds {
            if k >= splits.folds.len() {
                return Err(Error::Arg(format!(
                    "--folds: fold {k} does not exist for {d} ({} folds in splits.json)",
                    splits.folds.len()
                )));
            }
            let ck = checkpoint_path(&o.checkpoints, d, k)?;
            if !ck.is_file() {
                return Err(Error::file(
                    &ck,
                    format!("Phase 1 checkpoint of {d} fold {k} not found (train it with `phase1 --dataset {d} --fold {k}` or point --checkpoints elsewhere)"),
                ));
            }
            plan.push((d.clone(), k, ck, splits_sha.clone()));
        }
    }

    if work_dir.exists() {
        std::fs::remove_dir_all(&work_dir).map_err(|e| Error::io(&work_dir, e))?;
    }
    let shard_dir = work_dir.join("shards");
    std::fs::create_dir_all(&shard_dir).map_err(|e| Error::io(&shard_dir, e))?;

    let config_json = serde_json::json!({
        "checkpoints": plan.iter().map(|(d, k, p, _)| serde_json::json!({
            "dataset": d, "fold": k, "path": p.display().to_string(),
            "sha256": crate::train::checkpoint::sha256_file(p).ok()})).collect::<Vec<_>>(),
        "store_dtype": o.store_dtype,
        "shard_size": o.shard_size,
    });
    let config_hash = blake3::hash(config_json.to_string().as_bytes())
        .to_hex()
        .to_string();

    let mut store_size: Option<usize> = None;
    let mut sources = Vec::new();
    let mut fold_reports = Vec::new();
    let mut writer: Option<ShardWriter> = None;
    let mut index = 0usize;
    for (d, k, ck, splits_sha) in &plan {
        let model = load_fold_model(ck, &config, d, *k, splits_sha, &device)?;
        let s = model.img_size;
        match store_size {
            None => store_size = Some(s),
            Some(s0) if s0 != s => {
                return Err(Error::file(
                    ck,
                    format!(
                    "predicts at S = {s}, an earlier checkpoint at S = {s0}: one run needs one S"
                ),
                ))
            }
            _ => {}
        }
        let w = writer.get_or_insert_with(|| ShardWriter {
            run_dir: &work_dir,
            shard_size: o.shard_size,
            s,
            dtype: o.store_dtype,
            config_hash: config_hash.clone(),
            next_shard: 0,
            records: Vec::new(),
            planes: Vec::new(),
            all: Vec::new(),
        });
        let splits = read_splits(&o.processed_root, d)?;
        let ds = SegDataset::open(&o.processed_root, &[d.as_str()], Split::FoldVal(*k), s)?;
        let entries = ds.entries().to_vec();
        let loader = Loader::new(
            Arc::new(ds),
            LoaderOptions::eval(o.batch_size).with_workers(o.num_workers.max(1)),
        )?;
        let (mut n, mut dice_sum) = (0usize, 0.0f64);
        for batch in loader.epoch(0) {
            let batch = batch?;
            let prob = model
                .predict(&batch.images.to_device(&device)?, true)?
                .coarse
                .to_device(&candle_core::Device::Cpu)?
                .to_dtype(candle_core::DType::F32)?;
            let dices = per_image_dice(&prob, &batch.masks)?;
            let planes: Vec<Vec<f32>> = prob.flatten_from(1)?.to_vec2()?;
            for ((&i, plane), dice) in batch.indices.iter().zip(planes).zip(dices) {
                let e = &entries[i];
                let mask_path = e
                    .mask
                    .clone()
                    .ok_or_else(|| Error::file(&e.image, "validation image without a mask"))?;
                let (h, w_, m) = read_mask(&mask_path)?;
                // An empty GT (never kept by `prepare`) gets the descriptors of an empty mask.
                let desc = match GtMask::from_full(&m, h, w_) {
                    Some(g) => gt_descriptors(&g),
                    None => super::descriptors::describe(&[], 0, 0),
                };
                let sha = match splits.source_sha256.get(&e.name) {
                    Some(x) => x.clone(),
                    None => sha256_file(&e.image)?,
                };
                sources.push(serde_json::json!({
                    "dataset": d, "name": e.name, "height": h, "width": w_, "sha256": sha, "fold": k}));
                let rec = SampleRecord {
                    index,
                    sample_id: format!("{d}_{}_{REAL_BIN}_{index:06}", e.name),
                    dataset: d.clone(),
                    source_name: e.name.clone(),
                    bin: REAL_BIN.into(),
                    target_lo: 0.0,
                    target_hi: 1.0,
                    dice,
                    in_bin: true,
                    modes: format!("oof:fold_{k}"),
                    gain: 0.0,
                    attempts: 1,
                    soft: "softmax".into(),
                    temperature: 1.0,
                    seed: format!("{:016x}", 0),
                    shard: index / o.shard_size,
                    row: index % o.shard_size,
                    area_frac: desc.area_frac,
                    circularity: desc.circularity,
                    solidity: desc.solidity,
                    tiny: desc.tiny,
                    small: desc.small,
                    irregular: desc.irregular,
                };
                w.push(rec, plane)?;
                index += 1;
                n += 1;
                dice_sum += dice;
            }
        }
        fold_reports.push(FoldReport {
            dataset: d.clone(),
            fold: *k,
            checkpoint: ck.clone(),
            n,
            mean_dice: if n > 0 { dice_sum / n as f64 } else { f64::NAN },
        });
    }
    let mut w = writer.ok_or_else(|| Error::msg("no fold to predict"))?;
    w.flush()?;
    let n_shards = w.next_shard;
    let all = std::mem::take(&mut w.all);
    let s = store_size.unwrap_or(0);
    write_atomic(&work_dir.join("samples.csv"), records_csv(&all)?.as_bytes())?;
    let bins = [real_bin()];
    let summary = summarize(&all, &bins);
    let mut table =
        String::from("dataset      fold  images  mean Dice (P > 0.5 vs GT_S)  checkpoint\n");
    for f in &fold_reports {
        table.push_str(&format!(
            "{:<12} {:>4}  {:>6}  {:>10.4}                   {}\n",
            f.dataset,
            f.fold,
            f.n,
            f.mean_dice,
            f.checkpoint.display()
        ));
    }
    table.push_str(&format_table(&summary, &bins));
    let seconds = t0.elapsed().as_secs_f64();
    let manifest = serde_json::json!({
        "format_version": 1,
        "generator_version": GENERATOR_VERSION.replace("-sdf-", "-oof-"),
        "kind": "oof",
        "seed": serde_json::Value::Null,
        "datasets": datasets,
        "sources": sources,
        "config": {
            "checkpoints": config_json["checkpoints"],
            "bins": bins,
            "soft": "softmax",
            "format": "safetensors",
            "config_hash": config_hash,
        },
        "store_size": s,
        "store_dtype": o.store_dtype,
        "shard_size": o.shard_size,
        "n_shards": n_shards,
        "excluded_fold": serde_json::Value::Null,
        "counts_by_bin": summary.counts_by_bin,
        "dice_by_bin": summary.dice_by_bin,
        "mode_counts": summary.mode_counts,
        "folds": fold_reports,
        "skipped_too_small": [],
        "timing": {"seconds": seconds, "samples_per_s": all.len() as f64 / seconds.max(1e-9),
                   "device": device_spec.to_string()},
    });
    let mj = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::msg(e.to_string()))?;
    write_atomic(&work_dir.join("manifest.json"), &mj)?;
    if run_dir.exists() {
        std::fs::remove_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
    }
    std::fs::rename(&work_dir, &run_dir).map_err(|e| Error::io(&run_dir, e))?;
    Ok(OofReport {
        run_dir,
        run_name: name,
        folds: fold_reports,
        summary,
        table,
        seconds,
    })
}
