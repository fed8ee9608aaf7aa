//! All options of the `phase3` binary (SPEC §11.4, §11.1.7).
use crate::device::DeviceSpec;
use crate::train::signals::StopFlag;
use std::path::PathBuf;

/// Every flag of SPEC §11.4 and the common flags of §11.1.7. `Option` fields left `None`
/// take the preset's (or the Phase 2 sidecar's) value.
#[derive(Debug, Clone)]
pub struct Phase3Options {
    pub data_root: PathBuf,
    pub dataset: Option<String>,
    pub datasets: Vec<String>,
    pub fold: u32,
    pub n_splits: u32,
    /// Phase 1 result; default `checkpoints/transunet/{DS}/fold_{k}/best.safetensors`.
    pub transunet_checkpoint: Option<PathBuf>,
    /// Phase 2 `best_sam.safetensors`, a converted SAM/MedSAM, a `.pth`, any file with `sam.*` keys, or `random`
    /// (deterministic random weights from `--seed`; tests and demos only).
    pub sam_checkpoint: String,
    pub config: String,
    pub img_size: Option<usize>,
    /// Must be 2 (binary loss); accepted for parity with Phase 1.
    pub num_classes: Option<usize>,
    pub n_skip: Option<usize>,
    pub batch_size: Option<usize>,
    pub max_epochs: Option<usize>,
    pub transunet_lr: f64,
    pub sam_lr: f64,
    pub weight_decay: f64,
    pub min_lr: f64,
    pub coarse_loss_weight: f64,
    pub refined_loss_weight: f64,
    /// `N` (default) or `S`.
    pub refined_loss_size: Option<usize>,
    pub mask_prompt_style: Option<String>,
    pub allow_style_mismatch: bool,
    pub sharpen_coarse_mask: bool,
    pub sharpen_temperature: f64,
    pub sam_normalization: Option<String>,
    pub grad_clip: f64,
    pub grad_accum: usize,
    pub transunet_weight_reg: f64,
    pub transunet_grad_scale: f64,
    pub freeze_transunet_epochs: u64,
    pub transunet_unfreeze_decoder_layers: i64,
    pub freeze_sam_prompt_encoder: bool,
    pub freeze_sam_mask_decoder: bool,
    pub freeze_sam_all: bool,
    pub freeze_sam_epochs: u64,
    pub sam_unfreeze_decoder_layers: i64,
    pub no_augment: bool,
    /// LoRA on the SAM image encoder (SPEC §6.8; flags as Phase 2's): the encoder then runs with gradients in every
    /// step and the embedding cache is off. Adapters stored in `--sam-checkpoint` (a Phase 2/3 LoRA checkpoint) are
    /// carried over.
    pub use_lora: bool,
    pub lora_rank: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Comma-separated `qkv`, `proj`, `mlp`.
    pub lora_targets: String,
    /// Gated residual refinement (SPEC §7.8) with `γ` (`--gate-gamma`), `g_min` (`--gate-min`), `g_max` (`--gate-max`).
    pub use_gated_refinement: bool,
    pub gate_gamma: f64,
    pub gate_min: f64,
    pub gate_max: f64,
    /// Fixed rotation angles of the cached SAM branch ([`RotationPolicy::Fixed`]); 0 = flip only.
    pub rotation_angles: usize,
    /// Embedding cache for the frozen encoder; off = encoder every step with continuous §3.8 rotation.
    pub embed_cache: bool,
    /// In-memory LRU bound of the embedding cache in bytes.
    pub embed_cache_mem: usize,
    /// ROI-crop mode (SPEC §7.7): the refiner works on an enlarged crop around the coarse lesion; the encoder then
    /// runs on the crop in every step (no embedding cache).
    pub use_roi_crop: bool,
    /// `--roi-expand-ratio r` (0.2).
    pub roi_expand_ratio: f64,
    pub output_dir: PathBuf,
    pub exp_name: Option<String>,
    pub save_every: u64,
    pub device: Option<DeviceSpec>,
    /// Frozen SAM image encoder dtype: `bf16`, `f32` or `auto` (bf16 on CUDA, f32 on CPU; SPEC §15).
    pub encoder_dtype: Option<String>,
    pub seed: u64,
    pub num_workers: usize,
    pub resume: Option<String>,
    pub force_retrain: bool,
    pub allow_config_change: bool,
    pub val_every: u64,
    pub plain: bool,
    pub ascii: bool,
    /// No stdout (train.log is still written). For tests.
    pub quiet: bool,
    pub stop: Option<StopFlag>,
    /// Behave as if a stop was requested after this many completed epochs (in total). Tests and time-boxed jobs.
    pub stop_after_epochs: Option<u64>,
}

impl Phase3Options {
    /// The SPEC defaults with `data_root` set.
    pub fn new(data_root: impl Into<PathBuf>) -> Self {
        Phase3Options {
            data_root: data_root.into(),
            dataset: None,
            datasets: Vec::new(),
            fold: 0,
            n_splits: 5,
            transunet_checkpoint: None,
            sam_checkpoint: String::new(),
            config: "paper".into(),
            img_size: None,
            num_classes: None,
            n_skip: None,
            batch_size: None,
            max_epochs: None,
            transunet_lr: 1e-5,
            sam_lr: 1e-5,
            weight_decay: 0.01,
            min_lr: 1e-6,
            coarse_loss_weight: 0.3,
            refined_loss_weight: 0.7,
            refined_loss_size: None,
            mask_prompt_style: None,
            allow_style_mismatch: false,
            sharpen_coarse_mask: false,
            sharpen_temperature: 10.0,
            sam_normalization: None,
            grad_clip: 1.0,
            grad_accum: 1,
            transunet_weight_reg: 0.0,
            transunet_grad_scale: 1.0,
            freeze_transunet_epochs: 0,
            transunet_unfreeze_decoder_layers: -1,
            freeze_sam_prompt_encoder: false,
            freeze_sam_mask_decoder: false,
            freeze_sam_all: false,
            freeze_sam_epochs: 0,
            sam_unfreeze_decoder_layers: -1,
            no_augment: false,
            use_lora: false,
            lora_rank: 4,
            lora_alpha: 4.0,
            lora_dropout: 0.0,
            lora_targets: "qkv".into(),
            use_gated_refinement: false,
            gate_gamma: 1.0,
            gate_min: 0.0,
            gate_max: 0.8,
            rotation_angles: 0,
            embed_cache: true,
            embed_cache_mem: 8 << 30,
            use_roi_crop: false,
            roi_expand_ratio: crate::refiner::roi::DEFAULT_EXPAND_RATIO,
            output_dir: PathBuf::from("./checkpoints/ultra_refiner"),
            exp_name: None,
            save_every: 20,
            device: None,
            encoder_dtype: None,
            seed: 42,
            num_workers: 8,
            resume: None,
            force_retrain: false,
            allow_config_change: false,
            val_every: 1,
            plain: false,
            ascii: false,
            quiet: false,
            stop: None,
            stop_after_epochs: None,
        }
    }
}
