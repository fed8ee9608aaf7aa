//! Model definitions: TransUNet (SPEC §5) and SAM/MedSAM (SPEC §6).
pub mod sam;
pub mod transunet;
