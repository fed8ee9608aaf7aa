//! `ultrarefiner prepare {datasets, verify, phantom}` (SPEC §3.11, §4): flag parsing only; the work is done by
//! `ultrarefiner::data`.
use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use ultrarefiner::config::Config;
use ultrarefiner::data::{
    self, phantom::PhantomOptions, prepare::PrepareOptions, verify::VerifyOptions,
};

#[derive(Parser, Debug)]
#[command(
    about = "Prepare datasets: convert raw layouts, verify processed data, generate the phantom set"
)]
pub struct Args {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Convert raw datasets into the processed layout with a train/test split and K folds (SPEC §3.2-§3.5).
    ///
    /// Layouts under --raw-root: BUSI/PHANTOM {benign,malignant,normal}/<base>.png + <base>_mask[_N].png;
    /// BUSBRA Images/bus_<id>.png + Masks/mask_<id>.png; BUS and UDIAT original/ + GT/; BUS_UC All/{images,masks}
    /// or {Benign,Malignant}/{images,masks}; BUS_UCLM images/ + masks/. UDIAT is test-only (unseen).
    /// Images become 8-bit grey, masks {0,255} (any non-zero colour is foreground; several masks are ORed);
    /// blank masks and BUSI normal/ are excluded. Writes <out>/<DS>/{train,test}/{images,masks}, splits.json,
    /// split_info.json and summary.json, prints a table, then runs `verify`.
    Datasets(DatasetsArgs),
    /// Check processed datasets (sizes, {0,255} masks, no empty masks, splits.json consistency, duplicates,
    /// hashes); exits 1 listing every problem (SPEC §3.10).
    Verify(VerifyArgs),
    /// Generate the synthetic breast-ultrasound phantom in the BUSI raw layout (SPEC §4); deterministic per seed.
    Phantom(PhantomArgs),
}

#[derive(Parser, Debug)]
pub struct DatasetsArgs {
    /// Folder holding one sub-folder per raw dataset (BUSI, BUSBRA, BUS, BUS_UC, BUS_UCLM, UDIAT, PHANTOM).
    #[arg(long, default_value = "./dataset/raw")]
    pub raw_root: PathBuf,
    /// Where the processed datasets are written.
    #[arg(long, default_value = "./dataset/processed")]
    pub output_root: PathBuf,
    /// Datasets to process (comma-separated or repeated); default: every dataset folder present under --raw-root.
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    pub datasets: Vec<String>,
    /// Preset (paper, narrow, tiny) or TOML path supplying [data] defaults.
    #[arg(long, default_value = "paper")]
    pub config: String,
    /// Fraction of each dataset held out as test split [default: 0.2, from [data]].
    #[arg(long)]
    pub test_ratio: Option<f64>,
    /// Number of cross-validation folds of the training split [default: 5, from [data]].
    #[arg(long)]
    pub n_splits: Option<usize>,
    /// Seed of the CPython-compatible shuffle used for the split and the folds [default: 42, from [data]].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Re-process datasets even when splits.json already matches the raw content.
    #[arg(long)]
    pub overwrite: bool,
    /// Skip bad samples (corrupt/zero-byte PNG, missing mask, mask size mismatch) with a warning instead of failing.
    #[arg(long)]
    pub skip_bad: bool,
    /// Worker threads for decoding/encoding (default: all cores).
    #[arg(long)]
    pub num_workers: Option<usize>,
}

#[derive(Parser, Debug)]
pub struct VerifyArgs {
    /// Processed root to check.
    #[arg(long, default_value = "./dataset/processed")]
    pub output_root: PathBuf,
    /// Datasets to check (comma-separated or repeated); default: every dataset folder under --output-root.
    #[arg(long, num_args = 1.., value_delimiter = ',')]
    pub datasets: Vec<String>,
    /// Treat duplicate images as errors (default: warnings).
    #[arg(long)]
    pub strict: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub num_workers: Option<usize>,
}

#[derive(Parser, Debug)]
pub struct PhantomArgs {
    /// Output folder (BUSI layout); pass it to `prepare datasets` as <raw-root>/PHANTOM.
    #[arg(long, default_value = "./dataset/raw/PHANTOM")]
    pub out: PathBuf,
    /// Preset (paper, narrow, tiny) or TOML path supplying [phantom] defaults (count and size ranges).
    #[arg(long, default_value = "paper")]
    pub config: String,
    /// Number of images (50% benign, 33% malignant, the rest normal) [default: 120 paper, 48 tiny].
    #[arg(long)]
    pub count: Option<usize>,
    /// Seed; the output is byte-identical for a seed and count.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Image height range in pixels, `A-B` inclusive [default: 280-400 paper, 112-144 tiny].
    #[arg(long)]
    pub size_h: Option<String>,
    /// Image width range in pixels, `A-B` inclusive [default: 360-520 paper, 128-176 tiny].
    #[arg(long)]
    pub size_w: Option<String>,
    /// Do not burn caliper marks into the images.
    #[arg(long)]
    pub no_annotations: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub num_workers: Option<usize>,
}

fn parse_range(flag: &str, s: &str) -> anyhow::Result<(usize, usize)> {
    let (a, b) = s
        .split_once('-')
        .with_context(|| format!("{flag} must look like A-B (e.g. 280-400), got `{s}`"))?;
    let a: usize = a
        .trim()
        .parse()
        .with_context(|| format!("{flag}: `{a}` is not a number"))?;
    let b: usize = b
        .trim()
        .parse()
        .with_context(|| format!("{flag}: `{b}` is not a number"))?;
    if a > b {
        bail!("{flag}: lower bound {a} exceeds upper bound {b}");
    }
    Ok((a, b))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.cmd {
        Cmd::Datasets(a) => {
            let cfg = Config::load(&a.config)?;
            let opts = PrepareOptions {
                raw_root: a.raw_root,
                output_root: a.output_root,
                datasets: data::parse_dataset_list(&a.datasets)?,
                test_ratio: a.test_ratio.unwrap_or(cfg.data.test_ratio),
                n_splits: a.n_splits.unwrap_or(cfg.data.n_splits),
                seed: a.seed.unwrap_or(cfg.data.seed),
                overwrite: a.overwrite,
                skip_bad: a.skip_bad,
                verify: true,
                num_workers: a.num_workers,
            };
            let report = data::prepare::prepare_datasets(&opts)?;
            print!("{report}");
            if !report.verify_ok() {
                bail!("verification of the processed datasets failed (see the errors above)");
            }
        }
        Cmd::Verify(a) => {
            let report = data::verify::verify_with(&VerifyOptions {
                output_root: a.output_root,
                datasets: data::parse_dataset_list(&a.datasets)?,
                strict: a.strict,
                num_workers: a.num_workers,
            })?;
            print!("{report}");
            if !report.is_ok() {
                eprintln!("{} problem(s) found", report.errors().len());
                std::process::exit(1);
            }
        }
        Cmd::Phantom(a) => {
            let cfg = Config::load(&a.config)?;
            let mut opts = PhantomOptions::from_config(&cfg.phantom, a.out, a.seed);
            if let Some(c) = a.count {
                opts.count = c;
            }
            if let Some(h) = &a.size_h {
                opts.height_range = parse_range("--size-h", h)?;
            }
            if let Some(w) = &a.size_w {
                opts.width_range = parse_range("--size-w", w)?;
            }
            opts.annotations = !a.no_annotations;
            opts.num_workers = a.num_workers;
            let report = data::phantom::generate(&opts)?;
            println!("{report}");
        }
    }
    Ok(())
}
