//! SAM / MedSAM vit_b (SPEC §6).
