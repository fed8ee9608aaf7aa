//! Checkpoints (SPEC §11.1.4): `<stem>.safetensors` (model tensors under canonical keys, BatchNorm buffers, optimiser
//! state `__optim__.*`) plus the `<stem>.json` sidecar, both written atomically (temporary file, fsync, rename).
use super::history::HistoryRow;
use super::optim::{split_optim_state, OptimizerInfo, OPTIM_PREFIX};
use super::schedule::Schedule;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Current sidecar format.
pub const FORMAT_VERSION: u32 = 1;

/// Which trainer wrote a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Phase1,
    Phase2,
    Phase3,
}

impl Phase {
    pub fn as_str(&self) -> &'static str {
        match self {
            Phase::Phase1 => "phase1",
            Phase::Phase2 => "phase2",
            Phase::Phase3 => "phase3",
        }
    }
}

/// Best metric so far. `epoch` is 0-based like [`Sidecar::epoch`]; `None` before any validation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Best {
    /// Selection metric name (`dice`, `dice_img`, Phase 2 `refined_dice`, …).
    pub metric: String,
    /// Stored rounded by [`round15`](super::history::round15) so that it survives a JSON round trip exactly.
    #[serde(serialize_with = "super::history::ser_opt_f64_15")]
    pub value: Option<f64>,
    pub epoch: Option<u64>,
}

impl Best {
    pub fn new(metric: impl Into<String>) -> Self {
        Best { metric: metric.into(), value: None, epoch: None }
    }
    /// Strict improvement rule (§11.2–11.4): `value > best`. Updates and returns true on improvement; NaN never
    /// improves. Values are compared and stored after [`round15`](super::history::round15), so a resumed run
    /// (best read back from JSON) decides exactly like an uninterrupted one.
    pub fn update(&mut self, value: f64, epoch: u64) -> bool {
        let value = super::history::round15(value);
        let better = match self.value {
            None => !value.is_nan(),
            Some(b) => value > b,
        };
        if better {
            self.value = Some(value);
            self.epoch = Some(epoch);
        }
        better
    }
}

/// Data identity: what the run trained on (must match on resume).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DataIdentity {
    pub datasets: Vec<String>,
    pub fold: Option<u32>,
    pub n_splits: Option<u32>,
    /// SHA-256 of `splits.json` (Phases 1, 3).
    #[serde(default)]
    pub splits_sha256: Option<String>,
    /// SHA-256 of the augmentation `manifest.json` (Phase 2).
    #[serde(default)]
    pub manifest_sha256: Option<String>,
}

/// Counter-based RNG position (§0, §11.1.6): only the seed and the next epoch are needed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: u64,
    pub next_epoch: u64,
}

/// Phase 3 baseline of the loaded TransUNet on the validation fold.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// Batch-pooled Dice (§10.1).
    #[serde(serialize_with = "super::history::ser_f64_15")]
    pub dice: f64,
    /// Per-image mean Dice (§10.2).
    #[serde(serialize_with = "super::history::ser_f64_15")]
    pub dice_img: f64,
    #[serde(default, serialize_with = "super::history::ser_opt_f64_15")]
    pub iou: Option<f64>,
}

/// Source of initial weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightSource {
    /// What the weights are for (`transunet`, `vit_pretrained`, `sam`, …).
    pub role: String,
    pub path: String,
    pub sha256: Option<String>,
    /// Free text: format and origin (e.g. `timm safetensors`, `phase2 best_sam`, `hub:medsam-vit-b`).
    pub provenance: String,
}

/// The JSON sidecar of a checkpoint (§11.1.4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sidecar {
    pub format_version: u32,
    pub kind: Phase,
    pub tool_version: String,
    #[serde(default)]
    pub git_commit: Option<String>,
    /// Creation time, RFC 3339 UTC.
    pub created: String,
    /// Last completed epoch, 0-based.
    pub epoch: u64,
    /// Optimiser steps taken so far.
    pub global_step: u64,
    pub best: Best,
    /// Resolved configuration (sections `model`, `refiner`, `data`, `training`, `cli`).
    pub config: serde_json::Value,
    pub data: DataIdentity,
    pub optimizer: OptimizerInfo,
    pub scheduler: Schedule,
    pub rng: RngState,
    /// Every history row so far.
    pub history: Vec<HistoryRow>,
    /// Phase 3 baseline.
    #[serde(default)]
    pub baseline: Option<Baseline>,
    /// Sources of the initial weights.
    #[serde(default)]
    pub init_weights: Vec<WeightSource>,
    /// BLAKE3 of the companion `.safetensors` file (detects a pair torn by a crash between the two renames).
    #[serde(default)]
    pub tensors_blake3: Option<String>,
    /// Phase-specific extras (e.g. Phase 2 `best_sam` settings).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
}

impl Sidecar {
    /// A sidecar with the fixed fields filled in (`tool_version` = crate version, `created` = now, format version).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kind: Phase,
        epoch: u64,
        global_step: u64,
        best: Best,
        config: serde_json::Value,
        data: DataIdentity,
        optimizer: OptimizerInfo,
        scheduler: Schedule,
        rng: RngState,
        history: Vec<HistoryRow>,
    ) -> Self {
        Sidecar {
            format_version: FORMAT_VERSION,
            kind,
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit: option_env!("ULTRAREFINER_GIT_COMMIT").map(|s| s.to_string()),
            created: now_rfc3339(),
            epoch,
            global_step,
            best,
            config,
            data,
            optimizer,
            scheduler,
            rng,
            history,
            baseline: None,
            init_weights: Vec::new(),
            tensors_blake3: None,
            extra: serde_json::Value::Null,
        }
    }
}

/// Current UTC time as RFC 3339 (`2026-11-27T23:08:36Z`).
pub fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    format_rfc3339(secs)
}

/// Formats Unix seconds as RFC 3339 UTC.
pub fn format_rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // civil-from-days (H. Hinnant)
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, (rem / 60) % 60, rem % 60)
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

fn fsync_dir(path: &Path) {
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        if let Ok(f) = std::fs::File::open(dir) {
            let _ = f.sync_all();
        }
    }
}

/// Atomic write: `write(tmp)` creates a temporary file beside `path`, which is fsynced and renamed over `path`; the
/// directory is fsynced afterwards (best effort). On error the temporary file is removed.
pub fn atomic_write_with<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&Path) -> Result<()>,
{
    let tmp = tmp_path(path);
    let res = (|| {
        write(&tmp)?;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    } else {
        fsync_dir(path);
    }
    res
}

/// Atomic write of a byte buffer.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp).map_err(|e| Error::io(tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(tmp, e))?;
        Ok(())
    })
}

/// Atomic write of pretty JSON.
pub fn atomic_write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut s = serde_json::to_string_pretty(value).map_err(|e| Error::file(path, format!("JSON encoding: {e}")))?;
    s.push('\n');
    atomic_write(path, s.as_bytes())
}

/// Atomic write of a safetensors file.
pub fn atomic_write_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    atomic_write_with(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp).map_err(|e| Error::file(tmp, format!("safetensors write: {e}")))
    })
}

fn hash_file_with<H: FnMut(&[u8])>(path: &Path, mut h: H) -> Result<()> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h(&buf[..n]);
    }
    Ok(())
}

/// SHA-256 (hex) of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    hash_file_with(path, |b| h.update(b))?;
    Ok(hex(&h.finalize()))
}

/// BLAKE3 (hex) of a file.
pub fn blake3_file(path: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    hash_file_with(path, |b| {
        h.update(b);
    })?;
    Ok(h.finalize().to_hex().to_string())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `<dir>/<stem>.safetensors` and `<dir>/<stem>.json`.
pub fn checkpoint_paths(dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
    (dir.join(format!("{stem}.safetensors")), dir.join(format!("{stem}.json")))
}

/// Writes `<dir>/<stem>.safetensors` (model tensors + buffers + optimiser state) and `<dir>/<stem>.json`, each
/// atomically (tensors first, then the sidecar carrying the tensors' BLAKE3). Model keys must not start with
/// `__optim__.`; optimiser keys must. Returns both paths.
pub fn save_checkpoint(
    dir: &Path,
    stem: &str,
    model: &HashMap<String, Tensor>,
    optim: &[(String, Tensor)],
    sidecar: &Sidecar,
) -> Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let (st_path, js_path) = checkpoint_paths(dir, stem);
    let mut all: HashMap<String, Tensor> = HashMap::with_capacity(model.len() + optim.len());
    for (k, v) in model {
        if k.starts_with(OPTIM_PREFIX) {
            return Err(Error::Arg(format!("model tensor key `{k}` uses the reserved `{OPTIM_PREFIX}` prefix")));
        }
        all.insert(k.clone(), v.clone());
    }
    for (k, v) in optim {
        if !k.starts_with(OPTIM_PREFIX) {
            return Err(Error::Arg(format!("optimiser tensor key `{k}` lacks the `{OPTIM_PREFIX}` prefix")));
        }
        if all.insert(k.clone(), v.clone()).is_some() {
            return Err(Error::Arg(format!("duplicate checkpoint tensor key `{k}`")));
        }
    }
    atomic_write_safetensors(&st_path, &all)?;
    let mut sc = sidecar.clone();
    sc.tensors_blake3 = Some(blake3_file(&st_path)?);
    atomic_write_json(&js_path, &sc)?;
    Ok((st_path, js_path))
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// Model tensors and buffers (everything but `__optim__.*`).
    pub model: HashMap<String, Tensor>,
    /// Optimiser tensors (`__optim__.*`).
    pub optim: HashMap<String, Tensor>,
    pub sidecar: Sidecar,
    pub safetensors_path: PathBuf,
}

/// Resolves a checkpoint argument (`X.safetensors`, `X.json` or the stem `X`) to its two files.
pub fn resolve_checkpoint(path: &Path) -> (PathBuf, PathBuf) {
    let s = path.to_string_lossy();
    let stem = s.strip_suffix(".safetensors").or_else(|| s.strip_suffix(".json")).unwrap_or(&s).to_string();
    (PathBuf::from(format!("{stem}.safetensors")), PathBuf::from(format!("{stem}.json")))
}

/// Reads a sidecar.
pub fn read_sidecar(path: &Path) -> Result<Sidecar> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let sc: Sidecar = serde_json::from_str(&text).map_err(|e| Error::file(path, format!("invalid sidecar: {e}")))?;
    if sc.format_version > FORMAT_VERSION {
        return Err(Error::file(
            path,
            format!("sidecar format_version {} is newer than this tool's {FORMAT_VERSION}", sc.format_version),
        ));
    }
    Ok(sc)
}

/// Loads a checkpoint written by [`save_checkpoint`] onto `device`, verifying that the tensors file belongs to the
/// sidecar (BLAKE3).
pub fn load_checkpoint(path: &Path, device: &Device) -> Result<Checkpoint> {
    let (st_path, js_path) = resolve_checkpoint(path);
    if !st_path.is_file() {
        return Err(Error::file(&st_path, "checkpoint tensors file not found"));
    }
    if !js_path.is_file() {
        return Err(Error::file(&js_path, "checkpoint sidecar not found (needed to resume)"));
    }
    let sidecar = read_sidecar(&js_path)?;
    if let Some(want) = &sidecar.tensors_blake3 {
        let got = blake3_file(&st_path)?;
        if &got != want {
            return Err(Error::file(
                &st_path,
                format!("does not belong to {} (BLAKE3 {got} ≠ {want}); the pair was torn by an interrupted save", js_path.display()),
            ));
        }
    }
    let all = candle_core::safetensors::load(&st_path, device).map_err(|e| Error::file(&st_path, e.to_string()))?;
    let (model, optim) = split_optim_state(all);
    Ok(Checkpoint { model, optim, sidecar, safetensors_path: st_path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_rfc3339(1_798_413_316), "2026-12-27T23:15:16Z");
    }

    #[test]
    fn best_is_strict() {
        let mut b = Best::new("dice");
        assert!(!b.update(f64::NAN, 0));
        assert!(b.update(0.5, 0));
        assert!(!b.update(0.5, 1));
        assert!(b.update(0.6, 2));
        assert_eq!((b.value, b.epoch), (Some(0.6), Some(2)));
    }

    #[test]
    fn resolve_checkpoint_forms() {
        let (a, b) = resolve_checkpoint(Path::new("x/best.safetensors"));
        assert_eq!((a.to_str().unwrap(), b.to_str().unwrap()), ("x/best.safetensors", "x/best.json"));
        let (a, _) = resolve_checkpoint(Path::new("x/best.json"));
        assert_eq!(a.to_str().unwrap(), "x/best.safetensors");
        let (_, b) = resolve_checkpoint(Path::new("x/latest"));
        assert_eq!(b.to_str().unwrap(), "x/latest.json");
    }
}
