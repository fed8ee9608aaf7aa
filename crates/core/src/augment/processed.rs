//! Minimal reader of the processed dataset layout (SPEC §3.4, `splits.json` §3.5.3) for the failure simulator.
//!
//! NOTE: `crate::data` owns the canonical readers; this one exists because they were not on `main` when the simulator
//! was written, and should be replaced by them (same semantics: mask `value > 127`).
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// The parts of `splits.json` the simulator needs.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct Splits {
    #[serde(default)]
    pub dataset: Option<String>,
    pub train: Vec<String>,
    #[serde(default)]
    pub folds: Vec<Fold>,
    #[serde(default)]
    pub source_sha256: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug, serde::Deserialize)]
pub struct Fold {
    #[serde(default)]
    pub train: Vec<String>,
    pub val: Vec<String>,
}

/// Reads `<processed_root>/<DS>/splits.json`.
pub fn read_splits(processed_root: &Path, dataset: &str) -> Result<Splits> {
    let path = processed_root.join(dataset).join("splits.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::file(&path, format!("invalid splits.json: {e}")))
}

/// A training source image of the simulator.
#[derive(Clone, Debug)]
pub struct SourceRef {
    pub dataset: String,
    pub name: String,
    pub mask_path: PathBuf,
    pub image_path: PathBuf,
    /// SHA-256 of the processed image (from `splits.json` when listed there).
    pub sha256: Option<String>,
}

/// Train-split sources of `datasets`, sorted by (dataset name, file name `<name>.png`); with `exclude_fold = Some(k)`
/// each dataset's fold-`k` validation images are removed (SPEC §8.8).
pub fn list_sources(
    processed_root: &Path,
    datasets: &[String],
    exclude_fold: Option<usize>,
) -> Result<Vec<SourceRef>> {
    let mut ds: Vec<String> = datasets.to_vec();
    ds.sort();
    ds.dedup();
    let mut out = Vec::new();
    for d in &ds {
        let splits = read_splits(processed_root, d)?;
        let excluded: std::collections::HashSet<&String> = match exclude_fold {
            None => Default::default(),
            Some(k) => {
                let f = splits.folds.get(k).ok_or_else(|| {
                    Error::file(
                        processed_root.join(d).join("splits.json"),
                        format!(
                            "--exclude-fold {k}: only {} folds listed",
                            splits.folds.len()
                        ),
                    )
                })?;
                f.val.iter().collect()
            }
        };
        let mut names: Vec<&String> = splits
            .train
            .iter()
            .filter(|n| !excluded.contains(n))
            .collect();
        names.sort_by(|a, b| format!("{a}.png").cmp(&format!("{b}.png")));
        for n in names {
            let base = processed_root.join(d).join("train");
            out.push(SourceRef {
                dataset: d.clone(),
                name: n.clone(),
                mask_path: base.join("masks").join(format!("{n}.png")),
                image_path: base.join("images").join(format!("{n}.png")),
                sha256: splits.source_sha256.get(n).cloned(),
            });
        }
    }
    Ok(out)
}

/// Reads a processed mask PNG as `(h, w, mask)` with `mask[i] = 1` where the grey value is > 127.
pub fn read_mask(path: &Path) -> Result<(usize, usize, Vec<u8>)> {
    let img =
        image::open(path).map_err(|e| Error::file(path, format!("cannot decode mask PNG: {e}")))?;
    let g = img.to_luma8();
    let (w, h) = (g.width() as usize, g.height() as usize);
    Ok((
        h,
        w,
        g.into_raw().into_iter().map(|v| (v > 127) as u8).collect(),
    ))
}

/// SHA-256 (hex) of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:x}", sha2::Sha256::digest(&bytes)))
}
