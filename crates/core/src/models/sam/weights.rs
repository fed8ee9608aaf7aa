//! SAM weight handling (SPEC §6.5, §6.6): the expected key/shape list of a configuration, reading `.pth` /
//! `.safetensors` / HF files, normalising them to the §6.5 names and strict loading.
use super::lora::is_lora_key;
use super::mask_decoder::MaskDecoder;
use super::prompt_encoder::PromptEncoder;
use crate::config::SamConfig;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// Key of the Fourier buffer (never trained, SPEC §16.3).
pub const FOURIER_KEY: &str = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix";

/// Tensors tolerated in a checkpoint and dropped on load (SPEC §6.5, §6.6).
pub const IGNORED_KEYS: [&str; 2] = ["pixel_mean", "pixel_std"];

/// Every §6.5 tensor of `cfg` with its shape, in the original `state_dict` order.
pub fn expected_params(cfg: &SamConfig) -> Vec<(String, Vec<usize>)> {
    let mut v: Vec<(String, Vec<usize>)> = Vec::new();
    let mut add = |k: String, s: &[usize]| v.push((k, s.to_vec()));
    let d = cfg.encoder_embed_dim;
    let g = cfg.embed_grid();
    let p = cfg.patch_size;
    let hd = d / cfg.encoder_num_heads.max(1);
    let mlp = cfg.encoder_mlp_dim();
    let c = cfg.prompt_embed_dim;
    add("image_encoder.pos_embed".into(), &[1, g, g, d]);
    add(
        "image_encoder.patch_embed.proj.weight".into(),
        &[d, 3, p, p],
    );
    add("image_encoder.patch_embed.proj.bias".into(), &[d]);
    for i in 0..cfg.encoder_depth {
        let b = format!("image_encoder.blocks.{i}");
        let size = if cfg.encoder_global_attn_indexes.contains(&i) {
            g
        } else {
            cfg.encoder_window_size
        };
        add(format!("{b}.norm1.weight"), &[d]);
        add(format!("{b}.norm1.bias"), &[d]);
        add(format!("{b}.attn.rel_pos_h"), &[2 * size - 1, hd]);
        add(format!("{b}.attn.rel_pos_w"), &[2 * size - 1, hd]);
        add(format!("{b}.attn.qkv.weight"), &[3 * d, d]);
        add(format!("{b}.attn.qkv.bias"), &[3 * d]);
        add(format!("{b}.attn.proj.weight"), &[d, d]);
        add(format!("{b}.attn.proj.bias"), &[d]);
        add(format!("{b}.norm2.weight"), &[d]);
        add(format!("{b}.norm2.bias"), &[d]);
        add(format!("{b}.mlp.lin1.weight"), &[mlp, d]);
        add(format!("{b}.mlp.lin1.bias"), &[mlp]);
        add(format!("{b}.mlp.lin2.weight"), &[d, mlp]);
        add(format!("{b}.mlp.lin2.bias"), &[d]);
    }
    add("image_encoder.neck.0.weight".into(), &[c, d, 1, 1]);
    add("image_encoder.neck.1.weight".into(), &[c]);
    add("image_encoder.neck.1.bias".into(), &[c]);
    add("image_encoder.neck.2.weight".into(), &[c, c, 3, 3]);
    add("image_encoder.neck.3.weight".into(), &[c]);
    add("image_encoder.neck.3.bias".into(), &[c]);
    // prompt encoder
    let mic = cfg.mask_in_chans;
    add(FOURIER_KEY.into(), &[2, c / 2]);
    for i in 0..4 {
        add(
            format!("prompt_encoder.point_embeddings.{i}.weight"),
            &[1, c],
        );
    }
    add("prompt_encoder.not_a_point_embed.weight".into(), &[1, c]);
    add(
        "prompt_encoder.mask_downscaling.0.weight".into(),
        &[mic / 4, 1, 2, 2],
    );
    add("prompt_encoder.mask_downscaling.0.bias".into(), &[mic / 4]);
    add(
        "prompt_encoder.mask_downscaling.1.weight".into(),
        &[mic / 4],
    );
    add("prompt_encoder.mask_downscaling.1.bias".into(), &[mic / 4]);
    add(
        "prompt_encoder.mask_downscaling.3.weight".into(),
        &[mic, mic / 4, 2, 2],
    );
    add("prompt_encoder.mask_downscaling.3.bias".into(), &[mic]);
    add("prompt_encoder.mask_downscaling.4.weight".into(), &[mic]);
    add("prompt_encoder.mask_downscaling.4.bias".into(), &[mic]);
    add(
        "prompt_encoder.mask_downscaling.6.weight".into(),
        &[c, mic, 1, 1],
    );
    add("prompt_encoder.mask_downscaling.6.bias".into(), &[c]);
    add("prompt_encoder.no_mask_embed.weight".into(), &[1, c]);
    // mask decoder
    let r = c / cfg.decoder_attn_downsample.max(1);
    let attn = |add: &mut dyn FnMut(String, &[usize]), pre: String, internal: usize| {
        for n in ["q_proj", "k_proj", "v_proj"] {
            add(format!("{pre}.{n}.weight"), &[internal, c]);
            add(format!("{pre}.{n}.bias"), &[internal]);
        }
        add(format!("{pre}.out_proj.weight"), &[c, internal]);
        add(format!("{pre}.out_proj.bias"), &[c]);
    };
    for l in 0..cfg.decoder_depth {
        let b = format!("mask_decoder.transformer.layers.{l}");
        attn(&mut add, format!("{b}.self_attn"), c);
        add(format!("{b}.norm1.weight"), &[c]);
        add(format!("{b}.norm1.bias"), &[c]);
        attn(&mut add, format!("{b}.cross_attn_token_to_image"), r);
        add(format!("{b}.norm2.weight"), &[c]);
        add(format!("{b}.norm2.bias"), &[c]);
        add(format!("{b}.mlp.lin1.weight"), &[cfg.decoder_mlp_dim, c]);
        add(format!("{b}.mlp.lin1.bias"), &[cfg.decoder_mlp_dim]);
        add(format!("{b}.mlp.lin2.weight"), &[c, cfg.decoder_mlp_dim]);
        add(format!("{b}.mlp.lin2.bias"), &[c]);
        add(format!("{b}.norm3.weight"), &[c]);
        add(format!("{b}.norm3.bias"), &[c]);
        add(format!("{b}.norm4.weight"), &[c]);
        add(format!("{b}.norm4.bias"), &[c]);
        attn(&mut add, format!("{b}.cross_attn_image_to_token"), r);
    }
    attn(
        &mut add,
        "mask_decoder.transformer.final_attn_token_to_image".into(),
        r,
    );
    add(
        "mask_decoder.transformer.norm_final_attn.weight".into(),
        &[c],
    );
    add("mask_decoder.transformer.norm_final_attn.bias".into(), &[c]);
    let nmt = cfg.num_multimask_outputs + 1;
    add("mask_decoder.iou_token.weight".into(), &[1, c]);
    add("mask_decoder.mask_tokens.weight".into(), &[nmt, c]);
    add(
        "mask_decoder.output_upscaling.0.weight".into(),
        &[c, c / 4, 2, 2],
    );
    add("mask_decoder.output_upscaling.0.bias".into(), &[c / 4]);
    add("mask_decoder.output_upscaling.1.weight".into(), &[c / 4]);
    add("mask_decoder.output_upscaling.1.bias".into(), &[c / 4]);
    add(
        "mask_decoder.output_upscaling.3.weight".into(),
        &[c / 4, c / 8, 2, 2],
    );
    add("mask_decoder.output_upscaling.3.bias".into(), &[c / 8]);
    for i in 0..nmt {
        let b = format!("mask_decoder.output_hypernetworks_mlps.{i}.layers");
        add(format!("{b}.0.weight"), &[c, c]);
        add(format!("{b}.0.bias"), &[c]);
        add(format!("{b}.1.weight"), &[c, c]);
        add(format!("{b}.1.bias"), &[c]);
        add(format!("{b}.2.weight"), &[c / 8, c]);
        add(format!("{b}.2.bias"), &[c / 8]);
    }
    let depth = cfg.iou_head_depth;
    let hid = cfg.iou_head_hidden_dim;
    for i in 0..depth {
        let a = if i == 0 { c } else { hid };
        let o = if i + 1 == depth { nmt } else { hid };
        add(
            format!("mask_decoder.iou_prediction_head.layers.{i}.weight"),
            &[o, a],
        );
        add(
            format!("mask_decoder.iou_prediction_head.layers.{i}.bias"),
            &[o],
        );
    }
    v
}

/// Whether a §6.5 key is a trainable parameter of the prompt encoder or the mask decoder (the Fourier buffer is not).
pub fn is_trainable_key(key: &str) -> bool {
    (key.starts_with("prompt_encoder.") && key != FOURIER_KEY) || key.starts_with("mask_decoder.")
}

/// Compares a normalised tensor map with [`expected_params`]: returns `Error::Weights` naming every missing,
/// unexpected and mis-shaped tensor.
pub fn check_strict(
    tensors: &HashMap<String, Vec<usize>>,
    cfg: &SamConfig,
    source: &str,
) -> Result<()> {
    let exp = expected_params(cfg);
    let mut missing = Vec::new();
    let mut bad = Vec::new();
    for (k, s) in &exp {
        match tensors.get(k) {
            None => missing.push(k.clone()),
            Some(got) if got != s => bad.push(format!("{k}: expected {s:?}, found {got:?}")),
            _ => {}
        }
    }
    let expected: BTreeSet<&str> = exp.iter().map(|(k, _)| k.as_str()).collect();
    let mut unexpected: Vec<&String> = tensors
        .keys()
        .filter(|k| !expected.contains(k.as_str()))
        .collect();
    unexpected.sort();
    if missing.is_empty() && bad.is_empty() && unexpected.is_empty() {
        return Ok(());
    }
    let show = |v: &[String]| {
        let n = v.len();
        let mut s = v.iter().take(12).cloned().collect::<Vec<_>>().join(", ");
        if n > 12 {
            s.push_str(&format!(", ... ({n} in all)"));
        }
        s
    };
    let mut msg = format!("{source}: does not match the SAM configuration:");
    if !missing.is_empty() {
        msg.push_str(&format!(" missing [{}];", show(&missing)));
    }
    if !unexpected.is_empty() {
        let u: Vec<String> = unexpected.into_iter().cloned().collect();
        msg.push_str(&format!(" unexpected [{}];", show(&u)));
    }
    if !bad.is_empty() {
        msg.push_str(&format!(" wrong shape [{}];", show(&bad)));
    }
    Err(Error::Weights(msg))
}

/// The format a SAM checkpoint was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamFormat {
    /// Original segment-anything names (plain state dict, `{'model': ...}` container, optional `sam.` prefix).
    Original,
    /// HF-transformers `SamModel` names (`vision_encoder.*`).
    Hf,
}

/// Reads every tensor of a `.pth`/`.pt`/`.bin` (PyTorch zip pickle) or `.safetensors` file, as stored (no renaming).
/// A pickle holding `{'model': state_dict}` yields the inner state dict.
pub fn read_raw_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if !path.is_file() {
        return Err(Error::file(path, "no such weight file"));
    }
    if ext == "safetensors" {
        let m = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::file(path, e.to_string()))?;
        return Ok(m.into_iter().collect());
    }
    // PyTorch zip archive: first try the `{'model': ...}` container, then a bare state dict.
    if let Ok(v) = candle_core::pickle::read_all_with_key(path, Some("model")) {
        if !v.is_empty() {
            return Ok(v);
        }
    }
    let v = candle_core::pickle::read_all(path)
        .map_err(|e| Error::file(path, format!("cannot read as a PyTorch checkpoint: {e}")))?;
    if v.is_empty() {
        return Err(Error::file(
            path,
            "no tensors found (expected a state dict or a {'model': state_dict} container)",
        ));
    }
    Ok(v)
}

/// Normalises raw tensors to the §6.5 names: HF names are mapped (SPEC §6.6 item 2), a `sam.` prefix is stripped (and
/// everything else dropped) when present, `pixel_mean`/`pixel_std` are dropped.
pub fn normalize_keys(
    raw: Vec<(String, Tensor)>,
    source: &str,
) -> Result<(HashMap<String, Tensor>, SamFormat)> {
    let has_sam_prefix = raw.iter().any(|(k, _)| k.starts_with("sam."));
    let raw: Vec<(String, Tensor)> = if has_sam_prefix {
        raw.into_iter()
            .filter_map(|(k, t)| k.strip_prefix("sam.").map(|s| (s.to_string(), t)))
            .collect()
    } else {
        raw
    };
    let is_hf = raw.iter().any(|(k, _)| k.starts_with("vision_encoder."));
    let (map, fmt) = if is_hf {
        (
            crate::convert::hf_sam::hf_to_canonical(raw, source)?,
            SamFormat::Hf,
        )
    } else {
        (
            raw.into_iter().collect::<HashMap<_, _>>(),
            SamFormat::Original,
        )
    };
    let map = map
        .into_iter()
        .filter(|(k, _)| !IGNORED_KEYS.contains(&k.as_str()))
        .collect();
    Ok((map, fmt))
}

/// Infers the shape-determining SAM hyper-parameters from §6.5 tensors. Head counts are not recoverable from shapes:
/// the encoder's follows from the relative-position tables, the decoder's is set to 1 (shape checks only).
pub fn infer_config(t: &HashMap<String, Vec<usize>>, source: &str) -> Result<SamConfig> {
    let get = |k: &str| {
        t.get(k)
            .ok_or_else(|| Error::Weights(format!("{source}: missing `{k}`")))
    };
    let pe = get("image_encoder.patch_embed.proj.weight")?.clone();
    let pos = get("image_encoder.pos_embed")?.clone();
    if pe.len() != 4 || pos.len() != 4 {
        return Err(Error::Weights(format!(
            "{source}: unexpected patch/pos embedding ranks"
        )));
    }
    let (d, p, g) = (pe[0], pe[2], pos[1]);
    let mut depth = 0;
    while t.contains_key(&format!("image_encoder.blocks.{depth}.norm1.weight")) {
        depth += 1;
    }
    let mut global = Vec::new();
    let mut window = 14;
    let mut hd = d;
    for i in 0..depth {
        let rp = get(&format!("image_encoder.blocks.{i}.attn.rel_pos_h"))?;
        hd = rp[1];
        if rp[0] == 2 * g - 1 {
            global.push(i);
        } else {
            window = rp[0].div_ceil(2);
        }
    }
    let mlp = get("image_encoder.blocks.0.mlp.lin1.weight")
        .map(|s| s[0])
        .unwrap_or(4 * d);
    let c = get("prompt_encoder.no_mask_embed.weight")?[1];
    let mic = get("prompt_encoder.mask_downscaling.3.weight")?[0];
    let mut ddepth = 0;
    while t.contains_key(&format!(
        "mask_decoder.transformer.layers.{ddepth}.norm1.weight"
    )) {
        ddepth += 1;
    }
    let dmlp = get("mask_decoder.transformer.layers.0.mlp.lin1.weight")?[0];
    let internal = get("mask_decoder.transformer.final_attn_token_to_image.q_proj.weight")?[0];
    let nmt = get("mask_decoder.mask_tokens.weight")?[0];
    let mut iou_depth = 0;
    while t.contains_key(&format!(
        "mask_decoder.iou_prediction_head.layers.{iou_depth}.weight"
    )) {
        iou_depth += 1;
    }
    let iou_hidden = get("mask_decoder.iou_prediction_head.layers.0.weight")?[0];
    if hd == 0 || internal == 0 || nmt == 0 {
        return Err(Error::Weights(format!(
            "{source}: degenerate tensor shapes"
        )));
    }
    Ok(SamConfig {
        img_size: g * p,
        patch_size: p,
        encoder_embed_dim: d,
        encoder_depth: depth,
        encoder_num_heads: d / hd,
        encoder_mlp_ratio: mlp as f64 / d as f64,
        encoder_window_size: window,
        encoder_global_attn_indexes: global,
        prompt_embed_dim: c,
        mask_in_chans: mic,
        decoder_depth: ddepth,
        decoder_num_heads: 1,
        decoder_mlp_dim: dmlp,
        decoder_attn_downsample: c / internal,
        num_multimask_outputs: nmt - 1,
        iou_head_depth: iou_depth,
        iou_head_hidden_dim: iou_hidden,
    })
}

/// Strictly loaded SAM weights with §6.5 names.
#[derive(Debug, Clone)]
pub struct SamWeights {
    pub tensors: HashMap<String, Tensor>,
    pub format: SamFormat,
}

/// Loads a SAM checkpoint (any §6.6 format) and checks it strictly against `cfg` (or, with `None`, against the
/// configuration inferred from its shapes). Tensors are cast to f32 on `device`.
pub fn load_sam_weights(
    path: &Path,
    cfg: Option<&SamConfig>,
    device: &Device,
) -> Result<SamWeights> {
    let w = load_sam_weights_with_adapters(path, cfg, device)?;
    if let Some(k) = w.tensors.keys().find(|k| is_lora_key(k)) {
        return Err(Error::Weights(format!(
            "{}: holds unmerged LoRA adapters (e.g. `{k}`): use the run's best_sam.safetensors (merged), or load it \
             as a Phase 3 checkpoint / with --use-lora",
            path.display()
        )));
    }
    Ok(w)
}

/// [`load_sam_weights`] for training checkpoints that may also hold LoRA adapters (`…lora_a`/`…lora_b`, SPEC §6.8):
/// the §6.5 tensors are checked strictly, the adapters are returned alongside them in `tensors` (f32).
pub fn load_sam_weights_with_adapters(
    path: &Path,
    cfg: Option<&SamConfig>,
    device: &Device,
) -> Result<SamWeights> {
    let source = path.display().to_string();
    let raw = read_raw_tensors(path)?;
    let (map, format) = normalize_keys(raw, &source)?;
    let shapes: HashMap<String, Vec<usize>> = map
        .iter()
        .filter(|(k, _)| !is_lora_key(k))
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    let inferred;
    let cfg = match cfg {
        Some(c) => c,
        None => {
            inferred = infer_config(&shapes, &source)?;
            &inferred
        }
    };
    check_strict(&shapes, cfg, &source)?;
    let tensors = map
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?.to_device(device)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    Ok(SamWeights { tensors, format })
}

impl SamWeights {
    /// A plain-tensor builder over all tensors (frozen; never `Var`s), in `dtype`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_tensors(self.tensors.clone(), dtype, device)
    }

    /// Inserts the trainable tensors (prompt encoder without the Fourier buffer, mask decoder) into `varmap` as fresh
    /// `Var`s (copies), so that a model built over the map starts from these weights (SPEC §16.3).
    pub fn seed_varmap(&self, varmap: &VarMap) -> Result<()> {
        let mut data = varmap
            .data()
            .lock()
            .map_err(|_| Error::msg("VarMap lock poisoned"))?;
        for (k, t) in &self.tensors {
            if is_trainable_key(k) {
                data.insert(
                    k.clone(),
                    Var::from_tensor(&t.to_dtype(DType::F32)?.copy()?)?,
                );
            }
        }
        Ok(())
    }

    /// Tensors in the §6.5 order of `cfg`.
    pub fn ordered(&self, cfg: &SamConfig) -> Vec<(String, Tensor)> {
        expected_params(cfg)
            .into_iter()
            .filter_map(|(k, _)| self.tensors.get(&k).map(|t| (k, t.clone())))
            .collect()
    }
}

/// Prompt-encoder tensors under their §6.5 names.
pub fn prompt_encoder_tensors(p: &PromptEncoder) -> Vec<(String, Tensor)> {
    let mut v = vec![(FOURIER_KEY.to_string(), p.pe_layer.gaussian.clone())];
    for (i, t) in p.point_embeddings.iter().enumerate() {
        v.push((
            format!("prompt_encoder.point_embeddings.{i}.weight"),
            t.clone(),
        ));
    }
    v.push((
        "prompt_encoder.not_a_point_embed.weight".into(),
        p.not_a_point_embed.clone(),
    ));
    let md = "prompt_encoder.mask_downscaling";
    for (i, c) in [(0, &p.md0), (3, &p.md3), (6, &p.md6)] {
        v.push((format!("{md}.{i}.weight"), c.weight.clone()));
        if let Some(b) = &c.bias {
            v.push((format!("{md}.{i}.bias"), b.clone()));
        }
    }
    for (i, l) in [(1, &p.md1), (4, &p.md4)] {
        v.push((format!("{md}.{i}.weight"), l.weight.clone()));
        v.push((format!("{md}.{i}.bias"), l.bias.clone()));
    }
    v.push((
        "prompt_encoder.no_mask_embed.weight".into(),
        p.no_mask_embed.clone(),
    ));
    v
}

/// Mask-decoder tensors under their §6.5 names.
pub fn mask_decoder_tensors(m: &MaskDecoder) -> Vec<(String, Tensor)> {
    use super::mask_decoder::Attention;
    use super::ops::{LayerNorm, Linear};
    let mut v = Vec::new();
    let lin = |v: &mut Vec<(String, Tensor)>, k: String, l: &Linear| {
        v.push((format!("{k}.weight"), l.weight.clone()));
        if let Some(b) = &l.bias {
            v.push((format!("{k}.bias"), b.clone()));
        }
    };
    let ln = |v: &mut Vec<(String, Tensor)>, k: String, l: &LayerNorm| {
        v.push((format!("{k}.weight"), l.weight.clone()));
        v.push((format!("{k}.bias"), l.bias.clone()));
    };
    let att = |v: &mut Vec<(String, Tensor)>, k: String, a: &Attention| {
        lin(v, format!("{k}.q_proj"), &a.q_proj);
        lin(v, format!("{k}.k_proj"), &a.k_proj);
        lin(v, format!("{k}.v_proj"), &a.v_proj);
        lin(v, format!("{k}.out_proj"), &a.out_proj);
    };
    let t = "mask_decoder.transformer";
    for (i, l) in m.transformer.layers.iter().enumerate() {
        let b = format!("{t}.layers.{i}");
        att(&mut v, format!("{b}.self_attn"), &l.self_attn);
        ln(&mut v, format!("{b}.norm1"), &l.norm1);
        att(
            &mut v,
            format!("{b}.cross_attn_token_to_image"),
            &l.cross_attn_token_to_image,
        );
        ln(&mut v, format!("{b}.norm2"), &l.norm2);
        lin(&mut v, format!("{b}.mlp.lin1"), &l.mlp.lin1);
        lin(&mut v, format!("{b}.mlp.lin2"), &l.mlp.lin2);
        ln(&mut v, format!("{b}.norm3"), &l.norm3);
        ln(&mut v, format!("{b}.norm4"), &l.norm4);
        att(
            &mut v,
            format!("{b}.cross_attn_image_to_token"),
            &l.cross_attn_image_to_token,
        );
    }
    att(
        &mut v,
        format!("{t}.final_attn_token_to_image"),
        &m.transformer.final_attn_token_to_image,
    );
    ln(
        &mut v,
        format!("{t}.norm_final_attn"),
        &m.transformer.norm_final_attn,
    );
    v.push(("mask_decoder.iou_token.weight".into(), m.iou_token.clone()));
    v.push((
        "mask_decoder.mask_tokens.weight".into(),
        m.mask_tokens.clone(),
    ));
    v.push((
        "mask_decoder.output_upscaling.0.weight".into(),
        m.up0.weight.clone(),
    ));
    v.push((
        "mask_decoder.output_upscaling.0.bias".into(),
        m.up0.bias.clone(),
    ));
    v.push((
        "mask_decoder.output_upscaling.1.weight".into(),
        m.up1.weight.clone(),
    ));
    v.push((
        "mask_decoder.output_upscaling.1.bias".into(),
        m.up1.bias.clone(),
    ));
    v.push((
        "mask_decoder.output_upscaling.3.weight".into(),
        m.up3.weight.clone(),
    ));
    v.push((
        "mask_decoder.output_upscaling.3.bias".into(),
        m.up3.bias.clone(),
    ));
    for (i, h) in m.hypernetworks.iter().enumerate() {
        for (j, l) in h.layers.iter().enumerate() {
            lin(
                &mut v,
                format!("mask_decoder.output_hypernetworks_mlps.{i}.layers.{j}"),
                l,
            );
        }
    }
    for (j, l) in m.iou_head.layers.iter().enumerate() {
        lin(
            &mut v,
            format!("mask_decoder.iou_prediction_head.layers.{j}"),
            l,
        );
    }
    v
}

/// Writes tensors to a safetensors file atomically (temporary file in the same folder, then rename).
pub fn save_safetensors_atomic(tensors: &[(String, Tensor)], path: &Path) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.contiguous()?)))
        .collect::<Result<_>>()?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("out.safetensors");
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    candle_core::safetensors::save(&map, &tmp).map_err(|e| Error::file(&tmp, e.to_string()))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    Ok(())
}

/// Deterministic random §6.5 weights for `cfg` from the project RNG (stream `"sam-random-init"`): matrices and
/// kernels `N(0, 1/fan_in)`, LayerNorm weights `1 + 0.1·N`, biases, position tables and embeddings `0.1·N`, the
/// Fourier matrix `N(0,1)`. For tests, benchmarks and smoke runs without a checkpoint.
pub fn random_weights(
    cfg: &SamConfig,
    seed: u64,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    use rand::Rng;
    let mut out = HashMap::new();
    for (idx, (k, shape)) in expected_params(cfg).into_iter().enumerate() {
        let mut rng = crate::rng::stream_rng(seed, "sam-random-init", &[idx as u64]);
        let n: usize = shape.iter().product();
        let mut normal = || {
            let u1: f64 = rng.gen::<f64>().max(1e-300);
            let u2: f64 = rng.gen();
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        };
        let is_norm = shape.len() == 1
            && k.ends_with(".weight")
            && (k.contains("norm")
                || k.contains("neck.1.")
                || k.contains("neck.3.")
                || k.contains("mask_downscaling.1.")
                || k.contains("mask_downscaling.4.")
                || k.contains("output_upscaling.1."));
        let (mean, std) = if k == FOURIER_KEY {
            (0.0, 1.0)
        } else if is_norm {
            (1.0, 0.1)
        } else if shape.len() >= 2
            && !k.contains("pos_embed")
            && !k.contains("rel_pos")
            && !k.contains("embed")
            && !k.contains("token")
        {
            let fan_in: usize = shape[1..].iter().product();
            (0.0, 1.0 / (fan_in.max(1) as f64).sqrt())
        } else {
            (0.0, 0.1)
        };
        let v: Vec<f32> = (0..n).map(|_| (mean + std * normal()) as f32).collect();
        out.insert(k, Tensor::from_vec(v, shape, device)?);
    }
    Ok(out)
}
