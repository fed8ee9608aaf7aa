//! SAM / MedSAM vit_b (SPEC §6), implemented in the project (SPEC §16.2): image encoder with a frozen fast path and a
//! differentiable path, batched differentiable prompt encoder, mask decoder pairing images and prompt sets one-to-one.
//!
//! Parameter names equal the original segment-anything checkpoint names (SPEC §6.5), so a `VarBuilder` over the
//! checkpoint (or a `VarMap` seeded from it) builds the model directly.
pub mod cache;
pub mod image_encoder;
pub mod lora;
pub mod mask_decoder;
pub mod ops;
pub mod prompt_encoder;
pub mod weights;

pub use cache::EmbeddingCache;
pub use image_encoder::ImageEncoder;
pub use lora::{LoraConfig, LoraTarget};
pub use mask_decoder::{DecoderOutput, MaskDecoder};
pub use prompt_encoder::PromptEncoder;
pub use weights::{expected_params, load_sam_weights, SamWeights};

use crate::config::SamConfig;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

/// SAM pixel mean (SPEC §6.1).
pub const PIXEL_MEAN: [f32; 3] = [123.675, 116.28, 103.53];
/// SAM pixel standard deviation (SPEC §6.1).
pub const PIXEL_STD: [f32; 3] = [58.395, 57.12, 57.375];

/// `(x − mean_c)/std_c` for `(B,3,H,W)` images with values in 0..255 (mode `sam`), computed in f32 with the two
/// correctly rounded operations of the reference.
pub fn normalize_sam(x: &Tensor) -> Result<Tensor> {
    let dev = x.device();
    let x = x.to_dtype(DType::F32)?;
    let mean = Tensor::new(&PIXEL_MEAN, dev)?.reshape((1, 3, 1, 1))?;
    let std = Tensor::new(&PIXEL_STD, dev)?.reshape((1, 3, 1, 1))?;
    Ok(x.broadcast_sub(&mean)?.broadcast_div(&std)?)
}

/// The complete SAM model.
#[derive(Debug, Clone)]
pub struct Sam {
    pub cfg: SamConfig,
    pub image_encoder: ImageEncoder,
    pub prompt_encoder: PromptEncoder,
    pub mask_decoder: MaskDecoder,
}

impl Sam {
    /// Builds SAM from two builders rooted at the checkpoint root (keys `image_encoder.*`, ...):
    /// * `vb_frozen`: plain tensors (e.g. `VarBuilder::from_mmaped_safetensors` or [`SamWeights::var_builder`]) for the
    ///   image encoder and the prompt encoder's Fourier buffer `pe_layer.positional_encoding_gaussian_matrix`;
    /// * `vb_trainable`: usually a `VarMap` builder, pre-seeded with the checkpoint's `prompt_encoder.*` and
    ///   `mask_decoder.*` tensors (SPEC §16.3), for the prompt encoder and the mask decoder.
    pub fn new(cfg: &SamConfig, vb_frozen: VarBuilder, vb_trainable: VarBuilder) -> Result<Self> {
        Self::new_with_lora(cfg, vb_frozen, vb_trainable, None)
    }

    /// As [`Sam::new`], with optional LoRA adapters on the image encoder whose `lora_a`/`lora_b` variables come from
    /// `vb_trainable` (`image_encoder.blocks.{i}.attn.qkv.lora_a`, ..., SPEC §6.8).
    pub fn new_with_lora(
        cfg: &SamConfig,
        vb_frozen: VarBuilder,
        vb_trainable: VarBuilder,
        lora: Option<&LoraConfig>,
    ) -> Result<Self> {
        Self::new_parts(cfg, vb_frozen.clone(), vb_frozen, vb_trainable, lora)
    }

    /// The general constructor: `vb_encoder` (plain tensors, in the encoder dtype) for `image_encoder.*`,
    /// `vb_buffers` (plain tensors) for the Fourier buffer, `vb_trainable` for the prompt encoder, the mask decoder
    /// and the LoRA adapters. All builders are rooted at the checkpoint root.
    pub fn new_parts(
        cfg: &SamConfig,
        vb_encoder: VarBuilder,
        vb_buffers: VarBuilder,
        vb_trainable: VarBuilder,
        lora: Option<&LoraConfig>,
    ) -> Result<Self> {
        let enc_lora = lora.map(|l| (l, vb_trainable.pp("image_encoder")));
        let image_encoder = ImageEncoder::new(cfg, vb_encoder.pp("image_encoder"), enc_lora)?;
        let prompt_encoder = PromptEncoder::new(
            cfg,
            vb_trainable.pp("prompt_encoder"),
            vb_buffers.pp("prompt_encoder"),
        )?;
        let mask_decoder = MaskDecoder::new(cfg, vb_trainable.pp("mask_decoder"))?;
        Ok(Self {
            cfg: cfg.clone(),
            image_encoder,
            prompt_encoder,
            mask_decoder,
        })
    }

    /// Builds SAM from strictly loaded weights: the image encoder as plain tensors in `encoder_dtype` (bf16 is for
    /// CUDA; CPU has no bf16 convolution), the Fourier buffer as a plain f32 tensor, and the prompt encoder + mask
    /// decoder (+ LoRA adapters) as f32 `Var`s of `varmap`, which is seeded with the loaded tensors first (entries
    /// already present, e.g. from a resumed checkpoint, are overwritten).
    pub fn from_weights(
        cfg: &SamConfig,
        weights: &SamWeights,
        varmap: &candle_nn::VarMap,
        device: &Device,
        encoder_dtype: DType,
        lora: Option<&LoraConfig>,
    ) -> Result<Self> {
        weights.seed_varmap(varmap)?;
        let vb_enc = weights.var_builder(encoder_dtype, device);
        let vb_buf = weights.var_builder(DType::F32, device);
        let vb_tr = VarBuilder::from_varmap(varmap, DType::F32, device);
        Self::new_parts(cfg, vb_enc, vb_buf, vb_tr, lora)
    }

    pub fn device(&self) -> &Device {
        self.prompt_encoder.no_mask_embed.device()
    }

    /// Prompt encoding and mask decoding for precomputed embeddings `(B|1, C, g, g)`:
    /// returns the decoder output (`masks (B,K,4g,4g)`, `iou (B,K)`).
    pub fn decode(
        &self,
        image_embeddings: &Tensor,
        points: Option<(&Tensor, &Tensor)>,
        boxes: Option<&Tensor>,
        masks: Option<&Tensor>,
        multimask: bool,
    ) -> Result<DecoderOutput> {
        let b = if let Some((p, _)) = points {
            p.dim(0)?
        } else if let Some(bx) = boxes {
            bx.dim(0)?
        } else if let Some(m) = masks {
            m.dim(0)?
        } else {
            image_embeddings.dim(0)?
        };
        let (sparse, dense) = self.prompt_encoder.forward_batch(b, points, boxes, masks)?;
        let pe = self.prompt_encoder.get_dense_pe()?;
        self.mask_decoder
            .forward(image_embeddings, &pe, &sparse, &dense, multimask)
    }

    /// Encodes normalised images `(B,3,N,N)`: frozen path (detached) without LoRA, differentiable path with LoRA.
    pub fn encode(&self, images: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        if self.image_encoder.has_lora() {
            self.image_encoder.forward_trainable(images, dropout_seed)
        } else {
            self.image_encoder.forward_frozen(images)
        }
    }

    /// All §6.5 tensors of this model (LoRA merged if requested, f32), for SAM-native export (SPEC §6.10).
    pub fn export_tensors(&self, merge_lora: bool) -> Result<Vec<(String, Tensor)>> {
        let mut enc = self.image_encoder.clone();
        if merge_lora {
            enc.merge_lora()?;
        } else if enc.has_lora() {
            return Err(Error::msg(
                "exporting a LoRA model requires merging (SPEC §6.10)",
            ));
        }
        let mut out: Vec<(String, Tensor)> = enc
            .named_tensors()
            .into_iter()
            .map(|(k, t)| (format!("image_encoder.{k}"), t))
            .collect();
        out.extend(weights::prompt_encoder_tensors(&self.prompt_encoder));
        out.extend(weights::mask_decoder_tensors(&self.mask_decoder));
        out.into_iter()
            .map(|(k, t)| Ok((k, t.detach().to_dtype(DType::F32)?)))
            .collect::<Result<Vec<_>>>()
    }
}
