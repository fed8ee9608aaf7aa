//! TransUNet R50-ViT-B/16 (SPEC §5).
