//! `phase2`: fine-tune the SAM refiner (prompt encoder + mask decoder) on simulated TransUNet failures
//! (SPEC §11.3). Thin wrapper over `ultrarefiner::train::phase2::run`.
use clap::Parser;
use std::path::PathBuf;
use ultrarefiner::train::phase2::{run, Phase2Options, Phase2Status};
use ultrarefiner::train::{StopFlag, EXIT_TEMPFAIL};

/// Phase 2 — train the SAM refiner on the simulated failures of `ultrarefiner augment synthetic`.
///
/// The image encoder is frozen (each distinct source image is encoded once, through the embedding cache); the prompt
/// encoder and mask decoder are trained with AdamW + per-epoch cosine on the loss BCE + Dice + IoU-prediction MSE +
/// quality-weighted change penalty (SPEC §9.2). Validation uses held-out SOURCE images (every augmentation of a
/// validation image is kept out of training) and prints Coarse | Refined | Δ.
///
/// Outputs in <output-dir>/<dataset>/: best/latest/final(.safetensors + .json, resumable), best_sam.safetensors
/// (SAM-native, loads anywhere a SAM checkpoint does) + best_sam.json, metrics.csv, summary.json, progress.png, train.log.
///
/// Options: LoRA on the image encoder (--use-lora; the encoder then runs in every step and the cache is off),
/// --curriculum (easy bins first, growing share of the data), Option B mixing of real out-of-fold predictions
/// (--real-data DIR --real-ratio r), --val-every, an on-disk embedding cache (--embed-cache-dir), ROI crop
/// (--use-roi-crop: the refiner works on an enlarged crop around the coarse lesion, SPEC §7.7).
///
/// Example (CPU demo; random SAM weights learn only with a higher LR than the paper's 1e-4 for pretrained SAM):
///   phase2 --config tiny --dataset PHANTOM --sam-checkpoint random --transunet-img-size 96 --epochs 3 --lr 2e-3
#[derive(Parser, Debug)]
#[command(name = "phase2", version, about, long_about)]
struct Args {
    /// Root of the augmented data (the `--output-root` of `augment synthetic`).
    #[arg(long, default_value = "./dataset/augmented")]
    data_root: PathBuf,
    /// Augmentation run name (sub-folder of --data-root), e.g. BUS_BUSBRA_BUSI_BUS_UC_BUS_UCLM or PHANTOM.
    #[arg(long)]
    dataset: String,
    /// Processed dataset root (source images and ground truth).
    #[arg(long, default_value = "./dataset/processed")]
    processed_root: PathBuf,
    /// SAM/MedSAM vit_b checkpoint (.pth/.pt/.bin/.safetensors), a fetched alias (sam-vit-b, medsam-vit-b: reads
    /// ./weights/<alias>.safetensors, see `ultrarefiner fetch`), or `random` for deterministic random weights
    /// (tests and demos only; the results are meaningless for real data).
    #[arg(long)]
    sam_checkpoint: String,
    /// SAM model type; only vit_b is supported.
    #[arg(long, default_value = "vit_b")]
    sam_model_type: String,
    /// Preset (paper, narrow, tiny) or TOML file: SAM architecture and refiner defaults. Real SAM weights need `paper`.
    #[arg(long, default_value = "paper")]
    config: String,
    /// Number of epochs [default: preset's phase2.max_epochs, 50 for paper].
    #[arg(long)]
    epochs: Option<usize>,
    /// Batch size [default: preset's phase2.batch_size, 4 for paper].
    #[arg(long)]
    batch_size: Option<usize>,
    /// AdamW base learning rate (1e-4 is for pretrained SAM/MedSAM weights; random weights need ~2e-3).
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Cosine floor.
    #[arg(long, default_value_t = 1e-6)]
    min_lr: f64,
    /// Mask prompt: direct | gaussian | distance [default: preset's refiner.mask_prompt_style].
    #[arg(long)]
    mask_prompt_style: Option<String>,
    /// λ of the change penalty (good inputs are penalised for changing).
    #[arg(long, default_value_t = 0.1)]
    change_penalty_weight: f64,
    /// Weight of the IoU-prediction MSE.
    #[arg(long, default_value_t = 1.0)]
    iou_loss_weight: f64,
    /// Fraction of SOURCE images (per dataset) held out for validation.
    #[arg(long, default_value_t = 0.1)]
    val_fraction: f64,
    /// TransUNet resolution S; must equal the manifest's store_size.
    #[arg(long, default_value_t = 224)]
    transunet_img_size: usize,
    /// Cap on training samples (deterministic subset).
    #[arg(long)]
    max_samples: Option<usize>,
    #[arg(long)]
    no_point_prompt: bool,
    #[arg(long)]
    no_box_prompt: bool,
    #[arg(long)]
    no_mask_prompt: bool,
    #[arg(long)]
    no_negative_point: bool,
    /// Image normalisation: auto (MedSAM weights → unit, else sam) | sam | unit.
    #[arg(long, default_value = "auto")]
    sam_normalization: String,
    /// Curriculum: order training samples by bin (high, medium, low, critical, real) and stored Dice (descending);
    /// epoch e uses the first max(min(100, n), ceil(n·d_e)) of them, d_e = min(1, 0.2 + 0.8·e/floor(E/2)).
    #[arg(long)]
    curriculum: bool,
    /// Validate every N epochs (the last epoch is always validated; `best` only changes on validated epochs).
    #[arg(long, default_value_t = 1)]
    val_every: usize,
    /// Option B: a run directory of real out-of-fold TransUNet predictions (`ultrarefiner augment oof`, same layout
    /// as an augment run: manifest.json, samples.csv, shards/). Needs --real-ratio.
    #[arg(long)]
    real_data: Option<PathBuf>,
    /// Share of real samples per epoch: exactly round(r·L) real + L − round(r·L) synthetic (L = synthetic training
    /// samples), each drawn without replacement where the pool is large enough.
    #[arg(long, default_value_t = 0.0)]
    real_ratio: f64,
    /// LoRA adapters on the image encoder (SPEC §6.8). Disables the embedding cache: the encoder runs (with
    /// gradients to the adapters) in every step, so it is much slower. best_sam.safetensors stores merged weights.
    #[arg(long)]
    use_lora: bool,
    #[arg(long, default_value_t = 4)]
    lora_rank: usize,
    #[arg(long, default_value_t = 4.0)]
    lora_alpha: f64,
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f64,
    /// Comma-separated: qkv, proj, mlp (= mlp.lin1 and mlp.lin2).
    #[arg(long, default_value = "qkv")]
    lora_targets: String,
    /// Embedding cache: on (encoder once per source image) | off (encoder in every step; for benchmarking).
    #[arg(long, default_value = "on")]
    embed_cache: String,
    /// On-disk embedding cache folder (entries under <dir>/<encoder fingerprint>/); memory only when not given.
    #[arg(long)]
    embed_cache_dir: Option<PathBuf>,
    /// In-memory embedding cache bound in GiB.
    #[arg(long, default_value_t = 8.0)]
    embed_cache_mem: f64,
    /// ROI-crop mode (SPEC §7.7): the image and the coarse mask are cropped to a box around the coarse lesion
    /// (centre ± 2.5σ, each side grown by --roi-expand-ratio, at least 64 px of the SAM grid), refined there and
    /// pasted back; outside the box the refined logits are the coarse logits. The crop depends on the mask, so the
    /// encoder runs in every step (no embedding cache; much slower). Recorded in best.json / best_sam.json, so
    /// evaluate and infer pick it up; Phase 3 needs its own --use-roi-crop (it prints a note when missing).
    #[arg(long)]
    use_roi_crop: bool,
    /// ROI expansion: each side of the box grows by r·(box size).
    #[arg(long, default_value_t = 0.2)]
    roi_expand_ratio: f64,
    /// Frozen encoder dtype: bf16 (CUDA only), f32 or auto [default auto: bf16 on CUDA, f32 on CPU and with LoRA].
    #[arg(long)]
    encoder_dtype: Option<String>,
    /// Gradient clipping by total L2 norm (0 disables).
    #[arg(long, default_value_t = 0.0)]
    grad_clip: f64,
    /// Gradient accumulation (micro-batches per optimiser step).
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    #[arg(long, default_value = "./checkpoints/sam_finetuned")]
    output_dir: PathBuf,
    /// Write epoch_<e> checkpoints every N epochs (0 = never).
    #[arg(long, default_value_t = 5)]
    save_every: usize,
    /// cpu | cuda | cuda:N [default: cuda:0 when built with CUDA and present, else cpu].
    #[arg(long)]
    device: Option<String>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// `auto` (continue from latest, or report a complete run) or a checkpoint path.
    #[arg(long)]
    resume: Option<String>,
    /// With --resume auto: retrain a complete run from scratch.
    #[arg(long)]
    force_retrain: bool,
    /// Plain output (no colours, no progress bar).
    #[arg(long)]
    plain: bool,
    /// ASCII-only output.
    #[arg(long)]
    ascii: bool,
}

fn main() {
    ultrarefiner::malloc::keep_freed_memory();
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .try_init();
    let a = Args::parse();
    let embed_cache = match a.embed_cache.as_str() {
        "on" => true,
        "off" => false,
        o => {
            eprintln!("error: --embed-cache {o}: expected on or off");
            std::process::exit(2);
        }
    };
    if !(a.embed_cache_mem.is_finite() && a.embed_cache_mem >= 0.0) {
        eprintln!("error: --embed-cache-mem must be a non-negative number of GiB");
        std::process::exit(2);
    }
    let opts = Phase2Options {
        data_root: a.data_root,
        dataset: a.dataset,
        processed_root: a.processed_root,
        sam_checkpoint: a.sam_checkpoint,
        config: a.config,
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        weight_decay: a.weight_decay,
        min_lr: a.min_lr,
        mask_prompt_style: a.mask_prompt_style,
        change_penalty_weight: a.change_penalty_weight,
        iou_loss_weight: a.iou_loss_weight,
        val_fraction: a.val_fraction,
        transunet_img_size: a.transunet_img_size,
        max_samples: a.max_samples,
        no_point_prompt: a.no_point_prompt,
        no_box_prompt: a.no_box_prompt,
        no_mask_prompt: a.no_mask_prompt,
        no_negative_point: a.no_negative_point,
        sam_normalization: a.sam_normalization,
        grad_clip: a.grad_clip,
        grad_accum: a.grad_accum,
        output_dir: a.output_dir,
        save_every: a.save_every,
        device: a.device,
        seed: a.seed,
        resume: a.resume,
        force_retrain: a.force_retrain,
        plain: a.plain,
        ascii: a.ascii,
        quiet: false,
        stop_after_epochs: None,
        sam_model_type: a.sam_model_type,
        use_lora: a.use_lora,
        lora_rank: a.lora_rank,
        lora_alpha: a.lora_alpha,
        lora_dropout: a.lora_dropout,
        lora_targets: a.lora_targets,
        curriculum: a.curriculum,
        val_every: a.val_every,
        real_data: a.real_data,
        real_ratio: a.real_ratio,
        embed_cache,
        embed_cache_dir: a.embed_cache_dir,
        embed_cache_mem: (a.embed_cache_mem * (1u64 << 30) as f64) as usize,
        encoder_dtype: a.encoder_dtype,
        use_roi_crop: a.use_roi_crop,
        roi_expand_ratio: a.roi_expand_ratio,
    };
    let stop = match StopFlag::install() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    match ultrarefiner::threads::run_on_compute_pool(|| run(&opts, &stop)) {
        Ok(o) if o.status == Phase2Status::Interrupted => std::process::exit(EXIT_TEMPFAIL),
        Ok(_) => {}
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
