//! `ultrarefiner`: the tool binary (prepare, augment, evaluate, infer, convert, fetch, bench).
//!
//! Each subcommand lives in its own module with an `Args` struct and a `run` function that calls the library.
use clap::{Parser, Subcommand};

mod augment;
mod bench;
mod common;
mod convert;
mod evaluate;
mod fetch;
mod gpu_check;
mod infer;
mod prepare;

#[derive(Parser)]
#[command(
    name = "ultrarefiner",
    version,
    about = "UltraRefiner tools: data preparation, failure simulation, evaluation, inference, weights and benchmarks",
    long_about = "UltraRefiner tools.\n\nTypical order: `prepare phantom|datasets` → `prepare verify` → `augment synthetic` → \
                  phase1 / phase2 / phase3 (separate binaries) → `evaluate` / `infer`.\nEvery subcommand has its own --help."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Dataset preparation: `datasets` (raw → processed + splits), `verify`, `phantom` (SPEC §3.11, §4).
    Prepare(prepare::Args),
    /// Phase 2 training data: simulated coarse-mask failures (`augment synthetic`, SPEC §8).
    Augment(augment::Args),
    /// Convert pretrained/original weights to canonical safetensors (SPEC §13.5).
    Convert(convert::Args),
    /// Download (or take from the local cache / a file) and convert pretrained weights (SPEC §13.6).
    Fetch(fetch::Args),
    /// Coarse vs refined per-image metrics on a processed split, result files, plots, overlays (SPEC §13.1).
    Evaluate(evaluate::Args),
    /// Segment images without ground truth: masks at the original size, overlays, predictions.csv (SPEC §13.2).
    Infer(infer::Args),
    /// Time a named workload and print one JSON line (SPEC §13.7).
    Bench(bench::Args),
    /// Device checks: CPU/GPU agreement of every model at `narrow` (SPEC §17.1; used by `make gpu-check`).
    GpuCheck(gpu_check::Args),
}

fn main() {
    ultrarefiner::malloc::keep_freed_memory();
    common::init_tracing();
    let cli = Cli::parse();
    let result = ultrarefiner::threads::run_on_compute_pool(|| match cli.command {
        Command::Prepare(a) => prepare::run(a),
        Command::Augment(a) => augment::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Fetch(a) => fetch::run(a),
        Command::Evaluate(a) => evaluate::run(a),
        Command::Infer(a) => infer::run(a),
        Command::Bench(a) => bench::run(a),
        Command::GpuCheck(a) => gpu_check::run(a),
    });
    if let Err(e) = result {
        common::exit_with(e);
    }
}
