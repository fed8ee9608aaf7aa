//! Embedding cache of the frozen image encoder (SPEC §6.9).
//!
//! Key = BLAKE3(encoder fingerprint ‖ preprocessing version ‖ normalisation mode ‖ encoder dtype ‖ input shape ‖
//! exact f32 bytes of the grey input image). Entries live in an in-memory LRU (bounded in bytes) backed by
//! `<dir>/<fingerprint>/<key>.safetensors` files holding one f16 tensor `embedding (C,g,g)`.
//! Embeddings handed out by the cache are always the f16-rounded values (on a miss too), so results do not depend on
//! whether an entry was hit.
use super::image_encoder::ImageEncoder;
use crate::{Error, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Version string of the SAM preprocessing (SPEC §7.1) folded into cache keys.
pub const PREPROCESS_VERSION: &str = "sam-preprocess-1";

#[derive(Debug, Default)]
struct Lru {
    map: HashMap<String, (Tensor, u64)>,
    tick: u64,
    bytes: usize,
}

/// The embedding cache for one encoder (fingerprint).
#[derive(Debug)]
pub struct EmbeddingCache {
    fingerprint: String,
    dir: Option<PathBuf>,
    mem_budget: usize,
    mem: Mutex<Lru>,
    hits: AtomicUsize,
    misses: AtomicUsize,
}

impl EmbeddingCache {
    /// `root`: cache folder (entries go to `root/<fingerprint>/`); `None` = memory only. `mem_budget_bytes`: LRU bound.
    pub fn new(root: Option<&Path>, fingerprint: &str, mem_budget_bytes: usize) -> Result<Self> {
        let dir = match root {
            Some(r) => {
                let d = r.join(fingerprint);
                std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
                Some(d)
            }
            None => None,
        };
        Ok(Self {
            fingerprint: fingerprint.to_string(),
            dir,
            mem_budget: mem_budget_bytes,
            mem: Mutex::new(Lru::default()),
            hits: AtomicUsize::new(0),
            misses: AtomicUsize::new(0),
        })
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
    /// Number of embeddings served from the cache.
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }
    /// Number of embeddings computed by the encoder.
    pub fn misses(&self) -> usize {
        self.misses.load(Ordering::Relaxed)
    }

    /// Cache key of one grey input image (any shape, e.g. `(1,S,S)`), for a normalisation mode and encoder dtype.
    pub fn key(&self, image: &Tensor, norm_mode: &str, encoder_dtype: DType) -> Result<String> {
        let mut h = blake3::Hasher::new();
        for part in [
            self.fingerprint.as_str(),
            PREPROCESS_VERSION,
            norm_mode,
            encoder_dtype.as_str(),
        ] {
            h.update(part.as_bytes());
            h.update(&[0u8]);
        }
        h.update(format!("{:?}", image.dims()).as_bytes());
        let v: Vec<f32> = image.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        for x in v {
            h.update(&x.to_le_bytes());
        }
        Ok(h.finalize().to_hex().to_string())
    }

    fn file(&self, key: &str) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("{key}.safetensors")))
    }

    fn mem_insert(&self, key: &str, t: Tensor) {
        let Ok(mut m) = self.mem.lock() else { return };
        let size = t.elem_count() * t.dtype().size_in_bytes();
        if size > self.mem_budget {
            return;
        }
        m.tick += 1;
        let tick = m.tick;
        if let Some((old, _)) = m.map.insert(key.to_string(), (t, tick)) {
            m.bytes -= old.elem_count() * old.dtype().size_in_bytes();
        }
        m.bytes += size;
        while m.bytes > self.mem_budget {
            let Some(victim) = m
                .map
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some((old, _)) = m.map.remove(&victim) {
                m.bytes -= old.elem_count() * old.dtype().size_in_bytes();
            }
        }
    }

    /// Looks an entry up (memory, then disk); returns the f16 tensor `(C,g,g)`.
    fn lookup(&self, key: &str) -> Result<Option<Tensor>> {
        if let Ok(mut m) = self.mem.lock() {
            m.tick += 1;
            let tick = m.tick;
            if let Some(e) = m.map.get_mut(key) {
                e.1 = tick;
                return Ok(Some(e.0.clone()));
            }
        }
        if let Some(p) = self.file(key) {
            if p.is_file() {
                let m = candle_core::safetensors::load(&p, &Device::Cpu)
                    .map_err(|e| Error::file(&p, e.to_string()))?;
                let t = m
                    .get("embedding")
                    .ok_or_else(|| Error::file(&p, "cache entry has no `embedding` tensor"))?
                    .to_dtype(DType::F16)?;
                self.mem_insert(key, t.clone());
                return Ok(Some(t));
            }
        }
        Ok(None)
    }

    /// Stores one embedding `(C,g,g)` (rounded to f16) in memory and on disk (atomic write).
    fn store(&self, key: &str, emb: &Tensor) -> Result<Tensor> {
        let t = emb
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F16)?
            .contiguous()?;
        if let Some(p) = self.file(key) {
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            let map = HashMap::from([("embedding".to_string(), t.clone())]);
            candle_core::safetensors::save(&map, &tmp)
                .map_err(|e| Error::file(&tmp, e.to_string()))?;
            std::fs::rename(&tmp, &p).map_err(|e| Error::io(&p, e))?;
        }
        self.mem_insert(key, t.clone());
        Ok(t)
    }

    /// Embeddings `(B,C,g,g)` f32 on `encoder`'s device for a batch of grey inputs `images (B, ...)`:
    /// cached ones are read, the others computed with `encoder.forward_frozen(make_input(missing_indices))`, where
    /// `make_input` returns the normalised SAM inputs `(m,3,N,N)` of those batch rows.
    pub fn embed(
        &self,
        encoder: &ImageEncoder,
        images: &Tensor,
        norm_mode: &str,
        make_input: impl FnOnce(&[usize]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if encoder.has_lora() {
            return Err(Error::msg(
                "the embedding cache is disabled with LoRA (SPEC §6.8): the encoder is trainable",
            ));
        }
        let b = images.dim(0)?;
        let mut keys = Vec::with_capacity(b);
        let mut found: Vec<Option<Tensor>> = Vec::with_capacity(b);
        let mut missing = Vec::new();
        for i in 0..b {
            let k = self.key(&images.i(i)?, norm_mode, encoder.dtype())?;
            let hit = self.lookup(&k)?;
            if hit.is_none() {
                missing.push(i);
            }
            found.push(hit);
            keys.push(k);
        }
        self.hits.fetch_add(b - missing.len(), Ordering::Relaxed);
        if !missing.is_empty() {
            self.misses.fetch_add(missing.len(), Ordering::Relaxed);
            let x = make_input(&missing)?;
            if x.dim(0)? != missing.len() {
                return Err(Error::msg(format!(
                    "embedding cache: make_input returned {} images for {} missing",
                    x.dim(0)?,
                    missing.len()
                )));
            }
            let emb = encoder.forward_frozen(&x)?;
            for (j, &i) in missing.iter().enumerate() {
                found[i] = Some(self.store(&keys[i], &emb.i(j)?)?);
            }
        }
        let dev = encoder.pos_embed.device().clone();
        let parts = found
            .into_iter()
            .map(|t| t.ok_or_else(|| Error::msg("embedding cache: entry vanished")))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&parts, 0)?
            .to_dtype(DType::F32)?
            .to_device(&dev)?)
    }
}
