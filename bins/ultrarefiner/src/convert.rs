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
    /// Original segment-anything / MedSAM `.pth` (plain state dict, `{'model': …}`, optional `sam.` prefix; SPEC §6.6).
    SamPth,
    /// Original-name SAM `.safetensors` (e.g. `sam_vit_b_01ec64.safetensors`), checked strictly.
    SamSafetensors,
    /// Hugging Face transformers `SamModel` weights (`vision_encoder.*` names; SPEC §6.6 mapping).
    HfSam,
}

#[derive(Parser)]
#[command(
    about = "Convert pretrained or original-system weights to canonical safetensors",
    after_help = "Writes OUTPUT (safetensors, canonical keys) and OUTPUT with extension .json (sidecar: source path, \
source sha256, format, provenance, mapping version, tensor count). Files are written atomically; every shape is \
checked, and missing or unmapped tensors are errors.\n\n\
Examples:\n  ultrarefiner convert --from npz --input R50+ViT-B_16.npz --output weights/r50-vit-b16.safetensors\n  \
ultrarefiner convert --from timm --input model.safetensors --output weights/r50-vit-b16.safetensors\n  \
ultrarefiner convert --from sam-pth --input medsam_vit_b.pth --output weights/medsam-vit-b.safetensors --provenance medsam\n  \
ultrarefiner convert --from hf-sam --input model.safetensors --output weights/sam-vit-b.safetensors"
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
    /// SAM weights only: `sam` or `medsam`, recorded in the sidecar; selects the default input normalisation (SPEC §7.1).
    #[arg(long)]
    provenance: Option<String>,
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
        FromFormat::SamPth | FromFormat::SamSafetensors => {
            let n = ultrarefiner::convert::pth::sam_pth_to_safetensors_with(
                &a.input,
                &a.output,
                a.provenance.as_deref(),
            )?;
            eprintln!(
                "wrote {} ({n} tensors, original SAM names)",
                a.output.display()
            );
        }
        FromFormat::HfSam => {
            let n = ultrarefiner::convert::hf_sam::hf_sam_to_safetensors(
                &a.input,
                &a.output,
                a.provenance.as_deref(),
            )?;
            eprintln!(
                "wrote {} ({n} tensors, mapped from HF names)",
                a.output.display()
            );
        }
    }
    Ok(())
}
