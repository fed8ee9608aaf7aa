//! Data: raw readers, pixel conversion, splits (CPython MT19937), processed datasets, loader, transforms, phantom,
//! verification (SPEC §3, §4).
//!
//! Entry points:
//! * [`prepare::prepare_datasets`] — raw layouts → processed layout + `splits.json` (§3.2–§3.5, §3.11);
//! * [`verify::verify`] — checks a processed tree (§3.10);
//! * [`phantom::generate`] — synthetic BUSI-layout ultrasound set (§4);
//! * [`dataset::SegDataset`] + [`loader::Loader`] — S×S training/evaluation batches (§3.6–§3.9);
//! * [`grf`] — Gaussian random fields `G_ℓ` (§8.2), [`resize`] — host-side §0 kernels.

pub mod bench;
pub mod dataset;
pub mod grf;
pub mod loader;
pub mod mt19937;
pub mod phantom;
pub mod pixels;
pub mod prepare;
pub mod raw;
pub mod resize;
pub mod splits;
pub mod transforms;
pub mod verify;

use crate::{Error, Result};

/// The dataset registry of SPEC §3.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DatasetKind {
    Busi,
    Busbra,
    Bus,
    BusUc,
    BusUclm,
    Udiat,
    Phantom,
}

impl DatasetKind {
    /// Every registered dataset, in the order `prepare` processes them by default.
    pub const ALL: [DatasetKind; 7] = [
        DatasetKind::Busi,
        DatasetKind::Busbra,
        DatasetKind::Bus,
        DatasetKind::BusUc,
        DatasetKind::BusUclm,
        DatasetKind::Udiat,
        DatasetKind::Phantom,
    ];

    /// Upper-case registry name (also the folder name under the raw and processed roots).
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Busi => "BUSI",
            DatasetKind::Busbra => "BUSBRA",
            DatasetKind::Bus => "BUS",
            DatasetKind::BusUc => "BUS_UC",
            DatasetKind::BusUclm => "BUS_UCLM",
            DatasetKind::Udiat => "UDIAT",
            DatasetKind::Phantom => "PHANTOM",
        }
    }

    /// Parses a registry name (case-insensitive). Unknown names are an error listing the known ones.
    pub fn parse(s: &str) -> Result<Self> {
        let up = s.trim().to_ascii_uppercase();
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.name() == up)
            .ok_or_else(|| {
                let known: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                Error::Arg(format!(
                    "unknown dataset name `{s}` (known: {})",
                    known.join(", ")
                ))
            })
    }

    /// UDIAT is the unseen, test-only dataset: every sample goes to `test/`.
    pub fn test_only(self) -> bool {
        matches!(self, DatasetKind::Udiat)
    }
}

impl std::fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Parses a list of dataset names given as repeated values and/or comma-separated lists (`BUSI,BUS` `UDIAT`).
/// Duplicates are removed, keeping the first occurrence.
pub fn parse_dataset_list<S: AsRef<str>>(items: &[S]) -> Result<Vec<DatasetKind>> {
    let mut out = Vec::new();
    for item in items {
        for part in item
            .as_ref()
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let k = DatasetKind::parse(part)?;
            if !out.contains(&k) {
                out.push(k);
            }
        }
    }
    Ok(out)
}

/// Name of a combined run: dataset names sorted in code-point order joined with `_` (SPEC §0).
pub fn combined_name<S: AsRef<str>>(names: &[S]) -> String {
    let mut v: Vec<&str> = names.iter().map(|s| s.as_ref()).collect();
    v.sort();
    v.join("_")
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, then a rename.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let fname = path
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(
        ".{fname}.tmp-{}-{}",
        std::process::id(),
        tmp_counter()
    ));
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

fn tmp_counter() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static C: AtomicU64 = AtomicU64::new(0);
    C.fetch_add(1, Ordering::Relaxed)
}

/// Lower-case hex of a byte slice.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// SHA-256 of bytes as lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}
