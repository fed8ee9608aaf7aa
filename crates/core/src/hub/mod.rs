//! Weight registry, weight sources and `ultrarefiner fetch` (SPEC §6.7, §13.6).
//!
//! * [`registry`] lists the §6.7 aliases (where each pretrained file lives on the Hugging Face hub, its format, its
//!   known SHA-256 and its provenance).
//! * [`WeightSource`] resolves a file to a local path: [`LocalPath`] (a file the user already has) or [`HubCache`]
//!   (the standard Hugging Face cache layout, downloading through `hf-hub` unless offline).
//! * [`fetch`] resolves/downloads, verifies the SHA-256, converts to `weights/<alias>.safetensors` (canonical keys)
//!   and records the result in `weights/manifest.json`.
//! * [`resolve_weights_arg`] turns a training flag value (a path or an alias) into a path; training never downloads.
use crate::{Error, Result};
use std::path::{Path, PathBuf};

mod convert;
mod fetch;
mod manifest;
mod source;

pub use convert::{
    convert_weights, sam_original_safetensors_to_canonical, ConvertOutcome, SAM_PREFIXES,
};
pub use fetch::{fetch, FetchOptions, FetchReport};
pub use manifest::{
    utc_now_iso8601, write_atomic, Manifest, ManifestRecord, MANIFEST_FORMAT_VERSION,
};
pub use source::{
    cache_dir_from_env, default_cache_dir, sha256_file, HubCache, LocalPath, ResolvedFile,
    WeightSource,
};

/// Default folder of converted weights and `manifest.json` (SPEC §1.1).
pub const DEFAULT_WEIGHTS_DIR: &str = "weights";

/// Kind of Hugging Face repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoKind {
    Model,
    Space,
}

impl RepoKind {
    /// `model` or `space` (the manifest's `type`).
    pub fn as_str(&self) -> &'static str {
        match self {
            RepoKind::Model => "model",
            RepoKind::Space => "space",
        }
    }
    /// Folder prefix in the hub cache: `models` or `spaces`.
    pub fn cache_prefix(&self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Space => "spaces",
        }
    }
}

/// On-disk format of a downloaded file; selects the converter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// SAM with original segment-anything names, as safetensors (§6.5).
    SamOriginalSafetensors,
    /// SAM with original names, PyTorch pickle `.pth` (§6.6.1).
    SamPth,
    /// HF-transformers `SamModel` (safetensors or pickle `.bin`, §6.6.2).
    SamHf,
    /// timm `vit_base_r50_s16_224.orig_in21k` safetensors (§5.6).
    TimmR50,
    /// Google `R50+ViT-B_16.npz` (§5.5).
    Npz,
}

impl WeightFormat {
    /// Short name, as used by `ultrarefiner convert --from` (§13.5) and the sidecars.
    pub fn name(&self) -> &'static str {
        match self {
            WeightFormat::SamOriginalSafetensors => "sam-safetensors",
            WeightFormat::SamPth => "sam-pth",
            WeightFormat::SamHf => "hf-sam",
            WeightFormat::TimmR50 => "timm",
            WeightFormat::Npz => "npz",
        }
    }
}

impl std::fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the weights are: SAM, MedSAM (both select their input normalisation, §7.1) or the TransUNet ViT encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provenance {
    Sam,
    MedSam,
    Vit,
}

impl Provenance {
    pub fn as_str(&self) -> &'static str {
        match self {
            Provenance::Sam => "sam",
            Provenance::MedSam => "medsam",
            Provenance::Vit => "vit",
        }
    }
}

/// One §6.7 alias.
#[derive(Debug, Clone, Copy)]
pub struct WeightAlias {
    pub alias: &'static str,
    /// `org/name` on the hub.
    pub repo: &'static str,
    pub kind: RepoKind,
    /// Default revision (branch, tag, `refs/pr/N` or commit hash).
    pub revision: &'static str,
    /// File path inside the repository.
    pub file: &'static str,
    pub format: WeightFormat,
    /// SHA-256 of the downloaded file when known (lower-case hex); `None` = recorded at first download.
    pub sha256: Option<&'static str>,
    pub provenance: Provenance,
    /// Whether this is the default alias of its kind of weights.
    pub is_default: bool,
    /// One line for `--help`.
    pub description: &'static str,
}

const REGISTRY: &[WeightAlias] = &[
    WeightAlias {
        alias: "sam-vit-b",
        repo: "lmz/candle-sam",
        kind: RepoKind::Model,
        revision: "main",
        file: "sam_vit_b_01ec64.safetensors",
        format: WeightFormat::SamOriginalSafetensors,
        sha256: None,
        provenance: Provenance::Sam,
        is_default: true,
        description: "SAM ViT-B, original names, safetensors",
    },
    WeightAlias {
        alias: "sam-vit-b-pth",
        repo: "ybelkada/segment-anything",
        kind: RepoKind::Model,
        revision: "main",
        file: "checkpoints/sam_vit_b_01ec64.pth",
        format: WeightFormat::SamPth,
        sha256: Some("ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"),
        provenance: Provenance::Sam,
        is_default: false,
        description: "SAM ViT-B, the official .pth checkpoint",
    },
    WeightAlias {
        alias: "sam-vit-b-hf",
        repo: "facebook/sam-vit-base",
        kind: RepoKind::Model,
        revision: "main",
        file: "model.safetensors",
        format: WeightFormat::SamHf,
        sha256: None,
        provenance: Provenance::Sam,
        is_default: false,
        description: "SAM ViT-B in HF-transformers SamModel naming",
    },
    WeightAlias {
        alias: "medsam-vit-b",
        repo: "dennistrujillo/MedSAMTest",
        kind: RepoKind::Space,
        revision: "main",
        file: "medsam_vit_b.pth",
        format: WeightFormat::SamPth,
        sha256: None,
        provenance: Provenance::MedSam,
        is_default: true,
        description: "MedSAM ViT-B, original .pth, from a hub space",
    },
    WeightAlias {
        alias: "medsam-vit-b-hf",
        repo: "flaviagiammarino/medsam-vit-base",
        kind: RepoKind::Model,
        revision: "main",
        file: "pytorch_model.bin",
        format: WeightFormat::SamHf,
        sha256: Some("b80a96478503f89e76f1f7bbba50cfcd4ec9e7467f0d5185310216b33946ec9c"),
        provenance: Provenance::MedSam,
        is_default: false,
        description: "MedSAM ViT-B in HF-transformers naming (pickle .bin)",
    },
    WeightAlias {
        alias: "r50-vit-b16",
        repo: "timm/vit_base_r50_s16_224.orig_in21k",
        kind: RepoKind::Model,
        revision: "main",
        file: "model.safetensors",
        format: WeightFormat::TimmR50,
        sha256: None,
        provenance: Provenance::Vit,
        is_default: true,
        description: "TransUNet R50+ViT-B/16 ImageNet-21k encoder, timm safetensors",
    },
    WeightAlias {
        alias: "r50-vit-b16-npz",
        repo: "ccf92/ViT_Classification_Model",
        kind: RepoKind::Model,
        revision: "refs/pr/1",
        file: "R50+ViT-B_16.npz",
        format: WeightFormat::Npz,
        sha256: Some("ff009bf39bb4f9198b834cfe46aba2bfdaf730e933ab3e3c4b1edf4226eaafbe"),
        provenance: Provenance::Vit,
        is_default: false,
        description: "the same encoder as Google's original R50+ViT-B_16.npz",
    },
];

/// All §6.7 aliases, in table order.
pub fn registry() -> &'static [WeightAlias] {
    REGISTRY
}

/// The alias entry, if `alias` is one.
pub fn lookup(alias: &str) -> Option<&'static WeightAlias> {
    REGISTRY.iter().find(|w| w.alias == alias)
}

/// Comma-separated list of the aliases (for error messages).
pub fn alias_names() -> String {
    REGISTRY
        .iter()
        .map(|w| w.alias)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The alias entry, or an error listing the known aliases.
pub fn lookup_or_err(alias: &str) -> Result<&'static WeightAlias> {
    lookup(alias).ok_or_else(|| {
        Error::Arg(format!(
            "unknown weight alias `{alias}` (known: {})",
            alias_names()
        ))
    })
}

/// `weights_dir/<alias>.safetensors`.
pub fn converted_path(weights_dir: &Path, alias: &str) -> PathBuf {
    weights_dir.join(format!("{alias}.safetensors"))
}

/// Resolves a training flag value (`--sam-checkpoint`, `--vit-pretrained`; SPEC §13.6): an existing path is returned
/// as is; a known alias resolves to `weights_dir/<alias>.safetensors`, which must exist (the error suggests
/// `ultrarefiner fetch <alias>`; training never downloads implicitly).
pub fn resolve_weights_arg(arg: &str, weights_dir: &Path) -> Result<PathBuf> {
    let p = Path::new(arg);
    if p.exists() {
        return Ok(p.to_path_buf());
    }
    if let Some(w) = lookup(arg) {
        let conv = converted_path(weights_dir, w.alias);
        if conv.is_file() {
            return Ok(conv);
        }
        return Err(Error::Weights(format!(
            "`{arg}` is a weight alias but {} does not exist; download and convert it first with \
             `ultrarefiner fetch {arg}` (or `ultrarefiner fetch {arg} --from-file PATH` for a file you already have); \
             training never downloads weights by itself",
            conv.display()
        )));
    }
    Err(Error::Weights(format!(
        "`{arg}` is neither an existing file nor a weight alias (aliases: {}; get one with `ultrarefiner fetch <alias>`)",
        alias_names()
    )))
}
