//! SPEC §17.1 tests of the quality-controlled sampler (§8.6), allocation (§8.8) and the `augment synthetic` run (§8.9).
use std::path::Path;
use ultrarefiner::augment::run::{
    generate_range, run_synthetic, SampleRecord, Source, SyntheticOptions,
};
use ultrarefiner::augment::sampler::{
    allocate_bin_labels, bin_counts, parse_bins, SimConfig, DEFAULT_BINS,
};
use ultrarefiner::augment::sim::SourceContext;
use ultrarefiner::augment::synthetic_sources;

fn sources() -> Vec<Source> {
    synthetic_sources(12, 160, 190, 3)
}

/// Sources whose lesion keeps an equivalent radius of at least 6 px on the stored grid. Smaller lesions cannot reach
/// the high bin: by SPEC §8.6 quality compares the *bilinear* stored mask with the *nearest*-resized GT_S, and the two
/// kernels are offset by half a stored pixel, so even the unmodified GT scores 0.79–0.92 for R_S ≈ 3–6 px (see
/// `tiny_lesions_cannot_reach_the_high_bin`).
fn regular_sources(n: usize, h: usize, w: usize, seed: u64) -> Vec<Source> {
    let s = 224.0 / h.max(w) as f64;
    synthetic_sources(2 * n, h, w, seed)
        .into_iter()
        .filter(|src| (src.gt.area() as f64 / std::f64::consts::PI).sqrt() * s >= 6.0)
        .take(n)
        .collect()
}

#[test]
fn tiny_lesions_cannot_reach_the_high_bin() {
    use ultrarefiner::augment::soft::{stored_mask, SoftKind, StoreDtype};
    // Baseline quality of the unmodified GT through the stored path, for a tiny lesion (R = 4.5 px on 300×360).
    let src = &synthetic_sources(1, 300, 360, 11)[0];
    let ctx = SourceContext::new(&src.gt, 224);
    assert!(ctx.desc.tiny);
    let st = stored_mask(&ctx, &ctx.gt_win, SoftKind::Sigmoid, 4.0, StoreDtype::F32);
    let base = ctx.dice_s(&st);
    assert!(base < 0.9, "baseline {base}");
    // The sampler still never returns GT_S and labels the miss honestly.
    let bins = parse_bins(DEFAULT_BINS, 0.0).unwrap();
    for j in 0..6 {
        let r = ultrarefiner::augment::sampler::generate_sample(
            &ctx,
            &bins[0],
            &SimConfig::default(),
            42,
            j,
        );
        assert!(r.dice < 1.0 && r.in_bin == bins[0].contains(r.dice));
    }
}

#[test]
fn bins_parse_and_allocate_exactly() {
    let bins = parse_bins(DEFAULT_BINS, 0.0).unwrap();
    assert_eq!(
        bins.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
        ["high", "medium", "low"]
    );
    assert_eq!(bin_counts(&bins, 100000), vec![25000, 40000, 35000]);
    assert_eq!(bin_counts(&bins, 7), vec![2, 3, 2]);
    let labels = allocate_bin_labels(&bins, 1001, 42);
    let c: Vec<usize> = (0..3)
        .map(|b| labels.iter().filter(|&&l| l == b).count())
        .collect();
    assert_eq!(c, bin_counts(&bins, 1001));
    assert_eq!(labels, allocate_bin_labels(&bins, 1001, 42));
    assert_ne!(labels, allocate_bin_labels(&bins, 1001, 43));
    let with_crit = parse_bins(DEFAULT_BINS, 0.1).unwrap();
    assert_eq!(with_crit.len(), 4);
    assert!(
        (with_crit[0].share - 0.225).abs() < 1e-12
            && with_crit[3].lo == 0.0
            && with_crit[3].hi == 0.6
    );
    assert!(
        parse_bins("0.9-1.0:1.0", 0.0).is_err(),
        "a bin reaching Dice 1 must be rejected"
    );
    assert!(
        parse_bins("0.9-0.99:0.5", 0.0).is_err(),
        "shares must sum to 1"
    );
    assert!(parse_bins("junk", 0.0).is_err());
}

fn check_samples(srcs: &[Source], n: usize, cfg: &SimConfig) -> (usize, usize) {
    let bins = parse_bins(DEFAULT_BINS, 0.0).unwrap();
    let labels = allocate_bin_labels(&bins, n, 42);
    let out = generate_range(srcs, &labels, &bins, cfg, 42, 0..n, None);
    assert_eq!(out.len(), n);
    let mut in_bin = 0;
    let ctxs: Vec<SourceContext> = srcs
        .iter()
        .map(|s| SourceContext::new(&s.gt, cfg.store_size))
        .collect();
    for s in &out {
        let ctx = &ctxs[s.source];
        let r = &s.result;
        // Never the GT: the stored hard mask differs from GT_S; never Dice ≥ 0.99 inside a bin.
        let hard: Vec<u8> = r.stored.iter().map(|&v| (v > 0.5) as u8).collect();
        assert_ne!(hard, ctx.gt_s, "sample {} equals GT_S", s.index);
        assert!(r.dice < 1.0);
        assert!(!(r.in_bin && r.dice >= 0.99));
        // The recorded Dice is the quality of what is stored.
        assert_eq!(ctx.dice_s(&r.stored), r.dice);
        assert_eq!(r.in_bin, bins[s.bin].contains(r.dice));
        assert!(r.stored.iter().all(|v| (0.0..=1.0).contains(v)));
        in_bin += r.in_bin as usize;
    }
    (in_bin, n)
}

#[test]
fn sampler_hits_bins_and_never_returns_gt() {
    // All sources (including tiny lesions): never GT, Dice recorded exactly, labels consistent.
    let (hit_all, n_all) = check_samples(&sources(), 60, &SimConfig::default());
    assert!(
        hit_all as f64 >= 0.9 * n_all as f64,
        "bin hit rate (with tiny lesions) {hit_all}/{n_all}"
    );
    // Lesions large enough for every bin: ≥ 98% in bin (SPEC §8.6 target).
    let (hit, n) = check_samples(
        &regular_sources(10, 200, 240, 3),
        120,
        &SimConfig::default(),
    );
    assert!(hit as f64 >= 0.98 * n as f64, "bin hit rate {hit}/{n}");
}

#[test]
fn sampler_other_soft_modes() {
    use ultrarefiner::augment::soft::{SoftKind, StoreDtype};
    for (soft, dt) in [
        (SoftKind::Blur, StoreDtype::F32),
        (SoftKind::None, StoreDtype::F16),
    ] {
        let cfg = SimConfig {
            soft,
            store_dtype: dt,
            store_size: 96,
            ..SimConfig::default()
        };
        let (hit, n) = check_samples(&sources()[..6], 60, &cfg);
        assert!(hit as f64 >= 0.95 * n as f64, "{soft:?}: {hit}/{n}");
    }
}

#[test]
fn output_is_identical_for_any_thread_count() {
    let srcs = sources();
    let bins = parse_bins(DEFAULT_BINS, 0.0).unwrap();
    let labels = allocate_bin_labels(&bins, 60, 42);
    let cfg = SimConfig::default();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| generate_range(&srcs, &labels, &bins, &cfg, 42, 0..60, None))
    };
    let a = run(1);
    let b = run(2);
    // A sub-range gives the same samples too (resume, chunking).
    let c = generate_range(&srcs, &labels, &bins, &cfg, 42, 17..41, None);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x.index, y.index);
        assert_eq!(x.result.stored, y.result.stored);
        assert_eq!(x.result.dice, y.result.dice);
        assert_eq!(x.result.modes, y.result.modes);
    }
    for x in &c {
        assert_eq!(x.result.stored, a[x.index].result.stored);
    }
}

/// SPEC §8.5/§8.6 at scale: 5,000 samples, bin distribution within ±2 points of 25/40/35 (counted by achieved bin).
#[test]
#[ignore = "slow: 5,000 samples (about 30 s in release on 2 idle cores, minutes on a loaded machine)"]
fn five_thousand_sample_distribution() {
    let srcs = regular_sources(40, 300, 360, 11);
    assert_eq!(srcs.len(), 40);
    let bins = parse_bins(DEFAULT_BINS, 0.0).unwrap();
    let n = 5000;
    let labels = allocate_bin_labels(&bins, n, 42);
    let out = generate_range(&srcs, &labels, &bins, &SimConfig::default(), 42, 0..n, None);
    let mut achieved = [0usize; 3];
    let mut hit = 0;
    for s in &out {
        if let Some(b) = bins.iter().position(|b| b.contains(s.result.dice)) {
            achieved[b] += 1;
        }
        hit += s.result.in_bin as usize;
    }
    eprintln!("5000-sample run: achieved bins {achieved:?}, in bin {hit}/{n}");
    for (b, &want) in [25.0, 40.0, 35.0].iter().enumerate() {
        let pct = 100.0 * achieved[b] as f64 / n as f64;
        assert!((pct - want).abs() <= 2.0, "bin {b}: {pct}% (want {want}%)");
    }
    assert!(hit as f64 >= 0.98 * n as f64, "hit {hit}/{n}");
}

fn write_png_mask(path: &Path, h: usize, w: usize, m: &[u8]) {
    let img = image::GrayImage::from_raw(w as u32, h as u32, m.iter().map(|&v| v * 255).collect())
        .unwrap();
    img.save(path).unwrap();
}

/// A tiny processed layout (SPEC §3.4) with splits.json; run `augment synthetic` end to end.
#[test]
fn run_synthetic_writes_the_documented_layout() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("processed");
    let srcs = synthetic_sources(8, 120, 140, 21);
    let names: Vec<String> = (0..8).map(|k| format!("img_{k}")).collect();
    for ds in ["BUSI", "PHANTOM"] {
        std::fs::create_dir_all(root.join(ds).join("train/masks")).unwrap();
        std::fs::create_dir_all(root.join(ds).join("train/images")).unwrap();
        for (k, n) in names.iter().enumerate() {
            let s = &srcs[k];
            let mut full = vec![0u8; s.gt.h * s.gt.w];
            for i in 0..s.gt.h {
                for j in 0..s.gt.w {
                    full[i * s.gt.w + j] = s.gt.at(i, j) as u8;
                }
            }
            write_png_mask(
                &root.join(ds).join(format!("train/masks/{n}.png")),
                s.gt.h,
                s.gt.w,
                &full,
            );
            write_png_mask(
                &root.join(ds).join(format!("train/images/{n}.png")),
                s.gt.h,
                s.gt.w,
                &full,
            );
        }
        let splits = serde_json::json!({
            "format_version": 1, "dataset": ds, "seed": 42, "test_ratio": 0.2, "n_splits": 2,
            "train": names, "test": [],
            "folds": [{"train": names[4..], "val": names[..4]}, {"train": names[..4], "val": names[4..]}],
            "excluded": {"blank": [], "normal": [], "missing_mask": [], "size_mismatch": []},
            "source_sha256": {}
        });
        std::fs::write(
            root.join(ds).join("splits.json"),
            serde_json::to_vec(&splits).unwrap(),
        )
        .unwrap();
    }
    let out = dir.path().join("aug");
    let opts = SyntheticOptions {
        processed_root: root.clone(),
        output_root: out.clone(),
        datasets: vec!["PHANTOM".into(), "BUSI".into()],
        target_samples: 50,
        shard_size: 16,
        exclude_fold: Some(0),
        sim: SimConfig {
            store_size: 64,
            ..SimConfig::default()
        },
        num_workers: Some(2),
        ..SyntheticOptions::default()
    };
    let rep = run_synthetic(&opts).unwrap();
    assert_eq!(rep.run_name, "BUSI_PHANTOM");
    assert_eq!(rep.n_sources, 8, "fold-0 validation images excluded");
    let run = out.join("BUSI_PHANTOM");
    for f in [
        "manifest.json",
        "samples.csv",
        "summary.png",
        "shards/coarse-00000.safetensors",
        "shards/coarse-00003.safetensors",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let mut rdr = csv::Reader::from_path(run.join("samples.csv")).unwrap();
    let recs: Vec<SampleRecord> = rdr.deserialize().map(|r| r.unwrap()).collect();
    assert_eq!(recs.len(), 50);
    for (j, r) in recs.iter().enumerate() {
        assert_eq!(r.index, j);
        assert!(!["img_0", "img_1", "img_2", "img_3"].contains(&r.source_name.as_str()));
        assert_eq!(r.shard, j / 16);
        assert!(r.sample_id.ends_with(&format!("_{j:06}")));
    }
    // Sources in (dataset, name) order: sample 0 comes from BUSI/img_4.
    assert_eq!(
        (recs[0].dataset.as_str(), recs[0].source_name.as_str()),
        ("BUSI", "img_4")
    );
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["format_version"], 1);
    assert_eq!(m["sources"].as_array().unwrap().len(), 8);
    assert_eq!(m["excluded_fold"], 0);
    let total: u64 = ["high", "medium", "low"]
        .iter()
        .map(|b| m["counts_by_bin"][b]["target"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 50);
    // Shards: coarse (n,S,S) f32 and index (n) u32.
    let bytes = std::fs::read(run.join("shards/coarse-00003.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("coarse").unwrap().shape(), &[2, 64, 64]);
    assert_eq!(st.tensor("index").unwrap().shape(), &[2]);
    // Resume keeps the complete shards and rebuilds identical metadata.
    let csv1 = std::fs::read(run.join("samples.csv")).unwrap();
    std::fs::remove_file(run.join("shards/coarse-00001.safetensors")).unwrap();
    let rep2 = run_synthetic(&SyntheticOptions {
        resume: true,
        num_workers: Some(1),
        ..opts.clone()
    })
    .unwrap();
    assert_eq!(rep2.summary.total, 50);
    assert!(
        std::fs::read(run.join("samples.csv")).unwrap() == csv1,
        "samples.csv changed after --resume"
    );
    assert!(
        std::fs::read(run.join("shards/coarse-00003.safetensors")).unwrap() == bytes,
        "shard changed after --resume"
    );
    // Dry run prints the allocation only.
    let dry = run_synthetic(&SyntheticOptions {
        dry_run: true,
        ..opts
    })
    .unwrap();
    assert!(dry.allocation.contains("8 sources"));
}

/// `augment-throughput` bench workload (SPEC §13.7); prints samples/s at 1 and 2 threads.
#[test]
#[ignore = "measurement, not a check: run with --ignored --nocapture"]
fn throughput_report() {
    // Process CPU time (Linux /proc), so the estimate survives a machine shared with other jobs.
    fn cpu_seconds() -> f64 {
        let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let f: Vec<&str> = s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (t(11) + t(12)) / 100.0
    }
    let n = 300;
    let _ = ultrarefiner::augment::synthetic_sources(16, 480, 560, 7); // setup cost, measured below
    for threads in [1, 2] {
        let c0 = cpu_seconds();
        let t0 = std::time::Instant::now();
        let _ = ultrarefiner::augment::synthetic_sources(16, 480, 560, 7);
        let setup_cpu = cpu_seconds() - c0;
        let setup_wall = t0.elapsed().as_secs_f64();
        let c1 = cpu_seconds();
        let sps = ultrarefiner::augment::bench_throughput(n, threads).unwrap();
        let cpu = cpu_seconds() - c1 - setup_cpu;
        eprintln!(
            "augment-throughput: {sps:.1} samples/s wall on {threads} thread(s) (setup {setup_wall:.2} s excluded); \
             {:.2} CPU-ms/sample => {:.0} samples/s per busy core",
            1e3 * cpu / n as f64,
            n as f64 / cpu
        );
    }
}
