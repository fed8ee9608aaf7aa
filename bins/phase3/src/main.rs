//! `phase3`: end-to-end fine-tuning of TransUNet + SAM refiner — SPEC §11.4.
//! Thin wrapper: parses flags and calls `ultrarefiner::train::phase3::run`.
use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use ultrarefiner::device::DeviceSpec;
use ultrarefiner::train::phase3::{Phase3Options, Phase3Outcome};
use ultrarefiner::train::signals::StopFlag;

#[derive(Parser, Debug)]
#[command(
    name = "phase3",
    version,
    about = "Phase 3: end-to-end fine-tuning of the Phase 1 TransUNet and the SAM refiner (0.3·coarse + 0.7·refined loss)",
    long_about = "Phase 3 of UltraRefiner: the Phase 1 TransUNet and the SAM refiner (a Phase 2 best_sam.safetensors, or a \
pretrained SAM/MedSAM to skip Phase 2) are trained together through the differentiable prompts, with the loss \
λc·L_coarse + λr·L_refined (SPEC §9.3) and two AdamW groups (transunet, sam) under one per-epoch cosine schedule.\n\n\
The SAM image encoder is frozen (unless --use-lora); its embeddings are cached per training image and flip (see \
--rotation-angles). \
Each epoch prints the training losses, a Coarse | Refined | Delta validation table and a Performance Comparison \
(Phase 1 baseline Dice, coarse Dice with Δ vs baseline, refined Dice with Δ vs coarse), with a warning when the coarse \
Dice falls more than 0.02 below the baseline.\n\n\
Writes <output-dir>/<DATASET>/fold_<k>/ with best/latest/final checkpoints (keys transunet.* + sam.*, + JSON sidecars \
holding the refiner settings, so `ultrarefiner evaluate --checkpoint best.safetensors` needs no extra flags), \
metrics.csv (coarse and refined metrics), summary.json, train.log and progress.png.\n\n\
Examples:\n  \
phase3 --dataset BUSI --fold 0 --sam-checkpoint checkpoints/sam_finetuned/RUN/best_sam.safetensors\n  \
phase3 --dataset BUSI --fold 0 --sam-checkpoint weights/medsam_vit_b.pth --transunet-lr 1e-4   # skip Phase 2\n  \
phase3 --config tiny --dataset PHANTOM --sam-checkpoint random --max-epochs 2                  # CPU smoke run\n  \
phase3 --dataset BUSI --fold 0 --sam-checkpoint RUN/best_sam.safetensors --use-gated-refinement --gate-max 0.8\n  \
phase3 --dataset BUSI --fold 0 --sam-checkpoint RUN/best.safetensors --use-lora --batch-size 2   # Phase 2 LoRA run\n\n\
SIGTERM/SIGUSR1 stop at the next step boundary with exit code 75; rerun with --resume auto to continue exactly."
)]
struct Args {
    /// Processed data root (contains <DATASET>/splits.json).
    #[arg(long, default_value = "./dataset/processed")]
    data_root: PathBuf,
    /// Single-dataset mode, e.g. BUSI (wins over --datasets).
    #[arg(long)]
    dataset: Option<String>,
    /// Combined mode: comma-separated datasets. With neither flag all five training datasets are combined.
    #[arg(long, value_delimiter = ',')]
    datasets: Vec<String>,
    /// Fold k (the same folds as Phase 1).
    #[arg(long, default_value_t = 0)]
    fold: u32,
    #[arg(long, default_value_t = 5)]
    n_splits: u32,
    /// Phase 1 checkpoint [default: checkpoints/transunet/{DS}/fold_{k}/best.safetensors].
    #[arg(long)]
    transunet_checkpoint: Option<PathBuf>,
    /// SAM weights: Phase 2 best_sam.safetensors (recommended; its best_sam.json supplies the mask-prompt style and
    /// normalisation), a converted SAM/MedSAM .safetensors, an original .pth, or `random` (tests/demos only).
    #[arg(long)]
    sam_checkpoint: String,
    /// Preset (paper, narrow, tiny) or TOML file.
    #[arg(long, default_value = "paper")]
    config: String,
    /// TransUNet input size S (must match the Phase 1 and Phase 2 models) [default: preset].
    #[arg(long)]
    img_size: Option<usize>,
    /// Must be 2 (the Phase 3 loss is binary) [default: preset].
    #[arg(long)]
    num_classes: Option<usize>,
    /// Skip connections used by the decoder (must match Phase 1) [default: preset].
    #[arg(long)]
    n_skip: Option<usize>,
    /// [default: preset's phase3.batch_size, 8 for paper]
    #[arg(long)]
    batch_size: Option<usize>,
    /// [default: preset's phase3.max_epochs, 100 for paper]
    #[arg(long)]
    max_epochs: Option<usize>,
    /// AdamW base LR of the TransUNet group (the skip-Phase-2 example of the original used 1e-4).
    #[arg(long, default_value_t = 1e-5)]
    transunet_lr: f64,
    /// AdamW base LR of the SAM group (prompt encoder + mask decoder).
    #[arg(long, default_value_t = 1e-5)]
    sam_lr: f64,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f64,
    /// Cosine floor.
    #[arg(long, default_value_t = 1e-6)]
    min_lr: f64,
    /// λc of L_coarse (0.5·CE + 0.5·Dice on the TransUNet logits).
    #[arg(long, default_value_t = 0.3)]
    coarse_loss_weight: f64,
    /// λr of L_refined (0.5·BCE + 0.5·Dice on the refined logits).
    #[arg(long, default_value_t = 0.7)]
    refined_loss_weight: f64,
    /// Size of L_refined: the SAM grid N (default, e.g. 1024) or the TransUNet grid S (e.g. 224).
    #[arg(long)]
    refined_loss_size: Option<usize>,
    /// direct | gaussian | distance [default: from best_sam.json, else the preset's].
    #[arg(long)]
    mask_prompt_style: Option<String>,
    /// Allow --mask-prompt-style to differ from the Phase 2 model's.
    #[arg(long)]
    allow_style_mismatch: bool,
    /// Sharpen the coarse probability before prompting (for binary-trained Phase 2 models).
    #[arg(long)]
    sharpen_coarse_mask: bool,
    #[arg(long, default_value_t = 10.0)]
    sharpen_temperature: f64,
    /// auto | sam | unit [default: from best_sam.json, else auto (MedSAM → unit)].
    #[arg(long)]
    sam_normalization: Option<String>,
    /// Gradient clipping by total L2 norm (0 disables).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f64,
    /// Micro-batches per optimiser step.
    #[arg(long, default_value_t = 1)]
    grad_accum: usize,
    /// β of the weight anchor β·Σ(θ − θ₁)² to the Phase 1 TransUNet weights (0 = off).
    #[arg(long, default_value_t = 0.0)]
    transunet_weight_reg: f64,
    /// α: scales only the gradient reaching the TransUNet through the refiner.
    #[arg(long, default_value_t = 1.0)]
    transunet_grad_scale: f64,
    /// TransUNet frozen (eval mode, output detached) for epochs < N.
    #[arg(long, default_value_t = 0)]
    freeze_transunet_epochs: u64,
    /// Trainable TransUNet subset: -1 all; 0 head only; k in 1..4 head + the last k decoder blocks.
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    transunet_unfreeze_decoder_layers: i64,
    #[arg(long)]
    freeze_sam_prompt_encoder: bool,
    #[arg(long)]
    freeze_sam_mask_decoder: bool,
    /// Freeze the whole SAM (only the TransUNet trains, through the refined loss).
    #[arg(long)]
    freeze_sam_all: bool,
    /// SAM prompt encoder and mask decoder frozen for epochs < N.
    #[arg(long, default_value_t = 0)]
    freeze_sam_epochs: u64,
    /// Trainable mask-decoder subset: -1 all; 0 output heads; k in 1..2 heads + the last k two-way layers.
    #[arg(long, default_value_t = -1, allow_hyphen_values = true)]
    sam_unfreeze_decoder_layers: i64,
    /// Disable the training augmentation (rotation/flip).
    #[arg(long)]
    no_augment: bool,
    /// LoRA adapters on the SAM image encoder (SPEC §6.8), trained in the `lora` group at --sam-lr. The embedding
    /// cache is then off: the encoder runs (with gradients to the adapters) in every step, so it is much slower and
    /// needs far more memory (batch 1-2 per 80 GB GPU at 1024). A --sam-checkpoint with LoRA adapters (Phase 2/3
    /// best.safetensors) continues from them (same --lora-rank/--lora-alpha); without --use-lora they are merged.
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
    /// Gated residual refinement (SPEC §7.8): refined = coarse + gate·(σ(SAM) − coarse) with the uncertainty gate
    /// gate = g_min + (g_max − g_min)·(1 − |2·coarse − 1|^γ), so confident coarse pixels stay and uncertain ones
    /// follow SAM. Recorded in best.json; evaluate/infer apply it automatically.
    #[arg(long)]
    use_gated_refinement: bool,
    /// γ of the gate (> 0; larger = more of the probability range counts as uncertain).
    #[arg(long, default_value_t = 1.0)]
    gate_gamma: f64,
    /// Gate at confident coarse pixels (coarse 0 or 1).
    #[arg(long, default_value_t = 0.0)]
    gate_min: f64,
    /// Gate at maximally uncertain coarse pixels (coarse 0.5).
    #[arg(long, default_value_t = 0.8)]
    gate_max: f64,
    /// Rotation angles of the cached SAM branch: 0 = flip only (2 cached embeddings per training image); K ≥ 1 = the
    /// ±20° rotation snapped to K fixed angles (up to 2(K+1) embeddings per image, K+1 times the encoder work and
    /// cache memory).
    #[arg(long, default_value_t = 0)]
    rotation_angles: usize,
    /// Run the frozen SAM encoder inside every training step instead of caching (continuous ±20° rotation as in
    /// Phase 1; one encoder forward per sample and step).
    #[arg(long)]
    no_embed_cache: bool,
    /// In-memory embedding-cache bound in GiB.
    #[arg(long, default_value_t = 8.0)]
    embed_cache_mem: f64,
    /// ROI-crop mode (SPEC §7.7): SAM refines an enlarged crop around the coarse lesion (centre ± 2.5σ, each side
    /// grown by --roi-expand-ratio, at least 64 px of the SAM grid) that is pasted back; outside it the refined logits
    /// are the coarse logits. The encoder runs on the crop in every step (no embedding cache, continuous rotation).
    /// Recorded in the checkpoint sidecar, so evaluate/infer use it without flags.
    #[arg(long)]
    use_roi_crop: bool,
    /// ROI expansion: each side of the box grows by r·(box size).
    #[arg(long, default_value_t = 0.2)]
    roi_expand_ratio: f64,
    #[arg(long, default_value = "./checkpoints/ultra_refiner")]
    output_dir: PathBuf,
    /// [default: {DATASET}/fold_{k}]
    #[arg(long)]
    exp_name: Option<String>,
    /// Write epoch_<e> checkpoints every N epochs (0 = never).
    #[arg(long, default_value_t = 20)]
    save_every: u64,
    /// cpu | cuda | cuda:N [default: cuda:0 when built with CUDA and present, else cpu].
    #[arg(long)]
    device: Option<String>,
    /// Frozen SAM image encoder precision: bf16 (CUDA only), f32 or auto (bf16 on CUDA, f32 on CPU).
    #[arg(long, value_name = "bf16|f32|auto")]
    encoder_dtype: Option<String>,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Threads for decoding and augmentation.
    #[arg(long, default_value_t = 8)]
    num_workers: usize,
    /// `auto` (continue from latest, or report a complete run) or a checkpoint path.
    #[arg(long)]
    resume: Option<String>,
    /// With --resume auto: retrain a complete run from scratch.
    #[arg(long)]
    force_retrain: bool,
    /// Resume even though training hyper-parameters changed (recorded in the history).
    #[arg(long)]
    allow_config_change: bool,
    /// Validate every N epochs (and after the last).
    #[arg(long, default_value_t = 1)]
    val_every: u64,
    /// Plain output (no colours, no progress bars).
    #[arg(long)]
    plain: bool,
    /// ASCII-only output.
    #[arg(long)]
    ascii: bool,
}

fn options(a: Args) -> anyhow::Result<Phase3Options> {
    let mut o = Phase3Options::new(a.data_root);
    o.dataset = a.dataset;
    o.datasets = a.datasets;
    o.fold = a.fold;
    o.n_splits = a.n_splits;
    o.transunet_checkpoint = a.transunet_checkpoint;
    o.sam_checkpoint = a.sam_checkpoint;
    o.config = a.config;
    o.img_size = a.img_size;
    o.num_classes = a.num_classes;
    o.n_skip = a.n_skip;
    o.batch_size = a.batch_size;
    o.max_epochs = a.max_epochs;
    o.transunet_lr = a.transunet_lr;
    o.sam_lr = a.sam_lr;
    o.weight_decay = a.weight_decay;
    o.min_lr = a.min_lr;
    o.coarse_loss_weight = a.coarse_loss_weight;
    o.refined_loss_weight = a.refined_loss_weight;
    o.refined_loss_size = a.refined_loss_size;
    o.mask_prompt_style = a.mask_prompt_style;
    o.allow_style_mismatch = a.allow_style_mismatch;
    o.sharpen_coarse_mask = a.sharpen_coarse_mask;
    o.sharpen_temperature = a.sharpen_temperature;
    o.sam_normalization = a.sam_normalization;
    o.grad_clip = a.grad_clip;
    o.grad_accum = a.grad_accum;
    o.transunet_weight_reg = a.transunet_weight_reg;
    o.transunet_grad_scale = a.transunet_grad_scale;
    o.freeze_transunet_epochs = a.freeze_transunet_epochs;
    o.transunet_unfreeze_decoder_layers = a.transunet_unfreeze_decoder_layers;
    o.freeze_sam_prompt_encoder = a.freeze_sam_prompt_encoder;
    o.freeze_sam_mask_decoder = a.freeze_sam_mask_decoder;
    o.freeze_sam_all = a.freeze_sam_all;
    o.freeze_sam_epochs = a.freeze_sam_epochs;
    o.sam_unfreeze_decoder_layers = a.sam_unfreeze_decoder_layers;
    o.no_augment = a.no_augment;
    o.use_lora = a.use_lora;
    o.lora_rank = a.lora_rank;
    o.lora_alpha = a.lora_alpha;
    o.lora_dropout = a.lora_dropout;
    o.lora_targets = a.lora_targets;
    o.use_gated_refinement = a.use_gated_refinement;
    o.gate_gamma = a.gate_gamma;
    o.gate_min = a.gate_min;
    o.gate_max = a.gate_max;
    o.rotation_angles = a.rotation_angles;
    o.embed_cache = !a.no_embed_cache;
    o.embed_cache_mem = (a.embed_cache_mem.max(0.0) * (1u64 << 30) as f64) as usize;
    o.use_roi_crop = a.use_roi_crop;
    o.roi_expand_ratio = a.roi_expand_ratio;
    o.output_dir = a.output_dir;
    o.exp_name = a.exp_name;
    o.save_every = a.save_every;
    o.device = a.device.map(|d| d.parse::<DeviceSpec>()).transpose()?;
    o.encoder_dtype = a.encoder_dtype;
    o.seed = a.seed;
    o.num_workers = a.num_workers;
    o.resume = a.resume;
    o.force_retrain = a.force_retrain;
    o.allow_config_change = a.allow_config_change;
    o.val_every = a.val_every;
    o.plain = a.plain;
    o.ascii = a.ascii;
    o.stop = Some(StopFlag::install()?);
    Ok(o)
}

fn main() {
    ultrarefiner::malloc::keep_freed_memory();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let args = Args::parse();
    let result = ultrarefiner::threads::run_on_compute_pool(|| {
        options(args).and_then(|o| ultrarefiner::train::phase3::run(&o).context("phase3 failed"))
    });
    match result {
        Ok(outcome) => {
            let code = outcome.exit_code();
            if let Phase3Outcome::Interrupted { .. } = outcome {
                eprintln!("phase3: stopped on request; exit code {code} (requeue and rerun with --resume auto)");
            }
            std::process::exit(code);
        }
        Err(e) => {
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            eprintln!("error: {msg}");
            std::process::exit(1);
        }
    }
}
