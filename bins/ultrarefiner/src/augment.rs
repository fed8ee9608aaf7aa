//! `ultrarefiner augment`: Phase 2 training data (SPEC §8): `synthetic` (simulated failures) and `oof` (Option B).
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use ultrarefiner::augment::grf::Spectrum;
use ultrarefiner::augment::oof::{run_oof, OofOptions, DEFAULT_CHECKPOINTS};
use ultrarefiner::augment::run::{run_synthetic, OutputFormat, SyntheticOptions};
use ultrarefiner::augment::sampler::{SimConfig, DEFAULT_BINS};
use ultrarefiner::augment::soft::{SoftKind, StoreDtype};
use ultrarefiner::eval::model::parse_folds;

#[derive(Parser, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub cmd: AugmentCmd,
}

#[derive(Subcommand, Debug)]
pub enum AugmentCmd {
    /// Simulate coarse-mask failures from the train-split ground truth (SDF-based, quality-controlled; SPEC §8.1–§8.9).
    ///
    /// Every sample corrupts one GT mask at its original resolution with a size- and shape-conditioned mix of failure
    /// modes (erosion, dilation, smooth deformation, shrinkage, breakage, holes, false-positive islands, attachments,
    /// boundary jitter), calibrates a global gain until the Dice of the stored mask falls in its target quality bin,
    /// softens it (sigmoid of the SDF by default) and stores it at --store-size. Output: <output-root>/<RUN>/ with
    /// shards/coarse-*.safetensors, samples.csv, manifest.json and summary.png. Output is identical for any
    /// --num-workers.
    Synthetic(SyntheticArgs),
    /// Real coarse masks: out-of-fold predictions of the Phase 1 TransUNets (Option B, SPEC §8.10).
    ///
    /// For every dataset and fold k, the Phase 1 checkpoint of fold k predicts the fold-k validation images (eval
    /// mode, no augmentation) at its input size S, so every training image gets exactly one prediction from a model
    /// that never trained on it. The foreground probabilities are stored like `augment synthetic` output (bin `real`,
    /// modes `oof:fold_k`, the actual Dice of P > 0.5 vs the ground truth) under <output-root>/<RUN>_oof/.
    /// Use it in Phase 2 as `--dataset <RUN>_oof` (real only) or `--real-data <output-root>/<RUN>_oof --real-ratio r`.
    ///
    /// Example (tiny demo, 5 folds trained): ultrarefiner augment oof --datasets BUSI --config tiny
    Oof(OofArgs),
}

#[derive(Parser, Debug)]
pub struct OofArgs {
    /// Processed datasets (SPEC §3.4 layout; the folds come from each dataset's splits.json).
    #[arg(long, default_value = "./dataset/processed")]
    pub processed_root: PathBuf,
    /// Output root; the run goes to <output-root>/<dataset names sorted and joined with '_'>_oof.
    #[arg(long, default_value = "./dataset/augmented")]
    pub output_root: PathBuf,
    /// Datasets to predict, e.g. --datasets BUSI BUSBRA (or BUSI,BUSBRA).
    #[arg(long, required = true, num_args = 1.., value_delimiter = ',')]
    pub datasets: Vec<String>,
    /// Phase 1 checkpoint of each dataset and fold: {DS} is replaced by the dataset name, {k} by the fold.
    #[arg(long, default_value = DEFAULT_CHECKPOINTS)]
    pub checkpoints: String,
    /// Folds to predict (e.g. 0,1,2,3,4 or 0-4); default: every fold of splits.json. With a subset, only those
    /// folds' validation images get a prediction.
    #[arg(long)]
    pub folds: Option<String>,
    /// Model geometry (paper, narrow, tiny or a TOML path) for checkpoints without a JSON sidecar; a Phase 1
    /// sidecar's recorded model configuration always wins.
    #[arg(long, default_value = "paper")]
    pub config: String,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Samples per shard file.
    #[arg(long, default_value_t = 1024)]
    pub shard_size: usize,
    /// Stored dtype: f32 or f16.
    #[arg(long, default_value = "f32")]
    pub store_dtype: String,
    /// cpu, cuda or cuda:N (default: cuda:0 when built with CUDA and a GPU exists, else cpu).
    #[arg(long)]
    pub device: Option<String>,
    /// Image decoding threads.
    #[arg(long, default_value_t = 4)]
    pub num_workers: usize,
}

#[derive(Parser, Debug)]
pub struct SyntheticArgs {
    /// Processed datasets (SPEC §3.4 layout; splits.json is read for the train split and folds).
    #[arg(long, default_value = "./dataset/processed")]
    pub processed_root: PathBuf,
    /// Output root; the run goes to <output-root>/<dataset names sorted and joined with '_'>.
    #[arg(long, default_value = "./dataset/augmented")]
    pub output_root: PathBuf,
    /// Datasets whose train split is used as sources, e.g. --datasets BUSI BUSBRA (or BUSI,BUSBRA).
    #[arg(long, required = true, num_args = 1.., value_delimiter = ',')]
    pub datasets: Vec<String>,
    /// Total number of samples (sources are used round-robin).
    #[arg(long, default_value_t = 100_000)]
    pub target_samples: usize,
    /// Quality bins "lo-hi:share,…" on Dice; every bin must end at or below 0.99.
    #[arg(long, default_value = DEFAULT_BINS)]
    pub bins: String,
    /// Share of an extra critical bin [0, 0.6) (the only bin that may contain empty masks).
    #[arg(long, default_value_t = 0.0)]
    pub critical_fraction: f64,
    /// Soft mask: sigmoid (σ(−SDF/T)), blur (Gaussian σ = T) or none (binary).
    #[arg(long, default_value = "sigmoid")]
    pub soft: String,
    /// Same as --soft sigmoid (accepted for familiarity with the original tool).
    #[arg(long)]
    pub soft_masks: bool,
    /// Range of the soft temperature T in working-grid pixels, "lo-hi".
    #[arg(long, default_value = "2-8")]
    pub temperature: String,
    /// Spectrum of the random boundary fields: gaussian or powerlaw.
    #[arg(long, default_value = "gaussian")]
    pub grf_spectrum: String,
    /// Stored mask size S (must match the TransUNet input size used by Phase 2/3).
    #[arg(long, default_value_t = 224)]
    pub store_size: usize,
    /// Stored dtype: f32 or f16.
    #[arg(long, default_value = "f32")]
    pub store_dtype: String,
    /// Samples per shard file.
    #[arg(long, default_value_t = 1024)]
    pub shard_size: usize,
    /// Output format: safetensors (shards), npy (one file per sample) or both.
    #[arg(long, default_value = "safetensors")]
    pub format: String,
    /// Compositions tried per sample before falling back to the closest candidate.
    #[arg(long, default_value_t = 12)]
    pub max_attempts: usize,
    /// Gain-calibration renders per composition.
    #[arg(long, default_value_t = 8)]
    pub bisection_steps: usize,
    /// Never use fold K's validation images as sources (for a fold-specific Phase 2 model).
    #[arg(long, value_name = "K")]
    pub exclude_fold: Option<usize>,
    /// Seed of the project RNG.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Worker threads (default: all cores). The output does not depend on it.
    #[arg(long)]
    pub num_workers: Option<usize>,
    /// Keep complete shards of an interrupted run and generate the rest.
    #[arg(long)]
    pub resume: bool,
    /// Print the allocation (sources, samples per bin) and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// Accepted for compatibility; the SDF generator is the only one.
    #[arg(long, hide = true)]
    pub use_sdf: bool,
    /// Hide the progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

fn parse_range(s: &str) -> anyhow::Result<(f64, f64)> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| anyhow::anyhow!("--temperature: expected lo-hi, got {s:?}"))?;
    Ok((a.trim().parse()?, b.trim().parse()?))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.cmd {
        AugmentCmd::Synthetic(a) => run_synthetic_cmd(a),
        AugmentCmd::Oof(a) => run_oof_cmd(a),
    }
}

fn run_oof_cmd(a: OofArgs) -> anyhow::Result<()> {
    let mut o = OofOptions::new(a.datasets);
    o.processed_root = a.processed_root;
    o.output_root = a.output_root;
    o.checkpoints = a.checkpoints;
    o.folds = a.folds.as_deref().map(parse_folds).transpose()?;
    o.config = a.config;
    o.batch_size = a.batch_size;
    o.shard_size = a.shard_size;
    o.store_dtype = a.store_dtype.parse()?;
    o.device = a.device.as_deref().map(str::parse).transpose()?;
    o.num_workers = a.num_workers;
    let rep = run_oof(&o)?;
    print!("{}", rep.table);
    println!(
        "wrote {} ({} samples, {:.1} s)",
        rep.run_dir.display(),
        rep.summary.total,
        rep.seconds
    );
    Ok(())
}

fn run_synthetic_cmd(a: SyntheticArgs) -> anyhow::Result<()> {
    let soft: SoftKind = if a.soft_masks {
        SoftKind::Sigmoid
    } else {
        a.soft.parse()?
    };
    let spectrum: Spectrum = a.grf_spectrum.parse()?;
    let store_dtype: StoreDtype = a.store_dtype.parse()?;
    let format: OutputFormat = a.format.parse()?;
    let opts = SyntheticOptions {
        processed_root: a.processed_root,
        output_root: a.output_root,
        datasets: a.datasets,
        target_samples: a.target_samples,
        bins: a.bins,
        critical_fraction: a.critical_fraction,
        sim: SimConfig {
            temperature: parse_range(&a.temperature)?,
            soft,
            spectrum,
            store_size: a.store_size,
            store_dtype,
            max_attempts: a.max_attempts.max(1),
            bisection_steps: a.bisection_steps.max(1),
        },
        shard_size: a.shard_size,
        format,
        exclude_fold: a.exclude_fold,
        seed: a.seed,
        num_workers: a.num_workers,
        resume: a.resume,
        dry_run: a.dry_run,
        progress: !a.no_progress && !a.dry_run,
    };
    let rep = run_synthetic(&opts)?;
    print!("{}", rep.allocation);
    if opts.dry_run {
        return Ok(());
    }
    print!("{}", rep.table);
    println!(
        "wrote {} ({:.1} s, {:.1} samples/s); summary plot: {}",
        rep.run_dir.display(),
        rep.seconds,
        rep.summary.total as f64 / rep.seconds.max(1e-9),
        rep.run_dir.join("summary.png").display()
    );
    Ok(())
}
