//! SAM checkpoint conversion to canonical safetensors (SPEC §6.6, §13.5): original `.pth` (plain state dict,
//! `{'model': ...}` container, `sam.` prefix) or original-name `.safetensors` → §6.5 names, strictly checked,
//! written atomically with a sidecar JSON.
use crate::models::sam::weights::{
    expected_params, infer_config, load_sam_weights, save_safetensors_atomic, SamWeights,
};
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Version of the original-format normalisation written to sidecars.
pub const SAM_MAPPING_VERSION: &str = "sam-orig-1";

/// SHA-256 (hex) of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Sidecar path of a converted file: `Y.safetensors` → `Y.json`.
pub fn sidecar_path(output: &Path) -> PathBuf {
    output.with_extension("json")
}

/// Writes `w` in §6.5 order (f32) to `output` atomically, and the sidecar
/// `{source_path, source_sha256, format, provenance, mapping_version, tensor_count}`.
pub fn write_canonical(
    w: &SamWeights,
    input: &Path,
    output: &Path,
    format: &str,
    mapping_version: &str,
    provenance: Option<&str>,
) -> Result<usize> {
    if let Some(p) = provenance {
        if p != "sam" && p != "medsam" {
            return Err(Error::Arg(format!(
                "provenance must be `sam` or `medsam`, got `{p}`"
            )));
        }
    }
    let shapes: HashMap<String, Vec<usize>> = w
        .tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    let cfg = infer_config(&shapes, &input.display().to_string())?;
    let ordered: Vec<_> = expected_params(&cfg)
        .into_iter()
        .filter_map(|(k, _)| w.tensors.get(&k).map(|t| (k, t.clone())))
        .collect();
    save_safetensors_atomic(&ordered, output)?;
    let side = serde_json::json!({
        "source_path": input.display().to_string(),
        "source_sha256": sha256_file(input)?,
        "format": format,
        "provenance": provenance.unwrap_or("sam"),
        "mapping_version": mapping_version,
        "tensor_count": ordered.len(),
    });
    let sp = sidecar_path(output);
    let text = serde_json::to_string_pretty(&side).map_err(|e| Error::msg(e.to_string()))?;
    let tmp = sp.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &sp).map_err(|e| Error::io(&sp, e))?;
    Ok(ordered.len())
}

/// `.pth` (or original-name `.safetensors`) SAM checkpoint → canonical safetensors with a sidecar (provenance `sam`).
/// Returns the number of tensors written.
pub fn sam_pth_to_safetensors(input: &Path, output: &Path) -> Result<usize> {
    sam_pth_to_safetensors_with(input, output, None)
}

/// As [`sam_pth_to_safetensors`] with an explicit provenance (`sam` or `medsam`).
pub fn sam_pth_to_safetensors_with(
    input: &Path,
    output: &Path,
    provenance: Option<&str>,
) -> Result<usize> {
    let w = load_sam_weights(input, None, &candle_core::Device::Cpu)?;
    let fmt = if input.extension().and_then(|e| e.to_str()) == Some("safetensors") {
        "sam-safetensors"
    } else {
        "sam-pth"
    };
    write_canonical(&w, input, output, fmt, SAM_MAPPING_VERSION, provenance)
}
