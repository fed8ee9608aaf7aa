//! Phase 2 trainer (SPEC §11.3) at the `tiny` preset on a small phantom: phantom → prepare → augment synthetic
//! (48 samples at S = 96) → `train::phase2::run` with random SAM weights.
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use ultrarefiner::augment::{run_synthetic, SimConfig, SyntheticOptions};
use ultrarefiner::testing::{prepared_phantom, synthetic_phantom_run};
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
        let processed = prepared_phantom(tmp.path(), 16, false).unwrap();
        let augmented = tmp.path().join("augmented");
        synthetic_phantom_run(&processed, &augmented, 48, S, 42).unwrap();
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

/// A tiny SAM refiner with random weights, optionally with LoRA adapters (SPEC §6.8) on `targets`.
fn tiny_refiner(lora: Option<&str>) -> (ultrarefiner::refiner::SamRefiner, candle_nn::VarMap) {
    use ultrarefiner::models::sam::weights::{random_weights, SamFormat, SamWeights};
    use ultrarefiner::models::sam::{LoraConfig, LoraTarget, Sam};
    let cfg = ultrarefiner::config::Config::load("tiny").unwrap();
    let w = SamWeights {
        tensors: random_weights(&cfg.model.sam, 5, &candle_core::Device::Cpu).unwrap(),
        format: SamFormat::Original,
    };
    let lcfg = lora.map(|t| LoraConfig {
        targets: LoraTarget::parse_list(t).unwrap(),
        ..LoraConfig::default()
    });
    let vm = candle_nn::VarMap::new();
    let sam = Sam::from_weights(
        &cfg.model.sam,
        &w,
        &vm,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
        lcfg.as_ref(),
    )
    .unwrap();
    let settings =
        ultrarefiner::refiner::SamRefinerSettings::from_config(&cfg.refiner, None).unwrap();
    (ultrarefiner::refiner::SamRefiner::new(sam, settings), vm)
}

fn abs_sum(t: &candle_core::Tensor) -> f64 {
    t.abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// SPEC §6.8 through the Phase 2 path: zero-initialised B makes the LoRA model's loss equal the plain model's; the
/// gradient reaches every `lora_b` at once and every `lora_a` after one AdamW step (∂L/∂A ∝ B = 0 at init); the
/// optimiser has the groups `sam` and `lora`.
#[test]
fn lora_gradients_reach_every_adapter() {
    use ultrarefiner::train::optim::{AdamW, Grads, Optimizer};
    use ultrarefiner::train::phase2::{
        forward, is_lora_key, load_data, make_batch, param_groups, Embeddings,
    };
    let f = fixture();
    let data = load_data(&f.augmented, "PHANTOM", &f.processed, S).unwrap();
    let dev = candle_core::Device::Cpu;
    let lcfg = ultrarefiner::train::losses::Phase2LossConfig::default();
    let (plain, _) = tiny_refiner(None);
    let (lr, vm) = tiny_refiner(Some("qkv,proj,mlp"));
    let ids = [0usize, 1];
    let bp = make_batch(&data, &Embeddings::PerBatch, &plain, &ids, &dev, None).unwrap();
    let bl = make_batch(&data, &Embeddings::PerBatch, &lr, &ids, &dev, Some(1)).unwrap();
    let lp = forward(&plain, &bp, &lcfg)
        .unwrap()
        .loss
        .total_f64()
        .unwrap();
    let st = forward(&lr, &bl, &lcfg).unwrap();
    assert_eq!(
        lp,
        st.loss.total_f64().unwrap(),
        "zero-init B must leave the output unchanged"
    );
    let mut opt = AdamW::new(param_groups(&vm, 1e-2, 0.0).unwrap()).unwrap();
    let names: Vec<String> = opt.groups().iter().map(|g| g.name.clone()).collect();
    assert_eq!(names, vec!["sam", "lora"]);
    let lora_keys: Vec<String> = opt.groups()[1]
        .params
        .iter()
        .map(|(k, _)| k.clone())
        .collect();
    // 4 blocks × (qkv, proj, lin1, lin2) × (A, B).
    assert_eq!(lora_keys.len(), 4 * 4 * 2);
    assert!(lora_keys.iter().all(|k| is_lora_key(k)));
    let g = Grads::from_store(&st.loss.total.backward().unwrap(), opt.groups()).unwrap();
    for k in &lora_keys {
        let n = g.get(k).map(abs_sum).unwrap_or(0.0);
        if k.ends_with("lora_b") {
            assert!(n > 0.0, "{k}: no gradient");
        } else {
            assert_eq!(n, 0.0, "{k}: ∂L/∂A must vanish while B = 0");
        }
    }
    opt.step(&g).unwrap();
    let bl = make_batch(&data, &Embeddings::PerBatch, &lr, &ids, &dev, Some(2)).unwrap();
    let st = forward(&lr, &bl, &lcfg).unwrap();
    let g = Grads::from_store(&st.loss.total.backward().unwrap(), opt.groups()).unwrap();
    for k in &lora_keys {
        let n = g.get(k).map(abs_sum).unwrap_or(0.0);
        assert!(n > 0.0 && n.is_finite(), "{k}: gradient {n}");
    }
}

/// `--use-lora` end to end: the full checkpoint holds the adapters (`sam.…lora_a/b`), `best_sam.safetensors` is
/// SAM-native with the adapters merged, the run resumes with the adapters.
#[test]
fn lora_run_saves_adapters_and_merged_export() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts(tmp.path(), 1);
    o.use_lora = true;
    o.max_samples = Some(8);
    let out = run(&o, &StopFlag::new()).unwrap();
    assert_eq!(out.status, Phase2Status::Complete);
    assert!(
        out.encoder_forwards == 0,
        "no cache fill with LoRA (encoder runs in the steps)"
    );
    let dev = candle_core::Device::Cpu;
    let ck = candle_core::safetensors::load(out.run_dir.join("best.safetensors"), &dev).unwrap();
    let n_lora = ck
        .keys()
        .filter(|k| k.starts_with("sam.image_encoder.") && k.ends_with(".lora_a"))
        .count();
    assert_eq!(n_lora, 4, "one qkv adapter per tiny encoder block");
    let cfg = ultrarefiner::config::Config::load("tiny")
        .unwrap()
        .model
        .sam;
    let w = ultrarefiner::models::sam::load_sam_weights(
        &out.run_dir.join("best_sam.safetensors"),
        Some(&cfg),
        &dev,
    )
    .unwrap();
    assert!(w.tensors.keys().all(|k| !k.contains("lora")));
    // Merged: W' = W + (α/r)·B·A differs from the checkpoint's frozen W by exactly the adapter product.
    let k = "image_encoder.blocks.0.attn.qkv";
    let wq = &ck[&format!("sam.{k}.weight")];
    let a = &ck[&format!("sam.{k}.lora_a")];
    let b = &ck[&format!("sam.{k}.lora_b")];
    assert!(abs_sum(b) > 0.0, "B was trained");
    let want = (wq + b.matmul(a).unwrap()).unwrap(); // α/r = 1
    let got = &w.tensors[&format!("{k}.weight")];
    let d = abs_sum(&(got - want).unwrap());
    assert!(d < 1e-4, "merged weight differs by {d}");
    // Resume of a complete run with LoRA: already complete; a 2-epoch continuation loads the adapters.
    let mut o2 = opts(tmp.path(), 2);
    o2.use_lora = true;
    o2.max_samples = Some(8);
    o2.resume = Some(
        out.run_dir
            .join("latest.safetensors")
            .to_string_lossy()
            .into_owned(),
    );
    let out2 = run(&o2, &StopFlag::new()).unwrap();
    assert_eq!(out2.history.len(), 2);
}

/// `--val-every 2` over 3 epochs validates epochs 2 and 3 (the last); `--curriculum` with n < 100 uses every sample.
#[test]
fn val_every_and_curriculum() {
    let tmp = tempfile::tempdir().unwrap();
    let mut o = opts(tmp.path(), 3);
    o.val_every = 2;
    o.curriculum = true;
    o.max_samples = Some(8);
    let out = run(&o, &StopFlag::new()).unwrap();
    let v: Vec<bool> = out.history.iter().map(|r| r.val_dice.is_some()).collect();
    assert_eq!(v, vec![false, true, true]);
    assert!(!out.history[0].is_best);
    for r in &out.history {
        assert_eq!(r.extra.get("train_samples"), Some(8.0));
    }
}

/// Option B: a second run directory (here made by the synthetic generator with another seed, standing in for
/// `augment oof`) mixed with `--real-ratio 0.25`: every epoch has exactly L samples; a ratio without data is refused.
#[test]
fn real_data_mixing_runs() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let real_root = tmp.path().join("real");
    synthetic_phantom_run(&f.processed, &real_root, 16, S, 9).unwrap();
    let mut o = opts(&tmp.path().join("out"), 1);
    o.real_data = Some(real_root.join("PHANTOM"));
    o.real_ratio = 0.25;
    o.max_samples = Some(12);
    let out = run(&o, &StopFlag::new()).unwrap();
    assert_eq!(out.n_train, 12);
    assert_eq!(out.history[0].extra.get("train_samples"), Some(12.0));
    let mut bad = opts(&tmp.path().join("bad"), 1);
    bad.real_ratio = 0.5;
    assert!(run(&bad, &StopFlag::new()).is_err());
}

/// Issue 7's learning-signal check at `tiny`, on the demo's data (`scripts/demo.sh`: 48 phantom images, 480 failure
/// samples at S = 96 with fold 0 excluded): from random SAM weights, with the LR a random-init decoder needs (2e-3;
/// the paper's 1e-4 is for pretrained SAM), 3 epochs end with refined validation Dice above coarse validation Dice
/// on held-out source images (measured: coarse 0.8001, refined 0.8264). Ignored by default: ~320 optimiser steps,
/// about 2 min CPU in release (run with `--ignored`).
#[test]
#[ignore = "~320 optimiser steps: about 2 min CPU in release; run with --ignored"]
fn refined_beats_coarse_on_held_out_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let processed = prepared_phantom(tmp.path(), 48, false).unwrap();
    let augmented = tmp.path().join("augmented");
    run_synthetic(&SyntheticOptions {
        processed_root: processed.clone(),
        output_root: augmented.clone(),
        datasets: vec!["PHANTOM".into()],
        target_samples: 480,
        exclude_fold: Some(0),
        sim: SimConfig {
            store_size: S,
            ..SimConfig::default()
        },
        num_workers: Some(2),
        ..Default::default()
    })
    .unwrap();
    let o = Phase2Options {
        data_root: augmented,
        dataset: "PHANTOM".into(),
        processed_root: processed,
        sam_checkpoint: "random".into(),
        config: "tiny".into(),
        epochs: Some(3),
        lr: 2e-3,
        transunet_img_size: S,
        output_dir: tmp.path().join("out"),
        device: Some("cpu".into()),
        quiet: true,
        ..Default::default()
    };
    let out = run(&o, &StopFlag::new()).unwrap();
    assert!(out.run_dir.ends_with("PHANTOM_fold0"));
    let last = out.history.last().unwrap();
    let refined = last.val_dice.unwrap();
    let coarse = last.extra.get("val_coarse_dice").unwrap();
    println!("tiny phase 2: coarse val Dice {coarse:.4}, refined val Dice {refined:.4}");
    assert!(
        refined > coarse,
        "refined {refined:.4} <= coarse {coarse:.4}"
    );
}
