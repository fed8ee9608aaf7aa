//! timm `vit_base_r50_s16_224.orig_in21k` safetensors → canonical TransUNet `transformer.*` tensors (SPEC §5.6).
//!
//! timm stores the same weights as the Google npz, already in PyTorch orientation and un-standardised; only the
//! key names differ, `qkv` is fused along dim 0 and `pos_embed` carries the cls row. The TransUNet architecture of
//! SPEC §5.2 is unchanged (timm's own model pads differently; only the tensors are reused).
use super::npz::{encoder_slots, run_mapping, Conversion, Mapping, Slot, TensorSource, Transform};
use crate::config::TransUnetConfig;
use crate::{Error, Result};
use candle_core::Tensor;
use std::path::{Path, PathBuf};

/// A safetensors file as a [`TensorSource`].
pub struct SafetensorsSource {
    path: PathBuf,
    inner: candle_core::safetensors::MmapedSafetensors,
}

impl SafetensorsSource {
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            return Err(Error::file(path, "no such file"));
        }
        // SAFETY: the file is only read; a concurrent writer would be a user error as for any weight file.
        let inner =
            unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(|e| {
                Error::file(
                    path,
                    format!("not a readable safetensors file (truncated or corrupt?): {e}"),
                )
            })?;
        Ok(Self {
            path: path.to_path_buf(),
            inner,
        })
    }
}

impl TensorSource for SafetensorsSource {
    fn path(&self) -> &Path {
        &self.path
    }
    fn names(&self) -> Vec<String> {
        let mut n: Vec<String> = self.inner.tensors().into_iter().map(|(k, _)| k).collect();
        n.sort();
        n
    }
    fn get(&self, name: &str) -> Result<Option<Tensor>> {
        if !self.inner.tensors().iter().any(|(k, _)| k == name) {
            return Ok(None);
        }
        let t = self
            .inner
            .load(name, &candle_core::Device::Cpu)
            .map_err(|e| Error::file(&self.path, format!("cannot read tensor `{name}`: {e}")))?;
        Ok(Some(t))
    }
}

/// The §5.6 source tensor and transform of every slot.
pub fn timm_mapping(cfg: &TransUnetConfig) -> Vec<Mapping> {
    let st = "patch_embed.backbone.stages";
    encoder_slots(cfg)
        .into_iter()
        .map(|(slot, _)| {
            let w = |bias: bool| if bias { "bias" } else { "weight" };
            let (source, transform) = match slot {
                Slot::RootConv => (
                    "patch_embed.backbone.stem.conv.weight".to_string(),
                    Transform::Copy,
                ),
                Slot::RootGn { bias } => (
                    format!("patch_embed.backbone.stem.norm.{}", w(bias)),
                    Transform::Copy,
                ),
                Slot::UnitConv { b, u, k } => (
                    format!("{st}.{}.blocks.{}.conv{k}.weight", b - 1, u - 1),
                    Transform::Copy,
                ),
                Slot::UnitGn { b, u, k, bias } => (
                    format!("{st}.{}.blocks.{}.norm{k}.{}", b - 1, u - 1, w(bias)),
                    Transform::Copy,
                ),
                Slot::Downsample { b } => (
                    format!("{st}.{}.blocks.0.downsample.conv.weight", b - 1),
                    Transform::Copy,
                ),
                Slot::GnProj { b, bias } => (
                    format!("{st}.{}.blocks.0.downsample.norm.{}", b - 1, w(bias)),
                    Transform::Copy,
                ),
                Slot::Patch { bias } => (format!("patch_embed.proj.{}", w(bias)), Transform::Copy),
                Slot::PosEmbed => ("pos_embed".to_string(), Transform::PosEmbed),
                Slot::Norm { i, ffn, bias } => (
                    format!(
                        "blocks.{i}.{}.{}",
                        if ffn { "norm2" } else { "norm1" },
                        w(bias)
                    ),
                    Transform::Copy,
                ),
                Slot::Attn { i, which: 3, bias } => {
                    (format!("blocks.{i}.attn.proj.{}", w(bias)), Transform::Copy)
                }
                Slot::Attn { i, which, bias } => (
                    format!("blocks.{i}.attn.qkv.{}", w(bias)),
                    Transform::Rows(which),
                ),
                Slot::Fc { i, k, bias } => {
                    (format!("blocks.{i}.mlp.fc{k}.{}", w(bias)), Transform::Copy)
                }
                Slot::EncoderNorm { bias } => (format!("norm.{}", w(bias)), Transform::Copy),
            };
            Mapping {
                slot,
                source,
                transform,
            }
        })
        .collect()
}

/// timm tensors TransUNet never reads (cls token, classifier heads).
pub fn timm_is_ignored(name: &str) -> bool {
    name == "cls_token"
        || name.starts_with("head.")
        || name.starts_with("pre_logits.")
        || name.starts_with("fc_norm.")
}

/// Converts timm `vit_base_r50_s16_224.orig_in21k` safetensors for `cfg` (SPEC §5.6).
pub fn convert_timm(path: &Path, cfg: &TransUnetConfig) -> Result<Conversion> {
    let src = SafetensorsSource::open(path)?;
    run_mapping(&src, cfg, &timm_mapping(cfg), &timm_is_ignored)
}
