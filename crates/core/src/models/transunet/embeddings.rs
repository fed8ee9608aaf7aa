//! Hybrid patch embedding (SPEC §5.2): ResNet-V2 backbone → 1×1 Conv2d(16w → D, bias) → flatten to `(B, g², D)` →
//! `+ position_embeddings` → Dropout. Keys below `transformer.embeddings`: `hybrid_model.*`,
//! `patch_embeddings.{weight,bias}`, `position_embeddings` `(1, g², D)`.
use super::layers::{conv2d, Dropout};
use super::resnet::ResNetV2;
use crate::config::TransUnetConfig;
use crate::Result;
use candle_core::Tensor;
use candle_nn::{Conv2d, Init, VarBuilder};

#[derive(Debug, Clone)]
pub struct Embeddings {
    pub(crate) hybrid_model: ResNetV2,
    patch_embeddings: Conv2d,
    position_embeddings: Tensor,
    dropout: Dropout,
}

/// Outputs of [`Embeddings::forward_t`].
#[derive(Debug, Clone)]
pub struct EmbeddingsOutput {
    /// `(B, g², D)` after the dropout (equal to `pre_dropout` in eval mode).
    pub x: Tensor,
    /// `(B, g², D)` patch embeddings + position embeddings, before the dropout.
    pub pre_dropout: Tensor,
    /// ResNet block3 output `(B, 16w, g, g)` = input of the patch convolution.
    pub resnet_out: Tensor,
    /// Skip features in decoder order `[f1, f2, f3]`.
    pub features: Vec<Tensor>,
}

impl Embeddings {
    /// `vb` points at `transformer.embeddings`.
    pub fn new(cfg: &TransUnetConfig, vb: VarBuilder) -> Result<Self> {
        let hybrid_model = ResNetV2::new(cfg, vb.pp("hybrid_model"))?;
        let cin = 16 * cfg.resnet_width;
        let d = cfg.hidden_size;
        // The original's patch size is img_size/16/grid = 1 for the hybrid model: a 1×1 convolution with stride 1.
        let patch_embeddings = conv2d(cin, d, 1, 1, 0, true, vb.pp("patch_embeddings"))?;
        let g = cfg.grid();
        let position_embeddings =
            vb.get_with_hints((1, g * g, d), "position_embeddings", Init::Const(0.0))?;
        let dropout = Dropout::new(cfg.dropout);
        Ok(Self {
            hybrid_model,
            patch_embeddings,
            position_embeddings,
            dropout,
        })
    }

    pub fn forward_t(&self, x: &Tensor, dropout_seed: Option<u64>) -> Result<EmbeddingsOutput> {
        let r = self.hybrid_model.forward(x)?;
        let p = crate::nn::conv2d_layer(&self.patch_embeddings, &r.x)?; // (B, D, g, g)
        let p = p.flatten_from(2)?.transpose(1, 2)?; // (B, g², D)
        let pre_dropout = p.broadcast_add(&self.position_embeddings)?;
        let x = self.dropout.forward_t(&pre_dropout, dropout_seed)?;
        Ok(EmbeddingsOutput {
            x,
            pre_dropout,
            resnet_out: r.x,
            features: r.features,
        })
    }
}
