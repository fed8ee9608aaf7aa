//! `SamRefiner`: differentiable prompts → SAM prompt encoder → mask decoder (multimask) → soft selection
//! (SPEC §7.2–§7.4), batched over samples with embeddings and prompt sets paired one-to-one.
use crate::config::RefinerConfig;
use crate::models::sam::{EmbeddingCache, Sam};
use crate::refiner::preprocess::SamNormalization;
use crate::refiner::prompts::{extract_prompts, MaskPromptStyle, PromptConfig, Prompts};
use crate::refiner::roi;
use crate::refiner::select::{selection_weights, soft_select};
use crate::{Error, Result};
use candle_core::Tensor;

/// Refiner settings resolved from [`RefinerConfig`] (and the CLI).
#[derive(Debug, Clone, PartialEq)]
pub struct SamRefinerSettings {
    pub prompts: PromptConfig,
    /// `τ` of the soft selection (0.1).
    pub selection_temperature: f64,
    /// SAM input normalisation (SPEC §7.1).
    pub normalization: SamNormalization,
    /// Sharpening temperature `T` applied to the coarse probability at `S` (SPEC §7.3), `None` = off.
    pub sharpen: Option<f64>,
    /// ROI-crop mode (SPEC §7.7): `Some(r)` = on with `--roi-expand-ratio r`, `None` = off (whole image).
    pub roi_expand_ratio: Option<f64>,
}

impl Default for SamRefinerSettings {
    fn default() -> Self {
        Self {
            prompts: PromptConfig::default(),
            selection_temperature: 0.1,
            normalization: SamNormalization::Sam,
            sharpen: None,
            roi_expand_ratio: None,
        }
    }
}

impl SamRefinerSettings {
    /// Settings from the configuration. `provenance` (`"sam"`/`"medsam"`) resolves `sam_normalization = "auto"`.
    pub fn from_config(cfg: &RefinerConfig, provenance: Option<&str>) -> Result<Self> {
        let mask_style: MaskPromptStyle = cfg.mask_prompt_style.parse()?;
        let prompts = PromptConfig {
            use_point: cfg.use_point_prompt,
            use_box: cfg.use_box_prompt,
            use_mask: cfg.use_mask_prompt,
            add_negative_point: cfg.add_negative_point,
            mask_style,
            ..PromptConfig::default()
        };
        if !(cfg.selection_temperature > 0.0) {
            return Err(Error::Config(format!(
                "refiner.selection_temperature must be > 0, got {}",
                cfg.selection_temperature
            )));
        }
        let sharpen = if cfg.sharpen_coarse_mask {
            if !(cfg.sharpen_temperature > 0.0) {
                return Err(Error::Config(format!(
                    "refiner.sharpen_temperature must be > 0, got {}",
                    cfg.sharpen_temperature
                )));
            }
            Some(cfg.sharpen_temperature)
        } else {
            None
        };
        let roi_expand_ratio = if cfg.use_roi_crop {
            roi::check_expand_ratio(cfg.roi_expand_ratio)?;
            Some(cfg.roi_expand_ratio)
        } else {
            None
        };
        Ok(Self {
            prompts,
            selection_temperature: cfg.selection_temperature,
            normalization: SamNormalization::resolve(&cfg.sam_normalization, provenance)?,
            sharpen,
            roi_expand_ratio,
        })
    }
}

/// Output of [`SamRefiner::refine`].
#[derive(Debug, Clone)]
pub struct RefinerOutput {
    pub prompts: Prompts,
    /// `(B, 3, M, M)` candidate logits (tokens 1..3).
    pub low_res: Tensor,
    /// `(B, 3)` raw IoU predictions.
    pub iou_pred: Tensor,
    /// `(B, 3)` `softmax(iou/τ)`.
    pub selection_weights: Tensor,
    /// `(B, M, M)` soft-selected logits at the low resolution.
    pub refined_m: Tensor,
    /// `(B, N, N)` refined logits, `bilinear(ac=false)(refined_m → N)`; in ROI mode the pasted and blended
    /// full-image logits (SPEC §7.7.4).
    pub refined_n: Tensor,
    /// ROI-crop tensors (SPEC §7.7) when ROI mode is on; the fields above are then in crop coordinates, except
    /// `refined_n`.
    pub roi: Option<RoiOutput>,
}

/// The ROI part of a [`RefinerOutput`] (SPEC §7.7), all `(B, N, N)` except `boxes`.
#[derive(Debug, Clone)]
pub struct RoiOutput {
    /// `(B, 4)` ROI boxes `[x1, y1, x2, y2]` on the `N` grid (differentiable in `coarse_n`).
    pub boxes: Tensor,
    /// The cropped coarse mask the prompts were built from.
    pub coarse_crop: Tensor,
    /// Crop logits `z_c` (soft selection resized to `N`, crop coordinates).
    pub crop_logits: Tensor,
    /// Soft window `ω`.
    pub window: Tensor,
    /// `logit(clamp(coarse_n, 1e-4, 1 − 1e-4))`, the refined logits outside the ROI.
    pub coarse_logits: Tensor,
}

impl RefinerOutput {
    /// Candidates at full resolution `(B, 3, N, N)` (only for the IoU-prediction loss, SPEC §7.4 step 4).
    /// In ROI mode each candidate is pasted back and blended like `refined_n` (full-image coordinates).
    pub fn candidates_n(&self) -> Result<Tensor> {
        let n = self.refined_n.dim(1)?;
        let c = crate::nn::resize_bilinear(&self.low_res.contiguous()?, n, n, false)?;
        match &self.roi {
            None => Ok(c),
            Some(r) => roi::blend(
                &roi::paste(&c, &r.boxes, n, n)?,
                &r.window.unsqueeze(1)?,
                &r.coarse_logits.unsqueeze(1)?,
            ),
        }
    }
}

/// SAM with differentiable prompts and soft selection.
#[derive(Debug, Clone)]
pub struct SamRefiner {
    pub sam: Sam,
    pub settings: SamRefinerSettings,
}

impl SamRefiner {
    pub fn new(sam: Sam, settings: SamRefinerSettings) -> Self {
        Self { sam, settings }
    }

    /// SAM input size `N`.
    pub fn img_size(&self) -> usize {
        self.sam.cfg.img_size
    }

    /// Mask-prompt / low-resolution size `M = 4·N/16`.
    pub fn mask_size(&self) -> usize {
        self.sam.cfg.mask_input_size()
    }

    /// Image embeddings of a normalised SAM image `(B, 3, N, N)` (frozen encoder: detached; LoRA: differentiable).
    pub fn embed(&self, sam_image: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        self.sam.encode(sam_image, dropout_seed)
    }

    /// Whether ROI-crop mode (SPEC §7.7) is on.
    pub fn roi_mode(&self) -> bool {
        self.settings.roi_expand_ratio.is_some()
    }

    /// ROI mode: the crop of the normalised SAM image `(B, 3, N, N)` that [`Self::refine`] expects embeddings of,
    /// for `coarse_n (B, N, N)`. The box is the one `refine` computes (same ops on the same values), detached: the
    /// image carries no gradient (SPEC §7.1). Errors when ROI mode is off.
    pub fn roi_image(&self, sam_image: &Tensor, coarse_n: &Tensor) -> Result<Tensor> {
        let r = self
            .settings
            .roi_expand_ratio
            .ok_or_else(|| Error::msg("SamRefiner::roi_image called with ROI-crop mode off"))?;
        let n = self.img_size();
        let boxes = roi::roi_box(&coarse_n.detach(), r)?;
        Ok(roi::crop(&sam_image.detach(), &boxes, n, n)?.detach())
    }

    /// The embeddings [`Self::refine`] needs for `(sam_image, coarse_n)`: in ROI mode the encoder on the ROI crop
    /// (never cached: the crop depends on `P`, SPEC §7.7.5); otherwise [`Self::embed_cached`].
    pub fn embed_for(
        &self,
        cache: Option<&EmbeddingCache>,
        image_s: &Tensor,
        sam_image: &Tensor,
        coarse_n: &Tensor,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        if self.roi_mode() {
            self.embed(&self.roi_image(sam_image, coarse_n)?, dropout_seed)
        } else {
            self.embed_cached(cache, image_s, sam_image, dropout_seed)
        }
    }

    /// Image embeddings through the embedding cache (SPEC §6.9): the key is built from the grey `S×S` input
    /// `image_s (B, 1, S, S)`, misses run the frozen encoder on the matching rows of `sam_image (B, 3, N, N)`.
    /// Without a cache, or with LoRA (the cache is disabled), this is [`Self::embed`].
    pub fn embed_cached(
        &self,
        cache: Option<&EmbeddingCache>,
        image_s: &Tensor,
        sam_image: &Tensor,
        dropout_seed: Option<u64>,
    ) -> Result<Tensor> {
        match cache {
            Some(c) if !self.sam.image_encoder.has_lora() => {
                let norm = self.settings.normalization.as_str();
                c.embed(&self.sam.image_encoder, image_s, norm, |rows| {
                    let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
                    let ids = Tensor::from_vec(ids, rows.len(), sam_image.device())?;
                    Ok(sam_image.index_select(&ids, 0)?)
                })
            }
            _ => self.embed(sam_image, dropout_seed),
        }
    }

    /// Prompts from `coarse_n (B, N, N)`, SAM prompt encoder and mask decoder (multimask), soft selection at `M`,
    /// then the resize to `N`. `embeddings` is `(B, C, g, g)` (or `(1, C, g, g)`, shared), from [`Self::embed`] or the
    /// embedding cache.
    ///
    /// ROI mode (SPEC §7.7): `embeddings` must be those of the ROI crop ([`Self::embed_for`] /
    /// [`Self::roi_image`]); the ROI box comes from `coarse_n`, the prompts from the cropped mask, and the crop
    /// logits are pasted back and blended with the coarse logits ([`RefinerOutput::roi`]).
    pub fn refine(&self, embeddings: &Tensor, coarse_n: &Tensor) -> Result<RefinerOutput> {
        let Some(r) = self.settings.roi_expand_ratio else {
            return self.refine_direct(embeddings, coarse_n);
        };
        let n = self.img_size();
        if coarse_n.dims().len() != 3 || coarse_n.dim(1)? != n || coarse_n.dim(2)? != n {
            return Err(Error::Arg(format!(
                "SamRefiner::refine: coarse_n must be (B, {n}, {n}), got {:?}",
                coarse_n.dims()
            )));
        }
        let boxes = roi::roi_box(coarse_n, r)?;
        let coarse_crop = roi::crop_map(coarse_n, &boxes, n)?;
        let mut out = self.refine_direct(embeddings, &coarse_crop)?;
        let crop_logits = out.refined_n.clone();
        let window = roi::window(&boxes, n, n)?;
        let coarse_logits = roi::coarse_logits(coarse_n)?;
        out.refined_n = roi::blend(
            &roi::paste_map(&crop_logits, &boxes, n)?,
            &window,
            &coarse_logits,
        )?;
        out.roi = Some(RoiOutput {
            boxes,
            coarse_crop,
            crop_logits,
            window,
            coarse_logits,
        });
        Ok(out)
    }

    /// [`Self::refine`] without ROI cropping: prompts from `coarse_n` as given, SAM, soft selection, resize to `N`.
    pub fn refine_direct(&self, embeddings: &Tensor, coarse_n: &Tensor) -> Result<RefinerOutput> {
        let n = self.img_size();
        let (b, h, w) = coarse_n.dims3().map_err(|_| {
            Error::Arg(format!(
                "SamRefiner::refine: coarse_n must be (B, N, N), got {:?}",
                coarse_n.dims()
            ))
        })?;
        if h != n || w != n {
            return Err(Error::Arg(format!(
                "SamRefiner::refine: coarse_n is {h}×{w}, the SAM input size is {n} (use refiner::preprocess)"
            )));
        }
        let be = embeddings.dim(0)?;
        if be != b && be != 1 {
            return Err(Error::Arg(format!(
                "SamRefiner::refine: {be} embeddings for {b} prompt sets"
            )));
        }
        let prompts = extract_prompts(coarse_n, &self.settings.prompts, self.mask_size())?;
        let pt = match (&prompts.points, &prompts.labels) {
            (Some(p), Some(l)) => Some((p, l)),
            _ => None,
        };
        let out = self.sam.decode(
            embeddings,
            pt,
            prompts.boxes.as_ref(),
            prompts.mask.as_ref(),
            true,
        )?;
        let low_res = out.masks;
        let iou_pred = out.iou;
        let t = self.settings.selection_temperature;
        let weights = selection_weights(&iou_pred, t)?;
        let refined_m = soft_select(&low_res, &iou_pred, t)?;
        let refined_n =
            crate::nn::resize_bilinear(&refined_m.unsqueeze(1)?.contiguous()?, n, n, false)?
                .squeeze(1)?;
        Ok(RefinerOutput {
            prompts,
            low_res,
            iou_pred,
            selection_weights: weights,
            refined_m,
            refined_n,
            roi: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_from_config() -> Result<()> {
        let mut c = RefinerConfig::default();
        let s = SamRefinerSettings::from_config(&c, None)?;
        assert_eq!(s.prompts, PromptConfig::default());
        assert_eq!(s.selection_temperature, 0.1);
        assert_eq!(s.sharpen, None);
        c.mask_prompt_style = "gaussian".into();
        c.use_box_prompt = false;
        c.sharpen_coarse_mask = true;
        c.sharpen_temperature = 10.0;
        c.sam_normalization = "auto".into();
        let s = SamRefinerSettings::from_config(&c, Some("medsam"))?;
        assert_eq!(s.prompts.mask_style, MaskPromptStyle::Gaussian);
        assert!(!s.prompts.use_box && !s.prompts.negative_point_active());
        assert_eq!(s.sharpen, Some(10.0));
        assert_eq!(s.normalization, SamNormalization::Unit);
        c.mask_prompt_style = "fuzzy".into();
        assert!(SamRefinerSettings::from_config(&c, None).is_err());
        c.mask_prompt_style = "direct".into();
        c.selection_temperature = 0.0;
        assert!(SamRefinerSettings::from_config(&c, None).is_err());
        Ok(())
    }
}
