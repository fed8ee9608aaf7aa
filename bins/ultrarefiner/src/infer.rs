//! `ultrarefiner infer`: segment images without ground truth (SPEC §13.2).
use anyhow::Result;
use clap::Parser;
use std::path::PathBuf;
use ultrarefiner::device::DeviceSpec;
use ultrarefiner::eval::infer::{self, InferMode, InferOptions};

#[derive(Parser)]
#[command(
    after_help = "Inputs: PNG (any mode: grey, 16-bit, grey+alpha, RGB, RGBA, palette), JPEG, BMP, TIFF.\n\
Per image: grey → [0,1] → bilinear to S → model → probabilities at S → optional post-processing (§13.4) →\n\
bilinear back to the original size → threshold. Writes <name>_coarse.png, <name>_refined.png (0/255),\n\
<name>_overlay.png (refined mask green, α = 0.5, 2-px contour), with --save-prob <name>_prob.npy (f32, original\n\
size) and predictions.csv (name, width, height, areas, mean prob, IoU coarse/refined, components, rejected, fused, ms).\n\n\
Model sources as for `evaluate`: --checkpoint P3 | --transunet-checkpoint T --sam-checkpoint S |\n\
--transunet-checkpoint T --mode transunet | --ensemble 'dir/fold_{k}/best.safetensors' --folds 0-4.\n\n\
Example:\n  ultrarefiner infer --config tiny --input scans/ --output preds/ --checkpoint checkpoints/ultra_refiner/PHANTOM/fold_0/best.safetensors"
)]
pub struct Args {
    /// An image file or a folder of images.
    #[arg(long)]
    input: PathBuf,
    /// Output folder.
    #[arg(long)]
    output: PathBuf,
    /// Phase 3 end-to-end checkpoint (`transunet.*` + `sam.*`).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Phase 1 TransUNet checkpoint.
    #[arg(long)]
    transunet_checkpoint: Option<PathBuf>,
    /// SAM checkpoint (Phase 2 best_sam or a pretrained SAM/MedSAM).
    #[arg(long)]
    sam_checkpoint: Option<PathBuf>,
    /// Fold ensemble path pattern with `{k}` (mean of probabilities).
    #[arg(long)]
    ensemble: Option<String>,
    /// Folds of the ensemble, e.g. 0,1,2,3,4 or 0-4.
    #[arg(long, default_value = "0,1,2,3,4")]
    folds: String,
    /// full (TransUNet + SAM refiner) or transunet (coarse only).
    #[arg(long, default_value = "full")]
    mode: String,
    /// Binarisation threshold (strict `>`).
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Descend into sub-folders of --input.
    #[arg(long)]
    recursive: bool,
    /// Also write <name>_prob.npy: the final (refined, or coarse in transunet mode) probability at the original size.
    #[arg(long)]
    save_prob: bool,
    /// Preset (paper, narrow, tiny) or TOML path: model geometry.
    #[arg(long, default_value = "paper")]
    config: String,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<DeviceSpec>,
    /// No progress bar or lines.
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    post: crate::evaluate::PostArgs,
    #[command(flatten)]
    load: crate::evaluate::LoadArgs,
}

pub fn run(a: Args) -> Result<()> {
    let mode: InferMode = a.mode.parse()?;
    let coarse = mode == InferMode::Transunet;
    // In transunet mode a Phase 1 file alone is enough.
    let source = crate::evaluate::model_source(
        a.checkpoint,
        a.transunet_checkpoint,
        a.sam_checkpoint.clone(),
        coarse && a.sam_checkpoint.is_none(),
        a.ensemble,
        &a.folds,
    )?;
    let device = a
        .device
        .unwrap_or_else(DeviceSpec::default_for_build)
        .open()?;
    let opts = InferOptions {
        source,
        config: a.config,
        input: a.input,
        output: a.output,
        mode,
        threshold: a.threshold,
        batch_size: a.batch_size,
        recursive: a.recursive,
        save_prob: a.save_prob,
        post: a.post.to_post(),
        load: a.load.to_load()?,
        device,
        verbose: !a.quiet,
    };
    let r = infer::run(&opts)?;
    println!("infer: {} images → {}", r.rows.len(), r.output.display());
    Ok(())
}
