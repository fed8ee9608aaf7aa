//! `ultrarefiner`: the tool binary (prepare, augment, evaluate, infer, convert, fetch, bench).
//!
//! Each subcommand lives in its own module with an `Args` struct and a `run` function that calls the library.
use clap::{Parser, Subcommand};

mod bench;
mod common;
mod fetch;

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
    /// Time a named workload and print one JSON line (SPEC §13.7).
    Bench(bench::Args),
    /// Download, verify and convert pretrained SAM/MedSAM/ViT weights into weights/ (SPEC §13.6).
    Fetch(fetch::Args),
}

fn main() {
    common::init_tracing();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench(a) => bench::run(a),
        Command::Fetch(a) => fetch::run(a),
    };
    if let Err(e) = result {
        common::exit_with(e);
    }
}
