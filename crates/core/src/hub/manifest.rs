//! `weights/manifest.json`: one record per fetched alias (SPEC §13.6), written atomically.
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const MANIFEST_FORMAT_VERSION: u32 = 1;

/// One fetched alias.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    pub alias: String,
    /// `org/name` of the hub repository the alias names.
    pub repo: String,
    /// `model` or `space`.
    #[serde(rename = "type")]
    pub repo_type: String,
    /// Requested revision (None for `--from-file`).
    pub revision: Option<String>,
    /// Commit hash of the cached snapshot (None for `--from-file` or when unknown).
    pub commit: Option<String>,
    /// File inside the repository, or the local path for `--from-file`.
    pub file: String,
    /// `hub` or `file`.
    pub source: String,
    /// Format of the downloaded file (§13.5 names).
    pub format: String,
    /// SHA-256 of the downloaded (source) file.
    pub sha256: String,
    /// SHA-256 of the converted canonical safetensors.
    pub sha256_converted: String,
    /// Converted file, relative to the weights folder.
    pub output: String,
    pub tensor_count: usize,
    /// `sam`, `medsam` or `vit`.
    pub provenance: String,
    /// UTC, ISO 8601 (`YYYY-MM-DDTHH:MM:SSZ`).
    pub date: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub weights: Vec<ManifestRecord>,
}

impl Default for Manifest {
    fn default() -> Self {
        Manifest {
            format_version: MANIFEST_FORMAT_VERSION,
            weights: Vec::new(),
        }
    }
}

impl Manifest {
    /// `weights_dir/manifest.json`.
    pub fn path(weights_dir: &Path) -> PathBuf {
        weights_dir.join("manifest.json")
    }

    /// Reads the manifest; a missing file is an empty manifest.
    pub fn load(path: &Path) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Manifest::default()),
            Err(e) => return Err(Error::io(path, e)),
        };
        let m: Manifest = serde_json::from_str(&text).map_err(|e| {
            Error::file(
                path,
                format!("not a weights manifest ({e}); move it away to start a new one"),
            )
        })?;
        if m.format_version != MANIFEST_FORMAT_VERSION {
            return Err(Error::file(
                path,
                format!("manifest format_version {} is not supported (expected {MANIFEST_FORMAT_VERSION})", m.format_version),
            ));
        }
        Ok(m)
    }

    pub fn get(&self, alias: &str) -> Option<&ManifestRecord> {
        self.weights.iter().find(|r| r.alias == alias)
    }

    /// Replaces the record of the same alias (keeping its position) or appends it.
    pub fn upsert(&mut self, rec: ManifestRecord) {
        if let Some(slot) = self.weights.iter_mut().find(|r| r.alias == rec.alias) {
            *slot = rec;
        } else {
            self.weights.push(rec);
        }
    }

    /// Writes atomically (temporary file + rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text =
            serde_json::to_string_pretty(self).map_err(|e| Error::msg(format!("manifest: {e}")))?;
        write_atomic(path, format!("{text}\n").as_bytes())
    }
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let res = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now_iso8601() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    format_utc(secs)
}

/// Formats Unix seconds as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, days-from-civil inverse).
pub(crate) fn format_utc(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formatting() {
        assert_eq!(format_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_utc(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
