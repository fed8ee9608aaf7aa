//! Frozen models for evaluation and inference (SPEC §13.1–§13.3): the model sources, their loading, and one
//! prediction call that returns coarse and refined **probabilities** at `S` (fold ensembles average probabilities,
//! never logits).
//!
//! Sources:
//! * [`ModelSource::TransUnetOnly`]: a Phase 1 TransUNet file (canonical §5.3 keys) — coarse path only;
//! * [`ModelSource::Pair`]: a Phase 1 TransUNet + a SAM file (Phase 2 `best_sam.safetensors` or any pretrained
//!   SAM/MedSAM checkpoint that `load_sam_weights` reads);
//! * [`ModelSource::Phase3`]: one end-to-end file with keys `transunet.*` + `sam.*` (refiner settings from the JSON
//!   sidecar `config.refiner`, model geometry from `config.model`, when present);
//! * [`ModelSource::Ensemble`]: a path pattern with `{k}` and a fold list; each member file is a Phase 3 file
//!   (detected by its `transunet.` keys) or a Phase 1 file (combined with the shared `sam` when given).
use crate::config::{Config, ModelConfig, RefinerConfig};
use crate::models::sam::{load_sam_weights, Sam};
use crate::models::transunet::TransUnet;
use crate::refiner::{SamRefiner, SamRefinerSettings, UltraRefiner};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

/// Where the weights come from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// Phase 1 TransUNet alone (`--transunet-only`).
    TransUnetOnly { transunet: PathBuf },
    /// Phase 1 TransUNet + Phase 2 (or pretrained) SAM.
    Pair { transunet: PathBuf, sam: PathBuf },
    /// Phase 3 end-to-end checkpoint (`transunet.*` + `sam.*`).
    Phase3 { checkpoint: PathBuf },
    /// Fold ensemble: `pattern` contains `{k}`; members are Phase 3 files, or Phase 1 files combined with `sam`
    /// (without `sam`: coarse only). `transunet_only` ignores the SAM part of Phase 3 members.
    Ensemble {
        pattern: String,
        folds: Vec<usize>,
        sam: Option<PathBuf>,
        transunet_only: bool,
    },
}

impl ModelSource {
    /// Short human description for headers and result files.
    pub fn describe(&self) -> String {
        match self {
            ModelSource::TransUnetOnly { transunet } => {
                format!("transunet-only {}", transunet.display())
            }
            ModelSource::Pair { transunet, sam } => {
                format!("transunet {} + sam {}", transunet.display(), sam.display())
            }
            ModelSource::Phase3 { checkpoint } => format!("phase3 {}", checkpoint.display()),
            ModelSource::Ensemble { pattern, folds, .. } => {
                format!("ensemble {pattern} folds {folds:?}")
            }
        }
    }
}

/// Substitutes `{k}` in an ensemble pattern.
pub fn ensemble_path(pattern: &str, k: usize) -> Result<PathBuf> {
    if !pattern.contains("{k}") {
        return Err(Error::Arg(format!(
            "--ensemble pattern `{pattern}` has no `{{k}}` placeholder for the fold"
        )));
    }
    Ok(PathBuf::from(pattern.replace("{k}", &k.to_string())))
}

/// Parses `0,1,2,3,4` (also `0-4`).
pub fn parse_folds(s: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: usize = a
                .trim()
                .parse()
                .map_err(|_| Error::Arg(format!("--folds: `{part}` is not a range like 0-4")))?;
            let b: usize = b
                .trim()
                .parse()
                .map_err(|_| Error::Arg(format!("--folds: `{part}` is not a range like 0-4")))?;
            out.extend(a..=b);
        } else {
            out.push(
                part.parse()
                    .map_err(|_| Error::Arg(format!("--folds: `{part}` is not a fold number")))?,
            );
        }
    }
    if out.is_empty() {
        return Err(Error::Arg(
            "--folds is empty (e.g. --folds 0,1,2,3,4)".into(),
        ));
    }
    Ok(out)
}

/// One loaded model.
#[derive(Debug)]
pub enum Member {
    Coarse(TransUnet),
    Full(Box<UltraRefiner>),
}

/// Coarse and refined probabilities of one batch at `S`.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// `(B, S, S)` coarse foreground probability `P` (ensembles: mean over members).
    pub coarse: Tensor,
    /// `(B, S, S)` refined probability `σ(refined_S)` (ensembles: mean over the members that refine); `None` when no
    /// member has a refiner.
    pub refined: Option<Tensor>,
}

/// A frozen model (or fold ensemble) ready for prediction.
#[derive(Debug)]
pub struct EvalModel {
    pub members: Vec<Member>,
    /// TransUNet input size `S`.
    pub img_size: usize,
    /// The model configuration used (geometry).
    pub model_config: ModelConfig,
    /// Refiner settings in effect (from the sidecar or the configuration), if any member refines.
    pub refiner: Option<RefinerConfig>,
    pub source: ModelSource,
}

/// The JSON sidecar next to a checkpoint (`X.safetensors` → `X.json`), loosely parsed, if present.
pub fn read_sidecar_json(path: &Path) -> Result<Option<serde_json::Value>> {
    let (_, js) = crate::train::checkpoint::resolve_checkpoint(path);
    if !js.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&js).map_err(|e| Error::io(&js, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::file(&js, format!("invalid JSON sidecar: {e}")))?;
    Ok(Some(v))
}

/// Refiner settings and model geometry recorded in a sidecar (`config.refiner`, `config.model`; also accepted at the
/// top level and under `extra`).
pub fn sidecar_settings(
    v: &serde_json::Value,
    path: &Path,
) -> Result<(Option<RefinerConfig>, Option<ModelConfig>)> {
    let pick = |key: &str| -> Option<serde_json::Value> {
        v.get("config")
            .and_then(|c| c.get(key))
            .or_else(|| v.get(key))
            .or_else(|| v.get("extra").and_then(|e| e.get(key)))
            .cloned()
    };
    let refiner = match pick("refiner") {
        Some(r) if !r.is_null() => Some(
            serde_json::from_value::<RefinerConfig>(r)
                .map_err(|e| Error::file(path, format!("sidecar `refiner` settings: {e}")))?,
        ),
        _ => None,
    };
    let model = match pick("model") {
        Some(m) if !m.is_null() => Some(
            serde_json::from_value::<ModelConfig>(m)
                .map_err(|e| Error::file(path, format!("sidecar `model` configuration: {e}")))?,
        ),
        _ => None,
    };
    Ok((refiner, model))
}

fn file_has_prefix(path: &Path, prefix: &str) -> Result<bool> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::file(path, format!("not a safetensors file: {e}")))?;
    let p = format!("{prefix}.");
    let found = st.names().iter().any(|k| k.starts_with(&p));
    Ok(found)
}

fn load_sam(cfg: &ModelConfig, path: &Path, device: &Device) -> Result<Sam> {
    let w = load_sam_weights(path, Some(&cfg.sam), device)
        .map_err(|e| Error::file(path, e.to_string()))?;
    let vb = w.var_builder(DType::F32, device);
    // Frozen image encoder in bf16 on CUDA, f32 on CPU (SPEC §15); its output is f32 either way.
    let vb_enc = w.var_builder(crate::device::encoder_dtype(None, device)?, device);
    Sam::new_parts(&cfg.sam, vb_enc, vb.clone(), vb, None)
}

fn check_file(path: &Path, what: &str) -> Result<()> {
    if !path.is_file() {
        return Err(Error::file(path, format!("{what} not found")));
    }
    Ok(())
}

fn full(tu: TransUnet, sam: Sam, refiner: &RefinerConfig) -> Result<Member> {
    let settings = SamRefinerSettings::from_config(refiner, None)?;
    Ok(Member::Full(Box::new(UltraRefiner::new(
        tu,
        SamRefiner::new(sam, settings),
    ))))
}

/// Loads a Phase 3 file: `transunet.*` + (unless `coarse_only`) `sam.*`. Returns the member and the sidecar's
/// refiner settings (or `default_refiner`).
fn load_phase3(
    cfg: &ModelConfig,
    path: &Path,
    default_refiner: &RefinerConfig,
    coarse_only: bool,
    device: &Device,
) -> Result<(Member, RefinerConfig)> {
    check_file(path, "Phase 3 checkpoint")?;
    let (sc_ref, _) = match read_sidecar_json(path)? {
        Some(v) => sidecar_settings(&v, path)?,
        None => (None, None),
    };
    let refiner = sc_ref.unwrap_or_else(|| default_refiner.clone());
    let tu = TransUnet::from_checkpoint(&cfg.transunet, path, "transunet", DType::F32, device)?;
    if coarse_only {
        return Ok((Member::Coarse(tu), refiner));
    }
    if !file_has_prefix(path, "sam")? {
        return Err(Error::file(
            path,
            "no `sam.*` tensors: not a Phase 3 checkpoint (use --transunet-only?)",
        ));
    }
    let sam = load_sam(cfg, path, device)?;
    Ok((full(tu, sam, &refiner)?, refiner))
}

impl EvalModel {
    /// Loads `source` with the geometry of `config` (a Phase 3 sidecar's `config.model` takes precedence) onto
    /// `device` in f32 (frozen plain tensors).
    pub fn load(source: &ModelSource, config: &Config, device: &Device) -> Result<Self> {
        let mut cfg = config.model.clone();
        let default_refiner = config.refiner.clone();
        let mut members = Vec::new();
        let mut refiner = None;
        match source {
            ModelSource::TransUnetOnly { transunet } => {
                check_file(transunet, "TransUNet checkpoint")?;
                members.push(Member::Coarse(TransUnet::from_checkpoint(
                    &cfg.transunet,
                    transunet,
                    "",
                    DType::F32,
                    device,
                )?));
            }
            ModelSource::Pair { transunet, sam } => {
                check_file(transunet, "TransUNet checkpoint")?;
                check_file(sam, "SAM checkpoint")?;
                // A Phase 2 `best_sam.json` next to the SAM file carries the refiner settings used in training.
                let r = match read_sidecar_json(sam)? {
                    Some(v) => sidecar_settings(&v, sam)?.0,
                    None => None,
                }
                .unwrap_or_else(|| default_refiner.clone());
                let tu =
                    TransUnet::from_checkpoint(&cfg.transunet, transunet, "", DType::F32, device)?;
                let s = load_sam(&cfg, sam, device)?;
                members.push(full(tu, s, &r)?);
                refiner = Some(r);
            }
            ModelSource::Phase3 { checkpoint } => {
                if let Some(v) = read_sidecar_json(checkpoint)? {
                    if let (_, Some(m)) = sidecar_settings(&v, checkpoint)? {
                        cfg = m;
                    }
                }
                let (m, r) = load_phase3(&cfg, checkpoint, &default_refiner, false, device)?;
                members.push(m);
                refiner = Some(r);
            }
            ModelSource::Ensemble {
                pattern,
                folds,
                sam,
                transunet_only,
            } => {
                if folds.is_empty() {
                    return Err(Error::Arg(
                        "--ensemble needs --folds (e.g. 0,1,2,3,4)".into(),
                    ));
                }
                let shared_sam = match (sam, transunet_only) {
                    (Some(p), false) => {
                        check_file(p, "SAM checkpoint")?;
                        Some(p.clone())
                    }
                    _ => None,
                };
                for &k in folds {
                    let p = ensemble_path(pattern, k)?;
                    check_file(&p, &format!("ensemble member (fold {k})"))?;
                    if file_has_prefix(&p, "transunet")? {
                        let (m, r) =
                            load_phase3(&cfg, &p, &default_refiner, *transunet_only, device)?;
                        if !transunet_only {
                            refiner.get_or_insert(r);
                        }
                        members.push(m);
                    } else {
                        let tu =
                            TransUnet::from_checkpoint(&cfg.transunet, &p, "", DType::F32, device)?;
                        match &shared_sam {
                            Some(sp) => {
                                let r = default_refiner.clone();
                                let s = load_sam(&cfg, sp, device)?;
                                members.push(full(tu, s, &r)?);
                                refiner.get_or_insert(r);
                            }
                            None => members.push(Member::Coarse(tu)),
                        }
                    }
                }
            }
        }
        Ok(EvalModel {
            members,
            img_size: cfg.transunet.img_size,
            model_config: cfg,
            refiner,
            source: source.clone(),
        })
    }

    /// Whether the model produces refined masks.
    pub fn refines(&self) -> bool {
        self.members.iter().any(|m| matches!(m, Member::Full(_)))
    }

    /// Coarse (and refined) probabilities at `S` for `image_s (B, 1, S, S)` in `[0, 1]` on the model's device.
    /// `coarse_only` skips the refiner even when present (`--mode transunet`).
    pub fn predict(&self, image_s: &Tensor, coarse_only: bool) -> Result<Prediction> {
        let mut coarse_sum: Option<Tensor> = None;
        let mut refined_sum: Option<Tensor> = None;
        let mut n_ref = 0usize;
        for m in &self.members {
            let (c, r) = match m {
                Member::Coarse(tu) => (coarse_prob(tu, image_s)?, None),
                Member::Full(u) if coarse_only => (coarse_prob(&u.transunet, image_s)?, None),
                Member::Full(u) => {
                    let out = u.forward(image_s)?;
                    let r = crate::nn::sigmoid(&out.refined_logits_s)?;
                    (out.coarse_prob_raw, Some(r))
                }
            };
            let c = c.detach();
            coarse_sum = Some(match coarse_sum {
                None => c,
                Some(s) => (s + c)?,
            });
            if let Some(r) = r {
                n_ref += 1;
                let r = r.detach();
                refined_sum = Some(match refined_sum {
                    None => r,
                    Some(s) => (s + r)?,
                });
            }
        }
        let n = self.members.len();
        let coarse = coarse_sum.ok_or_else(|| Error::msg("model has no members"))?;
        let coarse = if n > 1 { (coarse / n as f64)? } else { coarse };
        let refined = match refined_sum {
            Some(r) if n_ref > 1 => Some((r / n_ref as f64)?),
            r => r,
        };
        Ok(Prediction { coarse, refined })
    }
}

/// `P = softmax(logits)[:, 1]` of a TransUNet in eval mode, `(B, S, S)`.
pub fn coarse_prob(tu: &TransUnet, image_s: &Tensor) -> Result<Tensor> {
    let logits = tu.forward(image_s)?;
    Ok(crate::nn::softmax(&logits, 1)?
        .narrow(1, 1, 1)?
        .squeeze(1)?)
}
