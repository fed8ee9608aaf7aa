//! Phase 1 trainer (SPEC §11.2, §11.1.6) on a small phantom dataset with the `tiny` preset: exact resume after a
//! stop, `--resume auto` on a complete run, and a short run that learns.
use std::path::{Path, PathBuf};
use std::time::Instant;
use ultrarefiner::data::phantom::{generate, PhantomOptions};
use ultrarefiner::data::prepare::{prepare_datasets, PrepareOptions};
use ultrarefiner::data::DatasetKind;
use ultrarefiner::device::DeviceSpec;
use ultrarefiner::models::transunet::read_checkpoint;
use ultrarefiner::train::phase1::{run, Phase1Options, Phase1Outcome};

/// Generates `count` phantom images and prepares them (5 folds); returns the processed root.
fn phantom_processed(dir: &Path, count: usize) -> PathBuf {
    let raw = dir.join("raw");
    generate(&PhantomOptions {
        out: raw.join("PHANTOM"),
        count,
        seed: 7,
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
        ..Default::default()
    })
    .unwrap();
    out
}

fn opts(data: &Path, out: &Path, epochs: usize) -> Phase1Options {
    let mut o = Phase1Options::new(data);
    o.dataset = Some("PHANTOM".into());
    o.config = "tiny".into();
    o.max_epochs = Some(epochs);
    o.batch_size = Some(4);
    o.output_dir = out.to_path_buf();
    o.vit_pretrained = Some("none".into());
    o.device = Some(DeviceSpec::Cpu);
    o.num_workers = 2;
    o.plain = true;
    o.save_every = 2;
    o.img_size = Some(64); // smaller than tiny's 96: keeps each test well under a minute on 2 loaded cores
    o
}

/// metrics.csv without the wall-clock column `time_s`.
fn csv_without_time(p: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(p).unwrap();
    let rows: Vec<Vec<String>> = text
        .lines()
        .map(|l| l.split(',').map(String::from).collect())
        .collect();
    let col = rows[0].iter().position(|c| c == "time_s").unwrap();
    rows.into_iter()
        .map(|mut r| {
            r.remove(col);
            r
        })
        .collect()
}

#[test]
fn resume_after_stop_is_bit_identical_and_auto_skips_complete() {
    let tmp = tempfile::tempdir().unwrap();
    let data = phantom_processed(tmp.path(), 16);
    let t0 = Instant::now();

    // Uninterrupted: 3 epochs.
    let a_out = tmp.path().join("a");
    let a = run(&opts(&data, &a_out, 3)).unwrap();
    let run_a = a_out.join("PHANTOM/fold_0");
    assert!(
        matches!(a, Phase1Outcome::Complete { epochs: 3, .. }),
        "{a:?}"
    );
    assert_eq!(a.run_dir(), run_a.as_path());

    // Stopped after epoch 1, then resumed with --resume auto.
    let b_out = tmp.path().join("b");
    let mut ob = opts(&data, &b_out, 3);
    ob.stop_after_epochs = Some(1);
    let b1 = run(&ob).unwrap();
    assert_eq!(
        b1,
        Phase1Outcome::Interrupted {
            run_dir: b_out.join("PHANTOM/fold_0"),
            epochs_done: 1
        }
    );
    assert_eq!(b1.exit_code(), 75);
    let run_b = b_out.join("PHANTOM/fold_0");
    assert!(run_b.join("latest.safetensors").is_file());
    assert!(!run_b.join("final.safetensors").exists());
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_b.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(s["status"], "interrupted");
    ob.stop_after_epochs = None;
    ob.resume = Some("auto".into());
    let b2 = run(&ob).unwrap();
    assert!(
        matches!(b2, Phase1Outcome::Complete { epochs: 3, .. }),
        "{b2:?}"
    );

    // Every tensor of final (weights, BN buffers, optimiser state) bit-identical; metrics identical.
    let fa = read_checkpoint(&run_a.join("final.safetensors"), "").unwrap();
    let fb = read_checkpoint(&run_b.join("final.safetensors"), "").unwrap();
    let all_a =
        candle_core::safetensors::load(run_a.join("final.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    let all_b =
        candle_core::safetensors::load(run_b.join("final.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert!(
        fa.len() > 10 && all_a.len() > fa.len(),
        "model {} / all {}",
        fa.len(),
        all_a.len()
    );
    assert_eq!(all_a.len(), all_b.len());
    let mut keys: Vec<&String> = all_a.keys().collect();
    keys.sort();
    for k in keys {
        let ta = &all_a[k];
        let tb = all_b
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing after resume"));
        assert_eq!(ta.dims(), tb.dims(), "{k}");
        assert_eq!(ta.dtype(), tb.dtype(), "{k}");
        let va: Vec<f64> = ta
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let vb: Vec<f64> = tb
            .to_dtype(candle_core::DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let same = va.iter().zip(&vb).all(|(x, y)| x.to_bits() == y.to_bits());
        assert!(same, "{k} differs after resume");
    }
    assert_eq!(fb.len(), fa.len());
    assert_eq!(
        csv_without_time(&run_a.join("metrics.csv")),
        csv_without_time(&run_b.join("metrics.csv"))
    );
    // The history in the final sidecars agrees too (apart from times).
    let sa: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_a.join("final.json")).unwrap()).unwrap();
    let sb: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_b.join("final.json")).unwrap()).unwrap();
    assert_eq!(sa["best"], sb["best"]);
    assert_eq!(sa["global_step"], sb["global_step"]);
    assert_eq!(sa["scheduler"], sb["scheduler"]);
    assert!(run_a.join("epoch_2.safetensors").is_file());

    // --resume auto on the finished run: "already complete", nothing trained or rewritten.
    let before = std::fs::metadata(run_a.join("final.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    let mut oa = opts(&data, &a_out, 3);
    oa.resume = Some("auto".into());
    let again = run(&oa).unwrap();
    assert_eq!(
        again,
        Phase1Outcome::AlreadyComplete {
            run_dir: run_a.clone()
        }
    );
    assert_eq!(again.exit_code(), 0);
    assert_eq!(
        std::fs::metadata(run_a.join("final.safetensors"))
            .unwrap()
            .modified()
            .unwrap(),
        before
    );
    println!("resume test: {:.1} s", t0.elapsed().as_secs_f64());
}

#[test]
fn tiny_phase1_learns_on_phantom() {
    let tmp = tempfile::tempdir().unwrap();
    let data = phantom_processed(tmp.path(), 24);
    let out = tmp.path().join("out");
    let mut o = opts(&data, &out, 8);
    o.base_lr = Some(0.1);
    o.no_augment = true;
    o.save_every = 0;
    let t0 = Instant::now();
    let r = run(&o).unwrap();
    assert!(
        matches!(r, Phase1Outcome::Complete { epochs: 8, .. }),
        "{r:?}"
    );
    let sc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(r.run_dir().join("final.json")).unwrap())
            .unwrap();
    let h = sc["history"].as_array().unwrap();
    let loss: Vec<f64> = h
        .iter()
        .map(|r| r["train_loss"].as_f64().unwrap())
        .collect();
    let vdice: Vec<f64> = h.iter().map(|r| r["val_dice"].as_f64().unwrap()).collect();
    let tdice: Vec<f64> = h
        .iter()
        .map(|r| r["train_dice"].as_f64().unwrap())
        .collect();
    println!("train dice {tdice:?}");
    let vdimg: Vec<f64> = h
        .iter()
        .map(|r| r["val_dice_img"].as_f64().unwrap())
        .collect();
    println!(
        "train loss per epoch {loss:?}\nval dice (pooled) {vdice:?}\nval dice (per-img) {vdimg:?}"
    );
    println!("tiny run: {:.1} s", t0.elapsed().as_secs_f64());
    assert!(
        loss.last().unwrap() < &(loss[0] * 0.5),
        "training loss did not fall: {loss:?}"
    );
    // NOTE: after 8 epochs × 3 steps at S = 64 the thresholded validation Dice is still at the all-background level
    // (≈0) although the loss falls steadily (soft foreground probabilities stay below 0.5); a run long enough to
    // cross the threshold does not fit the test budget. The Dice values are printed above for the report.
    assert!(
        vdice
            .iter()
            .all(|d| d.is_finite() && (0.0..=1.0).contains(d)),
        "{vdice:?}"
    );
}
