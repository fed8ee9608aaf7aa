//! `prepare datasets` (SPEC §3.2–§3.5, §3.11): raw layouts → `processed/<DS>/{train,test}/{images,masks}`,
//! `splits.json`, `split_info.json` and `processed/summary.json`, then verification (§3.10).
//!
//! Each dataset is built in a staging folder beside its final place and swapped in with renames, so an interrupted
//! or failed run never leaves a half-written dataset; single files are written atomically (temp + rename).
use super::pixels::{decode_png, to_binary_mask, to_gray, Gray};
use super::raw::{list_raw, RawListing, RawSample};
use super::splits::{sort_names, Excluded, SplitsFile};
use super::verify::{verify_with, VerifyOptions, VerifyReport};
use super::{write_atomic, DatasetKind};
use crate::{Error, Result};
use rayon::prelude::*;
use serde_json::json;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Options of `prepare datasets`.
#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub raw_root: PathBuf,
    pub output_root: PathBuf,
    /// Datasets to process; empty = every registered dataset whose raw folder exists.
    pub datasets: Vec<DatasetKind>,
    pub test_ratio: f64,
    pub n_splits: usize,
    pub seed: u64,
    /// Re-process even when `splits.json` matches the raw content.
    pub overwrite: bool,
    /// Turn per-file problems (corrupt PNG, missing mask, size mismatch) into warnings; the sample is skipped.
    pub skip_bad: bool,
    /// Run `verify` on the processed datasets afterwards (default true).
    pub verify: bool,
    /// Size of the rayon pool (None = rayon's global pool).
    pub num_workers: Option<usize>,
}

impl Default for PrepareOptions {
    fn default() -> Self {
        Self {
            raw_root: PathBuf::from("./dataset/raw"),
            output_root: PathBuf::from("./dataset/processed"),
            datasets: Vec::new(),
            test_ratio: 0.2,
            n_splits: 5,
            seed: 42,
            overwrite: false,
            skip_bad: false,
            verify: true,
            num_workers: None,
        }
    }
}

/// Whether a dataset was (re)built or found up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatasetStatus {
    Processed,
    UpToDate,
}

/// Per-dataset counts of one `prepare` run.
#[derive(Debug, Clone)]
pub struct DatasetReport {
    pub dataset: DatasetKind,
    pub status: DatasetStatus,
    /// Images found in the raw layout (including `normal/`).
    pub found: usize,
    pub kept: usize,
    pub excluded_blank: usize,
    pub excluded_normal: usize,
    /// Samples whose mask was merged from several files.
    pub merged: usize,
    pub missing_mask: usize,
    pub size_mismatch: usize,
    /// Files skipped under `--skip-bad` for other problems (corrupt / undecodable).
    pub bad: usize,
    pub train: usize,
    pub test: usize,
    /// Validation size of every fold.
    pub fold_val_sizes: Vec<usize>,
    /// Warnings, including every problem turned into a warning by `--skip-bad`.
    pub warnings: Vec<String>,
    pub seconds: f64,
}

/// The result of `prepare_datasets`; `Display` prints the per-dataset table.
#[derive(Debug, Clone)]
pub struct PrepareReport {
    pub output_root: PathBuf,
    pub datasets: Vec<DatasetReport>,
    pub verify: Option<VerifyReport>,
}

impl PrepareReport {
    /// False when the post-prepare verification found errors.
    pub fn verify_ok(&self) -> bool {
        self.verify.as_ref().map(|v| v.is_ok()).unwrap_or(true)
    }
    pub fn dataset(&self, kind: DatasetKind) -> Option<&DatasetReport> {
        self.datasets.iter().find(|d| d.dataset == kind)
    }
}

impl fmt::Display for PrepareReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<10} {:>6} {:>6} {:>6} {:>7} {:>7} {:>5} {:>6} {:>5}  {:<28} status",
            "dataset",
            "found",
            "kept",
            "blank",
            "normal",
            "merged",
            "bad",
            "train",
            "test",
            "fold val sizes"
        )?;
        for d in &self.datasets {
            let folds = if d.fold_val_sizes.is_empty() {
                "-".to_string()
            } else {
                d.fold_val_sizes
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join("/")
            };
            let status = match d.status {
                DatasetStatus::Processed => format!("processed ({:.1} s)", d.seconds),
                DatasetStatus::UpToDate => "up to date".to_string(),
            };
            writeln!(
                f,
                "{:<10} {:>6} {:>6} {:>6} {:>7} {:>7} {:>5} {:>6} {:>5}  {:<28} {}",
                d.dataset.name(),
                d.found,
                d.kept,
                d.excluded_blank,
                d.excluded_normal,
                d.merged,
                d.missing_mask + d.size_mismatch + d.bad,
                d.train,
                d.test,
                folds,
                status
            )?;
        }
        for d in &self.datasets {
            for w in &d.warnings {
                writeln!(f, "warning [{}]: {w}", d.dataset)?;
            }
        }
        if let Some(v) = &self.verify {
            write!(f, "{v}")?;
        }
        Ok(())
    }
}

/// Converts, splits and writes every requested dataset, then verifies them (SPEC §3.11).
pub fn prepare_datasets(opts: &PrepareOptions) -> Result<PrepareReport> {
    if !(0.0..1.0).contains(&opts.test_ratio) {
        return Err(Error::Arg(format!(
            "--test-ratio must be in [0, 1), got {}",
            opts.test_ratio
        )));
    }
    if opts.n_splits < 2 {
        return Err(Error::Arg(format!(
            "--n-splits must be at least 2, got {}",
            opts.n_splits
        )));
    }
    let kinds: Vec<DatasetKind> = if opts.datasets.is_empty() {
        let present: Vec<DatasetKind> = DatasetKind::ALL
            .iter()
            .copied()
            .filter(|k| opts.raw_root.join(k.name()).is_dir())
            .collect();
        if present.is_empty() {
            let names: Vec<&str> = DatasetKind::ALL.iter().map(|k| k.name()).collect();
            return Err(Error::file(
                &opts.raw_root,
                format!(
                    "no dataset folder found under the raw root (expected one of {})",
                    names.join(", ")
                ),
            ));
        }
        present
    } else {
        for k in &opts.datasets {
            let d = opts.raw_root.join(k.name());
            if !d.is_dir() {
                return Err(Error::file(
                    &d,
                    format!("raw folder of dataset {k} does not exist"),
                ));
            }
        }
        opts.datasets.clone()
    };
    std::fs::create_dir_all(&opts.output_root).map_err(|e| Error::io(&opts.output_root, e))?;

    let run = || -> Result<Vec<(DatasetReport, Option<serde_json::Value>)>> {
        kinds.iter().map(|&k| prepare_one(k, opts)).collect()
    };
    let results = match opts.num_workers {
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build()
            .map_err(|e| Error::msg(format!("cannot build thread pool: {e}")))?
            .install(run)?,
        None => run()?,
    };

    // summary.json: update the entries of the processed datasets, keep the others.
    let summary_path = opts.output_root.join("summary.json");
    let mut summary: serde_json::Map<String, serde_json::Value> =
        std::fs::read_to_string(&summary_path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("datasets").and_then(|d| d.as_object()).cloned())
            .unwrap_or_default();
    let mut reports = Vec::new();
    for (r, stats) in results {
        if let Some(s) = stats {
            summary.insert(r.dataset.name().to_string(), s);
        }
        reports.push(r);
    }
    let summary_doc = json!({
        "tool": "ultrarefiner",
        "tool_version": env!("CARGO_PKG_VERSION"),
        "seed": opts.seed,
        "test_ratio": opts.test_ratio,
        "n_splits": opts.n_splits,
        "datasets": summary,
    });
    write_atomic(
        &summary_path,
        serde_json::to_string_pretty(&summary_doc)
            .unwrap_or_default()
            .as_bytes(),
    )?;

    let verify = if opts.verify {
        Some(verify_with(&VerifyOptions {
            output_root: opts.output_root.clone(),
            datasets: kinds.clone(),
            strict: false,
            num_workers: opts.num_workers,
        })?)
    } else {
        None
    };
    Ok(PrepareReport {
        output_root: opts.output_root.clone(),
        datasets: reports,
        verify,
    })
}

/// What happened to one raw sample.
enum Outcome {
    Kept {
        name: String,
        height: usize,
        width: usize,
        area_frac: f64,
        sha: String,
        n_masks: usize,
    },
    Blank {
        name: String,
    },
    SizeMismatch {
        name: String,
        path: PathBuf,
        msg: String,
    },
    Bad {
        name: String,
        path: PathBuf,
        msg: String,
    },
}

/// Reads and converts one sample (merging its masks) without writing anything.
pub fn convert_sample(s: &RawSample) -> Result<(Gray, Gray)> {
    let img = to_gray(&decode_png(&s.image)?)?;
    let mut merged = Gray::zeros(img.width, img.height);
    for mp in &s.masks {
        let m = to_binary_mask(&decode_png(mp)?);
        if (m.width, m.height) != (img.width, img.height) {
            return Err(Error::file(
                mp,
                format!(
                    "mask size {}x{} differs from its image {} ({}x{}, WxH)",
                    m.width,
                    m.height,
                    s.image.display(),
                    img.width,
                    img.height
                ),
            ));
        }
        for (o, v) in merged.data.iter_mut().zip(&m.data) {
            *o |= *v;
        }
    }
    for v in merged.data.iter_mut() {
        *v = if *v != 0 { 255 } else { 0 };
    }
    Ok((img, merged))
}

fn process_sample(s: &RawSample, staging: &Path) -> Outcome {
    match convert_sample(s) {
        Ok((img, mask)) => {
            let fg = mask.data.iter().filter(|&&v| v != 0).count();
            if fg == 0 {
                return Outcome::Blank {
                    name: s.name.clone(),
                };
            }
            let write = || -> Result<String> {
                let bytes = super::pixels::encode_gray_png(&img)?;
                let sha = super::sha256_hex(&bytes);
                write_atomic(
                    &staging
                        .join("all")
                        .join("images")
                        .join(format!("{}.png", s.name)),
                    &bytes,
                )?;
                super::pixels::write_gray_png(
                    &staging
                        .join("all")
                        .join("masks")
                        .join(format!("{}.png", s.name)),
                    &mask,
                )?;
                Ok(sha)
            };
            match write() {
                Ok(sha) => Outcome::Kept {
                    name: s.name.clone(),
                    height: img.height,
                    width: img.width,
                    area_frac: fg as f64 / (img.width * img.height) as f64,
                    sha,
                    n_masks: s.masks.len(),
                },
                Err(e) => Outcome::Bad {
                    name: s.name.clone(),
                    path: s.image.clone(),
                    msg: format!("write failed: {e}"),
                },
            }
        }
        Err(Error::File { path, msg }) if msg.contains("differs from its image") => {
            Outcome::SizeMismatch {
                name: s.name.clone(),
                path,
                msg,
            }
        }
        Err(Error::File { path, msg }) => Outcome::Bad {
            name: s.name.clone(),
            path,
            msg,
        },
        Err(Error::Io { path, source }) => Outcome::Bad {
            name: s.name.clone(),
            path,
            msg: source.to_string(),
        },
        Err(e) => Outcome::Bad {
            name: s.name.clone(),
            path: s.image.clone(),
            msg: e.to_string(),
        },
    }
}

/// Digest of the raw content and the options that determine the processed output.
fn raw_digest(kind: DatasetKind, l: &RawListing, opts: &PrepareOptions) -> Result<String> {
    let per_file: Vec<Result<String>> = l
        .samples
        .par_iter()
        .map(|s| {
            let mut h = blake3::Hasher::new();
            h.update(s.name.as_bytes());
            for p in std::iter::once(&s.image).chain(&s.masks) {
                let bytes = std::fs::read(p).map_err(|e| Error::io(p, e))?;
                h.update(
                    p.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default()
                        .as_bytes(),
                );
                h.update(blake3::hash(&bytes).as_bytes());
            }
            Ok(h.finalize().to_hex().to_string())
        })
        .collect();
    let mut h = blake3::Hasher::new();
    h.update(
        format!(
            "{}|{}|{}|{}|{}|{}|",
            kind.name(),
            env!("CARGO_PKG_VERSION"),
            opts.seed,
            opts.test_ratio,
            opts.n_splits,
            opts.skip_bad
        )
        .as_bytes(),
    );
    for r in per_file {
        match r {
            Ok(s) => h.update(s.as_bytes()),
            // An unreadable file: digest it as such; processing reports the problem.
            Err(e) => h.update(e.to_string().as_bytes()),
        };
    }
    for n in &l.excluded_normal {
        h.update(n.as_bytes());
    }
    for (n, _) in &l.missing_mask {
        h.update(n.as_bytes());
    }
    Ok(h.finalize().to_hex().to_string())
}

fn quantiles(v: &mut [f64]) -> serde_json::Value {
    if v.is_empty() {
        return serde_json::Value::Null;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| {
        let pos = p * (v.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
    };
    json!({"min": v[0], "q25": q(0.25), "median": q(0.5), "q75": q(0.75), "max": v[v.len() - 1]})
}

fn prepare_one(
    kind: DatasetKind,
    opts: &PrepareOptions,
) -> Result<(DatasetReport, Option<serde_json::Value>)> {
    let t0 = Instant::now();
    let raw_dir = opts.raw_root.join(kind.name());
    let listing = list_raw(kind, &raw_dir)?;
    let final_dir = opts.output_root.join(kind.name());
    let digest = raw_digest(kind, &listing, opts)?;

    // Up to date?
    if !opts.overwrite {
        if let Ok(existing) = SplitsFile::read(&final_dir.join("splits.json")) {
            if existing.raw_digest.as_deref() == Some(digest.as_str()) {
                let r = DatasetReport {
                    dataset: kind,
                    status: DatasetStatus::UpToDate,
                    found: listing.found,
                    kept: existing.train.len() + existing.test.len(),
                    excluded_blank: existing.excluded.blank.len(),
                    excluded_normal: existing.excluded.normal.len(),
                    merged: listing.samples.iter().filter(|s| s.masks.len() > 1).count(),
                    missing_mask: existing.excluded.missing_mask.len(),
                    size_mismatch: existing.excluded.size_mismatch.len(),
                    bad: existing.excluded.bad.len(),
                    train: existing.train.len(),
                    test: existing.test.len(),
                    fold_val_sizes: existing.folds.iter().map(|f| f.val.len()).collect(),
                    warnings: listing.warnings.clone(),
                    seconds: t0.elapsed().as_secs_f64(),
                };
                return Ok((r, None));
            }
        }
    }

    // Missing masks are file problems: errors unless --skip-bad.
    let mut problems: Vec<(PathBuf, String)> = listing
        .missing_mask
        .iter()
        .map(|(_, p)| (p.clone(), "image has no mask file".to_string()))
        .collect();
    if !problems.is_empty() && !opts.skip_bad {
        return Err(problems_error(kind, &problems));
    }

    let staging = opts
        .output_root
        .join(format!(".{}.staging-{}", kind.name(), std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    }
    let result = build_staging(kind, opts, &listing, &staging, &digest, &mut problems);
    let (report_parts, stats) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    // Swap the staging folder into place.
    let old = opts
        .output_root
        .join(format!(".{}.old-{}", kind.name(), std::process::id()));
    if final_dir.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
        }
        std::fs::rename(&final_dir, &old).map_err(|e| Error::io(&final_dir, e))?;
    }
    std::fs::rename(&staging, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
    }
    let mut r = report_parts;
    r.seconds = t0.elapsed().as_secs_f64();
    Ok((r, Some(stats)))
}

fn problems_error(kind: DatasetKind, problems: &[(PathBuf, String)]) -> Error {
    if problems.len() == 1 {
        return Error::file(
            &problems[0].0,
            format!(
                "{} ({kind}; use --skip-bad to skip such samples)",
                problems[0].1
            ),
        );
    }
    let mut msg = format!(
        "{kind}: {} bad input files (use --skip-bad to skip them):",
        problems.len()
    );
    for (p, m) in problems {
        msg.push_str(&format!("\n  {}: {m}", p.display()));
    }
    Error::msg(msg)
}

fn build_staging(
    kind: DatasetKind,
    opts: &PrepareOptions,
    listing: &RawListing,
    staging: &Path,
    digest: &str,
    problems: &mut Vec<(PathBuf, String)>,
) -> Result<(DatasetReport, serde_json::Value)> {
    for sub in ["all/images", "all/masks"] {
        let d = staging.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    let outcomes: Vec<Outcome> = listing
        .samples
        .par_iter()
        .map(|s| process_sample(s, staging))
        .collect();

    let mut excluded = Excluded {
        normal: listing.excluded_normal.clone(),
        missing_mask: listing
            .missing_mask
            .iter()
            .map(|(n, _)| n.clone())
            .collect(),
        ..Default::default()
    };
    let mut warnings = listing.warnings.clone();
    for (p, m) in problems.iter() {
        warnings.push(format!("skipped {}: {m}", p.display()));
    }
    let mut kept = Vec::new();
    let (mut heights, mut widths, mut areas) = (Vec::new(), Vec::new(), Vec::new());
    let mut sha = BTreeMap::new();
    let mut merged = 0usize;
    let (mut n_size, mut n_bad) = (0usize, 0usize);
    let mut new_problems = Vec::new();
    for o in outcomes {
        match o {
            Outcome::Kept {
                name,
                height,
                width,
                area_frac,
                sha: h,
                n_masks,
            } => {
                heights.push(height as f64);
                widths.push(width as f64);
                areas.push(area_frac);
                if n_masks > 1 {
                    merged += 1;
                }
                sha.insert(name.clone(), h);
                kept.push(name);
            }
            Outcome::Blank { name } => excluded.blank.push(name),
            Outcome::SizeMismatch { name, path, msg } => {
                n_size += 1;
                excluded.size_mismatch.push(name);
                new_problems.push((path, msg));
            }
            Outcome::Bad { name, path, msg } => {
                n_bad += 1;
                excluded
                    .bad
                    .push(format!("{name}: {}: {msg}", path.display()));
                new_problems.push((path, msg));
            }
        }
    }
    if !new_problems.is_empty() {
        if !opts.skip_bad {
            return Err(problems_error(kind, &new_problems));
        }
        for (p, m) in &new_problems {
            warnings.push(format!("skipped {}: {m}", p.display()));
        }
        problems.extend(new_problems);
    }
    if kept.is_empty() {
        return Err(Error::file(
            opts.raw_root.join(kind.name()),
            format!("{kind}: no usable sample (every image was blank, normal or bad)"),
        ));
    }
    for v in [
        &mut excluded.blank,
        &mut excluded.normal,
        &mut excluded.missing_mask,
        &mut excluded.size_mismatch,
    ] {
        sort_names(v);
    }

    let mut splits = SplitsFile::build(
        kind.name(),
        &kept,
        kind.test_only(),
        opts.test_ratio,
        opts.n_splits,
        opts.seed,
    );
    splits.excluded = excluded;
    splits.source_sha256 = sha;
    splits.raw_digest = Some(digest.to_string());

    // Move files into train/ and test/.
    for (part, names) in [("train", &splits.train), ("test", &splits.test)] {
        for sub in ["images", "masks"] {
            let d = staging.join(part).join(sub);
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
            for n in names.iter() {
                let from = staging.join("all").join(sub).join(format!("{n}.png"));
                let to = d.join(format!("{n}.png"));
                std::fs::rename(&from, &to).map_err(|e| Error::io(&from, e))?;
            }
        }
    }
    let all = staging.join("all");
    std::fs::remove_dir_all(&all).map_err(|e| Error::io(&all, e))?;
    splits.write(&staging.join("splits.json"))?;

    // split_info.json (original-system-compatible summary).
    let by_name: BTreeMap<&str, &RawSample> = listing
        .samples
        .iter()
        .map(|s| (s.name.as_str(), s))
        .collect();
    let entry = |n: &String| {
        let s = by_name.get(n.as_str());
        let mut e = json!({"name": format!("{n}.png")});
        if let Some(s) = s {
            if let Some(c) = &s.category {
                e["category"] = json!(c);
            }
            e["original_image"] = json!(s
                .image
                .file_name()
                .map(|f| f.to_string_lossy().into_owned()));
        }
        e
    };
    let mut info = json!({
        "train": splits.train.iter().map(entry).collect::<Vec<_>>(),
        "test": splits.test.iter().map(entry).collect::<Vec<_>>(),
        "excluded_blank": splits.excluded.blank.len(),
    });
    if matches!(kind, DatasetKind::Busi | DatasetKind::Phantom) {
        info["excluded_normal"] = json!(splits.excluded.normal.len());
        info["total_excluded"] = json!(splits.excluded.normal.len() + splits.excluded.blank.len());
    }
    if kind.test_only() {
        info["unseen"] = json!(true);
    }
    write_atomic(
        &staging.join("split_info.json"),
        serde_json::to_string_pretty(&info)
            .unwrap_or_default()
            .as_bytes(),
    )?;

    let report = DatasetReport {
        dataset: kind,
        status: DatasetStatus::Processed,
        found: listing.found,
        kept: kept.len(),
        excluded_blank: splits.excluded.blank.len(),
        excluded_normal: splits.excluded.normal.len(),
        merged,
        missing_mask: splits.excluded.missing_mask.len(),
        size_mismatch: n_size,
        bad: n_bad,
        train: splits.train.len(),
        test: splits.test.len(),
        fold_val_sizes: splits.folds.iter().map(|f| f.val.len()).collect(),
        warnings,
        seconds: 0.0,
    };
    let stats = json!({
        "found": report.found,
        "kept": report.kept,
        "train": report.train,
        "test": report.test,
        "unseen": kind.test_only(),
        "excluded_blank": report.excluded_blank,
        "excluded_normal": report.excluded_normal,
        "missing_mask": report.missing_mask,
        "size_mismatch": report.size_mismatch,
        "bad": report.bad,
        "merged_masks": report.merged,
        "fold_val_sizes": report.fold_val_sizes,
        "image_height": quantiles(&mut heights),
        "image_width": quantiles(&mut widths),
        "lesion_area_fraction": quantiles(&mut areas),
    });
    Ok((report, stats))
}
