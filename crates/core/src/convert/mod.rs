//! Weight conversion to canonical safetensors (SPEC §13.5).
pub mod hf_sam;
pub mod pth;
