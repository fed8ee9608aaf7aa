//! `augment oof` (SPEC §8.10): out-of-fold predictions of per-fold Phase 1 checkpoints on a small phantom dataset
//! prepared with 2 folds. Each fold's checkpoint comes from a one-step `tiny` Phase 1 run at S = 32 (weights barely
//! trained; what is tested is which images each checkpoint predicts and the output format).
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use ultrarefiner::augment::oof::{run_oof, OofOptions};
use ultrarefiner::augment::run::SampleRecord;
use ultrarefiner::data::phantom::{generate, PhantomOptions};
use ultrarefiner::data::prepare::{prepare_datasets, PrepareOptions};
use ultrarefiner::data::splits::SplitsFile;
use ultrarefiner::data::DatasetKind;
use ultrarefiner::device::DeviceSpec;
use ultrarefiner::train::phase1::{run, Phase1Options, Phase1Outcome};
use ultrarefiner::train::phase2::load_data;

const S: usize = 32;

fn phantom_processed(dir: &Path, count: usize, n_splits: usize) -> PathBuf {
    let raw = dir.join("raw");
    generate(&PhantomOptions {
        out: raw.join("PHANTOM"),
        count,
        seed: 11,
        height_range: (112, 144),
        width_range: (128, 176),
        annotations: true,
        num_workers: Some(2),
    })
    .unwrap();
    let out = dir.join("processed");
    prepare_datasets(&PrepareOptions {
        raw_root: raw,
        output_root: out.clone(),
        datasets: vec![DatasetKind::Phantom],
        n_splits,
        ..Default::default()
    })
    .unwrap();
    out
}

fn train_fold(data: &Path, out: &Path, fold: u32) {
    let mut o = Phase1Options::new(data);
    o.dataset = Some("PHANTOM".into());
    o.config = "tiny".into();
    o.fold = fold;
    o.n_splits = 2;
    o.max_epochs = Some(1);
    o.batch_size = Some(4);
    o.img_size = Some(S);
    o.output_dir = out.to_path_buf();
    o.vit_pretrained = Some("none".into());
    o.device = Some(DeviceSpec::Cpu);
    o.num_workers = 2;
    o.plain = true;
    o.save_every = 0;
    let r = run(&o).unwrap();
    assert!(matches!(r, Phase1Outcome::Complete { .. }), "{r:?}");
}

fn read_csv(p: &Path) -> Vec<SampleRecord> {
    csv::Reader::from_path(p)
        .unwrap()
        .deserialize()
        .collect::<Result<Vec<SampleRecord>, _>>()
        .unwrap()
}

#[test]
fn oof_predicts_each_fold_validation_images_once_and_phase2_reads_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = phantom_processed(tmp.path(), 16, 2);
    let ck = tmp.path().join("ck");
    train_fold(&data, &ck, 0);
    train_fold(&data, &ck, 1);
    let splits = SplitsFile::read(&data.join("PHANTOM/splits.json")).unwrap();

    let aug = tmp.path().join("augmented");
    let mut o = OofOptions::new(vec!["PHANTOM".into()]);
    o.processed_root = data.clone();
    o.output_root = aug.clone();
    o.checkpoints = format!("{}/{{DS}}/fold_{{k}}/best.safetensors", ck.display());
    o.config = "tiny".into();
    o.batch_size = 3;
    o.shard_size = 5; // several shards, the last one partial
    o.device = Some(DeviceSpec::Cpu);
    o.num_workers = 2;
    let rep = run_oof(&o).unwrap();
    println!("{}", rep.table);
    assert_eq!(rep.run_name, "PHANTOM_oof");
    let dir = aug.join("PHANTOM_oof");
    assert_eq!(rep.run_dir, dir);

    // One record per validation image of each fold, never a training image of that fold.
    let recs = read_csv(&dir.join("samples.csv"));
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.index, i);
        assert_eq!(r.bin, "real");
        assert_eq!((r.shard, r.row), (i / 5, i % 5));
        let k: usize = r.modes.strip_prefix("oof:fold_").unwrap().parse().unwrap();
        let f = splits.fold(k).unwrap();
        assert!(f.val.contains(&r.source_name), "{r:?}");
        assert!(!f.train.contains(&r.source_name), "{r:?}");
        assert!((0.0..=1.0).contains(&r.dice), "{r:?}");
        *seen.entry(r.source_name.clone()).or_default() += 1;
    }
    let n_val: usize = (0..2).map(|k| splits.fold(k).unwrap().val.len()).sum();
    assert_eq!(recs.len(), n_val);
    let train: HashSet<&String> = splits.train.iter().collect();
    assert_eq!(seen.len(), train.len(), "every training image exactly once");
    assert!(seen.values().all(|&c| c == 1));
    assert!(seen.keys().all(|n| train.contains(n)));
    assert_eq!(rep.folds.len(), 2);

    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["store_size"].as_u64(), Some(S as u64));
    assert_eq!(
        manifest["n_shards"].as_u64(),
        Some(recs.len().div_ceil(5) as u64)
    );
    assert_eq!(
        manifest["counts_by_bin"]["real"]["target"].as_u64(),
        Some(recs.len() as u64)
    );

    // Phase 2's loader reads the run (as `--dataset PHANTOM_oof`; `--real-data DIR` uses the same reader).
    let p2 = load_data(&aug, "PHANTOM_oof", &data, S).unwrap();
    assert_eq!(p2.records, recs);
    assert_eq!(p2.coarse.len(), recs.len());
    for c in &p2.coarse {
        assert_eq!(c.len(), S * S);
        assert!(c.iter().all(|v| (0.0..=1.0).contains(v)));
    }
    assert_eq!(p2.sources.len(), train.len());

    // A checkpoint trained for another fold is refused (its "validation" images would be training images).
    let swapped = tmp.path().join("swapped");
    for k in 0..2 {
        let d = swapped.join(format!("fold_{k}"));
        std::fs::create_dir_all(&d).unwrap();
        for ext in ["safetensors", "json"] {
            std::fs::copy(
                ck.join(format!("PHANTOM/fold_{}/best.{ext}", 1 - k)),
                d.join(format!("best.{ext}")),
            )
            .unwrap();
        }
    }
    o.checkpoints = format!("{}/fold_{{k}}/best.safetensors", swapped.display());
    let err = run_oof(&o).unwrap_err().to_string();
    assert!(err.contains("fold"), "{err}");
    // The failed run left the earlier complete one untouched.
    assert_eq!(read_csv(&dir.join("samples.csv")), recs);

    // A missing checkpoint names its path.
    o.checkpoints = format!("{}/nowhere/fold_{{k}}.safetensors", tmp.path().display());
    let err = run_oof(&o).unwrap_err().to_string();
    assert!(err.contains("nowhere"), "{err}");
}
