//! Phase 3 freezing semantics (SPEC §11.4, §11.4.2): which parameters are trainable in a given epoch.
//!
//! Both AdamW groups (`transunet`, `sam`) hold every parameter that may ever become trainable; a frozen parameter
//! simply receives no gradient in that epoch (AdamW then skips it entirely: no decay, no state change), and the
//! cosine schedule drives every group from epoch 0 (§11.1.2), so a group unfrozen at epoch `k` starts at `lr_k`.
//! Keys carry the checkpoint prefixes `transunet.` and `sam.`.
use crate::{Error, Result};
use std::collections::BTreeSet;

/// Key prefix of the TransUNet parameters in Phase 3 (checkpoint and optimiser keys).
pub const TRANSUNET_PREFIX: &str = "transunet.";
/// Key prefix of the SAM parameters in Phase 3.
pub const SAM_PREFIX: &str = "sam.";

/// Mask-decoder parts that `--sam-unfreeze-decoder-layers 0` keeps trainable (the output heads, §11.4).
pub const SAM_DECODER_HEADS: [&str; 7] = [
    "output_upscaling.",
    "output_hypernetworks_mlps.",
    "iou_prediction_head.",
    "iou_token.",
    "mask_tokens.",
    "transformer.final_attn_token_to_image.",
    "transformer.norm_final_attn.",
];

/// The freeze and unfreeze flags of §11.4.
#[derive(Debug, Clone, PartialEq)]
pub struct FreezePlan {
    /// `--freeze-transunet-epochs N`: TransUNet frozen for epochs `< N`.
    pub freeze_transunet_epochs: u64,
    /// `--transunet-unfreeze-decoder-layers`: −1 all; 0 head only; `k ∈ 1..=blocks` head + the last `k` decoder blocks.
    pub transunet_unfreeze_decoder_layers: i64,
    pub freeze_sam_prompt_encoder: bool,
    pub freeze_sam_mask_decoder: bool,
    pub freeze_sam_all: bool,
    /// `--freeze-sam-epochs N`: prompt encoder and mask decoder frozen for epochs `< N`.
    pub freeze_sam_epochs: u64,
    /// `--sam-unfreeze-decoder-layers`: −1 all; 0 output heads; `k ∈ 1..=depth` heads + the last `k` two-way layers.
    pub sam_unfreeze_decoder_layers: i64,
    /// Number of TransUNet decoder blocks (4 for every preset).
    pub transunet_decoder_blocks: usize,
    /// Number of two-way transformer layers of the SAM mask decoder.
    pub sam_decoder_depth: usize,
}

impl FreezePlan {
    /// Everything trainable (all flags at their defaults).
    pub fn all_trainable(transunet_decoder_blocks: usize, sam_decoder_depth: usize) -> Self {
        FreezePlan {
            freeze_transunet_epochs: 0,
            transunet_unfreeze_decoder_layers: -1,
            freeze_sam_prompt_encoder: false,
            freeze_sam_mask_decoder: false,
            freeze_sam_all: false,
            freeze_sam_epochs: 0,
            sam_unfreeze_decoder_layers: -1,
            transunet_decoder_blocks,
            sam_decoder_depth,
        }
    }

    /// Checks the layer counts against the architecture.
    pub fn validate(&self) -> Result<()> {
        let t = self.transunet_unfreeze_decoder_layers;
        if t < -1 || t > self.transunet_decoder_blocks as i64 {
            return Err(Error::Arg(format!(
                "--transunet-unfreeze-decoder-layers {t}: must be -1 (all), 0 (head only) or 1..={}",
                self.transunet_decoder_blocks
            )));
        }
        let k = self.sam_unfreeze_decoder_layers;
        if k < -1 || k > self.sam_decoder_depth as i64 {
            return Err(Error::Arg(format!(
                "--sam-unfreeze-decoder-layers {k}: must be -1 (all), 0 (output heads) or 1..={}",
                self.sam_decoder_depth
            )));
        }
        Ok(())
    }

    /// Whether the TransUNet parameter `key` (canonical §5.3 key, no prefix) is in the trainable subset.
    fn transunet_subset(&self, key: &str) -> bool {
        let k = self.transunet_unfreeze_decoder_layers;
        if k < 0 {
            return true;
        }
        if key.starts_with("segmentation_head.") {
            return true;
        }
        let nb = self.transunet_decoder_blocks as i64;
        (nb - k..nb).any(|j| key.starts_with(&format!("decoder.blocks.{j}.")))
    }

    /// Whether the mask-decoder parameter `key` (below `mask_decoder.`) is in the trainable subset.
    fn sam_decoder_subset(&self, key: &str) -> bool {
        let k = self.sam_unfreeze_decoder_layers;
        if k < 0 {
            return true;
        }
        if SAM_DECODER_HEADS.iter().any(|h| key.starts_with(h)) {
            return true;
        }
        let d = self.sam_decoder_depth as i64;
        (d - k..d).any(|j| key.starts_with(&format!("transformer.layers.{j}.")))
    }

    /// Whether the TransUNet is frozen as a whole in `epoch`.
    pub fn transunet_frozen(&self, epoch: u64) -> bool {
        epoch < self.freeze_transunet_epochs
    }

    /// Whether every TransUNet parameter is trainable in `epoch` (the TransUNet then runs in training mode; a
    /// partially trainable TransUNet runs in eval mode, see [`EpochTrainable::transunet_train_mode`]).
    pub fn transunet_fully_trainable(&self, epoch: u64) -> bool {
        !self.transunet_frozen(epoch) && self.transunet_unfreeze_decoder_layers < 0
    }

    /// Whether the SAM prompt encoder and mask decoder are frozen as a whole in `epoch`.
    pub fn sam_frozen(&self, epoch: u64) -> bool {
        self.freeze_sam_all
            || epoch < self.freeze_sam_epochs
            || (self.freeze_sam_prompt_encoder && self.freeze_sam_mask_decoder)
    }

    /// Whether the parameter `key` (with its `transunet.`/`sam.` prefix) is trained in `epoch`.
    pub fn is_trainable(&self, key: &str, epoch: u64) -> bool {
        if let Some(k) = key.strip_prefix(TRANSUNET_PREFIX) {
            return !self.transunet_frozen(epoch) && self.transunet_subset(k);
        }
        if let Some(k) = key.strip_prefix(SAM_PREFIX) {
            if crate::models::sam::lora::is_lora_key(k) {
                // LoRA adapters of the image encoder (§6.8): frozen only with the whole SAM (`--freeze-sam-all`,
                // `--freeze-sam-epochs`), not by the prompt-encoder / mask-decoder flags.
                return !self.freeze_sam_all && epoch >= self.freeze_sam_epochs;
            }
            if self.sam_frozen(epoch) {
                return false;
            }
            if k.starts_with("prompt_encoder.") {
                return !self.freeze_sam_prompt_encoder;
            }
            if let Some(d) = k.strip_prefix("mask_decoder.") {
                return !self.freeze_sam_mask_decoder && self.sam_decoder_subset(d);
            }
            // Anything else SAM-side: trainable with SAM.
            return true;
        }
        false
    }

    /// The trainable set of `epoch` among `keys` (all parameters of the optimiser).
    pub fn at<'a>(&self, epoch: u64, keys: impl IntoIterator<Item = &'a String>) -> EpochTrainable {
        let keys: BTreeSet<String> = keys
            .into_iter()
            .filter(|k| self.is_trainable(k, epoch))
            .cloned()
            .collect();
        EpochTrainable {
            transunet_any: keys.iter().any(|k| k.starts_with(TRANSUNET_PREFIX)),
            sam_any: keys.iter().any(|k| k.starts_with(SAM_PREFIX)),
            transunet_train_mode: self.transunet_fully_trainable(epoch),
            keys,
        }
    }
}

/// What is trained in one epoch.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct EpochTrainable {
    /// Trainable parameter keys (`transunet.*`, `sam.*`).
    pub keys: BTreeSet<String>,
    /// Some TransUNet parameter is trainable (else the TransUNet output is detached: no graph is recorded for it).
    pub transunet_any: bool,
    /// Some SAM parameter is trainable.
    pub sam_any: bool,
    /// The TransUNet runs in training mode (BatchNorm batch statistics + running-stat updates, dropout) only when it
    /// is trained as a whole. Frozen modules run in eval mode (§11.4.2); with a partial subset
    /// (`--transunet-unfreeze-decoder-layers k ≥ 0`) the frozen encoder must be in eval mode and the model has one
    /// mode switch, so the trainable decoder blocks keep their BatchNorm running statistics (frozen-BN fine-tuning).
    pub transunet_train_mode: bool,
}

impl EpochTrainable {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
    /// Short description for the log (`transunet 12/40, sam 30/30`).
    pub fn describe<'a>(&self, all: impl IntoIterator<Item = &'a String>) -> String {
        let (mut tt, mut ts) = (0usize, 0usize);
        for k in all {
            if k.starts_with(TRANSUNET_PREFIX) {
                tt += 1;
            } else if k.starts_with(SAM_PREFIX) {
                ts += 1;
            }
        }
        let t = self
            .keys
            .iter()
            .filter(|k| k.starts_with(TRANSUNET_PREFIX))
            .count();
        let s = self
            .keys
            .iter()
            .filter(|k| k.starts_with(SAM_PREFIX))
            .count();
        format!("trainable tensors: transunet {t}/{tt}, sam {s}/{ts}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Vec<String> {
        [
            "transunet.transformer.encoder.layer.0.attn.query.weight",
            "transunet.decoder.conv_more.0.weight",
            "transunet.decoder.blocks.0.conv1.0.weight",
            "transunet.decoder.blocks.2.conv1.0.weight",
            "transunet.decoder.blocks.3.conv2.0.weight",
            "transunet.segmentation_head.0.weight",
            "sam.prompt_encoder.point_embeddings.0.weight",
            "sam.mask_decoder.transformer.layers.0.mlp.lin1.weight",
            "sam.mask_decoder.transformer.layers.1.mlp.lin1.weight",
            "sam.mask_decoder.transformer.final_attn_token_to_image.q_proj.weight",
            "sam.mask_decoder.iou_token.weight",
            "sam.mask_decoder.output_upscaling.0.weight",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn names(t: &EpochTrainable) -> Vec<&str> {
        t.keys.iter().map(|s| s.as_str()).collect()
    }

    #[test]
    fn defaults_train_everything() {
        let p = FreezePlan::all_trainable(4, 2);
        let t = p.at(0, &keys());
        assert_eq!(t.keys.len(), keys().len());
        assert!(t.transunet_train_mode && t.transunet_any && t.sam_any);
    }

    #[test]
    fn transunet_subsets_and_freeze_epochs() {
        let mut p = FreezePlan::all_trainable(4, 2);
        p.transunet_unfreeze_decoder_layers = 0;
        let t = p.at(0, &keys());
        assert!(!t.transunet_train_mode);
        assert!(names(&t).contains(&"transunet.segmentation_head.0.weight"));
        assert!(!names(&t).iter().any(|k| k.contains("decoder.blocks")));
        p.transunet_unfreeze_decoder_layers = 2;
        let t = p.at(0, &keys());
        let n = names(&t);
        assert!(n.contains(&"transunet.decoder.blocks.2.conv1.0.weight"));
        assert!(n.contains(&"transunet.decoder.blocks.3.conv2.0.weight"));
        assert!(!n.contains(&"transunet.decoder.blocks.0.conv1.0.weight"));
        assert!(!n.contains(&"transunet.decoder.conv_more.0.weight"));
        p.transunet_unfreeze_decoder_layers = 4;
        let n = p.at(0, &keys());
        assert!(n.keys.contains("transunet.decoder.blocks.0.conv1.0.weight"));
        assert!(!n.keys.contains("transunet.decoder.conv_more.0.weight"));
        assert!(!n
            .keys
            .contains("transunet.transformer.encoder.layer.0.attn.query.weight"));
        p.transunet_unfreeze_decoder_layers = 5;
        assert!(p.validate().is_err());
        let mut p = FreezePlan::all_trainable(4, 2);
        p.freeze_transunet_epochs = 2;
        for e in 0..2 {
            let t = p.at(e, &keys());
            assert!(!t.transunet_any && t.sam_any && !t.transunet_train_mode);
        }
        let t = p.at(2, &keys());
        assert!(t.transunet_any && t.transunet_train_mode);
    }

    #[test]
    fn sam_subsets() {
        let mut p = FreezePlan::all_trainable(4, 2);
        p.sam_unfreeze_decoder_layers = 0;
        let n = p.at(0, &keys()).keys;
        assert!(n.contains("sam.mask_decoder.iou_token.weight"));
        assert!(n.contains("sam.mask_decoder.output_upscaling.0.weight"));
        assert!(n.contains("sam.mask_decoder.transformer.final_attn_token_to_image.q_proj.weight"));
        assert!(!n.contains("sam.mask_decoder.transformer.layers.1.mlp.lin1.weight"));
        assert!(n.contains("sam.prompt_encoder.point_embeddings.0.weight"));
        p.sam_unfreeze_decoder_layers = 1;
        let n = p.at(0, &keys()).keys;
        assert!(n.contains("sam.mask_decoder.transformer.layers.1.mlp.lin1.weight"));
        assert!(!n.contains("sam.mask_decoder.transformer.layers.0.mlp.lin1.weight"));
        let mut p = FreezePlan::all_trainable(4, 2);
        p.freeze_sam_prompt_encoder = true;
        let n = p.at(0, &keys()).keys;
        assert!(!n.contains("sam.prompt_encoder.point_embeddings.0.weight"));
        assert!(n.contains("sam.mask_decoder.iou_token.weight"));
        p.freeze_sam_mask_decoder = true;
        assert!(!p.at(0, &keys()).sam_any);
        let mut p = FreezePlan::all_trainable(4, 2);
        p.freeze_sam_all = true;
        assert!(!p.at(5, &keys()).sam_any);
        let mut p = FreezePlan::all_trainable(4, 2);
        p.freeze_sam_epochs = 1;
        assert!(!p.at(0, &keys()).sam_any);
        assert!(p.at(1, &keys()).sam_any);
    }

    #[test]
    fn lora_adapters_follow_the_whole_sam_flags() {
        let mut k = keys();
        let lora = "sam.image_encoder.blocks.0.attn.qkv.lora_a".to_string();
        k.push(lora.clone());
        let mut p = FreezePlan::all_trainable(4, 2);
        p.freeze_sam_prompt_encoder = true;
        p.freeze_sam_mask_decoder = true;
        assert_eq!(
            names(&p.at(0, &k))
                .iter()
                .filter(|n| n.starts_with("sam."))
                .count(),
            1
        );
        assert!(p.at(0, &k).keys.contains(&lora));
        p.freeze_sam_epochs = 2;
        assert!(!p.at(1, &k).keys.contains(&lora));
        assert!(p.at(2, &k).keys.contains(&lora));
        p.freeze_sam_all = true;
        assert!(!p.at(3, &k).keys.contains(&lora));
    }
}
