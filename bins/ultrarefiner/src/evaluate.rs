//! `ultrarefiner evaluate`: coarse vs refined per-image metrics on a processed split (SPEC §13.1).
use anyhow::{bail, Result};
use clap::Parser;
use std::path::PathBuf;
use ultrarefiner::device::DeviceSpec;
use ultrarefiner::eval::evaluate::{self, EvalSplit, EvaluateOptions, DEFAULT_DATASETS};
use ultrarefiner::eval::model::{parse_folds, ModelSource};

#[derive(Parser)]
#[command(after_help = "Model sources (exactly one):\n  \
--checkpoint P3.safetensors                      Phase 3 end-to-end file (keys transunet.* + sam.*; refiner settings from P3.json)\n  \
--transunet-checkpoint T --sam-checkpoint S       Phase 1 TransUNet + Phase 2 best_sam (or a pretrained SAM/MedSAM: skip Phase 2)\n  \
--transunet-checkpoint T --transunet-only         coarse path alone (no refined metrics)\n  \
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
    /// Print only the result table (no progress lines).
    #[arg(long)]
    quiet: bool,
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
        (Some(_), None, false) => {
            bail!("--transunet-checkpoint needs --sam-checkpoint (or --transunet-only for the coarse path alone)")
        }
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
