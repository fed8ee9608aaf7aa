//! `ultrarefiner evaluate`: coarse vs refined per-image metrics on a processed split (SPEC §13.1).
use anyhow::{bail, Result};
use clap::Parser;
use std::path::PathBuf;
use ultrarefiner::device::DeviceSpec;
use ultrarefiner::eval::evaluate::{self, EvalSize, EvalSplit, EvaluateOptions, DEFAULT_DATASETS};
use ultrarefiner::eval::model::{
    parse_folds, EncoderDtype, EnsembleMode, LoadOptions, ModelSource, RefinerFlags,
};
use ultrarefiner::eval::postprocess::PostProcess;

/// §13.4 post-processing flags (shared by `evaluate` and `infer`).
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Post-processing (SPEC §13.4; per image at S, on probabilities)")]
pub struct PostArgs {
    /// Fall back to the coarse map when the refinement looks implausible (IoU, area ratio, components).
    #[arg(long)]
    use_rejection_rules: bool,
    /// Reject when IoU(coarse, refined) at 0.5 is below this.
    #[arg(long, default_value_t = 0.5)]
    reject_iou_threshold: f64,
    /// Reject when refined/coarse area is below this (coarse area > 0).
    #[arg(long, default_value_t = 0.3)]
    reject_area_ratio_min: f64,
    /// Reject when refined/coarse area is above this (coarse area > 0).
    #[arg(long, default_value_t = 3.0)]
    reject_area_ratio_max: f64,
    /// Reject when the refined mask has more 4-connected components than this.
    #[arg(long, default_value_t = 5)]
    reject_max_components: usize,
    /// Take the refined probability only in a band around the coarse boundary, the coarse one elsewhere.
    #[arg(long)]
    use_boundary_fusion: bool,
    /// Width of the fusion band in pixels at S (3×3 dilation/erosion applied width/2 times).
    #[arg(long, default_value_t = 15)]
    boundary_band_width: usize,
}

impl PostArgs {
    pub fn to_post(&self) -> PostProcess {
        PostProcess {
            use_rejection_rules: self.use_rejection_rules,
            reject_iou_threshold: self.reject_iou_threshold,
            reject_area_ratio_min: self.reject_area_ratio_min,
            reject_area_ratio_max: self.reject_area_ratio_max,
            reject_max_components: self.reject_max_components,
            use_boundary_fusion: self.use_boundary_fusion,
            boundary_band_width: self.boundary_band_width,
        }
    }
}

/// Model-loading flags beyond the source (shared by `evaluate` and `infer`).
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Model loading and refiner settings")]
pub struct LoadArgs {
    /// Frozen SAM image encoder dtype: auto (bf16 on CUDA, f32 on CPU), f32, bf16, f16.
    #[arg(long, default_value = "auto")]
    encoder_dtype: String,
    /// Fold ensembling: mean (every fold runs the full pipeline; probabilities averaged) or coarse-then-refine
    /// (Phase 1 folds + one shared --sam-checkpoint: mean TransUNet probability, SAM once).
    #[arg(long, default_value = "mean")]
    ensemble_mode: String,
    /// Let the refiner flags below replace the settings recorded in the checkpoint's sidecar.
    #[arg(long)]
    override_refiner: bool,
    /// Mask prompt style: direct | gaussian | distance.
    #[arg(long)]
    mask_prompt_style: Option<String>,
    #[arg(long)]
    no_point_prompt: bool,
    #[arg(long)]
    no_box_prompt: bool,
    #[arg(long)]
    no_mask_prompt: bool,
    #[arg(long)]
    no_negative_point: bool,
    /// Sharpen the coarse probability before prompting (σ((P − 0.5)·T)).
    #[arg(long)]
    sharpen_coarse_mask: bool,
    #[arg(long)]
    sharpen_temperature: Option<f64>,
    /// Soft multimask selection temperature.
    #[arg(long)]
    selection_temperature: Option<f64>,
    /// SAM input normalisation: sam | medsam.
    #[arg(long)]
    sam_normalization: Option<String>,
}

impl LoadArgs {
    pub fn to_load(&self) -> Result<LoadOptions> {
        Ok(LoadOptions {
            encoder_dtype: self.encoder_dtype.parse::<EncoderDtype>()?,
            ensemble_mode: self.ensemble_mode.parse::<EnsembleMode>()?,
            refiner_flags: RefinerFlags {
                mask_prompt_style: self.mask_prompt_style.clone(),
                no_point_prompt: self.no_point_prompt,
                no_box_prompt: self.no_box_prompt,
                no_mask_prompt: self.no_mask_prompt,
                no_negative_point: self.no_negative_point,
                sharpen_coarse_mask: self.sharpen_coarse_mask,
                sharpen_temperature: self.sharpen_temperature,
                selection_temperature: self.selection_temperature,
                sam_normalization: self.sam_normalization.clone(),
                override_sidecar: self.override_refiner,
            },
        })
    }
}

#[derive(Parser)]
#[command(after_help = "Model sources (exactly one):\n  \
--checkpoint P3.safetensors                      Phase 3 end-to-end file (keys transunet.* + sam.*; refiner settings from P3.json)\n  \
--transunet-checkpoint T --sam-checkpoint S       Phase 1 TransUNet + Phase 2 best_sam (or a pretrained SAM/MedSAM: skip Phase 2)\n  \
--transunet-checkpoint T [--transunet-only]       coarse path alone (no refined metrics); also --checkpoint of a Phase 1 file\n  \
--ensemble 'dir/fold_{k}/best.safetensors' --folds 0,1,2,3,4   fold ensemble (mean of probabilities)\n\n\
Outputs: <out>/<DS>/<split>[_fold<k>]_result.json, <out>/<DS>/per_case.csv, <out>/summary.{json,csv,png},\n\
and with --visualize <out>/<DS>/visualizations/sample_<idx>_imp<+d>.png.\n\n\
Example:\n  ultrarefiner evaluate --config tiny --data-root dataset/processed --datasets PHANTOM \\\n    \
--transunet-checkpoint checkpoints/transunet/PHANTOM/fold_0/best.safetensors \\\n    \
--sam-checkpoint checkpoints/sam_refiner/best_sam.safetensors --visualize")]
pub struct Args {
    /// Phase 3 end-to-end checkpoint (`transunet.*` + `sam.*`).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Phase 1 TransUNet checkpoint (canonical keys).
    #[arg(long)]
    transunet_checkpoint: Option<PathBuf>,
    /// SAM checkpoint: Phase 2 best_sam.safetensors or a pretrained SAM/MedSAM (.pth or .safetensors).
    #[arg(long)]
    sam_checkpoint: Option<PathBuf>,
    /// Evaluate the TransUNet (coarse) path only.
    #[arg(long)]
    transunet_only: bool,
    /// Fold ensemble: a checkpoint path pattern with `{k}` (Phase 3 files, or Phase 1 files + --sam-checkpoint).
    #[arg(long)]
    ensemble: Option<String>,
    /// Folds of the ensemble, e.g. 0,1,2,3,4 or 0-4.
    #[arg(long, default_value = "0,1,2,3,4")]
    folds: String,
    /// Processed data root.
    #[arg(long, default_value = "./dataset/processed")]
    data_root: PathBuf,
    /// Datasets (comma-separated or repeated; default the five training datasets).
    #[arg(long, value_delimiter = ',', num_args = 1..)]
    datasets: Vec<String>,
    /// Add the unseen test-only dataset UDIAT.
    #[arg(long)]
    include_unseen: bool,
    /// test | val | train | kfold-train.
    #[arg(long, default_value = "test")]
    split: String,
    /// Fold for val / kfold-train (default 0); with test it only labels the output folder.
    #[arg(long)]
    fold: Option<usize>,
    #[arg(long, default_value_t = 5)]
    n_splits: usize,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Binarisation threshold (strict `>`).
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Metric grid: the TransUNet size (224) or `original` (probabilities resampled bilinearly to the processed
    /// image size and compared with the processed mask).
    #[arg(long, default_value = "224")]
    eval_size: String,
    /// CSV `dataset,name,spacing_x_mm,spacing_y_mm` (original resolution): adds HD95/ASSD in mm.
    #[arg(long)]
    spacing_csv: Option<PathBuf>,
    /// Preset (paper, narrow, tiny) or TOML path: model geometry and default refiner settings.
    #[arg(long, default_value = "paper")]
    config: String,
    /// Output folder (default ./results/<split>_evaluation or ./results/<split>_fold<k>_evaluation).
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Write four-panel overlays per dataset.
    #[arg(long)]
    visualize: bool,
    /// Overlays per dataset (0 or -1 = all).
    #[arg(long, default_value_t = 10, allow_negative_numbers = true)]
    num_visualize: i64,
    /// Overlay the n/2 largest and n/2 smallest Dice improvements instead of evenly spaced cases.
    #[arg(long)]
    visualize_best_worst: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<DeviceSpec>,
    /// Print only the result table (no progress bar or lines).
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    post: PostArgs,
    #[command(flatten)]
    load: LoadArgs,
}

/// Resolves the model-source flags shared by `evaluate` and `infer`.
pub fn model_source(
    checkpoint: Option<PathBuf>,
    transunet: Option<PathBuf>,
    sam: Option<PathBuf>,
    transunet_only: bool,
    ensemble: Option<String>,
    folds: &str,
) -> Result<ModelSource> {
    if let Some(pattern) = ensemble {
        if checkpoint.is_some() || transunet.is_some() {
            bail!("--ensemble cannot be combined with --checkpoint or --transunet-checkpoint");
        }
        return Ok(ModelSource::Ensemble {
            pattern,
            folds: parse_folds(folds)?,
            sam,
            transunet_only,
        });
    }
    if let Some(c) = checkpoint {
        if transunet.is_some() || sam.is_some() {
            bail!("--checkpoint (Phase 3) cannot be combined with --transunet-checkpoint / --sam-checkpoint");
        }
        if transunet_only {
            bail!(
                "--transunet-only needs --transunet-checkpoint (a Phase 1 file), not --checkpoint"
            );
        }
        return Ok(ModelSource::Phase3 { checkpoint: c });
    }
    match (transunet, sam, transunet_only) {
        (Some(t), _, true) => Ok(ModelSource::TransUnetOnly { transunet: t }),
        (Some(t), Some(s), false) => Ok(ModelSource::Pair { transunet: t, sam: s }),
        // A Phase 1 checkpoint alone evaluates the coarse path (as --transunet-only).
        (Some(t), None, false) => Ok(ModelSource::TransUnetOnly { transunet: t }),
        _ => bail!(
            "no model given: use --checkpoint, --transunet-checkpoint with --sam-checkpoint or --transunet-only, \
             or --ensemble with --folds"
        ),
    }
}

pub fn run(a: Args) -> Result<()> {
    let source = model_source(
        a.checkpoint,
        a.transunet_checkpoint,
        a.sam_checkpoint,
        a.transunet_only,
        a.ensemble,
        &a.folds,
    )?;
    let mut datasets: Vec<String> = if a.datasets.is_empty() {
        DEFAULT_DATASETS.iter().map(|s| s.to_string()).collect()
    } else {
        ultrarefiner::data::parse_dataset_list(&a.datasets)?
            .iter()
            .map(|k| k.name().to_string())
            .collect()
    };
    if a.include_unseen && !datasets.iter().any(|d| d == "UDIAT") {
        datasets.push("UDIAT".into());
    }
    let device = a
        .device
        .unwrap_or_else(DeviceSpec::default_for_build)
        .open()?;
    let opts = EvaluateOptions {
        source,
        config: a.config,
        data_root: a.data_root,
        datasets,
        split: a.split.parse::<EvalSplit>()?,
        fold: a.fold,
        n_splits: a.n_splits,
        batch_size: a.batch_size,
        threshold: a.threshold,
        eval_size: a.eval_size.parse::<EvalSize>()?,
        spacing_csv: a.spacing_csv,
        post: a.post.to_post(),
        load: a.load.to_load()?,
        output_dir: a.output_dir,
        visualize: a.visualize,
        num_visualize: a.num_visualize,
        visualize_best_worst: a.visualize_best_worst,
        device,
        verbose: !a.quiet,
    };
    let report = evaluate::run(&opts)?;
    println!("{}", evaluate::console_table(&report));
    println!("{}", evaluate::demo_summary_line(&report));
    Ok(())
}
