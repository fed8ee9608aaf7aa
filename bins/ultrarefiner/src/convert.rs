//! `ultrarefiner convert`: normalises a supported weight file to canonical safetensors + JSON sidecar (SPEC §13.5).
use anyhow::Result;
use clap::{Parser, ValueEnum};
use std::path::PathBuf;
use ultrarefiner::config::Config;
use ultrarefiner::convert::npz::{convert_encoder_file, EncoderFormat};

/// Source format of `--input`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FromFormat {
    /// Google ViT ImageNet-21k `R50+ViT-B_16.npz` (TransUNet encoder, SPEC §5.5).
    Npz,
    /// timm `vit_base_r50_s16_224.orig_in21k` safetensors (TransUNet encoder, SPEC §5.6).
    Timm,
}

#[derive(Parser)]
#[command(
    about = "Convert pretrained or original-system weights to canonical safetensors",
    after_help = "Writes OUTPUT (safetensors, canonical keys) and OUTPUT with extension .json (sidecar: source path, \
source sha256, format, provenance, mapping version, tensor count). Files are written atomically; every shape is \
checked, and missing or unmapped tensors are errors.\n\n\
Examples:\n  ultrarefiner convert --from npz --input R50+ViT-B_16.npz --output weights/r50-vit-b16.safetensors\n  \
ultrarefiner convert --from timm --input model.safetensors --output weights/r50-vit-b16.safetensors"
)]
pub struct Args {
    /// Source format.
    #[arg(long, value_enum)]
    from: FromFormat,
    /// Source file.
    #[arg(long)]
    input: PathBuf,
    /// Destination `.safetensors` file (its sidecar is written beside it with the extension `.json`).
    #[arg(long)]
    output: PathBuf,
    /// Model preset (paper, narrow, tiny) or TOML path whose geometry the weights are converted for
    /// (TransUNet: the position embeddings are resized to its grid).
    #[arg(long, default_value = "paper")]
    config: String,
}

pub fn run(a: Args) -> Result<()> {
    let cfg = Config::load(&a.config)?;
    match a.from {
        FromFormat::Npz | FromFormat::Timm => {
            let fmt = if a.from == FromFormat::Npz {
                EncoderFormat::Npz
            } else {
                EncoderFormat::Timm
            };
            // Library errors already name the file and the offending arrays.
            let conv = convert_encoder_file(fmt, &a.input, &a.output, &cfg.model.transunet)?;
            eprintln!(
                "wrote {} ({} tensors; {} source arrays read, {} ignored)",
                a.output.display(),
                conv.tensors.len(),
                conv.read.len(),
                conv.ignored.len()
            );
        }
    }
    Ok(())
}
