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
use crate::models::sam::lora::{is_lora_key, merge_adapter_tensors};
use crate::models::sam::weights::load_sam_weights_with_adapters;
use crate::models::sam::Sam;
use crate::models::transunet::TransUnet;
use crate::refiner::prompts::sharpen;
use crate::refiner::ultra::ForwardOptions;
use crate::refiner::{Gate, SamRefiner, SamRefinerSettings, UltraRefiner};
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

/// `--encoder-dtype`: the dtype of the frozen SAM image encoder (SPEC §15).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncoderDtype {
    /// bf16 on CUDA, f32 on CPU.
    #[default]
    Auto,
    F32,
    Bf16,
    F16,
}

impl std::str::FromStr for EncoderDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(EncoderDtype::Auto),
            "f32" | "fp32" | "float32" => Ok(EncoderDtype::F32),
            "bf16" | "bfloat16" => Ok(EncoderDtype::Bf16),
            "f16" | "fp16" | "float16" => Ok(EncoderDtype::F16),
            _ => Err(Error::Arg(format!(
                "--encoder-dtype `{s}` is not one of auto, f32, bf16, f16"
            ))),
        }
    }
}

impl EncoderDtype {
    /// The dtype on `device`; half precision on the CPU is an error (candle has no bf16/f16 convolution there).
    pub fn resolve(&self, device: &Device) -> Result<DType> {
        let d = match self {
            EncoderDtype::Auto if device.is_cuda() => DType::BF16,
            EncoderDtype::Auto | EncoderDtype::F32 => DType::F32,
            EncoderDtype::Bf16 => DType::BF16,
            EncoderDtype::F16 => DType::F16,
        };
        if d != DType::F32 && device.is_cpu() {
            return Err(Error::Arg(format!(
                "--encoder-dtype {} needs a CUDA device (candle has no half-precision convolution on the CPU); \
                 use f32 or auto",
                d.as_str()
            )));
        }
        Ok(d)
    }
}

/// `--ensemble-mode` (SPEC §13.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EnsembleMode {
    /// Every fold runs the full pipeline; coarse and refined probabilities are averaged separately.
    #[default]
    Mean,
    /// Phase 1 folds + one shared SAM: average the fold TransUNet probabilities, then run SAM once on the mean.
    CoarseThenRefine,
}

impl std::str::FromStr for EnsembleMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "mean" | "full" => Ok(EnsembleMode::Mean),
            "coarse-then-refine" | "coarse_then_refine" => Ok(EnsembleMode::CoarseThenRefine),
            _ => Err(Error::Arg(format!(
                "--ensemble-mode `{s}` is not one of mean, coarse-then-refine"
            ))),
        }
    }
}

/// Refiner flags given on the command line (`None` = not given). They apply on top of the sidecar's settings only
/// with `override_sidecar` (`--override-refiner`); without a sidecar they apply on top of the configuration.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RefinerFlags {
    pub mask_prompt_style: Option<String>,
    pub no_point_prompt: bool,
    pub no_box_prompt: bool,
    pub no_mask_prompt: bool,
    pub no_negative_point: bool,
    pub sharpen_coarse_mask: bool,
    pub sharpen_temperature: Option<f64>,
    pub selection_temperature: Option<f64>,
    pub sam_normalization: Option<String>,
    pub override_sidecar: bool,
}

impl RefinerFlags {
    /// Whether any refiner flag was given.
    pub fn any(&self) -> bool {
        self.mask_prompt_style.is_some()
            || self.no_point_prompt
            || self.no_box_prompt
            || self.no_mask_prompt
            || self.no_negative_point
            || self.sharpen_coarse_mask
            || self.sharpen_temperature.is_some()
            || self.selection_temperature.is_some()
            || self.sam_normalization.is_some()
    }

    /// `base` with the given flags applied.
    pub fn apply(&self, base: &RefinerConfig) -> RefinerConfig {
        let mut r = base.clone();
        if let Some(s) = &self.mask_prompt_style {
            r.mask_prompt_style = s.clone();
        }
        if self.no_point_prompt {
            r.use_point_prompt = false;
        }
        if self.no_box_prompt {
            r.use_box_prompt = false;
        }
        if self.no_mask_prompt {
            r.use_mask_prompt = false;
        }
        if self.no_negative_point {
            r.add_negative_point = false;
        }
        if self.sharpen_coarse_mask {
            r.sharpen_coarse_mask = true;
        }
        if let Some(t) = self.sharpen_temperature {
            r.sharpen_temperature = t;
        }
        if let Some(t) = self.selection_temperature {
            r.selection_temperature = t;
        }
        if let Some(n) = &self.sam_normalization {
            r.sam_normalization = n.clone();
        }
        r
    }

    /// The settings in effect: the sidecar's (flags only with `--override-refiner`) or the configuration's.
    fn resolve(
        &self,
        sidecar: Option<RefinerConfig>,
        default: &RefinerConfig,
        path: &Path,
    ) -> Result<RefinerConfig> {
        match sidecar {
            Some(_) if self.any() && !self.override_sidecar => Err(Error::file(
                path,
                "refiner flags were given but the sidecar records the refiner settings used in training; \
                 add --override-refiner to override them",
            )),
            Some(sc) if self.override_sidecar => Ok(self.apply(&sc)),
            Some(sc) => Ok(sc),
            None => Ok(self.apply(default)),
        }
    }
}

/// How to load an [`EvalModel`] beyond its source.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadOptions {
    pub encoder_dtype: EncoderDtype,
    pub ensemble_mode: EnsembleMode,
    pub refiner_flags: RefinerFlags,
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
    /// How fold members are combined (§13.3).
    pub ensemble_mode: EnsembleMode,
    /// The device the weights live on (inputs are moved there).
    pub device: Device,
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

/// The `--lora-alpha` of the training run recorded in a Phase 2 (`config.lora_alpha`) or Phase 3
/// (`config.training.lora_alpha`) sidecar, when that run used LoRA: needed to merge stored adapters (SPEC §6.8).
pub fn sidecar_lora_alpha(v: &serde_json::Value) -> Option<f64> {
    let c = v.get("config")?;
    [Some(c), c.get("training")]
        .into_iter()
        .flatten()
        .find(|t| t["use_lora"].as_bool() == Some(true))
        .and_then(|t| t["lora_alpha"].as_f64())
}

fn file_has_prefix(path: &Path, prefix: &str) -> Result<bool> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::file(path, format!("not a safetensors file: {e}")))?;
    let p = format!("{prefix}.");
    let found = st.names().iter().any(|k| k.starts_with(&p));
    Ok(found)
}

fn load_sam(cfg: &ModelConfig, path: &Path, enc: DType, device: &Device) -> Result<Sam> {
    let mut w = load_sam_weights_with_adapters(path, Some(&cfg.sam), device)
        .map_err(|e| Error::file(path, e.to_string()))?;
    if w.tensors.keys().any(|k| is_lora_key(k)) {
        // A LoRA training checkpoint (Phase 2/3): merge the adapters with the run's α (SPEC §6.8).
        let alpha = read_sidecar_json(path)?
            .as_ref()
            .and_then(sidecar_lora_alpha)
            .ok_or_else(|| {
                Error::file(
                    path,
                    "holds LoRA adapters but its JSON sidecar records no lora_alpha to merge them with",
                )
            })?;
        merge_adapter_tensors(&mut w.tensors, alpha)?;
    }
    let vb = w.var_builder(DType::F32, device);
    Sam::new_parts(&cfg.sam, w.var_builder(enc, device), vb.clone(), vb, None)
}

fn check_file(path: &Path, what: &str) -> Result<()> {
    if !path.is_file() {
        return Err(Error::file(path, format!("{what} not found")));
    }
    Ok(())
}

fn full(tu: TransUnet, sam: Sam, refiner: &RefinerConfig) -> Result<Member> {
    let settings = SamRefinerSettings::from_config(refiner, None)?;
    let mut u = UltraRefiner::new(tu, SamRefiner::new(sam, settings));
    // Gated residual refinement recorded by a Phase 3 sidecar (SPEC §7.8).
    u.gate = Gate::from_config(refiner)?;
    Ok(Member::Full(Box::new(u)))
}

/// Loads a Phase 3 file: `transunet.*` + (unless `coarse_only`) `sam.*`. Returns the member and the sidecar's
/// refiner settings (or `default_refiner`).
fn load_phase3(
    cfg: &ModelConfig,
    path: &Path,
    default_refiner: &RefinerConfig,
    coarse_only: bool,
    opts: &LoadOptions,
    device: &Device,
) -> Result<(Member, RefinerConfig)> {
    check_file(path, "Phase 3 checkpoint")?;
    let (sc_ref, _) = match read_sidecar_json(path)? {
        Some(v) => sidecar_settings(&v, path)?,
        None => (None, None),
    };
    let refiner = opts.refiner_flags.resolve(sc_ref, default_refiner, path)?;
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
    let sam = load_sam(cfg, path, opts.encoder_dtype.resolve(device)?, device)?;
    Ok((full(tu, sam, &refiner)?, refiner))
}

impl EvalModel {
    /// Loads `source` with the geometry of `config` (a Phase 3 sidecar's `config.model` takes precedence) onto
    /// `device` in f32 (frozen plain tensors).
    pub fn load(source: &ModelSource, config: &Config, device: &Device) -> Result<Self> {
        Self::load_with(source, config, device, &LoadOptions::default())
    }

    /// [`EvalModel::load`] with an encoder dtype, an ensemble mode and refiner flags.
    pub fn load_with(
        source: &ModelSource,
        config: &Config,
        device: &Device,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let enc = opts.encoder_dtype.resolve(device)?;
        if opts.ensemble_mode == EnsembleMode::CoarseThenRefine {
            match source {
                ModelSource::Ensemble {
                    sam: Some(_),
                    transunet_only: false,
                    ..
                } => {}
                _ => {
                    return Err(Error::Arg(
                        "--ensemble-mode coarse-then-refine needs --ensemble over Phase 1 TransUNet files plus one \
                         shared --sam-checkpoint"
                            .into(),
                    ))
                }
            }
        }
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
                let sc = match read_sidecar_json(sam)? {
                    Some(v) => sidecar_settings(&v, sam)?.0,
                    None => None,
                };
                let r = opts.refiner_flags.resolve(sc, &default_refiner, sam)?;
                let tu =
                    TransUnet::from_checkpoint(&cfg.transunet, transunet, "", DType::F32, device)?;
                let s = load_sam(&cfg, sam, enc, device)?;
                members.push(full(tu, s, &r)?);
                refiner = Some(r);
            }
            ModelSource::Phase3 { checkpoint } => {
                if let Some(v) = read_sidecar_json(checkpoint)? {
                    if let (_, Some(m)) = sidecar_settings(&v, checkpoint)? {
                        cfg = m;
                    }
                }
                check_file(checkpoint, "checkpoint")?;
                if !file_has_prefix(checkpoint, "transunet")? {
                    // A Phase 1 file given as --checkpoint: the coarse path alone.
                    members.push(Member::Coarse(TransUnet::from_checkpoint(
                        &cfg.transunet,
                        checkpoint,
                        "",
                        DType::F32,
                        device,
                    )?));
                } else {
                    // `transunet.*` without `sam.*` (e.g. a Phase 3 file saved before SAM was attached): coarse only.
                    let coarse_only = !file_has_prefix(checkpoint, "sam")?;
                    let (m, r) = load_phase3(
                        &cfg,
                        checkpoint,
                        &default_refiner,
                        coarse_only,
                        opts,
                        device,
                    )?;
                    if !coarse_only {
                        refiner = Some(r);
                    }
                    members.push(m);
                }
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
                // The shared SAM is loaded once; members hold cheap clones (tensors are reference-counted).
                let shared_sam = match (sam, transunet_only) {
                    (Some(p), false) => {
                        check_file(p, "SAM checkpoint")?;
                        let sc = match read_sidecar_json(p)? {
                            Some(v) => sidecar_settings(&v, p)?.0,
                            None => None,
                        };
                        let r = opts.refiner_flags.resolve(sc, &default_refiner, p)?;
                        Some((load_sam(&cfg, p, enc, device)?, r))
                    }
                    _ => None,
                };
                for &k in folds {
                    let p = ensemble_path(pattern, k)?;
                    check_file(&p, &format!("ensemble member (fold {k})"))?;
                    if file_has_prefix(&p, "transunet")? {
                        if opts.ensemble_mode == EnsembleMode::CoarseThenRefine {
                            return Err(Error::file(
                                &p,
                                "a Phase 3 file cannot be used with --ensemble-mode coarse-then-refine \
                                 (it needs Phase 1 TransUNet files and one shared --sam-checkpoint)",
                            ));
                        }
                        let (m, r) =
                            load_phase3(&cfg, &p, &default_refiner, *transunet_only, opts, device)?;
                        if !transunet_only {
                            refiner.get_or_insert(r);
                        }
                        members.push(m);
                    } else {
                        let tu =
                            TransUnet::from_checkpoint(&cfg.transunet, &p, "", DType::F32, device)?;
                        match &shared_sam {
                            Some((s, r)) => {
                                members.push(full(tu, s.clone(), r)?);
                                refiner.get_or_insert(r.clone());
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
            ensemble_mode: opts.ensemble_mode,
            device: device.clone(),
        })
    }

    /// Whether the model produces refined masks.
    pub fn refines(&self) -> bool {
        self.members.iter().any(|m| matches!(m, Member::Full(_)))
    }

    /// Coarse (and refined) probabilities at `S` for `image_s (B, 1, S, S)` in `[0, 1]` on the model's device.
    /// `coarse_only` skips the refiner even when present (`--mode transunet`).
    pub fn predict(&self, image_s: &Tensor, coarse_only: bool) -> Result<Prediction> {
        if self.ensemble_mode == EnsembleMode::CoarseThenRefine && !coarse_only {
            return self.predict_coarse_then_refine(image_s);
        }
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

impl EvalModel {
    /// §13.3 `coarse-then-refine`: mean of the fold TransUNet probabilities, then the (shared) SAM refiner once on
    /// that mean (sharpened first when the refiner settings ask for it, as in the end-to-end forward).
    fn predict_coarse_then_refine(&self, image_s: &Tensor) -> Result<Prediction> {
        let mut sum: Option<Tensor> = None;
        let mut refiner_model = None;
        for m in &self.members {
            let tu = match m {
                Member::Coarse(tu) => tu,
                Member::Full(u) => {
                    refiner_model.get_or_insert(u);
                    &u.transunet
                }
            };
            let c = coarse_prob(tu, image_s)?.detach();
            sum = Some(match sum {
                None => c,
                Some(s) => (s + c)?,
            });
        }
        let n = self.members.len();
        let coarse = sum.ok_or_else(|| Error::msg("model has no members"))?;
        let coarse = if n > 1 { (coarse / n as f64)? } else { coarse };
        let u = refiner_model.ok_or_else(|| {
            Error::msg("coarse-then-refine ensemble has no SAM refiner (give --sam-checkpoint)")
        })?;
        let p = match u.refiner.settings.sharpen {
            Some(t) => sharpen(&coarse, t)?,
            None => coarse.clone(),
        };
        let (_, _, _, refined_s) = u.refine_coarse(image_s, &p, &ForwardOptions::default())?;
        let refined = crate::nn::sigmoid(&refined_s)?.detach();
        Ok(Prediction {
            coarse,
            refined: Some(refined),
        })
    }
}

/// `P = softmax(logits)[:, 1]` of a TransUNet in eval mode, `(B, S, S)`.
pub fn coarse_prob(tu: &TransUnet, image_s: &Tensor) -> Result<Tensor> {
    let logits = tu.forward(image_s)?;
    Ok(crate::nn::softmax(&logits, 1)?
        .narrow(1, 1, 1)?
        .squeeze(1)?)
}
