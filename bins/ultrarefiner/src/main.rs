//! `ultrarefiner`: the project's tool binary (SPEC §1.1). One module per subcommand; the library does the work.
use clap::{Parser, Subcommand};

mod augment;

#[derive(Parser, Debug)]
#[command(name = "ultrarefiner", version, about = "UltraRefiner tools: data preparation, augmentation, evaluation")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Phase 2 training data: simulated coarse-mask failures (`augment synthetic`, SPEC §8).
    Augment(augment::Args),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Augment(a) => augment::run(a),
    }
}
