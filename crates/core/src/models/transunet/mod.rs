//! TransUNet R50-ViT-B/16 hybrid (SPEC §5): ResNet-V2 backbone + ViT encoder + DecoderCup + segmentation head.
//!
//! Parameters are read through a `VarBuilder` under the original PyTorch module paths (SPEC §5.3), so a
//! `VarBuilder` over a canonical safetensors file gives a frozen model and one over a `VarMap` a trainable one.
//! BatchNorm running statistics are buffers held inside the modules ([`TransUnet::bn_buffers`]).
//!
//! ```ignore
//! let model = TransUnet::new(&cfg, vb)?;
//! let logits = model.forward_t(&x /* (B,1,S,S) in [0,1] */, /*train*/ false, None)?; // (B, n_classes, S, S)
//! ```
pub mod checkpoint;
pub mod decoder;
pub mod embeddings;
pub mod encoder;
pub mod layers;
pub mod resnet;

use crate::config::TransUnetConfig;
use crate::{Error, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;
use std::collections::HashMap;

pub use checkpoint::{
    build_trainable, load_into_varmap, load_pretrained_encoder, read_checkpoint,
    save_safetensors_atomic, state_dict, LoadMode, LoadReport,
};
use decoder::{DecoderCup, SegmentationHead};
use embeddings::Embeddings;
use encoder::Encoder;

/// Forward pass with every intermediate the parity tests compare.
#[derive(Debug, Clone)]
pub struct TransUnetOutput {
    /// `(B, n_classes, S, S)` logits.
    pub logits: Tensor,
    /// Skip features in the order the decoder consumes them: `[block2 (S/8), block1 padded to S/4, root (S/2)]`.
    pub features: Vec<Tensor>,
    /// ResNet block3 output `(B, 16w, g, g)`.
    pub resnet_out: Tensor,
    /// Patch + position embeddings before the dropout, `(B, g², D)`.
    pub embeddings: Tensor,
    /// Encoder output after `encoder_norm`, `(B, g², D)`.
    pub hidden_states: Tensor,
}

/// The TransUNet model.
#[derive(Debug)]
pub struct TransUnet {
    cfg: TransUnetConfig,
    embeddings: Embeddings,
    encoder: Encoder,
    decoder: DecoderCup,
    head: SegmentationHead,
    /// Prefix of the `VarBuilder` the model was built from ("" for §5.3 keys, "transunet" in Phase 3).
    prefix: String,
}

/// Checks the parts of the configuration the architecture depends on.
pub fn validate_config(cfg: &TransUnetConfig) -> Result<()> {
    let bad = |m: String| Err(Error::Config(m));
    if cfg.img_size == 0 || !cfg.img_size.is_multiple_of(16) {
        return bad(format!(
            "transunet.img_size {} must be a positive multiple of 16",
            cfg.img_size
        ));
    }
    if cfg.resnet_width == 0
        || cfg.gn_groups == 0
        || !cfg.resnet_width.is_multiple_of(cfg.gn_groups)
    {
        return bad(format!(
            "transunet.resnet_width {} must be a positive multiple of transunet.gn_groups {}",
            cfg.resnet_width, cfg.gn_groups
        ));
    }
    if cfg.num_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_heads) {
        return bad(format!(
            "transunet.hidden_size {} must be divisible by transunet.num_heads {}",
            cfg.hidden_size, cfg.num_heads
        ));
    }
    if cfg.n_skip > 3 {
        return bad(format!("transunet.n_skip {} must be at most 3", cfg.n_skip));
    }
    if cfg.n_classes == 0 {
        return bad("transunet.n_classes must be positive".into());
    }
    Ok(())
}

impl TransUnet {
    /// Builds the model from `vb` (keys of SPEC §5.3 below `vb`'s prefix; random parts use the explicit initialisers
    /// of SPEC §5.4 when `vb` is backed by a `VarMap`).
    pub fn new(cfg: &TransUnetConfig, vb: VarBuilder) -> Result<Self> {
        validate_config(cfg)?;
        let prefix = vb.prefix();
        let tvb = vb.pp("transformer");
        let embeddings = Embeddings::new(cfg, tvb.pp("embeddings"))?;
        let encoder = Encoder::new(cfg, tvb.pp("encoder"))?;
        let decoder = DecoderCup::new(cfg, vb.pp("decoder"))?;
        let head = SegmentationHead::new(cfg, vb.pp("segmentation_head"))?;
        Ok(Self {
            cfg: cfg.clone(),
            embeddings,
            encoder,
            decoder,
            head,
            prefix,
        })
    }

    pub fn config(&self) -> &TransUnetConfig {
        &self.cfg
    }

    /// The `VarBuilder` prefix the model was built under ("" for canonical keys).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `x`: `(B, 1, S, S)` (repeated to 3 channels, as the original does for 1-channel input) or `(B, 3, S, S)`,
    /// values in [0, 1], no normalisation. `train`: BatchNorm uses batch statistics and updates its running
    /// statistics. `dropout_seed`: with `train`, enables dropout with masks derived from this seed (SPEC §11.1.6:
    /// pass `rng::mix(seed, "dropout", &[epoch, step])`); `None` disables dropout. Returns logits `(B, n_classes, S, S)`.
    pub fn forward_t(&self, x: &Tensor, train: bool, dropout_seed: Option<u64>) -> Result<Tensor> {
        Ok(self
            .forward_with_intermediates(x, train, dropout_seed)?
            .logits)
    }

    /// Eval-mode forward (running statistics, no dropout).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, false, None)
    }

    /// As [`forward_t`](Self::forward_t), returning the intermediates as well.
    pub fn forward_with_intermediates(
        &self,
        x: &Tensor,
        train: bool,
        dropout_seed: Option<u64>,
    ) -> Result<TransUnetOutput> {
        let (_, c, h, w) = x.dims4()?;
        let s = self.cfg.img_size;
        if h != s || w != s {
            return Err(Error::Arg(format!(
                "TransUNet input is {h}×{w}, but the model was configured for img_size {s}"
            )));
        }
        let x = match c {
            1 => x.repeat((1, 3, 1, 1))?,
            3 => x.clone(),
            _ => {
                return Err(Error::Arg(format!(
                    "TransUNet input must have 1 or 3 channels, got {c}"
                )))
            }
        };
        let seed = if train { dropout_seed } else { None };
        let emb_seed = seed.map(|s| crate::rng::mix(s, "dropout-embeddings", &[]));
        let e = self.embeddings.forward_t(&x, emb_seed)?;
        let hidden_states = self.encoder.forward_t(&e.x, seed)?;
        let y = self.decoder.forward_t(&hidden_states, &e.features, train)?;
        let logits = self.head.forward(&y)?;
        Ok(TransUnetOutput {
            logits,
            features: e.features,
            resnet_out: e.resnet_out,
            embeddings: e.pre_dropout,
            hidden_states,
        })
    }

    fn strip<'a>(&self, key: &'a str) -> &'a str {
        if self.prefix.is_empty() {
            key
        } else {
            key.strip_prefix(self.prefix.as_str())
                .and_then(|k| k.strip_prefix('.'))
                .unwrap_or(key)
        }
    }

    /// BatchNorm buffers under their canonical keys (SPEC §5.3, without the builder prefix):
    /// `decoder.….running_mean`, `running_var` (f32/f64 like the model) and `num_batches_tracked` (i64 scalar).
    pub fn bn_buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (prefix, bn) in self.decoder.batch_norms() {
            let p = self.strip(prefix);
            for (name, t) in bn.buffers()? {
                out.push((format!("{p}.{name}"), t));
            }
        }
        Ok(out)
    }

    /// Restores the BatchNorm buffers from canonical keys. `running_mean`/`running_var` are required for every
    /// BatchNorm; `num_batches_tracked` is optional (SPEC §5.3). Other keys in `tensors` are not looked at.
    pub fn load_bn_buffers(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let mut missing = Vec::new();
        for (prefix, bn) in self.decoder.batch_norms() {
            let p = self.strip(prefix);
            for name in ["running_mean", "running_var", "num_batches_tracked"] {
                let key = format!("{p}.{name}");
                match tensors.get(&key) {
                    Some(t) => bn
                        .set_buffer(name, t)
                        .map_err(|e| Error::Weights(format!("`{key}`: {e}")))?,
                    None if name != "num_batches_tracked" => missing.push(key),
                    None => {}
                }
            }
        }
        if !missing.is_empty() {
            return Err(Error::Weights(format!(
                "missing BatchNorm buffers: {}",
                missing.join(", ")
            )));
        }
        Ok(())
    }

    /// Canonical keys of the BatchNorm buffers (as returned by [`bn_buffers`](Self::bn_buffers)).
    pub fn bn_buffer_keys(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (prefix, _) in self.decoder.batch_norms() {
            let p = self.strip(prefix);
            for name in ["running_mean", "running_var", "num_batches_tracked"] {
                out.push(format!("{p}.{name}"));
            }
        }
        out
    }
}
