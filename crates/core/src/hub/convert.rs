//! Conversion of a fetched file to canonical safetensors, dispatched by [`WeightFormat`] (SPEC §13.5, §13.6).
//!
//! Every converter writes `output` (canonical keys, f32) and the sidecar `output` with extension `.json`:
//! `{source_path, source_sha256, format, provenance, mapping_version, tensor_count}` (§13.5).
use super::manifest::write_atomic;
use super::source::sha256_file;
use super::{Provenance, WeightFormat};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Top-level prefixes of original segment-anything parameter names (§6.5).
pub const SAM_PREFIXES: [&str; 3] = ["image_encoder.", "prompt_encoder.", "mask_decoder."];

/// Mapping version written to sidecars of original-name SAM conversions (same as `convert --from sam-safetensors`).
const SAM_ORIG_MAPPING_VERSION: &str = "sam-orig-1";

/// Result of one conversion.
#[derive(Debug, Clone)]
pub struct ConvertOutcome {
    pub tensor_count: usize,
    pub sidecar: PathBuf,
}

/// Converts `input` of `format` to canonical safetensors at `output` (plus sidecar).
pub fn convert_weights(
    format: WeightFormat,
    input: &Path,
    output: &Path,
    provenance: Provenance,
) -> Result<ConvertOutcome> {
    match format {
        WeightFormat::SamOriginalSafetensors => sam_original_safetensors_to_canonical(input, output, provenance),
        WeightFormat::SamPth | WeightFormat::SamHf | WeightFormat::TimmR50 | WeightFormat::Npz => {
            Err(Error::Weights(format!(
                "conversion of {format} is not available in this build yet (source file kept at {})",
                input.display()
            )))
        }
    }
}

/// Sidecar of a converted file: `Y.safetensors` → `Y.json`.
fn sidecar_path(output: &Path) -> PathBuf {
    output.with_extension("json")
}

fn write_sidecar(
    input: &Path,
    output: &Path,
    format: WeightFormat,
    provenance: Provenance,
    mapping_version: &str,
    tensor_count: usize,
) -> Result<PathBuf> {
    let side = serde_json::json!({
        "source_path": input.display().to_string(),
        "source_sha256": sha256_file(input)?,
        "format": format.name(),
        "provenance": provenance.as_str(),
        "mapping_version": mapping_version,
        "tensor_count": tensor_count,
    });
    let text = serde_json::to_string_pretty(&side).map_err(|e| Error::msg(e.to_string()))?;
    let sp = sidecar_path(output);
    write_atomic(&sp, format!("{text}\n").as_bytes())?;
    Ok(sp)
}

/// Writes `tensors` as safetensors to `output` atomically (temporary file + rename).
fn save_safetensors_atomic(tensors: &BTreeMap<String, Tensor>, output: &Path) -> Result<()> {
    let dir = match output.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let name = output
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "weights".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let map: HashMap<&str, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let res = candle_core::safetensors::save(&map, &tmp)
        .map_err(|e| Error::file(&tmp, format!("writing safetensors: {e}")))
        .and_then(|_| std::fs::rename(&tmp, output).map_err(|e| Error::io(output, e)));
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Normalises original-name SAM tensors (§6.6.1): if any key starts with `sam.`, keeps only those and strips the
/// prefix; drops `pixel_mean`/`pixel_std`; every remaining key must start with `image_encoder.`, `prompt_encoder.`
/// or `mask_decoder.`, and each of the three parts must be present. Tensors become f32.
pub(crate) fn normalise_sam_original(
    raw: HashMap<String, Tensor>,
    source: &Path,
) -> Result<BTreeMap<String, Tensor>> {
    let has_sam_prefix = raw.keys().any(|k| k.starts_with("sam."));
    let mut out = BTreeMap::new();
    let mut bad = Vec::new();
    for (k, t) in raw {
        let key = if has_sam_prefix {
            match k.strip_prefix("sam.") {
                Some(s) => s.to_string(),
                None => continue,
            }
        } else {
            k
        };
        if key == "pixel_mean" || key == "pixel_std" {
            continue;
        }
        if !SAM_PREFIXES.iter().any(|p| key.starts_with(p)) {
            bad.push(key);
            continue;
        }
        let t = if t.dtype() == DType::F32 {
            t
        } else {
            t.to_dtype(DType::F32)?
        };
        out.insert(key, t);
    }
    if !bad.is_empty() {
        bad.sort();
        let hint = if bad.iter().any(|k| k.starts_with("vision_encoder.")) {
            " (this looks like an HF-transformers SamModel file: use the `sam-vit-b-hf` alias or `convert --from hf-sam`)"
        } else {
            ""
        };
        let shown: Vec<_> = bad.iter().take(5).map(|s| format!("`{s}`")).collect();
        return Err(Error::file(
            source,
            format!(
                "not an original-name SAM checkpoint: {} tensor(s) outside image_encoder./prompt_encoder./mask_decoder., \
                 e.g. {}{hint}",
                bad.len(),
                shown.join(", ")
            ),
        ));
    }
    for p in SAM_PREFIXES {
        if !out.keys().any(|k| k.starts_with(p)) {
            return Err(Error::file(
                source,
                format!("not a SAM checkpoint: no `{p}*` tensors"),
            ));
        }
    }
    Ok(out)
}

/// Original-name SAM safetensors (`sam-vit-b`) → canonical f32 safetensors + sidecar. Returns the tensor count.
pub fn sam_original_safetensors_to_canonical(
    input: &Path,
    output: &Path,
    provenance: Provenance,
) -> Result<ConvertOutcome> {
    let raw = candle_core::safetensors::load(input, &Device::Cpu)
        .map_err(|e| Error::file(input, format!("not a readable safetensors file: {e}")))?;
    let tensors = normalise_sam_original(raw, input)?;
    save_safetensors_atomic(&tensors, output)?;
    let sidecar = write_sidecar(
        input,
        output,
        WeightFormat::SamOriginalSafetensors,
        provenance,
        SAM_ORIG_MAPPING_VERSION,
        tensors.len(),
    )?;
    Ok(ConvertOutcome {
        tensor_count: tensors.len(),
        sidecar,
    })
}
