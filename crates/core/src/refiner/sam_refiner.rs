//! `SamRefiner`: differentiable prompts → SAM prompt encoder → mask decoder (multimask) → soft selection
//! (SPEC §7.2–§7.4), batched over samples with embeddings and prompt sets paired one-to-one.
use crate::config::RefinerConfig;
use crate::models::sam::{EmbeddingCache, Sam};
use crate::refiner::preprocess::SamNormalization;
use crate::refiner::prompts::{extract_prompts, MaskPromptStyle, PromptConfig, Prompts};
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
}

impl Default for SamRefinerSettings {
    fn default() -> Self {
        Self {
            prompts: PromptConfig::default(),
            selection_temperature: 0.1,
            normalization: SamNormalization::Sam,
            sharpen: None,
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
        Ok(Self {
            prompts,
            selection_temperature: cfg.selection_temperature,
            normalization: SamNormalization::resolve(&cfg.sam_normalization, provenance)?,
            sharpen,
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
    /// `(B, N, N)` refined logits, `bilinear(ac=false)(refined_m → N)`.
    pub refined_n: Tensor,
}

impl RefinerOutput {
    /// Candidates at full resolution `(B, 3, N, N)` (only for the IoU-prediction loss, SPEC §7.4 step 4).
    pub fn candidates_n(&self) -> Result<Tensor> {
        let n = self.refined_n.dim(1)?;
        crate::nn::resize_bilinear(&self.low_res.contiguous()?, n, n, false)
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
    pub fn refine(&self, embeddings: &Tensor, coarse_n: &Tensor) -> Result<RefinerOutput> {
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
        })
    }
}
