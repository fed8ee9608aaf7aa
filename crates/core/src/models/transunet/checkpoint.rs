//! Loading and saving TransUNet weights in the canonical safetensors layout (SPEC §5.3, §5.7, §11.1.4).
//!
//! * [`read_checkpoint`]: a canonical file (Phase 1 `<stem>.safetensors`, or the `transunet.` part of a Phase 3 file),
//!   `__optim__.*` keys dropped.
//! * [`TransUnet::from_tensors`] / [`TransUnet::from_checkpoint`]: a frozen model over plain tensors, strict
//!   (every missing and every unexpected key is reported by name; `num_batches_tracked` optional).
//! * [`load_into_varmap`]: copies weights into the `Var`s of a trainable model plus its BatchNorm buffers
//!   (strict, or encoder-only for pretrained initialisation).
//! * [`state_dict`] / [`save_safetensors_atomic`]: canonical tensors of a trainable model, written atomically.
//! * [`load_pretrained_encoder`]: `.npz` (SPEC §5.5), timm safetensors (§5.6) or canonical safetensors → the
//!   canonical `transformer.*` tensors.
use super::TransUnet;
use crate::config::TransUnetConfig;
use crate::convert::npz::key_list;
use crate::{Error, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Prefix of optimiser-state keys inside training checkpoints (ignored by weight loaders).
pub const OPTIM_PREFIX: &str = "__optim__.";

/// Reads a canonical safetensors file onto the CPU. Keys under `__optim__.` are dropped. With a non-empty `prefix`
/// (e.g. `"transunet"` for Phase 3 checkpoints) only keys below `prefix.` are kept, with the prefix removed.
pub fn read_checkpoint(path: &Path, prefix: &str) -> Result<HashMap<String, Tensor>> {
    let all = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| Error::file(path, e.to_string()))?;
    let mut out = HashMap::new();
    for (k, t) in all {
        if k.starts_with(OPTIM_PREFIX) {
            continue;
        }
        if prefix.is_empty() {
            out.insert(k, t);
        } else if let Some(rest) = k.strip_prefix(prefix).and_then(|r| r.strip_prefix('.')) {
            out.insert(rest.to_string(), t);
        }
    }
    if out.is_empty() {
        return Err(Error::file(
            path,
            if prefix.is_empty() {
                "no model tensors".to_string()
            } else {
                format!("no tensors under `{prefix}.`")
            },
        ));
    }
    Ok(out)
}

/// `SimpleBackend` over a tensor map that records which keys the model asked for and collects (instead of failing
/// on) missing keys and shape mismatches, so one build reports every problem.
struct RecordingBackend {
    tensors: HashMap<String, Tensor>,
    log: Arc<Mutex<Record>>,
}

#[derive(Default)]
struct Record {
    seen: BTreeSet<String>,
    missing: Vec<String>,
    bad_shape: Vec<String>,
}

impl RecordingBackend {
    fn record(&self) -> std::sync::MutexGuard<'_, Record> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl candle_nn::var_builder::SimpleBackend for RecordingBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut rec = self.record();
        rec.seen.insert(name.to_string());
        match self.tensors.get(name) {
            Some(t) if t.shape() == &s => t.to_dtype(dtype)?.to_device(dev),
            Some(t) => {
                rec.bad_shape.push(format!(
                    "`{name}` has shape {:?}, the model expects {:?}",
                    t.dims(),
                    s.dims()
                ));
                Tensor::zeros(s, dtype, dev)
            }
            None => {
                rec.missing.push(name.to_string());
                Tensor::zeros(s, dtype, dev)
            }
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.record().seen.insert(name.to_string());
        match self.tensors.get(name) {
            Some(t) => t.to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("cannot find tensor {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

impl TransUnet {
    /// A frozen model (plain tensors) from canonical tensors (SPEC §5.3 keys, no prefix). Strict: missing keys,
    /// shape mismatches and unexpected keys are errors naming every offending key; `num_batches_tracked` is optional.
    pub fn from_tensors(
        cfg: &TransUnetConfig,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let keys: BTreeSet<String> = tensors.keys().cloned().collect();
        let log = Arc::new(Mutex::new(Record::default()));
        let backend = RecordingBackend {
            tensors,
            log: log.clone(),
        };
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        let model = TransUnet::new(cfg, vb)?;
        let mut rec = log.lock().unwrap_or_else(|p| p.into_inner());
        // BatchNorm buffers are read only when present (defaults otherwise); a checkpoint must have them.
        for k in model.bn_buffer_keys() {
            if !k.ends_with(".num_batches_tracked") && !keys.contains(&k) {
                rec.missing.push(k);
            }
        }
        let unexpected: Vec<&String> = keys.iter().filter(|k| !rec.seen.contains(*k)).collect();
        let mut problems = Vec::new();
        if !rec.missing.is_empty() {
            problems.push(format!("missing keys: {}", key_list(&rec.missing, 12)));
        }
        if !rec.bad_shape.is_empty() {
            problems.push(key_list(&rec.bad_shape, 6));
        }
        if !unexpected.is_empty() {
            problems.push(format!("unexpected keys: {}", key_list(&unexpected, 12)));
        }
        if !problems.is_empty() {
            return Err(Error::Weights(format!(
                "TransUNet weights do not match the configuration: {}",
                problems.join("; ")
            )));
        }
        Ok(model)
    }

    /// [`read_checkpoint`] + [`from_tensors`](Self::from_tensors); `prefix` as in [`read_checkpoint`].
    pub fn from_checkpoint(
        cfg: &TransUnetConfig,
        path: &Path,
        prefix: &str,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let tensors = read_checkpoint(path, prefix)?;
        Self::from_tensors(cfg, tensors, dtype, device)
            .map_err(|e| Error::file(path, e.to_string()))
    }
}

/// What [`load_into_varmap`] did.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Canonical keys copied (parameters and buffers).
    pub loaded: Vec<String>,
    /// Model keys the source did not provide (left at their current values).
    pub missing: Vec<String>,
}

/// Which model keys a load must provide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadMode {
    /// Every parameter and BatchNorm mean/variance (checkpoints, resume).
    Strict,
    /// Every `transformer.*` parameter (pretrained initialisation); the decoder and head keep their values.
    Encoder,
}

/// Copies canonical `tensors` into the trainable `model` built over `varmap` (its `Var`s under the model's prefix)
/// and its BatchNorm buffers. Unexpected keys and shape mismatches are always errors; missing keys are errors per
/// `mode` (`num_batches_tracked` is always optional).
pub fn load_into_varmap(
    model: &TransUnet,
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    mode: LoadMode,
) -> Result<LoadReport> {
    let prefix = model.prefix();
    let full = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| Error::msg("VarMap lock poisoned"))?;
    let mut report = LoadReport::default();
    let mut known = BTreeSet::new();
    let mut problems = Vec::new();
    // Parameters: every Var below the prefix.
    let mut param_keys: Vec<String> = vars
        .keys()
        .filter_map(|k| {
            if prefix.is_empty() {
                Some(k.clone())
            } else {
                k.strip_prefix(prefix)
                    .and_then(|r| r.strip_prefix('.'))
                    .map(|r| r.to_string())
            }
        })
        .collect();
    param_keys.sort();
    for key in &param_keys {
        known.insert(key.clone());
        let var = &vars[&full(key)];
        match tensors.get(key) {
            Some(t) => {
                if t.dims() != var.dims() {
                    problems.push(format!(
                        "`{key}` has shape {:?}, the model expects {:?}",
                        t.dims(),
                        var.dims()
                    ));
                    continue;
                }
                var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
                report.loaded.push(key.clone());
            }
            None => report.missing.push(key.clone()),
        }
    }
    drop(vars);
    // Buffers.
    let mut buffers = HashMap::new();
    for key in model.bn_buffer_keys() {
        known.insert(key.clone());
        match tensors.get(&key) {
            Some(t) => {
                buffers.insert(key.clone(), t.clone());
                report.loaded.push(key);
            }
            None if key.ends_with(".num_batches_tracked") => {}
            None => report.missing.push(key),
        }
    }
    let mut unexpected: Vec<&String> = tensors.keys().filter(|k| !known.contains(*k)).collect();
    unexpected.sort();
    if !unexpected.is_empty() {
        problems.push(format!("unexpected keys: {}", key_list(&unexpected, 12)));
    }
    let missing_bad: Vec<&str> = report
        .missing
        .iter()
        .filter(|k| mode == LoadMode::Strict || k.starts_with("transformer."))
        .map(|s| s.as_str())
        .collect();
    if !missing_bad.is_empty() {
        problems.push(format!("missing keys: {}", key_list(&missing_bad, 12)));
    }
    if !problems.is_empty() {
        return Err(Error::Weights(format!(
            "cannot load TransUNet weights: {}",
            problems.join("; ")
        )));
    }
    // Only the buffers the source has (strict mode guarantees all means/variances are there).
    for (prefix_bn, bn) in model.decoder.batch_norms() {
        let p = model.strip(prefix_bn);
        for name in ["running_mean", "running_var", "num_batches_tracked"] {
            if let Some(t) = buffers.get(&format!("{p}.{name}")) {
                bn.set_buffer(name, t)
                    .map_err(|e| Error::Weights(format!("`{p}.{name}`: {e}")))?;
            }
        }
    }
    Ok(report)
}

/// Canonical tensors of a trainable model: its `Var`s (prefix removed) and BatchNorm buffers, sorted by key.
pub fn state_dict(model: &TransUnet, varmap: &VarMap) -> Result<Vec<(String, Tensor)>> {
    let prefix = model.prefix();
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| Error::msg("VarMap lock poisoned"))?;
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    for (k, v) in vars.iter() {
        let key = if prefix.is_empty() {
            Some(k.as_str())
        } else {
            k.strip_prefix(prefix).and_then(|r| r.strip_prefix('.'))
        };
        if let Some(key) = key {
            out.insert(key.to_string(), v.as_tensor().detach());
        }
    }
    drop(vars);
    for (k, t) in model.bn_buffers()? {
        out.insert(k, t);
    }
    Ok(out.into_iter().collect())
}

/// Writes `tensors` as safetensors atomically: a temporary file in the same directory, fsync, rename.
pub fn save_safetensors_atomic(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "weights".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let map: HashMap<String, Tensor> = tensors.iter().cloned().collect();
    let res = (|| -> Result<()> {
        candle_core::safetensors::save(&map, &tmp).map_err(|e| Error::file(&tmp, e.to_string()))?;
        let f = std::fs::File::open(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Pretrained encoder weights from `path` as canonical `transformer.*` tensors for `cfg`:
/// `.npz` → SPEC §5.5; safetensors with timm keys (`pos_embed`) → SPEC §5.6; other safetensors → canonical keys
/// (only `transformer.*` tensors are used; each is shape-checked against `cfg`).
pub fn load_pretrained_encoder(
    path: &Path,
    cfg: &TransUnetConfig,
) -> Result<BTreeMap<String, Tensor>> {
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if ext == "npz" {
        return Ok(crate::convert::npz::convert_npz(path, cfg)?.tensors);
    }
    let is_timm = {
        use crate::convert::npz::TensorSource;
        let src = crate::convert::timm::SafetensorsSource::open(path)?;
        src.names().iter().any(|k| k == "pos_embed")
    };
    if is_timm {
        return Ok(crate::convert::timm::convert_timm(path, cfg)?.tensors);
    }
    let all = read_checkpoint(path, "")?;
    let expected = crate::convert::npz::encoder_shapes(cfg);
    let mut out = BTreeMap::new();
    let mut problems = Vec::new();
    for (key, shape) in &expected {
        match all.get(key) {
            Some(t) if t.dims() == shape.as_slice() => {
                out.insert(key.clone(), t.to_dtype(DType::F32)?);
            }
            Some(t) => problems.push(format!(
                "`{key}` has shape {:?}, expected {:?}",
                t.dims(),
                shape
            )),
            None => problems.push(format!("missing `{key}`")),
        }
    }
    let unexpected: Vec<&String> = all
        .keys()
        .filter(|k| k.starts_with("transformer.") && !expected.contains_key(*k))
        .collect();
    if !unexpected.is_empty() {
        problems.push(format!(
            "unexpected encoder keys: {}",
            key_list(&unexpected, 12)
        ));
    }
    if !problems.is_empty() {
        return Err(Error::file(path, problems.join("; ")));
    }
    Ok(out)
}

/// A trainable TransUNet over `varmap` (parameters under `prefix`: "" for Phase 1, "transunet" for Phase 3), with
/// the explicit random initialisers of SPEC §5.4 drawn from the project RNG (`seed`, per-variable streams, see
/// [`super::layers::SeededVarMap`]; variables already in `varmap` are kept), then — when `pretrained` is given — the encoder overwritten from an
/// `.npz`, timm or canonical file ([`load_pretrained_encoder`]); the decoder and head stay random.
pub fn build_trainable(
    cfg: &TransUnetConfig,
    varmap: &VarMap,
    prefix: &str,
    dtype: DType,
    device: &Device,
    seed: u64,
    pretrained: Option<&Path>,
) -> Result<TransUnet> {
    let vb = super::layers::seeded_varbuilder(varmap, seed, dtype, device);
    let vb = if prefix.is_empty() { vb } else { vb.pp(prefix) };
    let model = TransUnet::new(cfg, vb)?;
    if let Some(p) = pretrained {
        let enc: HashMap<String, Tensor> = load_pretrained_encoder(p, cfg)?.into_iter().collect();
        load_into_varmap(&model, varmap, &enc, LoadMode::Encoder)
            .map_err(|e| Error::file(p, e.to_string()))?;
    }
    Ok(model)
}
