//! Weight converters: original/pretrained formats → canonical safetensors (SPEC §5.5–§5.7, §6.6, §13.5).
pub mod hf_sam;
pub mod npz;
pub mod pth;
pub mod timm;
