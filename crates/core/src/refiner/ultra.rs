//! `UltraRefiner`: TransUNet → `softmax[:,1]` → (sharpen) → shared preprocessing → `SamRefiner` (SPEC §7.5).
use crate::models::sam::EmbeddingCache;
use crate::models::transunet::TransUnet;
use crate::nn;
use crate::refiner::gate::Gate;
use crate::refiner::preprocess::{preprocess, SamInputs, SamNormalization};
use crate::refiner::prompts::{sharpen, Prompts};
use crate::refiner::sam_refiner::{RefinerOutput, SamRefiner};
use crate::{Error, Result};
use candle_core::Tensor;

/// Everything the end-to-end forward returns (SPEC §7.5).
#[derive(Debug, Clone)]
pub struct UltraOutput {
    /// `(B, 2, S, S)` TransUNet logits.
    pub coarse_logits: Tensor,
    /// `(B, S, S)` `P = softmax(coarse_logits)[:, 1]` (coarse metrics use this).
    pub coarse_prob_raw: Tensor,
    /// `(B, S, S)` `P'`: `P` after optional sharpening, as passed to the refiner.
    pub coarse_prob: Tensor,
    /// The SAM inputs `(sam_image, coarse_n)` produced by [`preprocess`].
    pub sam_inputs: SamInputs,
    /// `(B, C, g, g)` SAM image embeddings used (cached or computed).
    pub embeddings: Tensor,
    pub prompts: Prompts,
    /// `(B, 3, M, M)` candidate logits.
    pub low_res: Tensor,
    /// `(B, 3)` IoU predictions.
    pub iou_pred: Tensor,
    /// `(B, 3)` soft-selection weights.
    pub selection_weights: Tensor,
    /// `(B, N, N)` refined logits.
    pub refined_logits_n: Tensor,
    /// `(B, S, S)` refined logits (`bilinear(ac=false)` of `refined_logits_n`).
    pub refined_logits_s: Tensor,
}

/// How one forward runs.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions<'a> {
    /// TransUNet in training mode (BatchNorm batch statistics, dropout when `dropout_seed` is set).
    pub train: bool,
    /// Dropout seed of the TransUNet (and LoRA) in training mode; `None` = no dropout.
    pub dropout_seed: Option<u64>,
    /// Precomputed image embeddings `(B, C, g, g)` (in ROI mode: of the ROI crop, see [`SamRefiner::roi_image`]);
    /// `None` uses `cache` or runs the SAM image encoder.
    pub embeddings: Option<&'a Tensor>,
    /// Embedding cache (only for non-augmented inputs, SPEC §6.9); ignored when `embeddings` is given, with LoRA and
    /// in ROI mode.
    pub cache: Option<&'a EmbeddingCache>,
}

/// The Phase 3 / evaluation / inference path from a grey image and the coarse probability to the SAM inputs: exactly
/// [`preprocess`] (SPEC §7.1). [`UltraRefiner::forward_with`] goes through this function.
pub fn phase3_sam_inputs(
    image_s: &Tensor,
    coarse_prob: &Tensor,
    n: usize,
    norm: SamNormalization,
) -> Result<SamInputs> {
    preprocess(image_s, coarse_prob, n, norm)
}

/// `α·P + (1 − α)·detach(P)`: scales only the gradient that reaches `P` from the refined branch (SPEC §9.3).
pub fn scale_gradient(p: &Tensor, alpha: f64) -> Result<Tensor> {
    if alpha == 1.0 {
        return Ok(p.clone());
    }
    Ok((p.affine(alpha, 0.0)? + p.detach().affine(1.0 - alpha, 0.0)?)?)
}

/// TransUNet + differentiable SAM refiner.
#[derive(Debug)]
pub struct UltraRefiner {
    pub transunet: TransUnet,
    pub refiner: SamRefiner,
    /// `--transunet-grad-scale α` (1.0).
    pub transunet_grad_scale: f64,
    /// Gated residual refinement (SPEC §7.8), `None` = off: the refined logits at `N` become
    /// `logit(clamp(coarse_n + gate·(σ(refined_N) − coarse_n)))`.
    pub gate: Option<Gate>,
}

impl UltraRefiner {
    pub fn new(transunet: TransUnet, refiner: SamRefiner) -> Self {
        Self {
            transunet,
            refiner,
            transunet_grad_scale: 1.0,
            gate: None,
        }
    }

    /// Eval-mode forward of `image_s (B, 1, S, S)` in `[0, 1]`.
    pub fn forward(&self, image_s: &Tensor) -> Result<UltraOutput> {
        self.forward_with(image_s, &ForwardOptions::default())
    }

    /// Forward with explicit mode, dropout seed and optional cached embeddings.
    pub fn forward_with(&self, image_s: &Tensor, opts: &ForwardOptions) -> Result<UltraOutput> {
        let coarse_logits = self
            .transunet
            .forward_t(image_s, opts.train, opts.dropout_seed)?;
        self.forward_from_logits(image_s, coarse_logits, opts)
    }

    /// The rest of [`Self::forward_with`] for TransUNet logits computed by the caller (Phase 3 detaches them when the
    /// whole TransUNet is frozen, SPEC §11.4.2): `P`, sharpening, gradient scale, refiner.
    pub fn forward_from_logits(
        &self,
        image_s: &Tensor,
        coarse_logits: Tensor,
        opts: &ForwardOptions,
    ) -> Result<UltraOutput> {
        let c = coarse_logits.dim(1)?;
        if c < 2 {
            return Err(Error::Config(format!(
                "UltraRefiner needs a TransUNet with ≥ 2 classes, got {c}"
            )));
        }
        let p = nn::softmax(&coarse_logits, 1)?
            .narrow(1, 1, 1)?
            .squeeze(1)?;
        let p_sharp = match self.refiner.settings.sharpen {
            Some(t) => sharpen(&p, t)?,
            None => p.clone(),
        };
        let p_ref = scale_gradient(&p_sharp, self.transunet_grad_scale)?;
        let (sam_inputs, embeddings, r, refined_s) = self.refine_coarse(image_s, &p_ref, opts)?;
        Ok(UltraOutput {
            coarse_logits,
            coarse_prob_raw: p,
            coarse_prob: p_sharp,
            sam_inputs,
            embeddings,
            prompts: r.prompts,
            low_res: r.low_res,
            iou_pred: r.iou_pred,
            selection_weights: r.selection_weights,
            refined_logits_n: r.refined_n,
            refined_logits_s: refined_s,
        })
    }

    /// The refiner half for a given coarse probability `P' (B, S, S)`: shared preprocessing, embeddings (cached or
    /// fresh), prompts, SAM and soft selection (then the gate of §7.8 on `refined_n`, when set); returns the SAM inputs, the embeddings, the refiner output and the
    /// refined logits at `S`.
    pub fn refine_coarse(
        &self,
        image_s: &Tensor,
        coarse_prob: &Tensor,
        opts: &ForwardOptions,
    ) -> Result<(SamInputs, Tensor, RefinerOutput, Tensor)> {
        let s = image_s.dim(3)?;
        let n = self.refiner.img_size();
        let sam_inputs =
            phase3_sam_inputs(image_s, coarse_prob, n, self.refiner.settings.normalization)?;
        let emb = match opts.embeddings {
            Some(e) => e.clone(),
            // ROI mode (§7.7): the encoder runs on the crop, the cache is bypassed.
            None => self.refiner.embed_for(
                opts.cache,
                image_s,
                &sam_inputs.image,
                &sam_inputs.coarse,
                opts.dropout_seed,
            )?,
        };
        let mut r = self.refiner.refine(&emb, &sam_inputs.coarse)?;
        if let Some(g) = &self.gate {
            r.refined_n = g.apply(&r.refined_n, &sam_inputs.coarse)?;
        }
        let refined_s = nn::resize_bilinear(&r.refined_n.unsqueeze(1)?.contiguous()?, s, s, false)?
            .squeeze(1)?;
        Ok((sam_inputs, emb, r, refined_s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// `α·P + (1 − α)·detach(P)` keeps the value and scales the gradient by α (SPEC §9.3).
    #[test]
    fn gradient_scale_keeps_value_scales_gradient() -> Result<()> {
        let p = Var::from_tensor(&Tensor::new(&[0.2f64, 0.7, 1.0], &Device::Cpu)?)?;
        for alpha in [1.0, 0.25] {
            let q = scale_gradient(p.as_tensor(), alpha)?;
            let d: f64 = (&q - p.as_tensor())?.abs()?.sum_all()?.to_scalar()?;
            assert!(d < 1e-15);
            let g = q.sum_all()?.backward()?;
            let g: Vec<f64> = g.get(p.as_tensor()).unwrap().to_vec1()?;
            assert!(g.iter().all(|v| (v - alpha).abs() < 1e-15), "{g:?}");
        }
        Ok(())
    }
}
