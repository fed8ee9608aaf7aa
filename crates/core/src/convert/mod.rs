//! Weight converters: original/pretrained formats → canonical safetensors (SPEC §5.5–§5.7, §6.6, §13.5).
pub mod npz;
pub mod timm;
