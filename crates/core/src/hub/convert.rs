//! Conversion of a fetched file to canonical safetensors, dispatched by [`WeightFormat`] (SPEC §13.5, §13.6).
//!
//! Each arm calls the `crate::convert` function that `ultrarefiner convert` uses, so a fetched file and a converted
//! one are identical. Every converter writes `output` (canonical keys, f32, strict shape checks) and the sidecar
//! `output` with extension `.json`: `{source_path, source_sha256, format, provenance, mapping_version, tensor_count}`.
use super::{Provenance, WeightFormat};
use crate::config::TransUnetConfig;
use crate::convert::npz::{convert_encoder_file, EncoderFormat};
use crate::convert::{hf_sam, pth};
use crate::models::sam::weights::{load_sam_weights, SamFormat};
use crate::{Error, Result};
use candle_core::Device;
use std::path::{Path, PathBuf};

/// Result of one conversion.
#[derive(Debug, Clone)]
pub struct ConvertOutcome {
    pub tensor_count: usize,
    pub sidecar: PathBuf,
}

/// Converts `input` of `format` to canonical safetensors at `output` (plus sidecar). `transunet` is the geometry the
/// TransUNet encoder formats are converted for (position embeddings resized to its grid, SPEC §5.5); SAM formats infer
/// their geometry from the file and load strictly (SPEC §6.6).
pub fn convert_weights(
    format: WeightFormat,
    input: &Path,
    output: &Path,
    provenance: Provenance,
    transunet: &TransUnetConfig,
) -> Result<ConvertOutcome> {
    let sidecar = pth::sidecar_path(output);
    let tensor_count = match format {
        WeightFormat::SamOriginalSafetensors | WeightFormat::SamPth => {
            let w = load_sam_weights(input, None, &Device::Cpu)?;
            if w.format != SamFormat::Original {
                return Err(Error::file(
                    input,
                    "this file uses HF-transformers SamModel names (`vision_encoder.*`), not original segment-anything \
                     names: use the `-hf` alias or `ultrarefiner convert --from hf-sam`",
                ));
            }
            let fmt = if input.extension().and_then(|e| e.to_str()) == Some("safetensors") {
                WeightFormat::SamOriginalSafetensors.name()
            } else {
                WeightFormat::SamPth.name()
            };
            pth::write_canonical(
                &w,
                input,
                output,
                fmt,
                pth::SAM_MAPPING_VERSION,
                Some(provenance.as_str()),
            )?
        }
        WeightFormat::SamHf => {
            hf_sam::hf_sam_to_safetensors(input, output, Some(provenance.as_str()))?
        }
        WeightFormat::TimmR50 | WeightFormat::Npz => {
            let f = if format == WeightFormat::Npz {
                EncoderFormat::Npz
            } else {
                EncoderFormat::Timm
            };
            convert_encoder_file(f, input, output, transunet)?
                .tensors
                .len()
        }
    };
    Ok(ConvertOutcome {
        tensor_count,
        sidecar,
    })
}
