//! Processed-dataset verification (SPEC §3.10, `ultrarefiner prepare verify`).
use super::pixels::{decode_png_bytes, to_gray};
use super::splits::SplitsFile;
use super::DatasetKind;
use crate::{Error, Result};
use rayon::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// Options of `prepare verify`.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub output_root: PathBuf,
    /// Datasets to check; empty = every dataset folder present under the root.
    pub datasets: Vec<DatasetKind>,
    /// Duplicate images become errors instead of warnings.
    pub strict: bool,
    pub num_workers: Option<usize>,
}

/// Result of checking one processed dataset.
#[derive(Debug, Clone, Default)]
pub struct DatasetVerify {
    pub dataset: String,
    pub train: usize,
    pub test: usize,
    pub folds: usize,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// Result of `verify`: per-dataset counts, errors and warnings. `Display` lists every problem.
#[derive(Debug, Clone, Default)]
pub struct VerifyReport {
    pub datasets: Vec<DatasetVerify>,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.datasets.iter().all(|d| d.errors.is_empty())
    }
    /// Every error, prefixed with its dataset.
    pub fn errors(&self) -> Vec<String> {
        self.datasets
            .iter()
            .flat_map(|d| d.errors.iter().map(move |e| format!("{}: {e}", d.dataset)))
            .collect()
    }
    pub fn warnings(&self) -> Vec<String> {
        self.datasets
            .iter()
            .flat_map(|d| {
                d.warnings
                    .iter()
                    .map(move |e| format!("{}: {e}", d.dataset))
            })
            .collect()
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for d in &self.datasets {
            let state = if d.errors.is_empty() { "ok" } else { "FAILED" };
            writeln!(
                f,
                "verify {:<10} train {:>5}  test {:>5}  folds {}  {} ({} errors, {} warnings)",
                d.dataset,
                d.train,
                d.test,
                d.folds,
                state,
                d.errors.len(),
                d.warnings.len()
            )?;
            for e in &d.errors {
                writeln!(f, "  error: {e}")?;
            }
            for w in &d.warnings {
                writeln!(f, "  warning: {w}")?;
            }
        }
        Ok(())
    }
}

/// Verifies every dataset under `root` (non-strict).
pub fn verify(root: &Path) -> Result<VerifyReport> {
    verify_with(&VerifyOptions {
        output_root: root.to_path_buf(),
        datasets: Vec::new(),
        strict: false,
        num_workers: None,
    })
}

/// Verifies the selected datasets. I/O problems with the root itself are errors; everything found inside a dataset
/// is reported in the returned report.
pub fn verify_with(opts: &VerifyOptions) -> Result<VerifyReport> {
    let root = &opts.output_root;
    if !root.is_dir() {
        return Err(Error::file(root, "processed root does not exist"));
    }
    let names: Vec<String> = if opts.datasets.is_empty() {
        let mut v = Vec::new();
        let rd = std::fs::read_dir(root).map_err(|e| Error::io(root, e))?;
        for e in rd {
            let e = e.map_err(|e| Error::io(root, e))?;
            let n = e.file_name().to_string_lossy().into_owned();
            if e.path().is_dir() && !n.starts_with('.') {
                v.push(n);
            }
        }
        v.sort();
        if v.is_empty() {
            return Err(Error::file(root, "no processed dataset folder found"));
        }
        v
    } else {
        opts.datasets.iter().map(|k| k.name().to_string()).collect()
    };
    let run = || {
        names
            .iter()
            .map(|n| verify_dataset(&root.join(n), n, opts.strict))
            .collect::<Vec<_>>()
    };
    let datasets = match opts.num_workers {
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build()
            .map_err(|e| Error::msg(format!("cannot build thread pool: {e}")))?
            .install(run),
        None => run(),
    };
    Ok(VerifyReport { datasets })
}

struct FileCheck {
    name: String,
    part: &'static str,
    pixel_sha: Option<String>,
    file_sha: Option<String>,
    errors: Vec<String>,
}

fn list_names(dir: &Path) -> std::result::Result<BTreeSet<String>, String> {
    if !dir.is_dir() {
        return Ok(BTreeSet::new());
    }
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out = BTreeSet::new();
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if let Some(s) = n.strip_suffix(".png") {
            out.insert(s.to_string());
        }
    }
    Ok(out)
}

fn check_pair(dir: &Path, part: &'static str, name: &str) -> FileCheck {
    let mut fc = FileCheck {
        name: name.to_string(),
        part,
        pixel_sha: None,
        file_sha: None,
        errors: Vec::new(),
    };
    let ip = dir.join(part).join("images").join(format!("{name}.png"));
    let mp = dir.join(part).join("masks").join(format!("{name}.png"));
    let img = match std::fs::read(&ip) {
        Ok(b) => {
            fc.file_sha = Some(super::sha256_hex(&b));
            match decode_png_bytes(&ip, &b).and_then(|d| to_gray(&d)) {
                Ok(g) => Some(g),
                Err(e) => {
                    fc.errors.push(e.to_string());
                    None
                }
            }
        }
        Err(e) => {
            fc.errors.push(format!("{}: {e}", ip.display()));
            None
        }
    };
    if let Some(g) = &img {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update((g.width as u64).to_le_bytes());
        h.update((g.height as u64).to_le_bytes());
        h.update(&g.data);
        fc.pixel_sha = Some(super::hex(&h.finalize()));
    }
    if !mp.is_file() {
        fc.errors.push(format!(
            "{}: image has no mask ({} missing)",
            ip.display(),
            mp.display()
        ));
        return fc;
    }
    match super::pixels::decode_png(&mp) {
        Ok(m) => {
            let (mw, mh) = (m.width() as usize, m.height() as usize);
            if let Some(g) = &img {
                if (mw, mh) != (g.width, g.height) {
                    fc.errors.push(format!(
                        "{}: mask is {mw}x{mh} but its image is {}x{} (WxH)",
                        mp.display(),
                        g.width,
                        g.height
                    ));
                }
            }
            match m {
                image::DynamicImage::ImageLuma8(b) => {
                    let raw = b.as_raw();
                    if let Some(v) = raw.iter().find(|&&v| v != 0 && v != 255) {
                        fc.errors.push(format!(
                            "{}: mask is not strictly {{0,255}} (found value {v})",
                            mp.display()
                        ));
                    }
                    if raw.iter().all(|&v| v == 0) {
                        fc.errors.push(format!(
                            "{}: mask is empty (no foreground pixel)",
                            mp.display()
                        ));
                    }
                }
                other => fc.errors.push(format!(
                    "{}: mask must be an 8-bit grey PNG, found {:?}",
                    mp.display(),
                    other.color()
                )),
            }
        }
        Err(e) => fc.errors.push(e.to_string()),
    }
    fc
}

fn verify_dataset(dir: &Path, name: &str, strict: bool) -> DatasetVerify {
    let mut r = DatasetVerify {
        dataset: name.to_string(),
        ..Default::default()
    };
    if !dir.is_dir() {
        r.errors.push(format!(
            "{}: processed dataset folder does not exist",
            dir.display()
        ));
        return r;
    }
    // Folder contents.
    let mut on_disk: BTreeMap<&'static str, BTreeSet<String>> = BTreeMap::new();
    for part in ["train", "test"] {
        let imgs = list_names(&dir.join(part).join("images")).unwrap_or_else(|e| {
            r.errors.push(e);
            BTreeSet::new()
        });
        let masks = list_names(&dir.join(part).join("masks")).unwrap_or_default();
        for m in masks.difference(&imgs) {
            r.errors.push(format!(
                "{}: mask without an image",
                dir.join(part)
                    .join("masks")
                    .join(format!("{m}.png"))
                    .display()
            ));
        }
        on_disk.insert(part, imgs);
    }
    let checks: Vec<FileCheck> = on_disk
        .iter()
        .flat_map(|(part, names)| names.iter().map(move |n| (*part, n.clone())))
        .collect::<Vec<_>>()
        .par_iter()
        .map(|(part, n)| check_pair(dir, part, n))
        .collect();
    for c in &checks {
        r.errors.extend(c.errors.iter().cloned());
    }
    for n in on_disk["train"].intersection(&on_disk["test"]) {
        r.errors
            .push(format!("sample `{n}` is present in both train/ and test/"));
    }

    // splits.json.
    let sp_path = dir.join("splits.json");
    let splits = match SplitsFile::read(&sp_path) {
        Ok(s) => Some(s),
        Err(e) => {
            r.errors.push(e.to_string());
            None
        }
    };
    r.train = on_disk["train"].len();
    r.test = on_disk["test"].len();
    let mut fold_of_val: BTreeMap<&str, usize> = BTreeMap::new();
    if let Some(sp) = &splits {
        r.folds = sp.folds.len();
        let sp_name = sp_path.display();
        let train: BTreeSet<&str> = sp.train.iter().map(String::as_str).collect();
        let test: BTreeSet<&str> = sp.test.iter().map(String::as_str).collect();
        if train.len() != sp.train.len() {
            r.errors
                .push(format!("{sp_name}: `train` lists a sample more than once"));
        }
        if test.len() != sp.test.len() {
            r.errors
                .push(format!("{sp_name}: `test` lists a sample more than once"));
        }
        for n in train.intersection(&test) {
            r.errors
                .push(format!("{sp_name}: `{n}` is in both train and test"));
        }
        for (part, set) in [("train", &train), ("test", &test)] {
            let disk: BTreeSet<&str> = on_disk[part].iter().map(String::as_str).collect();
            for n in set.difference(&disk) {
                r.errors.push(format!(
                    "{sp_name}: {part} sample `{n}` has no file {part}/images/{n}.png"
                ));
            }
            for n in disk.difference(set) {
                r.errors.push(format!(
                    "{sp_name}: {part}/images/{n}.png is not listed in `{part}`"
                ));
            }
        }
        for (i, f) in sp.folds.iter().enumerate() {
            let val: BTreeSet<&str> = f.val.iter().map(String::as_str).collect();
            let ftrain: BTreeSet<&str> = f.train.iter().map(String::as_str).collect();
            if val.len() != f.val.len() || ftrain.len() != f.train.len() {
                r.errors
                    .push(format!("{sp_name}: fold {i} lists a sample more than once"));
            }
            for n in &val {
                if !train.contains(n) {
                    r.errors.push(format!(
                        "{sp_name}: fold {i} val sample `{n}` is not in `train`"
                    ));
                }
                if let Some(j) = fold_of_val.insert(n, i) {
                    r.errors.push(format!(
                        "{sp_name}: `{n}` is in the val sets of folds {j} and {i}"
                    ));
                }
            }
            let expect: BTreeSet<&str> = train.difference(&val).copied().collect();
            if ftrain != expect {
                r.errors.push(format!(
                    "{sp_name}: fold {i} train is not train minus its val set"
                ));
            }
        }
        if !sp.folds.is_empty() {
            for n in &train {
                if !fold_of_val.contains_key(n) {
                    r.errors.push(format!(
                        "{sp_name}: train sample `{n}` is in no fold's val set"
                    ));
                }
            }
        }
        // source_sha256.
        for c in &checks {
            match (sp.source_sha256.get(&c.name), &c.file_sha) {
                (Some(want), Some(got)) if want != got => r.errors.push(format!(
                    "{}/images/{}.png: SHA-256 differs from splits.json source_sha256",
                    c.part, c.name
                )),
                (None, Some(_)) if !sp.source_sha256.is_empty() => r.errors.push(format!(
                    "{sp_name}: source_sha256 has no entry for `{}`",
                    c.name
                )),
                _ => {}
            }
        }
    }

    // Duplicates (pixel SHA-256).
    let mut by_hash: BTreeMap<&str, Vec<&FileCheck>> = BTreeMap::new();
    for c in &checks {
        if let Some(h) = &c.pixel_sha {
            by_hash.entry(h.as_str()).or_default().push(c);
        }
    }
    for group in by_hash.values().filter(|g| g.len() > 1) {
        let names: Vec<String> = group
            .iter()
            .map(|c| format!("{}/{}", c.part, c.name))
            .collect();
        let parts: BTreeSet<&str> = group.iter().map(|c| c.part).collect();
        let folds: BTreeSet<usize> = group
            .iter()
            .filter_map(|c| fold_of_val.get(c.name.as_str()).copied())
            .collect();
        let where_ = if parts.len() > 1 {
            "across train/test"
        } else if folds.len() > 1 {
            "across folds"
        } else {
            "within a split"
        };
        let msg = format!("identical images {where_}: {}", names.join(", "));
        if strict {
            r.errors.push(msg);
        } else {
            r.warnings.push(msg);
        }
    }
    r
}
