//! Initial weights of Phase 3: the Phase 1 TransUNet and every accepted `--sam-checkpoint` form, and the refiner
//! settings resolved from the flags, the Phase 2 `best_sam.json` and the preset (SPEC §11.4 table, §11.4.1 step 2).
use super::Phase3Options;
use crate::config::RefinerConfig;
use crate::models::sam::lora::{is_lora_key, merge_adapter_tensors, LoraConfig};
use crate::models::sam::weights::{
    load_sam_weights_with_adapters, random_weights, SamFormat, SamWeights,
};
use crate::models::transunet::read_checkpoint;
use crate::refiner::Gate;
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
    /// `--lora-alpha` of the run that wrote LoRA adapters into the file (a Phase 2/3 LoRA training checkpoint,
    /// whose adapters `weights` then holds as `…lora_a`/`…lora_b`), from its sidecar.
    pub lora_alpha: Option<f64>,
}

impl SamSource {
    /// Whether the weights hold LoRA adapters (SPEC §6.8).
    pub fn has_adapters(&self) -> bool {
        self.weights.tensors.keys().any(|k| is_lora_key(k))
    }

    /// Reconciles stored LoRA adapters with the run's LoRA setting: with `lora` they are carried over (same α
    /// required; rank and targets are checked when the model is built); without it they are merged into the encoder
    /// weights with the recorded α. Returns a line for the log, `None` when the file has no adapters.
    pub fn reconcile_adapters(&mut self, lora: Option<&LoraConfig>) -> Result<Option<String>> {
        if !self.has_adapters() {
            return Ok(None);
        }
        let n = self
            .weights
            .tensors
            .keys()
            .filter(|k| k.ends_with(".lora_a"))
            .count();
        match lora {
            Some(l) => {
                if let Some(a) = self.lora_alpha {
                    if a != l.alpha {
                        return Err(Error::Arg(format!(
                            "--lora-alpha {} differs from the α {a} the LoRA adapters of the SAM checkpoint were trained with",
                            l.alpha
                        )));
                    }
                }
                Ok(Some(format!(
                    "LoRA: {n} adapters carried over from the SAM checkpoint"
                )))
            }
            None => {
                let a = self.lora_alpha.ok_or_else(|| {
                    Error::Arg(
                        "the SAM checkpoint holds LoRA adapters but its sidecar records no lora_alpha: pass --use-lora \
                         (with the training run's --lora-alpha) or use its best_sam.safetensors"
                            .into(),
                    )
                })?;
                merge_adapter_tensors(&mut self.weights.tensors, a)?;
                Ok(Some(format!(
                    "LoRA: {n} adapters of the SAM checkpoint merged into the encoder (α {a}); pass --use-lora to keep training them"
                )))
            }
        }
    }
}

/// Loads `--sam-checkpoint`: `random`, a Phase 2 `best_sam.safetensors` (+ `best_sam.json`), a converted SAM/MedSAM
/// safetensors, an original `.pth`, a Phase 2/3 checkpoint (`sam.*` keys, LoRA adapters included: see
/// [`SamSource::reconcile_adapters`]) or an HF file — any §6.6 form, strictly checked against `cfg`.
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
            lora_alpha: None,
        });
    }
    if spec.is_empty() {
        return Err(Error::Arg(
            "--sam-checkpoint is required (Phase 2 best_sam.safetensors, a SAM/MedSAM checkpoint, or `random`)"
                .into(),
        ));
    }
    let p = Path::new(spec);
    let weights = load_sam_weights_with_adapters(p, Some(cfg), device)?;
    let sidecar = crate::eval::model::read_sidecar_json(p)?;
    let lora_alpha = sidecar
        .as_ref()
        .and_then(crate::eval::model::sidecar_lora_alpha);
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
        lora_alpha,
    })
}

/// The refiner configuration of the run (§11.4 table): flags > Phase 2 `best_sam.json` > preset, with the style
/// check; gating (§7.8) comes from the flags only; `sam_normalization` is stored resolved (`sam`/`unit`) so evaluation needs no provenance.
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
    r.use_gated_refinement = o.use_gated_refinement;
    r.gate_gamma = o.gate_gamma;
    r.gate_min = o.gate_min;
    r.gate_max = o.gate_max;
    Gate::from_config(&r)?;
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
