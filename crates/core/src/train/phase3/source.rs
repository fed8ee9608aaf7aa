//! Initial weights of Phase 3: the Phase 1 TransUNet and every accepted `--sam-checkpoint` form, and the refiner
//! settings resolved from the flags, the Phase 2 `best_sam.json` and the preset (SPEC §11.4 table, §11.4.1 step 2).
use super::Phase3Options;
use crate::config::RefinerConfig;
use crate::models::sam::weights::{load_sam_weights, random_weights, SamFormat, SamWeights};
use crate::models::transunet::read_checkpoint;
use crate::refiner::{MaskPromptStyle, SamRefinerSettings};
use crate::train::checkpoint::sha256_file;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The initial SAM weights of a run and what is known about them.
pub struct SamSource {
    pub weights: SamWeights,
    /// SHA-256 of the file (or `random-seed<k>`); also the embedding-cache fingerprint base.
    pub weights_id: String,
    /// `sam`, `medsam` or `random` (resolves `sam_normalization = auto`).
    pub provenance: String,
    /// The Phase 2 `best_sam.json` next to the file, if any.
    pub phase2_sidecar: Option<serde_json::Value>,
}

/// Loads `--sam-checkpoint`: `random`, a Phase 2 `best_sam.safetensors` (+ `best_sam.json`), a converted SAM/MedSAM
/// safetensors, an original `.pth`, a Phase 2/3 checkpoint (`sam.*` keys) or an HF file — any §6.6 form, strictly
/// checked against `cfg`.
pub fn load_sam_source(
    spec: &str,
    cfg: &crate::config::SamConfig,
    seed: u64,
    device: &Device,
) -> Result<SamSource> {
    if spec == "random" {
        return Ok(SamSource {
            weights: SamWeights {
                tensors: random_weights(cfg, seed, device)?,
                format: SamFormat::Original,
            },
            weights_id: format!("random-seed{seed}"),
            provenance: "random".into(),
            phase2_sidecar: None,
        });
    }
    if spec.is_empty() {
        return Err(Error::Arg(
            "--sam-checkpoint is required (Phase 2 best_sam.safetensors, a SAM/MedSAM checkpoint, or `random`)"
                .into(),
        ));
    }
    let p = Path::new(spec);
    let weights = load_sam_weights(p, Some(cfg), device)?;
    let sidecar = crate::eval::model::read_sidecar_json(p)?;
    let provenance = sidecar
        .as_ref()
        .and_then(|v| v["provenance"].as_str())
        .map(|s| s.to_string())
        .unwrap_or_else(|| {
            if spec.to_ascii_lowercase().contains("medsam") {
                "medsam".into()
            } else {
                "sam".into()
            }
        });
    let phase2_sidecar = sidecar.filter(|v| v.get("mask_prompt_style").is_some());
    Ok(SamSource {
        weights,
        weights_id: sha256_file(p)?,
        provenance,
        phase2_sidecar,
    })
}

/// The refiner configuration of the run (§11.4 table): flags > Phase 2 `best_sam.json` > preset, with the style
/// check; `sam_normalization` is stored resolved (`sam`/`unit`) so evaluation needs no provenance.
pub fn resolve_refiner(
    o: &Phase3Options,
    preset: &RefinerConfig,
    src: &SamSource,
) -> Result<RefinerConfig> {
    let mut r = preset.clone();
    let p2 = src.phase2_sidecar.as_ref();
    if let Some(v) = p2 {
        if let Some(s) = v["mask_prompt_style"].as_str() {
            r.mask_prompt_style = s.to_string();
        }
        if let Some(s) = v["normalization"].as_str() {
            r.sam_normalization = s.to_string();
        }
        let pr = &v["prompts"];
        for (key, field) in [
            ("point", &mut r.use_point_prompt),
            ("box", &mut r.use_box_prompt),
            ("mask", &mut r.use_mask_prompt),
            ("negative_point", &mut r.add_negative_point),
        ] {
            if let Some(b) = pr[key].as_bool() {
                *field = b;
            }
        }
    } else {
        r.sam_normalization = "auto".into();
    }
    if let Some(st) = &o.mask_prompt_style {
        let _: MaskPromptStyle = st.parse()?;
        if let Some(trained) = p2.and_then(|v| v["mask_prompt_style"].as_str()) {
            if trained != st && !o.allow_style_mismatch {
                return Err(Error::Arg(format!(
                    "--mask-prompt-style {st} differs from the Phase 2 model's `{trained}` ({}); pass --allow-style-mismatch to use it anyway",
                    o.sam_checkpoint
                )));
            }
        }
        r.mask_prompt_style = st.clone();
    }
    if let Some(n) = &o.sam_normalization {
        r.sam_normalization = n.clone();
    }
    r.sharpen_coarse_mask = o.sharpen_coarse_mask;
    r.sharpen_temperature = o.sharpen_temperature;
    r.use_roi_crop = o.use_roi_crop;
    r.roi_expand_ratio = o.roi_expand_ratio;
    let resolved = SamRefinerSettings::from_config(&r, Some(&src.provenance))?;
    r.sam_normalization = resolved.normalization.as_str().to_string();
    Ok(r)
}

pub(crate) fn strip_prefix_map(
    m: &HashMap<String, Tensor>,
    prefix: &str,
) -> HashMap<String, Tensor> {
    m.iter()
        .filter_map(|(k, v)| k.strip_prefix(prefix).map(|s| (s.to_string(), v.clone())))
        .collect()
}

/// The Phase 1 TransUNet tensors (a Phase 3 checkpoint is accepted too: its `transunet.*` part), checked against the
/// run's image size through the Phase 1 sidecar when present.
pub(crate) fn load_transunet(path: &Path, img_size: usize) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        return Err(Error::file(
            path,
            "TransUNet checkpoint not found (train Phase 1 first, or pass --transunet-checkpoint)",
        ));
    }
    if let Some(v) = crate::eval::model::read_sidecar_json(path)? {
        if let Some(s) = v["config"]["model"]["transunet"]["img_size"].as_u64() {
            if s as usize != img_size {
                return Err(Error::file(
                    path,
                    format!("was trained at img_size {s}, this run uses --img-size {img_size}"),
                ));
            }
        }
    }
    let all = read_checkpoint(path, "")?;
    if all.keys().any(|k| k.starts_with("transunet.")) {
        read_checkpoint(path, "transunet")
    } else {
        Ok(all)
    }
}
