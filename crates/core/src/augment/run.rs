//! `augment synthetic` orchestration (SPEC §8.8, §8.9): sources, allocation, parallel generation by work unit,
//! shards, `samples.csv`, `manifest.json`, summary.
use super::descriptors::MIN_AREA;
use super::processed::{list_sources, read_mask, sha256_file};
use super::resize::nearest_taps;
use super::sampler::{
    allocate_bin_labels, bin_counts, generate_sample, parse_bins, sample_seed, QualityBin,
    SampleResult, SimConfig,
};
use super::sim::{modes_string, GtMask, SourceContext};
use super::soft::StoreDtype;
use super::summary::{format_table, summarize, write_png, Summary};
use crate::{Error, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};

/// Version of the generator written into the manifest.
pub const GENERATOR_VERSION: &str = concat!("ultrarefiner-sdf-", env!("CARGO_PKG_VERSION"));

/// One GT source in memory.
#[derive(Clone, Debug)]
pub struct Source {
    pub dataset: String,
    pub name: String,
    pub gt: GtMask,
    pub sha256: String,
}

/// One generated sample with its index, source and bin label.
#[derive(Clone, Debug)]
pub struct GeneratedSample {
    pub index: usize,
    pub source: usize,
    pub bin: usize,
    pub seed: u64,
    pub result: SampleResult,
}

/// Number of `GT_S` foreground pixels of a GT (nearest resize to `S×S`).
pub fn gt_s_count(gt: &GtMask, store: usize) -> usize {
    let ny = nearest_taps(gt.h, store);
    let nx = nearest_taps(gt.w, store);
    ny.iter()
        .map(|&i| nx.iter().filter(|&&j| gt.at(i, j)).count())
        .sum()
}

/// Source of sample `j`: `j mod n_src` (SPEC §8.8).
pub fn source_of(j: usize, n_src: usize) -> usize {
    j % n_src
}

/// Generates the samples with indices in `range` (work unit = one source and all its samples in the range; rayon over
/// work units). The output is sorted by index and identical for any thread count.
pub fn generate_range(
    sources: &[Source],
    labels: &[u16],
    bins: &[QualityBin],
    cfg: &SimConfig,
    seed: u64,
    range: std::ops::Range<usize>,
    progress: Option<&indicatif::ProgressBar>,
) -> Vec<GeneratedSample> {
    let n_src = sources.len();
    if n_src == 0 || range.is_empty() {
        return Vec::new();
    }
    let first: Vec<usize> = (0..n_src.min(range.len()))
        .map(|k| range.start + k)
        .collect();
    let mut out: Vec<GeneratedSample> = first
        .par_iter()
        .flat_map_iter(|&j0| {
            let si = source_of(j0, n_src);
            let ctx = SourceContext::new(&sources[si].gt, cfg.store_size);
            let idx: Vec<usize> = (j0..range.end).step_by(n_src).collect();
            idx.into_iter()
                .map(|j| {
                    let b = labels[j] as usize;
                    let result = generate_sample(&ctx, &bins[b], cfg, seed, j as u64);
                    if let Some(p) = progress {
                        p.inc(1);
                    }
                    GeneratedSample {
                        index: j,
                        source: si,
                        bin: b,
                        seed: sample_seed(seed, j as u64),
                        result,
                    }
                })
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort_by_key(|s| s.index);
    out
}

/// `--format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    #[default]
    Safetensors,
    Npy,
    Both,
}

impl std::str::FromStr for OutputFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "safetensors" => Ok(OutputFormat::Safetensors),
            "npy" => Ok(OutputFormat::Npy),
            "both" => Ok(OutputFormat::Both),
            _ => Err(Error::Arg(format!(
                "--format: expected safetensors|npy|both, got {s:?}"
            ))),
        }
    }
}

/// All options of `ultrarefiner augment synthetic` (SPEC §8.11).
#[derive(Clone, Debug)]
pub struct SyntheticOptions {
    pub processed_root: PathBuf,
    pub output_root: PathBuf,
    pub datasets: Vec<String>,
    pub target_samples: usize,
    pub bins: String,
    pub critical_fraction: f64,
    pub sim: SimConfig,
    pub shard_size: usize,
    pub format: OutputFormat,
    pub exclude_fold: Option<usize>,
    pub seed: u64,
    pub num_workers: Option<usize>,
    pub resume: bool,
    pub dry_run: bool,
    /// Show a progress bar on stderr.
    pub progress: bool,
}

impl Default for SyntheticOptions {
    fn default() -> Self {
        SyntheticOptions {
            processed_root: PathBuf::from("./dataset/processed"),
            output_root: PathBuf::from("./dataset/augmented"),
            datasets: Vec::new(),
            target_samples: 100_000,
            bins: super::sampler::DEFAULT_BINS.to_string(),
            critical_fraction: 0.0,
            sim: SimConfig::default(),
            shard_size: 1024,
            format: OutputFormat::Safetensors,
            exclude_fold: None,
            seed: 42,
            num_workers: None,
            resume: false,
            dry_run: false,
            progress: false,
        }
    }
}

/// One row of `samples.csv` (SPEC §8.9), also kept in each shard's metadata so `--resume` can rebuild the CSV.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SampleRecord {
    pub index: usize,
    pub sample_id: String,
    pub dataset: String,
    pub source_name: String,
    pub bin: String,
    pub target_lo: f64,
    pub target_hi: f64,
    pub dice: f64,
    pub in_bin: bool,
    pub modes: String,
    pub gain: f64,
    pub attempts: usize,
    pub soft: String,
    pub temperature: f64,
    pub seed: String,
    pub shard: usize,
    pub row: usize,
    pub area_frac: f64,
    pub circularity: f64,
    pub solidity: f64,
    pub tiny: bool,
    pub small: bool,
    pub irregular: bool,
}

/// Outcome of a run.
#[derive(Clone, Debug)]
pub struct RunReport {
    pub run_dir: PathBuf,
    pub run_name: String,
    pub n_sources: usize,
    pub skipped_too_small: Vec<(String, String, usize)>,
    pub summary: Summary,
    pub table: String,
    pub seconds: f64,
    /// Printed allocation (dry run) or empty.
    pub allocation: String,
}

/// `RUN` = dataset names sorted (code-point order) and joined with `_`.
pub fn run_name(datasets: &[String]) -> String {
    let mut d = datasets.to_vec();
    d.sort();
    d.dedup();
    d.join("_")
}

/// Writes `bytes` to `path` through a sibling temporary file and a rename (never a partial file at `path`).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// A NumPy `.npy` (v1.0, little-endian f32, C order) of an `h×w` plane.
pub fn npy_bytes(data: &[f32], h: usize, w: usize) -> Vec<u8> {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({h}, {w}), }}");
    let total = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - total % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + 4 * data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// `samples.csv` text (header + rows) of records; also stored in each shard's metadata (exact f64 round trip).
pub fn records_csv(records: &[SampleRecord]) -> Result<String> {
    let mut w = csv::Writer::from_writer(Vec::new());
    for r in records {
        w.serialize(r)
            .map_err(|e| Error::msg(format!("samples.csv: {e}")))?;
    }
    let bytes = w
        .into_inner()
        .map_err(|e| Error::msg(format!("samples.csv: {e}")))?;
    String::from_utf8(bytes).map_err(|e| Error::msg(format!("samples.csv: {e}")))
}

/// `<run_dir>/shards/coarse-<k:05>.safetensors`.
pub fn shard_path(run_dir: &Path, k: usize) -> PathBuf {
    run_dir
        .join("shards")
        .join(format!("coarse-{k:05}.safetensors"))
}

/// Serialises one shard (`coarse` (n,S,S) f32|f16, `index` (n) u32; records and config hash as metadata).
fn shard_bytes(
    samples: &[GeneratedSample],
    records: &[SampleRecord],
    s: usize,
    dtype: StoreDtype,
    config_hash: &str,
) -> Result<Vec<u8>> {
    let index: Vec<u32> = samples.iter().map(|x| x.index as u32).collect();
    let planes: Vec<&[f32]> = samples.iter().map(|x| x.result.stored.as_slice()).collect();
    coarse_shard_bytes(&index, &planes, records, s, dtype, config_hash)
}

/// Serialises one shard of the §8.9 layout: `coarse` (n,S,S) f32|f16 from `planes` (each `S·S`), `index` (n) u32, and
/// as metadata the format tag, `config_hash` and the shard's `samples.csv` rows.
pub fn coarse_shard_bytes(
    index: &[u32],
    planes: &[&[f32]],
    records: &[SampleRecord],
    s: usize,
    dtype: StoreDtype,
    config_hash: &str,
) -> Result<Vec<u8>> {
    use safetensors::tensor::{Dtype, TensorView};
    let n = planes.len();
    if index.len() != n || planes.iter().any(|p| p.len() != s * s) {
        return Err(Error::msg(format!(
            "shard: {} indices for {n} planes, planes must hold {s}×{s} values",
            index.len()
        )));
    }
    let coarse: Vec<u8> = match dtype {
        StoreDtype::F32 => planes
            .iter()
            .flat_map(|p| p.iter().flat_map(|v| v.to_le_bytes()))
            .collect(),
        StoreDtype::F16 => planes
            .iter()
            .flat_map(|p| p.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()))
            .collect(),
    };
    let index: Vec<u8> = index.iter().flat_map(|i| i.to_le_bytes()).collect();
    let dt = if dtype == StoreDtype::F16 {
        Dtype::F16
    } else {
        Dtype::F32
    };
    let tc = TensorView::new(dt, vec![n, s, s], &coarse)
        .map_err(|e| Error::msg(format!("shard tensor: {e:?}")))?;
    let ti = TensorView::new(Dtype::U32, vec![n], &index)
        .map_err(|e| Error::msg(format!("shard tensor: {e:?}")))?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "ultrarefiner-coarse-v1".to_string());
    meta.insert("config_hash".to_string(), config_hash.to_string());
    meta.insert("records_csv".to_string(), records_csv(records)?);
    safetensors::tensor::serialize(vec![("coarse", tc), ("index", ti)], &Some(meta))
        .map_err(|e| Error::msg(format!("shard: {e:?}")))
}

/// Records of a complete shard written by an earlier run with the same configuration (for `--resume`), or None.
fn read_complete_shard(
    path: &Path,
    expected: std::ops::Range<usize>,
    config_hash: &str,
) -> Result<Option<Vec<SampleRecord>>> {
    let Ok(bytes) = std::fs::read(path) else {
        return Ok(None);
    };
    let Ok((_, meta)) = safetensors::SafeTensors::read_metadata(&bytes) else {
        return Ok(None);
    };
    let Some(m) = meta.metadata() else {
        return Ok(None);
    };
    if m.get("config_hash").map(String::as_str) != Some(config_hash) {
        return Err(Error::file(
            path,
            "--resume: shard was generated with a different configuration; use a new --output-root",
        ));
    }
    let Some(rec) = m.get("records_csv") else {
        return Ok(None);
    };
    let Ok(records) = csv::Reader::from_reader(rec.as_bytes())
        .deserialize::<SampleRecord>()
        .collect::<std::result::Result<Vec<_>, _>>()
    else {
        return Ok(None);
    };
    let ok =
        records.len() == expected.len() && records.iter().zip(expected).all(|(r, j)| r.index == j);
    if ok && safetensors::SafeTensors::deserialize(&bytes).is_ok() {
        Ok(Some(records))
    } else {
        Ok(None)
    }
}

/// Loads GT sources from the processed layout (parallel), skipping GTs with `A < 16` (and GTs whose `GT_S` is empty,
/// which no corruption could be scored against). Returns (sources, skipped (dataset, name, area)).
pub fn load_sources(
    opts: &SyntheticOptions,
) -> Result<(Vec<Source>, Vec<(String, String, usize)>)> {
    let refs = list_sources(&opts.processed_root, &opts.datasets, opts.exclude_fold)?;
    let loaded: Vec<Result<(Option<Source>, Option<(String, String, usize)>)>> = refs
        .par_iter()
        .map(|r| {
            let (h, w, m) = read_mask(&r.mask_path)?;
            let gt = GtMask::from_full(&m, h, w);
            let area = gt.as_ref().map_or(0, |g| g.area());
            let Some(gt) =
                gt.filter(|g| area >= MIN_AREA && gt_s_count(g, opts.sim.store_size) > 0)
            else {
                return Ok((None, Some((r.dataset.clone(), r.name.clone(), area))));
            };
            let sha256 = match &r.sha256 {
                Some(s) => s.clone(),
                None => sha256_file(&r.image_path)?,
            };
            Ok((
                Some(Source {
                    dataset: r.dataset.clone(),
                    name: r.name.clone(),
                    gt,
                    sha256,
                }),
                None,
            ))
        })
        .collect();
    let mut sources = Vec::new();
    let mut skipped = Vec::new();
    for l in loaded {
        let (s, k) = l?;
        sources.extend(s);
        skipped.extend(k);
    }
    Ok((sources, skipped))
}

/// Lesion descriptors of a GT for `samples.csv` (§8.3; `area_frac` relative to the whole image).
pub fn gt_descriptors(gt: &GtMask) -> super::descriptors::LesionDescriptors {
    let d = super::descriptors::describe(&gt.crop, gt.bbox.h, gt.bbox.w);
    let a = d.area as f64 / (gt.h * gt.w) as f64;
    super::descriptors::LesionDescriptors {
        area_frac: a,
        tiny: a < 0.003,
        small: (0.003..0.012).contains(&a),
        ..d
    }
}

fn record_of(
    s: &GeneratedSample,
    src: &Source,
    ctx_desc: &super::descriptors::LesionDescriptors,
    bins: &[QualityBin],
    soft: &str,
    shard_size: usize,
) -> SampleRecord {
    let b = &bins[s.bin];
    SampleRecord {
        index: s.index,
        sample_id: format!("{}_{}_{}_{:06}", src.dataset, src.name, b.name, s.index),
        dataset: src.dataset.clone(),
        source_name: src.name.clone(),
        bin: b.name.clone(),
        target_lo: b.lo,
        target_hi: b.hi,
        dice: s.result.dice,
        in_bin: s.result.in_bin,
        modes: modes_string(&s.result.modes),
        gain: s.result.gain,
        attempts: s.result.attempts,
        soft: soft.to_string(),
        temperature: s.result.temperature,
        seed: format!("{:016x}", s.seed),
        shard: s.index / shard_size,
        row: s.index % shard_size,
        area_frac: ctx_desc.area_frac,
        circularity: ctx_desc.circularity,
        solidity: ctx_desc.solidity,
        tiny: ctx_desc.tiny,
        small: ctx_desc.small,
        irregular: ctx_desc.irregular,
    }
}

/// Runs `augment synthetic` end to end (SPEC §8.6–§8.11). With `dry_run` only the allocation is computed.
pub fn run_synthetic(opts: &SyntheticOptions) -> Result<RunReport> {
    let t0 = std::time::Instant::now();
    if opts.datasets.is_empty() {
        return Err(Error::Arg(
            "--datasets: at least one dataset is required".into(),
        ));
    }
    if opts.shard_size == 0 {
        return Err(Error::Arg("--shard-size must be > 0".into()));
    }
    if opts.sim.store_size == 0 {
        return Err(Error::Arg("--store-size must be > 0".into()));
    }
    if !(opts.sim.temperature.0 > 0.0 && opts.sim.temperature.1 >= opts.sim.temperature.0) {
        return Err(Error::Arg(format!(
            "--temperature: need 0 < lo <= hi, got {:?}",
            opts.sim.temperature
        )));
    }
    let bins = parse_bins(&opts.bins, opts.critical_fraction)?;
    let pool = {
        let mut b = rayon::ThreadPoolBuilder::new();
        if let Some(n) = opts.num_workers {
            b = b.num_threads(n.max(1));
        }
        b.build()
            .map_err(|e| Error::msg(format!("thread pool: {e}")))?
    };
    let name = run_name(&opts.datasets);
    let run_dir = opts.output_root.join(&name);
    let (sources, skipped) = pool.install(|| load_sources(opts))?;
    if sources.is_empty() {
        return Err(Error::msg(format!(
            "no usable training source in {} for datasets {:?} (skipped too small: {})",
            opts.processed_root.display(),
            opts.datasets,
            skipped.len()
        )));
    }
    let total = opts.target_samples;
    let n_src = sources.len();
    let counts = bin_counts(&bins, total);
    let mut allocation = format!(
        "run {name}: {n_src} sources ({} skipped too small), {total} samples, {}–{} per source\n",
        skipped.len(),
        total / n_src,
        total.div_ceil(n_src)
    );
    let mut per_ds: std::collections::BTreeMap<&str, usize> = Default::default();
    for s in &sources {
        *per_ds.entry(s.dataset.as_str()).or_insert(0) += 1;
    }
    for (d, c) in &per_ds {
        allocation.push_str(&format!("  {d}: {c} sources\n"));
    }
    for (b, c) in bins.iter().zip(&counts) {
        allocation.push_str(&format!(
            "  bin {:<9} [{:.2}, {:.2}) {:>8} samples\n",
            b.name, b.lo, b.hi, c
        ));
    }
    if opts.dry_run {
        return Ok(RunReport {
            run_dir,
            run_name: name,
            n_sources: n_src,
            skipped_too_small: skipped,
            summary: Summary::default(),
            table: String::new(),
            seconds: t0.elapsed().as_secs_f64(),
            allocation,
        });
    }
    let labels = allocate_bin_labels(&bins, total, opts.seed);
    let shard_dir = run_dir.join("shards");
    std::fs::create_dir_all(&shard_dir).map_err(|e| Error::io(&shard_dir, e))?;
    let npy_dir = run_dir.join("coarse_masks");
    if opts.format != OutputFormat::Safetensors {
        std::fs::create_dir_all(&npy_dir).map_err(|e| Error::io(&npy_dir, e))?;
    }
    let config_json = serde_json::json!({
        "seed": opts.seed,
        "target_samples": total,
        "bins": bins,
        "critical_fraction": opts.critical_fraction,
        "sim": opts.sim,
        "shard_size": opts.shard_size,
        "format": opts.format,
        "exclude_fold": opts.exclude_fold,
        "sources": sources.iter().map(|s| format!("{}/{}:{}", s.dataset, s.name, s.sha256)).collect::<Vec<_>>(),
    });
    let config_hash = blake3::hash(config_json.to_string().as_bytes())
        .to_hex()
        .to_string();
    let soft_name = opts.sim.soft.name();
    let n_shards = total.div_ceil(opts.shard_size);
    let mut records: Vec<Option<Vec<SampleRecord>>> = vec![None; n_shards];
    if opts.resume {
        for (k, r) in records.iter_mut().enumerate() {
            let range = k * opts.shard_size..((k + 1) * opts.shard_size).min(total);
            *r = read_complete_shard(&shard_path(&run_dir, k), range, &config_hash)?;
        }
    }
    let todo: Vec<usize> = (0..n_shards).filter(|&k| records[k].is_none()).collect();
    let pb = if opts.progress {
        let n_todo: usize = todo
            .iter()
            .map(|&k| ((k + 1) * opts.shard_size).min(total) - k * opts.shard_size)
            .sum();
        let pb = indicatif::ProgressBar::new(n_todo as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} samples  {per_sec}  eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Some(pb)
    } else {
        None
    };
    // Descriptors per source, for the CSV (cheap compared with generation; computed lazily once).
    let descs: Vec<super::descriptors::LesionDescriptors> =
        pool.install(|| sources.par_iter().map(|s| gt_descriptors(&s.gt)).collect());
    // Chunks of consecutive shards still to generate. A chunk should give every source several samples (its GT
    // context is computed once per chunk) while its stored masks stay within about 2 GiB.
    let bytes_per_sample = 4 * opts.sim.store_size * opts.sim.store_size;
    let cap = ((2usize << 30) / bytes_per_sample.max(1)).max(opts.shard_size);
    let want = (8 * n_src).clamp(2048, cap.max(2048));
    let per_chunk = (want.min(cap) / opts.shard_size).max(1);
    let mut k = 0;
    while k < todo.len() {
        let mut chunk = vec![todo[k]];
        while chunk.len() < per_chunk
            && k + chunk.len() < todo.len()
            && todo[k + chunk.len()] == chunk[chunk.len() - 1] + 1
        {
            chunk.push(todo[k + chunk.len()]);
        }
        k += chunk.len();
        let start = chunk[0] * opts.shard_size;
        let end = ((chunk[chunk.len() - 1] + 1) * opts.shard_size).min(total);
        let samples = pool.install(|| {
            generate_range(
                &sources,
                &labels,
                &bins,
                &opts.sim,
                opts.seed,
                start..end,
                pb.as_ref(),
            )
        });
        for &sk in &chunk {
            let a = sk * opts.shard_size - start;
            let b = (((sk + 1) * opts.shard_size).min(total)) - start;
            let part = &samples[a..b];
            let recs: Vec<SampleRecord> = part
                .iter()
                .map(|s| {
                    record_of(
                        s,
                        &sources[s.source],
                        &descs[s.source],
                        &bins,
                        soft_name,
                        opts.shard_size,
                    )
                })
                .collect();
            if opts.format != OutputFormat::Npy {
                let bytes = shard_bytes(
                    part,
                    &recs,
                    opts.sim.store_size,
                    opts.sim.store_dtype,
                    &config_hash,
                )?;
                write_atomic(&shard_path(&run_dir, sk), &bytes)?;
            } else {
                // npy only: an empty-tensor shard still carries the records (resume, CSV rebuild).
                let bytes = shard_bytes(
                    &[],
                    &recs,
                    opts.sim.store_size,
                    opts.sim.store_dtype,
                    &config_hash,
                )?;
                write_atomic(&shard_path(&run_dir, sk), &bytes)?;
            }
            if opts.format != OutputFormat::Safetensors {
                for (s, r) in part.iter().zip(&recs) {
                    let p = npy_dir.join(format!("{}.npy", r.sample_id));
                    write_atomic(
                        &p,
                        &npy_bytes(&s.result.stored, opts.sim.store_size, opts.sim.store_size),
                    )?;
                }
            }
            records[sk] = Some(recs);
        }
    }
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    let all: Vec<SampleRecord> = records.into_iter().flatten().flatten().collect();
    write_atomic(&run_dir.join("samples.csv"), records_csv(&all)?.as_bytes())?;
    let summary = summarize(&all, &bins);
    let table = format_table(&summary, &bins);
    let seconds = t0.elapsed().as_secs_f64();
    let manifest = serde_json::json!({
        "format_version": 1,
        "generator_version": GENERATOR_VERSION,
        "seed": opts.seed,
        "datasets": per_ds.keys().collect::<Vec<_>>(),
        "sources": sources.iter().map(|s| serde_json::json!({
            "dataset": s.dataset, "name": s.name, "height": s.gt.h, "width": s.gt.w, "sha256": s.sha256})).collect::<Vec<_>>(),
        "config": {
            "target_samples": total,
            "bins": bins,
            "critical_fraction": opts.critical_fraction,
            "soft": opts.sim.soft,
            "temperature": [opts.sim.temperature.0, opts.sim.temperature.1],
            "grf_spectrum": opts.sim.spectrum,
            "max_attempts": opts.sim.max_attempts,
            "bisection_steps": opts.sim.bisection_steps,
            "format": opts.format,
            "min_area": MIN_AREA,
            "sigmoid_cutoff_t": super::soft::SIGMOID_CUTOFF_T,
            "config_hash": config_hash,
        },
        "store_size": opts.sim.store_size,
        "store_dtype": opts.sim.store_dtype,
        "shard_size": opts.shard_size,
        "n_shards": n_shards,
        "excluded_fold": opts.exclude_fold,
        "counts_by_bin": summary.counts_by_bin,
        "dice_by_bin": summary.dice_by_bin,
        "mode_counts": summary.mode_counts,
        "skipped_too_small": skipped.iter().map(|(d, n, a)| serde_json::json!({"dataset": d, "name": n, "area": a})).collect::<Vec<_>>(),
        "timing": {"seconds": seconds, "samples_per_s": all.len() as f64 / seconds.max(1e-9),
                   "threads": pool.current_num_threads()},
    });
    let mj = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::msg(e.to_string()))?;
    write_atomic(&run_dir.join("manifest.json"), &mj)?;
    write_png(&run_dir.join("summary.png"), &summary, &bins)?;
    Ok(RunReport {
        run_dir,
        run_name: name,
        n_sources: n_src,
        skipped_too_small: skipped,
        summary,
        table,
        seconds,
        allocation,
    })
}
