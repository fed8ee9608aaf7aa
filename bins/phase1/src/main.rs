//! `phase1`: train the TransUNet coarse segmenter on one processed dataset (or several combined) — SPEC §11.2.
//! Thin wrapper: parses flags and calls `ultrarefiner::train::phase1::run`.
use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use ultrarefiner::device::DeviceSpec;
use ultrarefiner::train::phase1::{BestMetric, Phase1Options, Phase1Outcome};
use ultrarefiner::train::signals::StopFlag;

#[derive(Parser, Debug)]
#[command(
    name = "phase1",
    version,
    about = "Phase 1: train TransUNet (R50-ViT-B/16) on a processed dataset fold (SGD, poly LR, 0.5·CE + 0.5·Dice)",
    long_about = "Phase 1 of UltraRefiner: train the TransUNet coarse segmenter on one fold of a processed dataset \
(`ultrarefiner prepare datasets` makes them).\n\n\
Writes a run directory <output-dir>/<DATASET>/fold_<k>/ (combined: combined/fold_<k>) with best/latest/final \
checkpoints (+ JSON sidecars), metrics.csv, summary.json, train.log and progress.png.\n\n\
Examples:\n  \
phase1 --dataset BUSI --fold 0\n  \
phase1 --config tiny --dataset BUSI --fold 0                       # CPU demo in minutes (12 epochs, batch 4, lr 0.05)\n  \
phase1 --datasets BUSI,BUSBRA --fold 2 --resume auto                # combined mode, resumable\n\n\
Precedence: preset (--config) < explicit flags. SIGTERM/SIGUSR1 stop at the next step boundary with exit code 75; \
rerun with --resume auto to continue exactly where the last completed epoch left off."
)]
struct Args {
    /// Processed data root (contains <DATASET>/splits.json).
    #[arg(long, default_value = "./dataset/processed")]
    data_root: PathBuf,
    /// Single-dataset mode, e.g. BUSI (wins over --datasets).
    #[arg(long)]
    dataset: Option<String>,
    /// Combined mode: comma-separated list; with neither flag, all five training datasets are combined.
    #[arg(long, value_delimiter = ',')]
    datasets: Vec<String>,
    /// Fold index k (0-based) of splits.json used for validation.
    #[arg(long, default_value_t = 0)]
    fold: u32,
    /// Number of folds splits.json was prepared with.
    #[arg(long, default_value_t = 5)]
    n_splits: u32,
    /// Backbone name (only R50-ViT-B_16 is supported).
    #[arg(long, default_value = "R50-ViT-B_16")]
    vit_name: String,
    /// Pretrained encoder: .npz, timm or canonical safetensors; `none` for a random encoder. Default:
    /// weights/r50-vit-b16.safetensors if present (paper-sized presets), else random with a warning.
    #[arg(long)]
    vit_pretrained: Option<String>,
    /// Input size S (multiple of 16); default from the preset (paper 224, tiny 96).
    #[arg(long)]
    img_size: Option<usize>,
    /// Output classes (Phase 1 is binary: 2).
    #[arg(long)]
    num_classes: Option<usize>,
    /// Number of decoder skip connections (0–3).
    #[arg(long)]
    n_skip: Option<usize>,
    /// Batch size; default from the preset (paper 24, tiny 4).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Epochs; default from the preset (paper 150, tiny 12).
    #[arg(long)]
    max_epochs: Option<usize>,
    /// SGD base learning rate (poly(0.9) decay per optimiser step); default from the preset's [phase1] base_lr,
    /// else 0.01 (paper; tiny 0.05).
    #[arg(long)]
    base_lr: Option<f64>,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// SGD weight decay (all parameters).
    #[arg(long, default_value_t = 1e-4)]
    weight_decay: f64,
    /// Preset: paper, narrow, tiny, or a TOML file.
    #[arg(long, default_value = "paper")]
    config: String,
    /// Root of the run directories.
    #[arg(long, default_value = "./checkpoints/transunet")]
    output_dir: PathBuf,
    /// Run directory below --output-dir (default {DATASET}/fold_{k}, combined/fold_{k}).
    #[arg(long)]
    exp_name: Option<String>,
    /// Also keep epoch_<e> checkpoints every this many epochs (0: never).
    #[arg(long, default_value_t = 50)]
    save_every: u64,
    /// Best-checkpoint metric: dice (batch-pooled) or dice_img (per-image mean).
    #[arg(long, default_value = "dice")]
    best_metric: String,
    /// Disable the training augmentation (SPEC §3.8).
    #[arg(long)]
    no_augment: bool,
    /// cpu, cuda or cuda:N (default: cuda:0 when built with CUDA and a GPU exists, else cpu).
    #[arg(long)]
    device: Option<String>,
    /// Run seed (shuffle, augmentation, dropout, random initialisation).
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Data-loading threads.
    #[arg(long, default_value_t = 8)]
    num_workers: usize,
    /// `auto` (complete → exit 0; latest → resume; else fresh) or a checkpoint path.
    #[arg(long)]
    resume: Option<String>,
    /// With --resume auto: train again from scratch even if the run is complete.
    #[arg(long)]
    force_retrain: bool,
    /// Allow training hyper-parameters to differ from the resumed checkpoint (recorded in the history).
    #[arg(long)]
    allow_config_change: bool,
    /// Validate every this many epochs (the last epoch is always validated).
    #[arg(long, default_value_t = 1)]
    val_every: u64,
    /// Plain output: no colours, no progress bars (automatic when stdout is not a terminal).
    #[arg(long)]
    plain: bool,
    /// ASCII instead of box-drawing characters.
    #[arg(long)]
    ascii: bool,
}

fn options(a: Args) -> anyhow::Result<Phase1Options> {
    let mut o = Phase1Options::new(a.data_root);
    o.dataset = a.dataset;
    o.datasets = a.datasets;
    o.fold = a.fold;
    o.n_splits = a.n_splits;
    o.vit_name = a.vit_name;
    o.vit_pretrained = a.vit_pretrained;
    o.img_size = a.img_size;
    o.num_classes = a.num_classes;
    o.n_skip = a.n_skip;
    o.batch_size = a.batch_size;
    o.max_epochs = a.max_epochs;
    o.base_lr = a.base_lr;
    o.momentum = a.momentum;
    o.weight_decay = a.weight_decay;
    o.config = a.config;
    o.output_dir = a.output_dir;
    o.exp_name = a.exp_name;
    o.save_every = a.save_every;
    o.best_metric = a.best_metric.parse::<BestMetric>()?;
    o.no_augment = a.no_augment;
    o.device = a.device.map(|d| d.parse::<DeviceSpec>()).transpose()?;
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
        options(args).and_then(|o| ultrarefiner::train::phase1::run(&o).context("phase1 failed"))
    });
    match result {
        Ok(outcome) => {
            let code = outcome.exit_code();
            if let Phase1Outcome::Interrupted { .. } = outcome {
                eprintln!("phase1: stopped on request; exit code {code} (requeue and rerun with --resume auto)");
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
