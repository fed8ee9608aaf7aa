//! `ultrarefiner fetch`: resolve/download → verify SHA-256 → convert → record in `manifest.json` (SPEC §13.6).
use super::convert::convert_weights;
use super::manifest::{utc_now_iso8601, Manifest, ManifestRecord};
use super::source::{sha256_file, HubCache, LocalPath, WeightSource};
use super::{converted_path, lookup_or_err};
use crate::{Error, Result};
use std::path::PathBuf;

/// Options of one fetch.
#[derive(Debug, Clone)]
pub struct FetchOptions {
    pub alias: String,
    /// Hub revision (branch, tag, `refs/pr/N` or commit); None = the registry's.
    pub revision: Option<String>,
    /// Hub cache directory (holding `models--…`); None = `HF_HUB_CACHE`, `HF_HOME/hub` or `~/.cache/huggingface/hub`.
    pub cache_dir: Option<PathBuf>,
    /// Resolve from the cache only; never touch the network.
    pub offline: bool,
    /// Convert this local file instead of using the hub.
    pub from_file: Option<PathBuf>,
    /// Output folder of `<alias>.safetensors`, its sidecar and `manifest.json`.
    pub weights_dir: PathBuf,
    /// Download progress bar.
    pub progress: bool,
}

impl FetchOptions {
    /// Defaults: registry revision, environment cache, online, `weights/`, progress bar on.
    pub fn new(alias: impl Into<String>) -> Self {
        FetchOptions {
            alias: alias.into(),
            revision: None,
            cache_dir: None,
            offline: false,
            from_file: None,
            weights_dir: PathBuf::from(super::DEFAULT_WEIGHTS_DIR),
            progress: true,
        }
    }
}

/// What a fetch did.
#[derive(Debug, Clone)]
pub struct FetchReport {
    /// The record written to the manifest.
    pub record: ManifestRecord,
    /// The downloaded (or given) source file.
    pub source_path: PathBuf,
    /// Whether the source SHA-256 was compared with a known or previously recorded value.
    pub sha_verified: bool,
    /// `weights/<alias>.safetensors`.
    pub output: PathBuf,
    pub sidecar: PathBuf,
    pub manifest: PathBuf,
}

/// Runs one fetch (see [`FetchOptions`]). Never downloads when `offline` or `from_file` is set.
pub fn fetch(opts: &FetchOptions) -> Result<FetchReport> {
    let entry = lookup_or_err(&opts.alias)?;
    if opts.from_file.is_some() && opts.revision.is_some() {
        return Err(Error::Arg(
            "--revision applies to hub downloads and cannot be combined with --from-file".into(),
        ));
    }
    let manifest_path = Manifest::path(&opts.weights_dir);
    // Read the manifest first so a broken one fails before any download.
    let mut manifest = Manifest::load(&manifest_path)?;

    let (source, revision): (Box<dyn WeightSource>, Option<String>) = match &opts.from_file {
        Some(p) => (Box::new(LocalPath::new(p.clone())), None),
        None => {
            let h = HubCache {
                progress: opts.progress,
                ..HubCache::for_alias(
                    entry,
                    opts.revision.as_deref(),
                    opts.cache_dir.as_deref(),
                    opts.offline,
                )?
            };
            let rev = h.revision.clone();
            (Box::new(h), Some(rev))
        }
    };
    tracing::info!("fetch {}: resolving {}", entry.alias, source.describe());
    let resolved = source.resolve()?;
    let sha = sha256_file(&resolved.path)?;

    // Verification: the registry's known SHA-256 (for its default revision, or any --from-file), else the value
    // recorded at the first download of the same snapshot.
    let default_revision = revision.as_deref().map_or(true, |r| r == entry.revision);
    let mut sha_verified = false;
    if let Some(known) = entry.sha256 {
        if default_revision {
            if sha != known {
                return Err(Error::Weights(format!(
                    "SHA-256 mismatch for `{}` ({}): expected {known} (registry, SPEC §6.7), got {sha}; the file is \
                     corrupt, truncated or not the registry's file (delete it and fetch again, or convert another file \
                     with `ultrarefiner convert`)",
                    entry.alias,
                    resolved.path.display()
                )));
            }
            sha_verified = true;
        } else {
            tracing::warn!(
                "fetch {}: the known SHA-256 is for revision `{}`; revision `{}` is not checked against it",
                entry.alias,
                entry.revision,
                revision.as_deref().unwrap_or("")
            );
        }
    } else if let (Some(prev), Some(commit)) =
        (manifest.get(entry.alias), resolved.commit.as_deref())
    {
        if prev.source == "hub" && prev.commit.as_deref() == Some(commit) {
            if prev.sha256 != sha {
                return Err(Error::Weights(format!(
                    "SHA-256 mismatch for `{}` ({}): the first download of snapshot {commit} recorded {} in {}, \
                     got {sha}; the cached file changed or is corrupt (delete it and fetch again)",
                    entry.alias,
                    resolved.path.display(),
                    prev.sha256,
                    manifest_path.display()
                )));
            }
            sha_verified = true;
        }
    }

    let output = converted_path(&opts.weights_dir, entry.alias);
    let conv = convert_weights(entry.format, &resolved.path, &output, entry.provenance)?;
    let sha_converted = sha256_file(&output)?;

    let (file, source_kind) = match &opts.from_file {
        Some(p) => (
            std::fs::canonicalize(p)
                .unwrap_or_else(|_| p.clone())
                .display()
                .to_string(),
            "file",
        ),
        None => (entry.file.to_string(), "hub"),
    };
    let record = ManifestRecord {
        alias: entry.alias.to_string(),
        repo: entry.repo.to_string(),
        repo_type: entry.kind.as_str().to_string(),
        revision,
        commit: resolved.commit.clone(),
        file,
        source: source_kind.to_string(),
        format: entry.format.name().to_string(),
        sha256: sha,
        sha256_converted: sha_converted,
        output: format!("{}.safetensors", entry.alias),
        tensor_count: conv.tensor_count,
        provenance: entry.provenance.as_str().to_string(),
        date: utc_now_iso8601(),
    };
    manifest.upsert(record.clone());
    manifest.save(&manifest_path)?;
    Ok(FetchReport {
        record,
        source_path: resolved.path,
        sha_verified,
        output,
        sidecar: conv.sidecar,
        manifest: manifest_path,
    })
}
