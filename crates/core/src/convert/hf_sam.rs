//! HF-transformers `SamModel` ↔ original segment-anything key mapping (SPEC §6.6 item 2, §13.5).
//! Every HF key must be mapped; an unmapped key is an error (a newer naming scheme must fail loudly).
use crate::models::sam::weights::{load_sam_weights, FOURIER_KEY};
use crate::{Error, Result};
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Version of the HF → original mapping written to converter sidecars.
pub const HF_MAPPING_VERSION: &str = "hf-sam-1";

const HF_SHARED_DUP: &str = "shared_image_embedding.positional_embedding";
const HF_FOURIER: &str = "prompt_encoder.shared_embedding.positional_embedding";

/// Splits `"<num>.<rest>"`.
fn split_index(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// Feed-forward (`proj_in`, `layers.k`, `proj_out`) prefixes of the HF decoder.
fn ff_prefixes(key: &str) -> Option<(String, &str)> {
    if let Some(r) = key.strip_prefix("mask_decoder.iou_prediction_head.") {
        return Some(("mask_decoder.iou_prediction_head".into(), r));
    }
    if let Some(r) = key.strip_prefix("mask_decoder.output_hypernetworks_mlps.") {
        let (i, rest) = split_index(r)?;
        return Some((format!("mask_decoder.output_hypernetworks_mlps.{i}"), rest));
    }
    None
}

/// Maps one HF key (not the duplicate Fourier buffer) to the original name; `ff_depth` gives the layer count of
/// each feed-forward prefix.
fn map_hf_key(key: &str, ff_depth: &HashMap<String, usize>) -> Option<String> {
    if let Some(r) = key.strip_prefix("vision_encoder.") {
        if let Some(p) = r.strip_prefix("patch_embed.projection.") {
            return Some(format!("image_encoder.patch_embed.proj.{p}"));
        }
        if r == "pos_embed" {
            return Some("image_encoder.pos_embed".into());
        }
        if let Some(l) = r.strip_prefix("layers.") {
            let (i, rest) = split_index(l)?;
            let m = if let Some(p) = rest.strip_prefix("layer_norm1.") {
                format!("norm1.{p}")
            } else if let Some(p) = rest.strip_prefix("layer_norm2.") {
                format!("norm2.{p}")
            } else if [
                "attn.qkv.weight",
                "attn.qkv.bias",
                "attn.proj.weight",
                "attn.proj.bias",
                "attn.rel_pos_h",
                "attn.rel_pos_w",
            ]
            .contains(&rest)
                || [
                    "mlp.lin1.weight",
                    "mlp.lin1.bias",
                    "mlp.lin2.weight",
                    "mlp.lin2.bias",
                ]
                .contains(&rest)
            {
                rest.to_string()
            } else {
                return None;
            };
            return Some(format!("image_encoder.blocks.{i}.{m}"));
        }
        if let Some(n) = r.strip_prefix("neck.") {
            let (part, p) = n.split_once('.')?;
            let idx = match part {
                "conv1" => 0,
                "layer_norm1" => 1,
                "conv2" => 2,
                "layer_norm2" => 3,
                _ => return None,
            };
            return Some(format!("image_encoder.neck.{idx}.{p}"));
        }
        return None;
    }
    if key == HF_FOURIER {
        return Some(FOURIER_KEY.into());
    }
    if let Some(r) = key.strip_prefix("prompt_encoder.") {
        if let Some(p) = r.strip_prefix("point_embed.") {
            let (i, rest) = split_index(p)?;
            return (rest == "weight")
                .then(|| format!("prompt_encoder.point_embeddings.{i}.weight"));
        }
        if r == "not_a_point_embed.weight" || r == "no_mask_embed.weight" {
            return Some(key.to_string());
        }
        if let Some(m) = r.strip_prefix("mask_embed.") {
            let (part, p) = m.split_once('.')?;
            let idx = match part {
                "conv1" => 0,
                "layer_norm1" => 1,
                "conv2" => 3,
                "layer_norm2" => 4,
                "conv3" => 6,
                _ => return None,
            };
            return Some(format!("prompt_encoder.mask_downscaling.{idx}.{p}"));
        }
        return None;
    }
    if let Some(r) = key.strip_prefix("mask_decoder.") {
        if r == "iou_token.weight" || r == "mask_tokens.weight" {
            return Some(key.to_string());
        }
        for (hf, idx) in [
            ("upscale_conv1.", 0),
            ("upscale_layer_norm.", 1),
            ("upscale_conv2.", 3),
        ] {
            if let Some(p) = r.strip_prefix(hf) {
                return Some(format!("mask_decoder.output_upscaling.{idx}.{p}"));
            }
        }
        if let Some((prefix, rest)) = ff_prefixes(key) {
            let depth = *ff_depth.get(&prefix)?;
            let (layer, p) = if let Some(p) = rest.strip_prefix("proj_in.") {
                (0, p)
            } else if let Some(p) = rest.strip_prefix("proj_out.") {
                (depth - 1, p)
            } else if let Some(l) = rest.strip_prefix("layers.") {
                let (k, p) = split_index(l)?;
                (k + 1, p)
            } else {
                return None;
            };
            return Some(format!("{prefix}.layers.{layer}.{p}"));
        }
        if let Some(t) = r.strip_prefix("transformer.") {
            if let Some(p) = t.strip_prefix("layer_norm_final_attn.") {
                return Some(format!("mask_decoder.transformer.norm_final_attn.{p}"));
            }
            if let Some(p) = t.strip_prefix("final_attn_token_to_image.") {
                return valid_attn(p).then(|| key.to_string());
            }
            if let Some(l) = t.strip_prefix("layers.") {
                let (i, rest) = split_index(l)?;
                let base = format!("mask_decoder.transformer.layers.{i}");
                for k in 1..=4 {
                    if let Some(p) = rest.strip_prefix(&format!("layer_norm{k}.")) {
                        return Some(format!("{base}.norm{k}.{p}"));
                    }
                }
                for a in [
                    "self_attn.",
                    "cross_attn_token_to_image.",
                    "cross_attn_image_to_token.",
                ] {
                    if let Some(p) = rest.strip_prefix(a) {
                        return valid_attn(p).then(|| format!("{base}.{rest}"));
                    }
                }
                if [
                    "mlp.lin1.weight",
                    "mlp.lin1.bias",
                    "mlp.lin2.weight",
                    "mlp.lin2.bias",
                ]
                .contains(&rest)
                {
                    return Some(format!("{base}.{rest}"));
                }
            }
        }
        return None;
    }
    None
}

fn valid_attn(p: &str) -> bool {
    ["q_proj", "k_proj", "v_proj", "out_proj"]
        .iter()
        .any(|n| p == format!("{n}.weight") || p == format!("{n}.bias"))
}

/// Maps HF `SamModel` tensors to §6.5 names. The duplicate `shared_image_embedding.positional_embedding` must equal
/// the prompt encoder's copy and is dropped; any unmapped key is an error listing all of them.
pub fn hf_to_canonical(
    raw: Vec<(String, Tensor)>,
    source: &str,
) -> Result<HashMap<String, Tensor>> {
    // Layer counts of the feed-forward heads: proj_in + layers.k + proj_out.
    let mut ff_depth: HashMap<String, usize> = HashMap::new();
    for (k, _) in &raw {
        if let Some((prefix, rest)) = ff_prefixes(k) {
            let e = ff_depth.entry(prefix).or_insert(2);
            if let Some(l) = rest.strip_prefix("layers.") {
                if let Some((i, _)) = split_index(l) {
                    *e = (*e).max(i + 3);
                }
            }
        }
    }
    let mut out = HashMap::new();
    let mut unmapped = Vec::new();
    let mut dup = None;
    for (k, t) in raw {
        if k == HF_SHARED_DUP {
            dup = Some(t);
            continue;
        }
        match map_hf_key(&k, &ff_depth) {
            Some(n) => {
                if out.insert(n.clone(), t).is_some() {
                    return Err(Error::Weights(format!(
                        "{source}: two HF tensors map to `{n}`"
                    )));
                }
            }
            None => unmapped.push(k),
        }
    }
    if !unmapped.is_empty() {
        unmapped.sort();
        return Err(Error::Weights(format!(
            "{source}: unmapped HF SAM tensors (unsupported naming scheme): {}",
            unmapped.join(", ")
        )));
    }
    if let Some(d) = dup {
        match out.get(FOURIER_KEY) {
            Some(f) => {
                let same = f.dims() == d.dims()
                    && (f.to_dtype(candle_core::DType::F32)?
                        - d.to_dtype(candle_core::DType::F32)?)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?
                        == 0.0;
                if !same {
                    return Err(Error::Weights(format!(
                        "{source}: `{HF_SHARED_DUP}` differs from `{HF_FOURIER}`"
                    )));
                }
            }
            None => {
                out.insert(FOURIER_KEY.to_string(), d);
            }
        }
    }
    Ok(out)
}

/// The inverse mapping (original → HF), used by round-trip tests and for exporting to HF tooling. Writes the
/// duplicate `shared_image_embedding.positional_embedding` as HF does.
pub fn canonical_to_hf(map: &HashMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>> {
    // feed-forward depth per prefix
    let mut depth: HashMap<String, usize> = HashMap::new();
    for k in map.keys() {
        for pre in [
            "mask_decoder.iou_prediction_head",
            "mask_decoder.output_hypernetworks_mlps.",
        ] {
            if let Some(r) = k.strip_prefix(pre) {
                let (prefix, rest) = if pre.ends_with('.') {
                    let Some((i, rest)) = split_index(r) else {
                        continue;
                    };
                    (format!("{pre}{i}"), rest)
                } else {
                    (pre.to_string(), r.trim_start_matches('.'))
                };
                if let Some(l) = rest.strip_prefix("layers.") {
                    if let Some((i, _)) = split_index(l) {
                        let e = depth.entry(prefix).or_insert(0);
                        *e = (*e).max(i + 1);
                    }
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    for (k, t) in map {
        let n = canonical_key_to_hf(k, &depth)
            .ok_or_else(|| Error::Weights(format!("no HF name for `{k}`")))?;
        if k == FOURIER_KEY {
            out.insert(HF_SHARED_DUP.to_string(), t.clone());
        }
        out.insert(n, t.clone());
    }
    Ok(out)
}

fn canonical_key_to_hf(k: &str, depth: &HashMap<String, usize>) -> Option<String> {
    if k == FOURIER_KEY {
        return Some(HF_FOURIER.into());
    }
    if let Some(r) = k.strip_prefix("image_encoder.") {
        if let Some(p) = r.strip_prefix("patch_embed.proj.") {
            return Some(format!("vision_encoder.patch_embed.projection.{p}"));
        }
        if r == "pos_embed" {
            return Some("vision_encoder.pos_embed".into());
        }
        if let Some(b) = r.strip_prefix("blocks.") {
            let (i, rest) = split_index(b)?;
            let m = if let Some(p) = rest.strip_prefix("norm1.") {
                format!("layer_norm1.{p}")
            } else if let Some(p) = rest.strip_prefix("norm2.") {
                format!("layer_norm2.{p}")
            } else {
                rest.to_string()
            };
            return Some(format!("vision_encoder.layers.{i}.{m}"));
        }
        if let Some(n) = r.strip_prefix("neck.") {
            let (i, p) = split_index(n)?;
            let part = ["conv1", "layer_norm1", "conv2", "layer_norm2"].get(i)?;
            return Some(format!("vision_encoder.neck.{part}.{p}"));
        }
        return None;
    }
    if let Some(r) = k.strip_prefix("prompt_encoder.") {
        if let Some(p) = r.strip_prefix("point_embeddings.") {
            return Some(format!("prompt_encoder.point_embed.{p}"));
        }
        if let Some(m) = r.strip_prefix("mask_downscaling.") {
            let (i, p) = split_index(m)?;
            let part = match i {
                0 => "conv1",
                1 => "layer_norm1",
                3 => "conv2",
                4 => "layer_norm2",
                6 => "conv3",
                _ => return None,
            };
            return Some(format!("prompt_encoder.mask_embed.{part}.{p}"));
        }
        return Some(k.to_string());
    }
    if let Some(r) = k.strip_prefix("mask_decoder.") {
        if let Some(u) = r.strip_prefix("output_upscaling.") {
            let (i, p) = split_index(u)?;
            let part = match i {
                0 => "upscale_conv1",
                1 => "upscale_layer_norm",
                3 => "upscale_conv2",
                _ => return None,
            };
            return Some(format!("mask_decoder.{part}.{p}"));
        }
        let ff = |prefix: String, rest: &str| -> Option<String> {
            let l = rest.strip_prefix("layers.")?;
            let (i, p) = split_index(l)?;
            let d = *depth.get(&prefix)?;
            let part = if i == 0 {
                "proj_in".to_string()
            } else if i + 1 == d {
                "proj_out".to_string()
            } else {
                format!("layers.{}", i - 1)
            };
            Some(format!("{prefix}.{part}.{p}"))
        };
        if let Some(rest) = r.strip_prefix("iou_prediction_head.") {
            return ff("mask_decoder.iou_prediction_head".into(), rest);
        }
        if let Some(h) = r.strip_prefix("output_hypernetworks_mlps.") {
            let (i, rest) = split_index(h)?;
            return ff(format!("mask_decoder.output_hypernetworks_mlps.{i}"), rest);
        }
        if let Some(p) = r.strip_prefix("transformer.norm_final_attn.") {
            return Some(format!(
                "mask_decoder.transformer.layer_norm_final_attn.{p}"
            ));
        }
        if let Some(l) = r.strip_prefix("transformer.layers.") {
            let (i, rest) = split_index(l)?;
            for n in 1..=4 {
                if let Some(p) = rest.strip_prefix(&format!("norm{n}.")) {
                    return Some(format!(
                        "mask_decoder.transformer.layers.{i}.layer_norm{n}.{p}"
                    ));
                }
            }
        }
        return Some(k.to_string());
    }
    None
}

/// Converts an HF-format SAM file (`.safetensors` or pickle `.bin`) to a canonical safetensors file (atomic write)
/// plus a sidecar JSON (SPEC §13.5). Returns the number of tensors written.
pub fn hf_sam_to_safetensors(
    input: &Path,
    output: &Path,
    provenance: Option<&str>,
) -> Result<usize> {
    let w = load_sam_weights(input, None, &candle_core::Device::Cpu)?;
    if w.format != crate::models::sam::weights::SamFormat::Hf {
        return Err(Error::file(
            input,
            "not an HF SamModel file (no `vision_encoder.*` tensors)",
        ));
    }
    super::pth::write_canonical(&w, input, output, "hf-sam", HF_MAPPING_VERSION, provenance)
}
