//! Phase 2 augmented data (SPEC §8.9 layout, §11.3 steps 1-2): `manifest.json`, `samples.csv` and the coarse-mask
//! shards of one run (plus, with Option B, the real-prediction run), and the source images/GT at S.
//!
//! The coarse masks are not held in memory: at startup every shard header is read and checked (tensor names, dtype,
//! shape, byte ranges against the file size) and its `index` tensor maps each sample to a (shard, row); a batch then
//! reads its masks with one positioned read per sample ([`CoarseMasks::read_into`]). A 100k-sample run at S = 224 is
//! 20 GB of f32 masks (10 GB f16) on disk, but only the record table (a few MB) stays resident; the OS page cache
//! keeps the shards across epochs where memory allows.
use crate::augment::run::SampleRecord;
use crate::{Error, Result};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Above this many shard files the loader does not keep them open (file-descriptor limits) and opens a shard per read.
const MAX_OPEN_SHARDS: usize = 256;

/// The augmented data of one run (plus, with Option B, the real-prediction run).
pub struct Phase2Data {
    pub records: Vec<SampleRecord>,
    /// Stored coarse mask per record (`S×S`), read from the shards on demand.
    pub coarse: CoarseMasks,
    /// Index into `sources` per record.
    pub source_of: Vec<usize>,
    /// True for records of the `--real-data` run.
    pub is_real: Vec<bool>,
    /// `(dataset, name)` of each distinct source, sorted.
    pub sources: Vec<(String, String)>,
    /// Image at S `(S·S)` and GT at S per source.
    pub images: Vec<Vec<f32>>,
    pub gts: Vec<Vec<f32>>,
    pub store_size: usize,
    pub manifest_sha256: String,
    /// SHA-256 of the real run's manifest (Option B).
    pub real_manifest_sha256: Option<String>,
    /// `excluded_fold` of the manifest (`augment synthetic --exclude-fold k`).
    pub excluded_fold: Option<u64>,
}

/// Element type of a shard's `coarse` tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    F32,
    F16,
}

impl Elem {
    fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::F16 => 2,
        }
    }
}

/// One checked shard file: where its `coarse` rows start and their element type.
#[derive(Debug)]
struct Shard {
    path: PathBuf,
    /// Kept open when the run has at most [`MAX_OPEN_SHARDS`] shards.
    file: Option<File>,
    elem: Elem,
    /// Absolute byte offset of row 0 of `coarse`.
    data_start: u64,
    rows: usize,
}

/// Where one record's mask lives.
#[derive(Debug, Clone, Copy)]
struct Loc {
    shard: u32,
    row: u32,
    /// The sample's `index` (for error messages).
    index: u32,
}

#[derive(Debug)]
enum Store {
    /// Masks held in memory (benches, hand-built data).
    Memory(Vec<Vec<f32>>),
    /// Masks read from the shard files per access.
    Shards { shards: Vec<Shard>, locs: Vec<Loc> },
}

/// The stored coarse masks (`S×S`, values as stored: f32, or f16 widened exactly to f32) of the records, in record
/// order. Reads are positioned reads (`pread`), so a `&CoarseMasks` may be shared between threads.
#[derive(Debug)]
pub struct CoarseMasks {
    s: usize,
    store: Store,
}

impl CoarseMasks {
    /// Masks held in memory, each `S·S` values.
    pub fn in_memory(planes: Vec<Vec<f32>>, s: usize) -> Result<Self> {
        if let Some(i) = planes.iter().position(|p| p.len() != s * s) {
            return Err(Error::msg(format!(
                "coarse mask {i} has {} values, expected {s}×{s}",
                planes[i].len()
            )));
        }
        Ok(CoarseMasks {
            s,
            store: Store::Memory(planes),
        })
    }

    /// Number of masks (= records).
    pub fn len(&self) -> usize {
        match &self.store {
            Store::Memory(v) => v.len(),
            Store::Shards { locs, .. } => locs.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Side `S` of each mask.
    pub fn store_size(&self) -> usize {
        self.s
    }

    /// Bytes held in memory for the masks themselves (in-memory store) or for their index (shard store).
    pub fn resident_bytes(&self) -> usize {
        match &self.store {
            Store::Memory(v) => v.len() * self.s * self.s * 4,
            Store::Shards { shards, locs } => {
                locs.len() * std::mem::size_of::<Loc>()
                    + shards.len() * std::mem::size_of::<Shard>()
            }
        }
    }

    /// Appends the `S·S` values of record `i`'s mask to `out`. Errors name the shard file and the sample.
    pub fn read_into(&self, i: usize, out: &mut Vec<f32>) -> Result<()> {
        self.read_batch(&[i], out)
    }

    /// Appends the masks of records `ids` to `out`, in order: one positioned read per mask, the masks of a batch
    /// read in parallel (rayon), so that a batch costs about one mask's read where cores are idle.
    pub fn read_batch(&self, ids: &[usize], out: &mut Vec<f32>) -> Result<()> {
        use rayon::prelude::*;
        let plane = self.s * self.s;
        let start = out.len();
        out.resize(start + ids.len() * plane, 0.0);
        let dst = &mut out[start..];
        let res = if ids.len() > 1 {
            dst.par_chunks_mut(plane)
                .zip(ids.par_iter())
                .try_for_each_init(Scratch::default, |sc, (d, &i)| self.read_plane(i, d, sc))
        } else {
            let mut sc = Scratch::default();
            dst.chunks_mut(plane)
                .zip(ids)
                .try_for_each(|(d, &i)| self.read_plane(i, d, &mut sc))
        };
        if res.is_err() {
            out.truncate(start);
        }
        res
    }

    /// Record `i`'s mask.
    pub fn get(&self, i: usize) -> Result<Vec<f32>> {
        let mut v = Vec::with_capacity(self.s * self.s);
        self.read_into(i, &mut v)?;
        Ok(v)
    }

    /// Every mask in record order.
    pub fn iter(&self) -> impl Iterator<Item = Result<Vec<f32>>> + '_ {
        (0..self.len()).map(|i| self.get(i))
    }

    /// Record `i`'s mask into `dst` (`S·S` values).
    fn read_plane(&self, i: usize, dst: &mut [f32], scratch: &mut Scratch) -> Result<()> {
        let n = self.len();
        let range = || Error::msg(format!("coarse mask {i} out of range ({n} records)"));
        match &self.store {
            Store::Memory(v) => dst.copy_from_slice(v.get(i).ok_or_else(range)?),
            Store::Shards { shards, locs } => {
                let loc = locs.get(i).ok_or_else(range)?;
                let sh = &shards[loc.shard as usize];
                let buf = &mut scratch.bytes;
                buf.resize(dst.len() * sh.elem.size(), 0);
                let off = sh.data_start + (loc.row as u64) * buf.len() as u64;
                let res = match &sh.file {
                    Some(f) => read_exact_at(f, buf, off),
                    None => File::open(&sh.path).and_then(|f| read_exact_at(&f, buf, off)),
                };
                res.map_err(|e| {
                    Error::file(
                        &sh.path,
                        format!(
                            "cannot read the coarse mask of sample index {} (row {} of {}): {e}",
                            loc.index, loc.row, sh.rows
                        ),
                    )
                })?;
                decode(sh.elem, &scratch.bytes, &mut scratch.bits, dst);
            }
        }
        Ok(())
    }

    /// `self` followed by `other` (same `S`).
    fn concat(self, other: CoarseMasks) -> Result<CoarseMasks> {
        if self.s != other.s {
            return Err(Error::msg(format!(
                "coarse masks of size {} and {} cannot be mixed",
                self.s, other.s
            )));
        }
        let store = match (self.store, other.store) {
            (Store::Memory(mut a), Store::Memory(b)) => {
                a.extend(b);
                Store::Memory(a)
            }
            (
                Store::Shards {
                    shards: mut sa,
                    locs: mut la,
                },
                Store::Shards {
                    shards: sb,
                    locs: lb,
                },
            ) => {
                let k = sa.len() as u32;
                let keep_open = sa.len() + sb.len() <= MAX_OPEN_SHARDS;
                sa.extend(sb);
                if !keep_open {
                    sa.iter_mut().for_each(|s| s.file = None);
                }
                la.extend(lb.into_iter().map(|l| Loc {
                    shard: l.shard + k,
                    ..l
                }));
                Store::Shards {
                    shards: sa,
                    locs: la,
                }
            }
            _ => {
                return Err(Error::msg(
                    "in-memory and shard coarse masks cannot be mixed",
                ))
            }
        };
        Ok(CoarseMasks { s: self.s, store })
    }
}

/// Reusable buffers of the shard reads.
#[derive(Default)]
struct Scratch {
    bytes: Vec<u8>,
    bits: Vec<u16>,
}

/// Iterates over the masks in record order, for tests and tools that want plain `Vec<f32>`s. Panics with the
/// [`CoarseMasks::read_into`] error (file and sample) on a read failure; the trainer uses the fallible methods.
impl<'a> IntoIterator for &'a CoarseMasks {
    type Item = Vec<f32>;
    type IntoIter = Box<dyn Iterator<Item = Vec<f32>> + 'a>;
    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter().map(|r| r.unwrap_or_else(|e| panic!("{e}"))))
    }
}

/// Writes the little-endian values of `bytes` into `dst` as f32 (f16 widened exactly, with F16C where the CPU has
/// it); `bits` is scratch.
fn decode(elem: Elem, bytes: &[u8], bits: &mut Vec<u16>, dst: &mut [f32]) {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    match elem {
        Elem::F32 => {
            for (o, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Elem::F16 => {
            bits.clear();
            bits.extend(
                bytes
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]])),
            );
            bits.reinterpret_cast::<half::f16>()
                .convert_to_f32_slice(dst);
        }
    }
}

#[cfg(unix)]
fn read_exact_at(f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(f, buf, off)
}

#[cfg(not(unix))]
fn read_exact_at(mut f: &File, buf: &mut [u8], off: u64) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    f.seek(SeekFrom::Start(off))?;
    f.read_exact(buf)
}

/// A shard's checked header: its `index` values and where its `coarse` rows are.
fn open_shard(path: &Path, s: usize, keep_open: bool) -> Result<(Shard, Vec<u32>)> {
    use safetensors::tensor::{Dtype, Metadata};
    let bad = |msg: String| Error::file(path, format!("invalid shard: {msg}"));
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut n8 = [0u8; 8];
    if len < 8 {
        return Err(bad(format!(
            "{len} bytes, shorter than a safetensors header"
        )));
    }
    read_exact_at(&f, &mut n8, 0).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(n8);
    if n > 100_000_000 || 8 + n > len {
        return Err(bad(format!(
            "header length {n} does not fit the file ({len} bytes; truncated?)"
        )));
    }
    let mut hdr = vec![0u8; n as usize];
    read_exact_at(&f, &mut hdr, 8).map_err(|e| Error::io(path, e))?;
    let meta: Metadata = serde_json::from_slice(&hdr).map_err(|e| bad(format!("header: {e}")))?;
    // The data section must end exactly at the end of the file (as SafeTensors::deserialize checks).
    let mut end = 0usize;
    for (name, info) in meta.tensors() {
        let (a, b) = info.data_offsets;
        let want = info.shape.iter().product::<usize>() * info.dtype.size();
        if b < a || b - a != want {
            return Err(bad(format!(
                "tensor `{name}`: byte range {a}..{b} does not hold shape {:?} of {:?}",
                info.shape, info.dtype
            )));
        }
        end = end.max(b);
    }
    if 8 + n + end as u64 != len {
        return Err(bad(format!(
            "the header describes {} bytes, the file has {len} (truncated or corrupt)",
            8 + n + end as u64
        )));
    }
    let ii = meta
        .info("index")
        .ok_or_else(|| Error::file(path, "shard has no `index` tensor"))?;
    if ii.dtype != Dtype::U32 || ii.shape.len() != 1 {
        return Err(bad(format!(
            "`index` is {:?} {:?}, expected U32 (n)",
            ii.dtype, ii.shape
        )));
    }
    let mut ib = vec![0u8; ii.data_offsets.1 - ii.data_offsets.0];
    read_exact_at(&f, &mut ib, 8 + n + ii.data_offsets.0 as u64).map_err(|e| Error::io(path, e))?;
    let index: Vec<u32> = ib
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let c = meta
        .info("coarse")
        .ok_or_else(|| Error::file(path, "shard has no `coarse` tensor"))?;
    let elem = match c.dtype {
        Dtype::F32 => Elem::F32,
        Dtype::F16 => Elem::F16,
        d => {
            return Err(Error::file(
                path,
                format!("`coarse` has dtype {d:?}, expected F32 or F16"),
            ))
        }
    };
    if c.shape.len() != 3 || c.shape[1] != s || c.shape[2] != s || c.shape[0] != index.len() {
        return Err(Error::file(
            path,
            format!(
                "`coarse` shape {:?} does not match ({}, {s}, {s})",
                c.shape,
                index.len()
            ),
        ));
    }
    let shard = Shard {
        path: path.to_path_buf(),
        file: keep_open.then_some(f),
        elem,
        data_start: 8 + n + c.data_offsets.0 as u64,
        rows: index.len(),
    };
    Ok((shard, index))
}

/// One run directory (§8.9 layout) before the sources are loaded.
struct RunFiles {
    records: Vec<SampleRecord>,
    coarse: CoarseMasks,
    src_sha: HashMap<(String, String), String>,
    manifest_sha256: String,
    manifest_path: PathBuf,
    excluded_fold: Option<u64>,
}

/// The shard files of a run: `n_shards` of the manifest when present, else every `shards/coarse-*.safetensors`.
fn shard_paths(dir: &Path, manifest: &serde_json::Value) -> Result<Vec<PathBuf>> {
    let sd = dir.join("shards");
    if let Some(n) = manifest["n_shards"].as_u64() {
        return Ok((0..n as usize)
            .map(|k| sd.join(format!("coarse-{k:05}.safetensors")))
            .collect());
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir(&sd)
        .map_err(|e| Error::io(&sd, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("coarse-") && n.ends_with(".safetensors"))
        })
        .collect();
    v.sort();
    if v.is_empty() {
        return Err(Error::file(&sd, "no coarse-*.safetensors shards"));
    }
    Ok(v)
}

/// Reads `manifest.json`, `samples.csv` and the shard headers of one run directory.
fn read_run(dir: &Path, transunet_img_size: usize) -> Result<RunFiles> {
    let mpath = dir.join("manifest.json");
    let mbytes = std::fs::read(&mpath).map_err(|e| Error::io(&mpath, e))?;
    let manifest: serde_json::Value = serde_json::from_slice(&mbytes)
        .map_err(|e| Error::file(&mpath, format!("invalid manifest.json: {e}")))?;
    let manifest_sha256 = crate::data::sha256_hex(&mbytes);
    let s = manifest["store_size"]
        .as_u64()
        .ok_or_else(|| Error::file(&mpath, "missing `store_size`"))? as usize;
    if s != transunet_img_size {
        return Err(Error::Arg(format!(
            "--transunet-img-size {transunet_img_size} differs from the manifest's store_size {s} ({})",
            mpath.display()
        )));
    }
    let mut src_sha: HashMap<(String, String), String> = HashMap::new();
    for v in manifest["sources"].as_array().into_iter().flatten() {
        let d = v["dataset"].as_str().unwrap_or_default().to_string();
        let n = v["name"].as_str().unwrap_or_default().to_string();
        src_sha.insert((d, n), v["sha256"].as_str().unwrap_or_default().to_string());
    }
    let cpath = dir.join("samples.csv");
    let mut rdr = csv::Reader::from_path(&cpath).map_err(|e| Error::file(&cpath, e.to_string()))?;
    let records: Vec<SampleRecord> = rdr
        .deserialize()
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| Error::file(&cpath, format!("invalid samples.csv: {e}")))?;
    let paths = shard_paths(dir, &manifest)?;
    let keep_open = paths.len() <= MAX_OPEN_SHARDS;
    let mut shards = Vec::with_capacity(paths.len());
    let mut by_index: HashMap<u32, (u32, u32)> = HashMap::new();
    for (k, p) in paths.iter().enumerate() {
        let (sh, idx) = open_shard(p, s, keep_open)?;
        for (row, i) in idx.into_iter().enumerate() {
            by_index.insert(i, (k as u32, row as u32));
        }
        shards.push(sh);
    }
    let locs = records
        .iter()
        .map(|r| {
            let (shard, row) = by_index.remove(&(r.index as u32)).ok_or_else(|| {
                Error::file(
                    &cpath,
                    format!(
                        "sample {} (index {}) has no coarse mask in the shards",
                        r.sample_id, r.index
                    ),
                )
            })?;
            Ok(Loc {
                shard,
                row,
                index: r.index as u32,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(RunFiles {
        records,
        coarse: CoarseMasks {
            s,
            store: Store::Shards { shards, locs },
        },
        src_sha,
        manifest_sha256,
        manifest_path: mpath,
        excluded_fold: manifest["excluded_fold"].as_u64(),
    })
}

/// Reads `manifest.json`, `samples.csv` and the shard headers of `<data_root>/<dataset>`, verifies the sources
/// against the processed data (SHA-256) and loads each source image and GT at S (§3.7; GT nearest).
pub fn load_data(
    data_root: &Path,
    dataset: &str,
    processed_root: &Path,
    transunet_img_size: usize,
) -> Result<Phase2Data> {
    load_data_mixed(
        &data_root.join(dataset),
        None,
        processed_root,
        transunet_img_size,
    )
}

/// As [`load_data`] for a run directory `dir`, plus (Option B, §8.10) the records of the real-prediction run
/// `real_dir` (same layout), flagged in [`Phase2Data::is_real`]. Sources are the union of both runs.
pub fn load_data_mixed(
    dir: &Path,
    real_dir: Option<&Path>,
    processed_root: &Path,
    transunet_img_size: usize,
) -> Result<Phase2Data> {
    let s = transunet_img_size;
    let synth = read_run(dir, s)?;
    let real = real_dir.map(|d| read_run(d, s)).transpose()?;
    let mut keys: Vec<(String, String)> = synth
        .records
        .iter()
        .chain(real.iter().flat_map(|r| r.records.iter()))
        .map(|r| (r.dataset.clone(), r.source_name.clone()))
        .collect();
    keys.sort();
    keys.dedup();
    let pos: HashMap<(String, String), usize> = keys
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, k)| (k, i))
        .collect();
    let mut sha: HashMap<(String, String), (String, PathBuf)> = HashMap::new();
    for run in std::iter::once(&synth).chain(real.iter()) {
        for (k, v) in &run.src_sha {
            if !v.is_empty() {
                sha.entry(k.clone())
                    .or_insert_with(|| (v.clone(), run.manifest_path.clone()));
            }
        }
    }
    let mut records = Vec::new();
    let mut coarse = CoarseMasks {
        s,
        store: Store::Shards {
            shards: Vec::new(),
            locs: Vec::new(),
        },
    };
    let mut source_of = Vec::new();
    let mut is_real = Vec::new();
    let real_manifest_sha256 = real.as_ref().map(|r| r.manifest_sha256.clone());
    let (manifest_sha256, excluded_fold) = (synth.manifest_sha256.clone(), synth.excluded_fold);
    for (flag, run) in std::iter::once((false, synth)).chain(real.map(|r| (true, r))) {
        for r in run.records {
            source_of.push(pos[&(r.dataset.clone(), r.source_name.clone())]);
            is_real.push(flag);
            records.push(r);
        }
        coarse = coarse.concat(run.coarse)?;
    }
    let mut images = Vec::with_capacity(keys.len());
    let mut gts = Vec::with_capacity(keys.len());
    for k in &keys {
        let (d, n) = k;
        let base = processed_root.join(d).join("train");
        let ip = base.join("images").join(format!("{n}.png"));
        let mp = base.join("masks").join(format!("{n}.png"));
        if let Some((want, mpath)) = sha.get(k) {
            let got = crate::augment::processed::sha256_file(&ip)?;
            if &got != want {
                return Err(Error::file(&ip, format!("SHA-256 {got} differs from {} ({want}): processed data changed since augmentation", mpath.display())));
            }
        }
        let smp = crate::data::dataset::load_sample_s(&ip, Some(&mp), s)?;
        images.push(smp.image);
        gts.push(smp.mask);
    }
    Ok(Phase2Data {
        records,
        coarse,
        source_of,
        is_real,
        sources: keys,
        images,
        gts,
        store_size: s,
        manifest_sha256,
        real_manifest_sha256,
        excluded_fold,
    })
}

/// Writes a small synthetic Phase 2 input for benches and tests: `n_src` processed sources (`<root>/processed/
/// BENCH/train/{images,masks}/s<i>.png`, 64×64 with a centred disc) and an augmented run `<root>/aug/BENCH`
/// (§8.9 layout: `manifest.json`, `samples.csv`, `shard_size`-sample shards of `n` coarse masks at `S`, stored as
/// `dtype`). Mask `j` is source `j % n_src`'s disc shifted by `j % 7` pixels and softened to {0.1, 0.9}. Returns
/// `(data_root, processed_root)`; the run's dataset name is `BENCH`.
pub fn write_synthetic_run(
    root: &Path,
    n: usize,
    n_src: usize,
    s: usize,
    shard_size: usize,
    dtype: crate::augment::soft::StoreDtype,
) -> Result<(PathBuf, PathBuf)> {
    use crate::augment::run::{coarse_shard_bytes, records_csv, shard_path, write_atomic};
    let processed = root.join("processed");
    let base = processed.join("BENCH").join("train");
    for sub in ["images", "masks"] {
        let d = base.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    for i in 0..n_src {
        let img = image::GrayImage::from_fn(64, 64, |x, y| {
            image::Luma([((x * 3 + y * 2 + i as u32 * 17) % 256) as u8])
        });
        let r2 = (12 + i % 8).pow(2) as i64;
        let msk = image::GrayImage::from_fn(64, 64, |x, y| {
            let (dx, dy) = (x as i64 - 32, y as i64 - 32);
            image::Luma([if dx * dx + dy * dy <= r2 { 255 } else { 0 }])
        });
        for (im, sub) in [(&img, "images"), (&msk, "masks")] {
            let p = base.join(sub).join(format!("s{i}.png"));
            im.save(&p).map_err(|e| Error::file(&p, e.to_string()))?;
        }
    }
    let run = root.join("aug").join("BENCH");
    std::fs::create_dir_all(run.join("shards")).map_err(|e| Error::io(run.join("shards"), e))?;
    let shard_size = shard_size.max(1);
    let records: Vec<SampleRecord> = (0..n)
        .map(|j| SampleRecord {
            index: j,
            sample_id: format!("BENCH_{j:06}"),
            dataset: "BENCH".into(),
            source_name: format!("s{}", j % n_src.max(1)),
            bin: "0.80-0.85".into(),
            target_lo: 0.8,
            target_hi: 0.85,
            dice: 0.8 + (j % 5) as f64 * 0.01,
            in_bin: true,
            modes: "dilate".into(),
            gain: 0.0,
            attempts: 1,
            soft: "none".into(),
            temperature: 0.0,
            seed: j.to_string(),
            shard: j / shard_size,
            row: j % shard_size,
            area_frac: 0.1,
            circularity: 1.0,
            solidity: 1.0,
            tiny: false,
            small: false,
            irregular: false,
        })
        .collect();
    let plane = |j: usize| -> Vec<f32> {
        let (sh, r2) = (
            (j % 7) as i64,
            (s as i64 / 4 + (j % n_src.max(1)) as i64 % 8).pow(2),
        );
        (0..s * s)
            .map(|p| {
                let (dx, dy) = (
                    (p % s) as i64 - s as i64 / 2 - sh,
                    (p / s) as i64 - s as i64 / 2,
                );
                if dx * dx + dy * dy <= r2 {
                    0.9
                } else {
                    0.1
                }
            })
            .collect()
    };
    let n_shards = n.div_ceil(shard_size);
    for k in 0..n_shards {
        let recs = &records[k * shard_size..((k + 1) * shard_size).min(n)];
        let planes: Vec<Vec<f32>> = recs.iter().map(|r| plane(r.index)).collect();
        let refs: Vec<&[f32]> = planes.iter().map(|p| p.as_slice()).collect();
        let index: Vec<u32> = recs.iter().map(|r| r.index as u32).collect();
        let bytes = coarse_shard_bytes(&index, &refs, recs, s, dtype, "bench")?;
        write_atomic(&shard_path(&run, k), &bytes)?;
    }
    let csv = records_csv(&records)?;
    write_atomic(&run.join("samples.csv"), csv.as_bytes())?;
    let manifest = serde_json::json!({"store_size": s, "n_shards": n_shards, "shard_size": shard_size, "sources": []});
    write_atomic(&run.join("manifest.json"), manifest.to_string().as_bytes())?;
    Ok((root.join("aug"), processed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::soft::StoreDtype;

    fn scratch(tag: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("ur-p2data-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    #[test]
    fn lazy_masks_match_the_shards_and_mix_runs() {
        let root = scratch("match");
        for (sub, dtype) in [("a", StoreDtype::F32), ("b", StoreDtype::F16)] {
            let (aug, proc) = write_synthetic_run(&root.join(sub), 11, 3, 16, 4, dtype).unwrap();
            let d = load_data(&aug, "BENCH", &proc, 16).unwrap();
            assert_eq!(d.coarse.len(), 11);
            assert_eq!(d.sources.len(), 3);
            // Whole shard decoded the old way (SafeTensors::deserialize) = the positioned reads.
            let bytes = std::fs::read(aug.join("BENCH/shards/coarse-00002.safetensors")).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let c = st.tensor("coarse").unwrap();
            let mut want = vec![0f32; c.data().len() / c.dtype().size()];
            let el = if dtype == StoreDtype::F16 {
                Elem::F16
            } else {
                Elem::F32
            };
            decode(el, c.data(), &mut Vec::new(), &mut want);
            let mut got = Vec::new();
            d.coarse.read_batch(&[8, 9, 10], &mut got).unwrap();
            assert_eq!(got, want);
            assert!(got.iter().any(|v| *v > 0.5) && got.iter().any(|v| *v < 0.5));
        }
        let d = load_data_mixed(
            &root.join("a/aug/BENCH"),
            Some(&root.join("b/aug/BENCH")),
            &root.join("a/processed"),
            16,
        )
        .unwrap();
        assert_eq!(d.coarse.len(), 22);
        assert_eq!(d.is_real.iter().filter(|r| **r).count(), 11);
        // f16 of 0.1 is not exactly 0.1: the real run's masks come from the f16 shards.
        assert_eq!(d.coarse.get(3).unwrap(), d.coarse.get(3).unwrap());
        assert_ne!(d.coarse.get(3).unwrap(), d.coarse.get(11 + 3).unwrap());
        assert_eq!(
            d.coarse
                .get(11 + 3)
                .unwrap()
                .iter()
                .map(|v| (v * 10.0).round())
                .collect::<Vec<_>>(),
            d.coarse
                .get(3)
                .unwrap()
                .iter()
                .map(|v| (v * 10.0).round())
                .collect::<Vec<_>>()
        );
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn corrupt_shards_name_the_file_and_sample() {
        let root = scratch("corrupt");
        let (aug, proc) = write_synthetic_run(&root, 8, 2, 16, 4, StoreDtype::F32).unwrap();
        let shard = aug.join("BENCH/shards/coarse-00001.safetensors");
        let full = std::fs::read(&shard).unwrap();
        // Truncated: refused at startup, naming the shard.
        std::fs::write(&shard, &full[..full.len() - 100]).unwrap();
        let e = load_data(&aug, "BENCH", &proc, 16)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("coarse-00001.safetensors") && e.contains("truncated"),
            "{e}"
        );
        // A sample missing from every shard's index: refused at startup, naming the sample.
        let csv = aug.join("BENCH/samples.csv");
        let text = std::fs::read_to_string(&csv).unwrap();
        std::fs::write(&shard, &full).unwrap();
        std::fs::write(&csv, text.replace("\n7,BENCH_000007,", "\n9,BENCH_000009,")).unwrap();
        let e = load_data(&aug, "BENCH", &proc, 16)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("BENCH_000009") && e.contains("no coarse mask"),
            "{e}"
        );
        std::fs::write(&csv, text).unwrap();
        // Shrunk after the startup check: the read fails, naming the shard and the sample.
        let d = load_data(&aug, "BENCH", &proc, 16).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&shard)
            .unwrap()
            .set_len(full.len() as u64 - 16 * 16 * 4)
            .unwrap();
        assert_eq!(d.coarse.get(6).unwrap().len(), 256);
        let e = d.coarse.get(7).err().unwrap().to_string();
        assert!(
            e.contains("coarse-00001.safetensors") && e.contains("sample index 7"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
