//! Where a weight file comes from: a local path or the Hugging Face hub cache (SPEC §13.6).
use super::{RepoKind, WeightAlias};
use crate::{Error, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};

/// A file resolved to a local path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedFile {
    pub path: PathBuf,
    /// Commit hash of the hub snapshot the file came from (None for local files).
    pub commit: Option<String>,
}

/// Resolves a weight file to a local path.
pub trait WeightSource {
    /// Human-readable origin (for messages and logs).
    fn describe(&self) -> String;
    /// The local path of the file (downloading it first where the source allows it).
    fn resolve(&self) -> Result<ResolvedFile>;
}

/// A file the user already has.
#[derive(Debug, Clone)]
pub struct LocalPath {
    pub path: PathBuf,
}

impl LocalPath {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        LocalPath { path: path.into() }
    }
}

impl WeightSource for LocalPath {
    fn describe(&self) -> String {
        format!("local file {}", self.path.display())
    }
    fn resolve(&self) -> Result<ResolvedFile> {
        if !self.path.is_file() {
            return Err(Error::file(
                &self.path,
                "weight file not found (or not a regular file)",
            ));
        }
        Ok(ResolvedFile {
            path: self.path.clone(),
            commit: None,
        })
    }
}

/// The hub cache directory (the folder holding `models--org--name`) from the environment values:
/// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `HOME/.cache/huggingface/hub`.
pub fn cache_dir_from_env(
    hf_hub_cache: Option<&str>,
    hf_home: Option<&str>,
    home: Option<&str>,
) -> Result<PathBuf> {
    let nonempty = |s: Option<&str>| s.filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(c) = nonempty(hf_hub_cache) {
        return Ok(c);
    }
    if let Some(h) = nonempty(hf_home) {
        return Ok(h.join("hub"));
    }
    if let Some(h) = nonempty(home) {
        return Ok(h.join(".cache").join("huggingface").join("hub"));
    }
    Err(Error::Arg(
        "cannot locate the Hugging Face cache: none of HF_HUB_CACHE, HF_HOME, HOME is set; pass --cache-dir".into(),
    ))
}

/// [`cache_dir_from_env`] with the process environment.
pub fn default_cache_dir() -> Result<PathBuf> {
    let get = |k: &str| std::env::var(k).ok();
    cache_dir_from_env(
        get("HF_HUB_CACHE").as_deref(),
        get("HF_HOME").as_deref(),
        get("HOME").as_deref(),
    )
}

/// SHA-256 (lower-case hex) of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
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

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A file in a Hugging Face repository, resolved through the standard cache layout
/// `CACHE/{models|spaces}--{org}--{name}/{refs/<revision>, snapshots/<commit>/<file>}`.
/// Offline, only the cache is consulted; online, a file missing from the cache is downloaded with `hf-hub`
/// (honouring `HF_ENDPOINT` and the token in `HF_HOME/token`).
#[derive(Debug, Clone)]
pub struct HubCache {
    /// The hub cache directory (holding `models--…`), e.g. `~/.cache/huggingface/hub`.
    pub cache_dir: PathBuf,
    pub repo: String,
    pub kind: RepoKind,
    pub revision: String,
    pub file: String,
    pub offline: bool,
    /// Show a download progress bar.
    pub progress: bool,
}

impl HubCache {
    /// Source of `entry`'s file at `revision` (default: the registry's revision); `cache_dir` None = environment.
    pub fn for_alias(
        entry: &WeightAlias,
        revision: Option<&str>,
        cache_dir: Option<&Path>,
        offline: bool,
    ) -> Result<Self> {
        let revision = revision.unwrap_or(entry.revision);
        if revision.is_empty()
            || revision.starts_with('/')
            || revision
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(Error::Arg(format!(
                "invalid --revision `{revision}` (expected a branch, tag, `refs/pr/N` or commit hash)"
            )));
        }
        let cache_dir = match cache_dir {
            Some(d) => d.to_path_buf(),
            None => default_cache_dir()?,
        };
        Ok(HubCache {
            cache_dir,
            repo: entry.repo.to_string(),
            kind: entry.kind,
            revision: revision.to_string(),
            file: entry.file.to_string(),
            offline,
            progress: true,
        })
    }

    /// `CACHE/{models|spaces}--org--name`.
    pub fn repo_dir(&self) -> PathBuf {
        self.cache_dir.join(format!(
            "{}--{}",
            self.kind.cache_prefix(),
            self.repo.replace('/', "--")
        ))
    }

    /// Looks the file up in the cache without any network access. `Ok(None)` when the revision or the file is not
    /// cached; `Err` only for unreadable cache entries.
    pub fn locate_cached(&self) -> Result<Option<ResolvedFile>> {
        let repo_dir = self.repo_dir();
        let commit = if is_commit_hash(&self.revision)
            && repo_dir.join("snapshots").join(&self.revision).is_dir()
        {
            self.revision.clone()
        } else {
            let ref_path = repo_dir.join("refs").join(&self.revision);
            match std::fs::read_to_string(&ref_path) {
                Ok(s) => {
                    let c = s.trim().to_string();
                    if c.is_empty() || c.contains('/') || c.contains("..") {
                        return Err(Error::file(
                            &ref_path,
                            "malformed cache ref (expected a commit hash)",
                        ));
                    }
                    c
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(Error::io(&ref_path, e)),
            }
        };
        let path = repo_dir.join("snapshots").join(&commit).join(&self.file);
        // `exists` follows the snapshot symlink into blobs/; a dangling link counts as not cached.
        if path.exists() {
            Ok(Some(ResolvedFile {
                path,
                commit: Some(commit),
            }))
        } else {
            Ok(None)
        }
    }

    fn download(&self) -> Result<ResolvedFile> {
        use hf_hub::api::sync::ApiBuilder;
        use hf_hub::{Cache, Repo, RepoType};
        let mut builder =
            ApiBuilder::from_cache(Cache::new(self.cache_dir.clone())).with_progress(self.progress);
        let endpoint = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty());
        if let Some(ep) = &endpoint {
            builder = builder.with_endpoint(ep.clone());
        }
        let api = builder.build().map_err(|e| {
            Error::Weights(format!("cannot set up the Hugging Face hub client: {e}"))
        })?;
        let kind = match self.kind {
            RepoKind::Model => RepoType::Model,
            RepoKind::Space => RepoType::Space,
        };
        let repo = api.repo(Repo::with_revision(
            self.repo.clone(),
            kind,
            self.revision.clone(),
        ));
        let path = repo.download(&self.file).map_err(|e| {
            Error::Weights(format!(
                "downloading {} from {} failed: {e}; without network, download the file by other means and run \
                 `ultrarefiner fetch <alias> --from-file PATH`",
                self.describe(),
                endpoint.as_deref().unwrap_or("https://huggingface.co")
            ))
        })?;
        // The download wrote refs/<revision> and snapshots/<commit>/<file>; read the commit back from the cache.
        match self.locate_cached()? {
            Some(r) => Ok(r),
            None => Ok(ResolvedFile { path, commit: None }),
        }
    }
}

impl WeightSource for HubCache {
    fn describe(&self) -> String {
        format!(
            "{} `{}` file `{}` at revision `{}`",
            self.kind.as_str(),
            self.repo,
            self.file,
            self.revision
        )
    }

    fn resolve(&self) -> Result<ResolvedFile> {
        if let Some(r) = self.locate_cached()? {
            return Ok(r);
        }
        if self.offline {
            let repo_dir = self.repo_dir();
            let what = if repo_dir.join("refs").join(&self.revision).is_file()
                || is_commit_hash(&self.revision)
            {
                format!("file `{}` is not in the cached snapshot", self.file)
            } else {
                format!("no cached ref `refs/{}`", self.revision)
            };
            return Err(Error::Weights(format!(
                "offline: {} is not in the hub cache {} ({what}); run without --offline to download it, point \
                 --cache-dir at another cache, or use --from-file PATH",
                self.describe(),
                repo_dir.display()
            )));
        }
        self.download()
    }
}
