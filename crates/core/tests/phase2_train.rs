//! Phase 2 trainer (SPEC §11.3) at the `tiny` preset on a small phantom: phantom → prepare → augment synthetic
//! (48 samples at S = 96) → `train::phase2::run` with random SAM weights.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use ultrarefiner::augment::{run_synthetic, SimConfig, SyntheticOptions};
use ultrarefiner::data::phantom::{generate, PhantomOptions};
use ultrarefiner::data::prepare::{prepare_datasets, PrepareOptions};
use ultrarefiner::data::DatasetKind;
use ultrarefiner::train::phase2::{run, split_sources, Phase2Options, Phase2Status};
use ultrarefiner::train::StopFlag;

const S: usize = 96;

struct Fixture {
    _tmp: tempfile::TempDir,
    processed: PathBuf,
    augmented: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let raw = tmp.path().join("raw");
        generate(&PhantomOptions {
            out: raw.join("PHANTOM"),
            count: 16,
            seed: 7,
            height_range: (112, 144),
            width_range: (128, 176),
            annotations: false,
            num_workers: Some(2),
        })
        .unwrap();
        let processed = tmp.path().join("processed");
        prepare_datasets(&PrepareOptions {
            raw_root: raw,
            output_root: processed.clone(),
            datasets: vec![DatasetKind::Phantom],
            num_workers: Some(2),
            ..Default::default()
        })
        .unwrap();
        let augmented = tmp.path().join("augmented");
        run_synthetic(&SyntheticOptions {
            processed_root: processed.clone(),
            output_root: augmented.clone(),
            datasets: vec!["PHANTOM".into()],
            target_samples: 48,
            sim: SimConfig {
                store_size: S,
                ..SimConfig::default()
            },
            shard_size: 16,
            num_workers: Some(2),
            ..Default::default()
        })
        .unwrap();
        Fixture {
            _tmp: tmp,
            processed,
            augmented,
        }
    })
}

fn opts(out: &Path, epochs: usize) -> Phase2Options {
    let f = fixture();
    Phase2Options {
        data_root: f.augmented.clone(),
        dataset: "PHANTOM".into(),
        processed_root: f.processed.clone(),
        sam_checkpoint: "random".into(),
        config: "tiny".into(),
        epochs: Some(epochs),
        batch_size: Some(4),
        lr: 1e-3,
        val_fraction: 0.2,
        transunet_img_size: S,
        output_dir: out.to_path_buf(),
        device: Some("cpu".into()),
        quiet: true,
        ..Default::default()
    }
}

#[test]
fn one_encoder_forward_per_source_and_disjoint_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let o = run(&opts(tmp.path(), 1), &StopFlag::new()).unwrap();
    assert_eq!(o.status, Phase2Status::Complete);
    assert!(o.n_sources >= 4, "{} sources", o.n_sources);
    assert_eq!(
        o.encoder_forwards, o.n_sources,
        "one encoder forward per distinct source image"
    );
    assert!(!o.val_sources.is_empty() && !o.train_sources.is_empty());
    for v in &o.val_sources {
        assert!(
            !o.train_sources.contains(v),
            "validation source {v} is also a training source"
        );
    }
    assert_eq!(o.train_sources.len() + o.val_sources.len(), o.n_sources);
    assert!(o.n_train > 0 && o.n_val > 0 && o.n_train + o.n_val == 48);
    // Run directory contents.
    for f in [
        "best.safetensors",
        "best.json",
        "latest.safetensors",
        "latest.json",
        "final.safetensors",
        "final.json",
        "best_sam.safetensors",
        "best_sam.json",
        "metrics.csv",
        "summary.json",
        "train.log",
    ] {
        assert!(o.run_dir.join(f).is_file(), "missing {f}");
    }
    let csv = std::fs::read_to_string(o.run_dir.join("metrics.csv")).unwrap();
    assert!(
        csv.lines().next().unwrap().contains("val_coarse_dice"),
        "{csv}"
    );
    let log = std::fs::read_to_string(o.run_dir.join("train.log")).unwrap();
    assert!(log.contains("Dice") && log.contains("EPOCH 1/1"), "{log}");
    // best_sam.safetensors is SAM-native (§6.10): loads strictly with the tiny config, no prefix, no optimiser state.
    let cfg = ultrarefiner::config::Config::load("tiny")
        .unwrap()
        .model
        .sam;
    let w = ultrarefiner::models::sam::load_sam_weights(
        &o.run_dir.join("best_sam.safetensors"),
        Some(&cfg),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(w
        .tensors
        .keys()
        .all(|k| !k.starts_with("sam.") && !k.starts_with("__optim__")));
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(o.run_dir.join("best_sam.json")).unwrap())
            .unwrap();
    assert_eq!(j["transunet_img_size"], S);
    assert_eq!(j["mask_prompt_style"], "direct");
    // A second run with --resume auto finds the run complete.
    let mut o2 = opts(tmp.path(), 1);
    o2.resume = Some("auto".into());
    assert_eq!(
        run(&o2, &StopFlag::new()).unwrap().status,
        Phase2Status::AlreadyComplete
    );
}

#[test]
fn split_is_by_source_and_deterministic() {
    let src: Vec<(String, String)> = (0..10)
        .map(|i| ("A".to_string(), format!("img{i}")))
        .chain((0..3).map(|i| ("B".into(), format!("b{i}"))))
        .collect();
    let a = split_sources(&src, 0.2, 42).unwrap();
    assert_eq!(a, split_sources(&src, 0.2, 42).unwrap());
    assert_eq!(a[..10].iter().filter(|v| **v).count(), 2);
    assert_eq!(a[10..].iter().filter(|v| **v).count(), 1);
    assert!(split_sources(&src[..1], 0.2, 42).is_err());
}

#[test]
fn loss_falls_over_epochs() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts(tmp.path(), 4);
    o.lr = 3e-3;
    o.min_lr = 3e-3;
    let out = run(&o, &StopFlag::new()).unwrap();
    let l: Vec<f64> = out.history.iter().map(|r| r.train_loss.unwrap()).collect();
    println!("train losses {l:?}");
    assert!(l[3] < l[0], "training loss did not fall: {l:?}");
}

#[test]
fn resume_is_bitwise_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let full = run(&opts(&tmp.path().join("a"), 2), &StopFlag::new()).unwrap();
    let mut o = opts(&tmp.path().join("b"), 2);
    o.stop_after_epochs = Some(1);
    let first = run(&o, &StopFlag::new()).unwrap();
    assert_eq!(first.status, Phase2Status::Interrupted);
    assert_eq!(first.history.len(), 1);
    let mut o = opts(&tmp.path().join("b"), 2);
    o.resume = Some("auto".into());
    let second = run(&o, &StopFlag::new()).unwrap();
    assert_eq!(second.status, Phase2Status::Complete);
    let strip = |h: &[ultrarefiner::train::HistoryRow]| {
        h.iter()
            .map(|r| {
                let mut r = r.clone();
                r.time_s = 0.0;
                serde_json::to_string(&r).unwrap()
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(&full.history), strip(&second.history));
    let load = |p: PathBuf| candle_core::safetensors::load(p, &candle_core::Device::Cpu).unwrap();
    let a = load(full.run_dir.join("final.safetensors"));
    let b = load(second.run_dir.join("final.safetensors"));
    assert_eq!(a.len(), b.len());
    for (k, ta) in &a {
        let tb = &b[k];
        let va: Vec<f32> = ta
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let vb: Vec<f32> = tb
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(
            va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits()),
            "tensor {k} differs after resume"
        );
    }
}
