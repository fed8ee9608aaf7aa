//! ImageNet-21k `R50+ViT-B_16.npz` (Google ViT / flax layout) → canonical TransUNet `transformer.*` tensors (SPEC §5.5).
//!
//! The mapping is driven by the configuration: every canonical encoder key of `cfg` has exactly one source array and
//! one transform. Missing arrays, shape mismatches and unmapped arrays are errors naming the array and the file; the
//! classification extras (`cls`, `head/*`, `pre_logits/*`) are ignored and listed at debug level. All transforms are
//! transposes and reshapes (bit-exact), except the position-embedding resize for grids other than the source's.
use crate::config::TransUnetConfig;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Version of the key maps written into converted-file sidecars.
pub const MAPPING_VERSION: u32 = 1;

/// One canonical encoder tensor, described independently of the source format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    RootConv,
    RootGn {
        bias: bool,
    },
    /// `block{b}.unit{u}.conv{k}` (1-based b, u, k).
    UnitConv {
        b: usize,
        u: usize,
        k: usize,
    },
    UnitGn {
        b: usize,
        u: usize,
        k: usize,
        bias: bool,
    },
    Downsample {
        b: usize,
    },
    GnProj {
        b: usize,
        bias: bool,
    },
    Patch {
        bias: bool,
    },
    PosEmbed,
    /// `layer.{i}.attention_norm` (`ffn = false`) or `ffn_norm`.
    Norm {
        i: usize,
        ffn: bool,
        bias: bool,
    },
    /// `layer.{i}.attn.{query,key,value,out}` with `which` 0..4.
    Attn {
        i: usize,
        which: usize,
        bias: bool,
    },
    /// `layer.{i}.ffn.fc{k}`.
    Fc {
        i: usize,
        k: usize,
        bias: bool,
    },
    EncoderNorm {
        bias: bool,
    },
}

const ATTN_NAMES: [&str; 4] = ["query", "key", "value", "out"];

fn wb(bias: bool) -> &'static str {
    if bias {
        "bias"
    } else {
        "weight"
    }
}

impl Slot {
    /// Canonical key (SPEC §5.3).
    pub fn key(&self) -> String {
        let r = "transformer.embeddings.hybrid_model";
        match *self {
            Slot::RootConv => format!("{r}.root.conv.weight"),
            Slot::RootGn { bias } => format!("{r}.root.gn.{}", wb(bias)),
            Slot::UnitConv { b, u, k } => format!("{r}.body.block{b}.unit{u}.conv{k}.weight"),
            Slot::UnitGn { b, u, k, bias } => {
                format!("{r}.body.block{b}.unit{u}.gn{k}.{}", wb(bias))
            }
            Slot::Downsample { b } => format!("{r}.body.block{b}.unit1.downsample.weight"),
            Slot::GnProj { b, bias } => format!("{r}.body.block{b}.unit1.gn_proj.{}", wb(bias)),
            Slot::Patch { bias } => format!("transformer.embeddings.patch_embeddings.{}", wb(bias)),
            Slot::PosEmbed => "transformer.embeddings.position_embeddings".to_string(),
            Slot::Norm { i, ffn, bias } => {
                format!(
                    "transformer.encoder.layer.{i}.{}.{}",
                    if ffn { "ffn_norm" } else { "attention_norm" },
                    wb(bias)
                )
            }
            Slot::Attn { i, which, bias } => format!(
                "transformer.encoder.layer.{i}.attn.{}.{}",
                ATTN_NAMES[which],
                wb(bias)
            ),
            Slot::Fc { i, k, bias } => {
                format!("transformer.encoder.layer.{i}.ffn.fc{k}.{}", wb(bias))
            }
            Slot::EncoderNorm { bias } => format!("transformer.encoder.encoder_norm.{}", wb(bias)),
        }
    }
}

/// Every canonical encoder slot of `cfg` with its canonical shape, in model order.
pub fn encoder_slots(cfg: &TransUnetConfig) -> Vec<(Slot, Vec<usize>)> {
    let w = cfg.resnet_width;
    let d = cfg.hidden_size;
    let g = cfg.grid();
    let mut v = vec![
        (Slot::RootConv, vec![w, 3, 7, 7]),
        (Slot::RootGn { bias: false }, vec![w]),
        (Slot::RootGn { bias: true }, vec![w]),
    ];
    let stages = [(w, 4 * w, w), (4 * w, 8 * w, 2 * w), (8 * w, 16 * w, 4 * w)];
    for (bi, &(cin, cout, cmid)) in stages.iter().enumerate() {
        let b = bi + 1;
        let n = cfg.resnet_block_units.get(bi).copied().unwrap_or(0);
        for u in 1..=n {
            let ci = if u == 1 { cin } else { cout };
            v.push((Slot::UnitConv { b, u, k: 1 }, vec![cmid, ci, 1, 1]));
            v.push((Slot::UnitConv { b, u, k: 2 }, vec![cmid, cmid, 3, 3]));
            v.push((Slot::UnitConv { b, u, k: 3 }, vec![cout, cmid, 1, 1]));
            for k in 1..=3 {
                let c = if k == 3 { cout } else { cmid };
                v.push((
                    Slot::UnitGn {
                        b,
                        u,
                        k,
                        bias: false,
                    },
                    vec![c],
                ));
                v.push((
                    Slot::UnitGn {
                        b,
                        u,
                        k,
                        bias: true,
                    },
                    vec![c],
                ));
            }
            // The first unit of every stage projects (stride 2 in stages 2, 3; cin ≠ cout in stage 1).
            if u == 1 {
                v.push((Slot::Downsample { b }, vec![cout, cin, 1, 1]));
                v.push((Slot::GnProj { b, bias: false }, vec![cout]));
                v.push((Slot::GnProj { b, bias: true }, vec![cout]));
            }
        }
    }
    v.push((Slot::Patch { bias: false }, vec![d, 16 * w, 1, 1]));
    v.push((Slot::Patch { bias: true }, vec![d]));
    v.push((Slot::PosEmbed, vec![1, g * g, d]));
    for i in 0..cfg.num_layers {
        for ffn in [false, true] {
            for bias in [false, true] {
                v.push((Slot::Norm { i, ffn, bias }, vec![d]));
            }
        }
        for which in 0..4 {
            v.push((
                Slot::Attn {
                    i,
                    which,
                    bias: false,
                },
                vec![d, d],
            ));
            v.push((
                Slot::Attn {
                    i,
                    which,
                    bias: true,
                },
                vec![d],
            ));
        }
        v.push((
            Slot::Fc {
                i,
                k: 1,
                bias: false,
            },
            vec![cfg.mlp_dim, d],
        ));
        v.push((
            Slot::Fc {
                i,
                k: 1,
                bias: true,
            },
            vec![cfg.mlp_dim],
        ));
        v.push((
            Slot::Fc {
                i,
                k: 2,
                bias: false,
            },
            vec![d, cfg.mlp_dim],
        ));
        v.push((
            Slot::Fc {
                i,
                k: 2,
                bias: true,
            },
            vec![d],
        ));
    }
    v.push((Slot::EncoderNorm { bias: false }, vec![d]));
    v.push((Slot::EncoderNorm { bias: true }, vec![d]));
    v
}

/// Canonical `transformer.*` keys and shapes of `cfg`.
pub fn encoder_shapes(cfg: &TransUnetConfig) -> BTreeMap<String, Vec<usize>> {
    encoder_slots(cfg)
        .into_iter()
        .map(|(s, shape)| (s.key(), shape))
        .collect()
}

/// A read-only set of named source arrays (npz members, safetensors entries).
pub trait TensorSource {
    fn path(&self) -> &Path;
    fn names(&self) -> Vec<String>;
    /// `Ok(None)` when there is no such array.
    fn get(&self, name: &str) -> Result<Option<Tensor>>;
}

/// An `.npz` archive (stored or deflate-compressed members, C-order little-endian arrays).
///
/// Read with the workspace `zip` crate (deflate enabled) rather than `candle_core::npy::NpzTensors`: candle 0.11.1
/// links its own `zip` major version without the deflate feature, so it cannot read `np.savez_compressed` files.
pub struct NpzSource {
    path: PathBuf,
    archive: std::sync::Mutex<zip::ZipArchive<std::io::BufReader<std::fs::File>>>,
    names: Vec<String>,
}

impl NpzSource {
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let archive = zip::ZipArchive::new(std::io::BufReader::new(f)).map_err(|e| {
            Error::file(
                path,
                format!("not a readable .npz archive (truncated or corrupt?): {e}"),
            )
        })?;
        let mut names: Vec<String> = archive
            .file_names()
            .map(|n| n.strip_suffix(".npy").unwrap_or(n).to_string())
            .collect();
        names.sort();
        Ok(Self {
            path: path.to_path_buf(),
            archive: std::sync::Mutex::new(archive),
            names,
        })
    }
}

/// Parsed `.npy` header.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyHeader {
    pub dtype: DType,
    pub fortran_order: bool,
    pub shape: Vec<usize>,
}

/// Parses a `.npy` byte buffer into (header, offset of the data).
pub fn parse_npy_header(bytes: &[u8]) -> std::result::Result<(NpyHeader, usize), String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not an .npy array (bad magic)".into());
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let hdr = bytes
        .get(start..start + len)
        .ok_or("truncated .npy header")?;
    let hdr = std::str::from_utf8(hdr).map_err(|_| "non-UTF-8 .npy header")?;
    let field = |key: &str| -> Option<&str> {
        let i = hdr.find(&format!("'{key}'"))?;
        let rest = hdr[i + key.len() + 2..]
            .trim_start()
            .strip_prefix(':')?
            .trim_start();
        Some(rest)
    };
    let descr = field("descr").ok_or("no descr in .npy header")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or("bad descr")?;
    let dtype = match descr {
        "<f4" | "=f4" => DType::F32,
        "<f8" | "=f8" => DType::F64,
        "<f2" | "=f2" => DType::F16,
        "<i8" | "=i8" => DType::I64,
        "<i4" | "=i4" => DType::I32,
        "|u1" | "<u1" | "=u1" | "|b1" => DType::U8,
        "<u4" | "=u4" => DType::U32,
        d => {
            return Err(format!(
                "unsupported array dtype `{d}` (expected little-endian float/int)"
            ))
        }
    };
    let fo = field("fortran_order").ok_or("no fortran_order in .npy header")?;
    let fortran_order = fo.starts_with("True");
    let sh = field("shape").ok_or("no shape in .npy header")?;
    let sh = sh
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or("bad shape")?;
    let shape = sh
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| format!("bad shape entry `{s}`"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    Ok((
        NpyHeader {
            dtype,
            fortran_order,
            shape,
        },
        start + len,
    ))
}

/// Decodes a whole `.npy` buffer into a CPU tensor (C order only; SPEC §16.5 rejects Fortran order).
pub fn decode_npy(bytes: &[u8]) -> std::result::Result<Tensor, String> {
    let (h, off) = parse_npy_header(bytes)?;
    if h.fortran_order {
        return Err("Fortran-order arrays are not supported (expected C order)".into());
    }
    let n: usize = h.shape.iter().product();
    let need = n * h.dtype.size_in_bytes();
    let data = &bytes[off..];
    if data.len() < need {
        return Err(format!(
            "truncated array data: {} of {need} bytes",
            data.len()
        ));
    }
    Tensor::from_raw_buffer(&data[..need], h.dtype, &h.shape, &Device::Cpu)
        .map_err(|e| e.to_string())
}

impl TensorSource for NpzSource {
    fn path(&self) -> &Path {
        &self.path
    }
    fn names(&self) -> Vec<String> {
        self.names.clone()
    }
    fn get(&self, name: &str) -> Result<Option<Tensor>> {
        use std::io::Read;
        if !self.names.iter().any(|n| n == name) {
            return Ok(None);
        }
        let mut zip = self
            .archive
            .lock()
            .map_err(|_| Error::msg("npz reader lock poisoned"))?;
        let member = if zip.index_for_name(&format!("{name}.npy")).is_some() {
            format!("{name}.npy")
        } else {
            name.to_string()
        };
        let mut f = zip
            .by_name(&member)
            .map_err(|e| Error::file(&self.path, format!("array `{name}`: {e}")))?;
        let mut buf = Vec::with_capacity(f.size() as usize);
        f.read_to_end(&mut buf).map_err(|e| {
            Error::file(
                &self.path,
                format!("cannot read array `{name}` (truncated or corrupt?): {e}"),
            )
        })?;
        let t = decode_npy(&buf)
            .map_err(|e| Error::file(&self.path, format!("array `{name}`: {e}")))?;
        Ok(Some(t))
    }
}

/// How a source array becomes the canonical tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// Same shape.
    Copy,
    /// Conv kernel HWIO → OIHW (transpose `[3, 2, 0, 1]`).
    HwioToOihw,
    /// `(1,1,1,C)` or `(C)` → `(C)`.
    Flatten,
    /// Dense/attention kernel `(in, …)` → reshape to `(in, out)` then transpose to `(out, in)`.
    KernelT,
    /// Attention bias `(heads, head_dim)` → `(D)`.
    Reshape,
    /// Position embedding `(1, n, D)`: drop the cls row when `n = g0² + 1`, resize the grid when `g0 ≠ g`.
    PosEmbed,
    /// Rows `[k·n, (k+1)·n)` along dim 0 (timm fused qkv; `n` = canonical dim 0).
    Rows(usize),
}

/// One planned copy.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub slot: Slot,
    pub source: String,
    pub transform: Transform,
}

/// Result of a conversion.
#[derive(Debug, Clone)]
pub struct Conversion {
    /// Canonical key → f32 tensor (contiguous, CPU).
    pub tensors: BTreeMap<String, Tensor>,
    /// Source arrays read (sorted, each once).
    pub read: Vec<String>,
    /// Source arrays ignored (classification extras).
    pub ignored: Vec<String>,
}

/// The §5.5 source array and transform of every slot.
pub fn npz_mapping(cfg: &TransUnetConfig) -> Vec<Mapping> {
    let sb = |bias: bool| if bias { "bias" } else { "scale" };
    encoder_slots(cfg)
        .into_iter()
        .map(|(slot, _)| {
            let (source, transform) = match slot {
                Slot::RootConv => ("conv_root/kernel".to_string(), Transform::HwioToOihw),
                Slot::RootGn { bias } => (format!("gn_root/{}", sb(bias)), Transform::Flatten),
                Slot::UnitConv { b, u, k } => (
                    format!("block{b}/unit{u}/conv{k}/kernel"),
                    Transform::HwioToOihw,
                ),
                Slot::UnitGn { b, u, k, bias } => (
                    format!("block{b}/unit{u}/gn{k}/{}", sb(bias)),
                    Transform::Flatten,
                ),
                Slot::Downsample { b } => (
                    format!("block{b}/unit1/conv_proj/kernel"),
                    Transform::HwioToOihw,
                ),
                Slot::GnProj { b, bias } => (
                    format!("block{b}/unit1/gn_proj/{}", sb(bias)),
                    Transform::Flatten,
                ),
                Slot::Patch { bias: false } => {
                    ("embedding/kernel".to_string(), Transform::HwioToOihw)
                }
                Slot::Patch { bias: true } => ("embedding/bias".to_string(), Transform::Copy),
                Slot::PosEmbed => (
                    "Transformer/posembed_input/pos_embedding".to_string(),
                    Transform::PosEmbed,
                ),
                Slot::Norm { i, ffn, bias } => (
                    format!(
                        "Transformer/encoderblock_{i}/LayerNorm_{}/{}",
                        if ffn { 2 } else { 0 },
                        sb(bias)
                    ),
                    Transform::Copy,
                ),
                Slot::Attn { i, which, bias } => {
                    let name = ATTN_NAMES[which];
                    let base = format!(
                        "Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{name}"
                    );
                    if bias {
                        (
                            format!("{base}/bias"),
                            if which == 3 {
                                Transform::Copy
                            } else {
                                Transform::Reshape
                            },
                        )
                    } else {
                        (format!("{base}/kernel"), Transform::KernelT)
                    }
                }
                Slot::Fc { i, k, bias } => {
                    let base = format!("Transformer/encoderblock_{i}/MlpBlock_3/Dense_{}", k - 1);
                    if bias {
                        (format!("{base}/bias"), Transform::Copy)
                    } else {
                        (format!("{base}/kernel"), Transform::KernelT)
                    }
                }
                Slot::EncoderNorm { bias } => (
                    format!("Transformer/encoder_norm/{}", sb(bias)),
                    Transform::Copy,
                ),
            };
            Mapping {
                slot,
                source,
                transform,
            }
        })
        .collect()
}

/// Source arrays of the original npz that TransUNet never reads.
pub fn npz_is_ignored(name: &str) -> bool {
    name == "cls" || name.starts_with("head/") || name.starts_with("pre_logits/")
}

/// Resizes a `(n, D)` grid of `g0² = n` position embeddings to `(g², D)` with `bilinear(ac=true)` (SPEC §5.5).
pub fn resize_pos_grid(rows: &Tensor, g: usize) -> Result<Tensor> {
    let (n, d) = rows.dims2()?;
    let g0 = (n as f64).sqrt().round() as usize;
    if g0 * g0 != n {
        return Err(Error::Weights(format!(
            "{n} position-embedding rows do not form a square grid"
        )));
    }
    if g0 == g {
        return Ok(rows.clone());
    }
    // (n, D) → (1, D, g0, g0) → resize → (g², D)
    let x = rows.t()?.contiguous()?.reshape((1, d, g0, g0))?;
    let y = crate::nn::resize_bilinear(&x, g, g, true)?;
    Ok(y.reshape((d, g * g))?.t()?.contiguous()?)
}

fn apply(
    t: &Tensor,
    transform: Transform,
    want: &[usize],
    name: &str,
    path: &Path,
) -> Result<Tensor> {
    let bad = |why: &str| {
        Error::file(
            path,
            format!(
                "array `{name}` has shape {:?}; {why} (target shape {want:?})",
                t.dims()
            ),
        )
    };
    let numel: usize = want.iter().product();
    let t = t.to_dtype(DType::F32)?;
    let out = match transform {
        Transform::Copy => {
            if t.dims() != want {
                return Err(bad("expected the target shape"));
            }
            t
        }
        Transform::HwioToOihw => {
            let expect = [want[2], want[3], want[1], want[0]];
            if t.dims() != expect {
                return Err(bad(&format!("expected HWIO {expect:?}")));
            }
            t.permute((3, 2, 0, 1))?
        }
        Transform::Flatten => {
            let c = want[0];
            if t.dims() != [1, 1, 1, c] && t.dims() != [c] {
                return Err(bad(&format!("expected (1,1,1,{c}) or ({c})")));
            }
            t.reshape(c)?
        }
        Transform::KernelT => {
            // Dense (in, out); attention q/k/v (D, heads, hd); out (heads, hd, D). Target (out, in).
            let (o, i) = (want[0], want[1]);
            let ok = t.elem_count() == numel
                && t.rank() >= 2
                && match t.rank() {
                    2 => t.dims() == [i, o],
                    3 if name.ends_with("/out/kernel") => {
                        t.dims()[2] == o && t.dims()[0] * t.dims()[1] == i
                    }
                    3 => t.dims()[0] == i && t.dims()[1] * t.dims()[2] == o,
                    _ => false,
                };
            if !ok {
                return Err(bad(&format!(
                    "expected an ({i}, {o}) kernel (attention kernels split into heads)"
                )));
            }
            t.reshape((i, o))?.t()?
        }
        Transform::Reshape => {
            if t.elem_count() != numel || t.rank() != 2 {
                return Err(bad("expected (heads, head_dim)"));
            }
            t.reshape(want)?
        }
        Transform::PosEmbed => {
            let (g2, d) = (want[1], want[2]);
            let g = (g2 as f64).sqrt().round() as usize;
            if t.rank() != 3 || t.dims()[0] != 1 || t.dims()[2] != d {
                return Err(bad(&format!("expected (1, n, {d})")));
            }
            let n = t.dims()[1];
            let rows = t.squeeze(0)?;
            let rows = if n == g2 {
                rows
            } else {
                // Drop the cls row when present (n = g0² + 1); a bare grid otherwise.
                let r0 = (n as f64).sqrt().round() as usize;
                if r0 * r0 == n {
                    rows
                } else {
                    rows.narrow(0, 1, n - 1)?
                }
            };
            let rows = resize_pos_grid(&rows, g).map_err(|e| bad(&e.to_string()))?;
            rows.unsqueeze(0)?
        }
        Transform::Rows(k) => {
            let n = want[0];
            let mut expect = want.to_vec();
            expect[0] = 3 * n;
            if t.dims() != expect.as_slice() {
                return Err(bad(&format!("expected fused {expect:?}")));
            }
            t.narrow(0, k * n, n)?
        }
    };
    if out.dims() != want {
        return Err(bad("conversion produced a wrong shape"));
    }
    Ok(out.contiguous()?.to_device(&Device::Cpu)?)
}

/// `a, b, c, … and N more` (at most `max` names), for one-sentence error messages.
pub fn key_list<S: AsRef<str>>(keys: &[S], max: usize) -> String {
    let shown: Vec<&str> = keys.iter().take(max).map(|k| k.as_ref()).collect();
    let more = keys.len().saturating_sub(max);
    let mut out = shown.join(", ");
    if more > 0 {
        out.push_str(&format!(" … and {more} more"));
    }
    out
}

/// Runs `mapping` over `src`: every mapped array must exist; arrays that are neither mapped nor `ignored` are
/// errors (naming them), as are shape mismatches.
pub fn run_mapping(
    src: &dyn TensorSource,
    cfg: &TransUnetConfig,
    mapping: &[Mapping],
    ignored: &dyn Fn(&str) -> bool,
) -> Result<Conversion> {
    let shapes: BTreeMap<String, Vec<usize>> = encoder_shapes(cfg);
    let names = src.names();
    let name_set: std::collections::BTreeSet<&str> = names.iter().map(|s| s.as_str()).collect();
    let mapped: std::collections::BTreeSet<&str> =
        mapping.iter().map(|m| m.source.as_str()).collect();
    let missing: Vec<&str> = mapped
        .iter()
        .copied()
        .filter(|n| !name_set.contains(n))
        .collect();
    if !missing.is_empty() {
        return Err(Error::file(
            src.path(),
            format!(
                "{} missing arrays (does the configuration match the file?): {}",
                missing.len(),
                key_list(&missing, 8)
            ),
        ));
    }
    let unmapped: Vec<&str> = names
        .iter()
        .map(|s| s.as_str())
        .filter(|n| !mapped.contains(n) && !ignored(n))
        .collect();
    if !unmapped.is_empty() {
        return Err(Error::file(
            src.path(),
            format!(
                "{} arrays have no place in this TransUNet configuration (wrong depth/width preset?): {}",
                unmapped.len(),
                key_list(&unmapped, 8)
            ),
        ));
    }
    let mut cache: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut tensors = BTreeMap::new();
    for m in mapping {
        let t = match cache.get(&m.source) {
            Some(t) => t.clone(),
            None => {
                let t = src.get(&m.source)?.ok_or_else(|| {
                    Error::file(src.path(), format!("missing array `{}`", m.source))
                })?;
                cache.insert(m.source.clone(), t.clone());
                t
            }
        };
        let key = m.slot.key();
        let want = &shapes[&key];
        let out = apply(&t, m.transform, want, &m.source, src.path())?;
        tensors.insert(key, out);
    }
    let ign: Vec<String> = names
        .iter()
        .filter(|n| !mapped.contains(n.as_str()))
        .cloned()
        .collect();
    for n in &ign {
        tracing::debug!("{}: ignoring array `{n}`", src.path().display());
    }
    Ok(Conversion {
        tensors,
        read: mapped.into_iter().map(String::from).collect(),
        ignored: ign,
    })
}

/// Converts an ImageNet-21k R50+ViT-B/16 `.npz` (uncompressed or deflate-compressed) for `cfg` (SPEC §5.5).
pub fn convert_npz(path: &Path, cfg: &TransUnetConfig) -> Result<Conversion> {
    let src = NpzSource::open(path)?;
    run_mapping(&src, cfg, &npz_mapping(cfg), &npz_is_ignored)
}

/// SHA-256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes `text` to `path` atomically (temporary file in the same directory, fsync, rename).
pub fn write_text_atomic(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "file".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let res = (|| -> Result<()> {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(text.as_bytes())
            .map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Writes converted canonical tensors to `output` (safetensors, atomic) and the sidecar `output.json` of SPEC §13.5
/// (`source_path`, `source_sha256`, `format`, `provenance`, `mapping_version`, `tensor_count`). Returns the sidecar path.
pub fn write_converted(
    tensors: &BTreeMap<String, Tensor>,
    input: &Path,
    output: &Path,
    format: &str,
    provenance: Option<&str>,
) -> Result<PathBuf> {
    let list: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    crate::models::transunet::save_safetensors_atomic(output, &list)?;
    let sidecar = output.with_extension("json");
    let json = serde_json::json!({
        "source_path": input.display().to_string(),
        "source_sha256": sha256_file(input)?,
        "format": format,
        "provenance": provenance,
        "mapping_version": MAPPING_VERSION,
        "tensor_count": tensors.len(),
    });
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::msg(e.to_string()))?;
    write_text_atomic(&sidecar, &(text + "\n"))?;
    Ok(sidecar)
}

/// The TransUNet pretrained formats `ultrarefiner convert` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderFormat {
    /// Google ViT `R50+ViT-B_16.npz` (SPEC §5.5).
    Npz,
    /// timm `vit_base_r50_s16_224.orig_in21k` safetensors (SPEC §5.6).
    Timm,
}

impl EncoderFormat {
    pub fn name(&self) -> &'static str {
        match self {
            EncoderFormat::Npz => "npz",
            EncoderFormat::Timm => "timm",
        }
    }
}

/// Converts `input` (npz or timm) for `cfg` and writes canonical safetensors + sidecar to `output`.
pub fn convert_encoder_file(
    format: EncoderFormat,
    input: &Path,
    output: &Path,
    cfg: &TransUnetConfig,
) -> Result<Conversion> {
    let conv = match format {
        EncoderFormat::Npz => convert_npz(input, cfg)?,
        EncoderFormat::Timm => super::timm::convert_timm(input, cfg)?,
    };
    write_converted(&conv.tensors, input, output, format.name(), None)?;
    Ok(conv)
}
