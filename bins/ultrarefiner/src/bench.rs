//! `ultrarefiner bench`: prints one JSON line per run (SPEC §13.7).
use anyhow::Result;
use clap::Parser;
use ultrarefiner::bench::{self, BenchOptions};
use ultrarefiner::device::DeviceSpec;

#[derive(Parser)]
#[command(
    after_help = "Workloads: run with --list to see them with a description.\n\
Example: ultrarefiner bench --workload sgemm-2048 --n 5"
)]
pub struct Args {
    /// Workload name (see --list).
    #[arg(long, required_unless_present = "list")]
    workload: Option<String>,
    /// List the workloads and exit.
    #[arg(long)]
    list: bool,
    /// Model preset (paper, narrow, tiny) or a TOML path.
    #[arg(long, default_value = "paper")]
    config: String,
    /// Batch size where the workload has one (default: the workload's own).
    #[arg(long)]
    batch: Option<usize>,
    /// Timed repetitions.
    #[arg(long, default_value_t = 5)]
    n: usize,
    /// Untimed warm-up repetitions.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// dtype of the frozen SAM image encoder: bf16 (CUDA only) | f32 | auto (bf16 on CUDA, f32 on CPU).
    #[arg(long, default_value = "auto")]
    encoder_dtype: String,
    /// TF32 matrix products on CUDA: on | off.
    #[arg(long, default_value = "off")]
    tf32: String,
}

pub fn run(a: Args) -> Result<()> {
    if a.list {
        for (name, about, _) in bench::workloads() {
            println!("{name:28} {about}");
        }
        return Ok(());
    }
    let device = a.device.open()?;
    ultrarefiner::device::set_tf32(ultrarefiner::device::parse_on_off("--tf32", &a.tf32)?);
    let opts = BenchOptions {
        workload: a.workload.unwrap_or_default(),
        config: a.config,
        batch: a.batch,
        n: a.n,
        warmup: a.warmup,
        encoder_dtype: Some(ultrarefiner::device::encoder_dtype(
            Some(&a.encoder_dtype),
            &device,
        )?),
        device,
    };
    let r = bench::run(&opts)?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
