//! ROI-crop mode (SPEC §7.7) end to end at the `tiny` preset:
//! * every trainable SAM variable and the coarse mask get a gradient through the ROI path (§16.5), and a
//!   directional-derivative check (f64) of the whole ROI refiner w.r.t. the coarse mask (box, crop, prompts, SAM,
//!   paste-back, window, coarse logits);
//! * the end-to-end forward bypasses the embedding cache and keeps the coarse logits outside the ROI;
//! * Phase 2 and Phase 3 runs with `use_roi_crop` complete, record the setting in their sidecars, and evaluation
//!   (`eval::model::EvalModel`) loads it from there.
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use ultrarefiner::config::{Config, SamConfig};
use ultrarefiner::eval::model::{EvalModel, Member, ModelSource};
use ultrarefiner::models::sam::weights::{random_weights, SamFormat, SamWeights};
use ultrarefiner::models::sam::{EmbeddingCache, Sam};
use ultrarefiner::models::transunet::build_trainable;
use ultrarefiner::refiner::{ForwardOptions, SamRefiner, SamRefinerSettings, UltraRefiner};
use ultrarefiner::testing::{prepared_phantom, random_transunet_checkpoint, synthetic_phantom_run};
use ultrarefiner::train::StopFlag;

fn tiny() -> Config {
    Config::load("tiny").unwrap()
}

fn roi_settings() -> SamRefinerSettings {
    SamRefinerSettings {
        roi_expand_ratio: Some(0.2),
        ..SamRefinerSettings::default()
    }
}

/// Trainable tiny SAM (prompt encoder + decoder are `Var`s in the returned map), random weights.
fn sam_f32(cfg: &SamConfig) -> (Sam, VarMap) {
    let dev = Device::Cpu;
    let w = SamWeights {
        tensors: random_weights(cfg, 11, &dev).unwrap(),
        format: SamFormat::Original,
    };
    let vm = VarMap::new();
    let sam = Sam::from_weights(cfg, &w, &vm, &dev, DType::F32, None).unwrap();
    (sam, vm)
}

/// A deterministic pseudo-random tensor in `[-1, 1]`.
fn noise(shape: &[usize], seed: u64, dt: DType) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let v: Vec<f64> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
}

/// A smooth soft blob `(1, n, n)` of radius ~0.1·n with an off-centre hot spot (no negative-corner near-tie).
fn blob(n: usize, dt: DType) -> Tensor {
    let mut v = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            let (y, x) = (i as f64 / n as f64, j as f64 / n as f64);
            let d = ((x - 0.47) / 0.12).powi(2) + ((y - 0.55) / 0.08).powi(2);
            let hot = (-((x - 0.53).powi(2) + (y - 0.6).powi(2)) / 0.002).exp();
            v[i * n + j] = (0.45 + 0.55 * hot) / (1.0 + (5.0 * (d - 1.0)).exp());
        }
    }
    Tensor::from_vec(v, (1, n, n), &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
}

fn norm2(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn vals(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// SPEC §16.5 in ROI mode: a Phase-2-like loss (BCE + Dice on the blended logits, IoU-prediction MSE against the
/// IoU of the pasted candidates) gives every trainable SAM variable and the coarse mask a finite non-zero gradient
/// (except the parameters unused by construction with all prompts on).
#[test]
fn roi_every_trainable_var_gets_gradient() {
    let cfg = tiny().model.sam;
    let (sam, vm) = sam_f32(&cfg);
    let n = cfg.img_size;
    let g = cfg.embed_grid();
    let emb = noise(&[2, cfg.prompt_embed_dim, g, g], 4, DType::F32);
    let p0 = Tensor::cat(
        &[
            blob(n, DType::F32),
            blob(n, DType::F32).affine(0.7, 0.1).unwrap(),
        ],
        0,
    )
    .unwrap();
    let gt = p0.ge(0.4).unwrap().to_dtype(DType::F32).unwrap();
    let pv = Var::from_tensor(&p0).unwrap();
    let r = SamRefiner::new(sam, roi_settings());
    let out = r.refine(&emb, pv.as_tensor()).unwrap();
    let roi = out.roi.as_ref().expect("ROI output");
    assert_eq!(roi.boxes.dims(), &[2, 4]);
    let cand = out.candidates_n().unwrap();
    assert_eq!(cand.dims(), &[2, 3, n, n]);
    let lcfg = ultrarefiner::train::losses::Phase2LossConfig {
        iou_loss_weight: 1.0,
        change_penalty_weight: 0.1,
    };
    let loss = ultrarefiner::train::losses::phase2_loss(
        &out.refined_n,
        &gt,
        pv.as_tensor(),
        Some((&cand, &out.iou_pred)),
        &lcfg,
    )
    .unwrap();
    let grads = loss.total.backward().unwrap();
    let allowed = |k: &str| {
        k.starts_with("mask_decoder.output_hypernetworks_mlps.0.")
            || k == "prompt_encoder.not_a_point_embed.weight"
            || k == "prompt_encoder.no_mask_embed.weight"
    };
    let mut missing = Vec::new();
    let mut count = 0;
    for (k, v) in vm.data().lock().unwrap().iter() {
        count += 1;
        let ok = grads
            .get(v.as_tensor())
            .is_some_and(|t| norm2(t).is_finite() && norm2(t) > 0.0);
        if !ok && !allowed(k) {
            missing.push(k.clone());
        }
    }
    assert!(count > 40, "{count} variables");
    assert!(
        missing.is_empty(),
        "ROI: variables without gradient: {missing:?}"
    );
    let gp = grads.get(pv.as_tensor()).expect("coarse gradient");
    assert!(norm2(gp).is_finite() && norm2(gp) > 0.0);
}

/// SPEC §16.5: directional derivative (f64, central differences) of the whole ROI refiner w.r.t. the coarse mask:
/// the box (through `c`, `σ`), the crop of the mask, the prompts, SAM, soft selection, paste-back, window and blend.
#[test]
fn roi_directional_derivative_tiny_f64() {
    let cfg = tiny().model.sam;
    let dev = Device::Cpu;
    let w: HashMap<String, Tensor> = random_weights(&cfg, 13, &dev)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::F64).unwrap()))
        .collect();
    let vb = VarBuilder::from_tensors(w, DType::F64, &dev);
    let sam = Sam::new_parts(&cfg, vb.clone(), vb.clone(), vb, None).unwrap();
    let n = cfg.img_size;
    let g = cfg.embed_grid();
    let emb = noise(&[1, cfg.prompt_embed_dim, g, g], 8, DType::F64);
    let p0 = blob(n, DType::F64);
    // A smooth direction scaled by `P`: the outside-ROI logits `log(P/(1 − P))` at tiny `P` would make central
    // differences inaccurate for an absolute perturbation (third derivative ~ 2/P³).
    let dir = ultrarefiner::nn::resize_bilinear(&noise(&[1, 1, 8, 8], 9, DType::F64), n, n, false)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .mul(&p0)
        .unwrap();
    let r = noise(&[1, n, n], 10, DType::F64);
    let refiner = SamRefiner::new(sam, roi_settings());
    let out0 = refiner.refine(&emb, &p0).unwrap();
    // The ROI box is a real crop (not the whole image) and the crop-space negative corner is no near-tie.
    let b = vals(&out0.roi.as_ref().unwrap().boxes);
    assert!(
        b[0] > 1.0 && b[2] < (n - 2) as f64 && b[2] - b[0] > 64.0,
        "{b:?}"
    );
    {
        let pts = vals(out0.prompts.points.as_ref().unwrap());
        let bx = vals(out0.prompts.boxes.as_ref().unwrap());
        let corners = [
            (bx[0], bx[1]),
            (bx[2], bx[1]),
            (bx[0], bx[3]),
            (bx[2], bx[3]),
        ];
        let mut d: Vec<f64> = corners
            .iter()
            .map(|(x, y)| ((x - pts[0]).powi(2) + (y - pts[1]).powi(2)).sqrt())
            .collect();
        d.sort_by(|a, b| b.partial_cmp(a).unwrap());
        assert!(d[0] - d[1] > 0.5, "negative-corner margin {}", d[0] - d[1]);
    }
    let f = |p: &Tensor| -> Tensor {
        (&refiner.refine(&emb, p).unwrap().refined_n * &r)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let pv = Var::from_tensor(&p0).unwrap();
    let grads = f(pv.as_tensor()).backward().unwrap();
    let analytic = (grads.get(pv.as_tensor()).unwrap() * &dir)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let h = 1e-6;
    let fp = f(&(&p0 + (&dir * h).unwrap()).unwrap())
        .to_scalar::<f64>()
        .unwrap();
    let fm = f(&(&p0 - (&dir * h).unwrap()).unwrap())
        .to_scalar::<f64>()
        .unwrap();
    let fd = (fp - fm) / (2.0 * h);
    eprintln!("ROI directional derivative: analytic {analytic:.9e}, finite difference {fd:.9e}");
    assert!(
        (fd - analytic).abs() <= 1e-5 * analytic.abs().max(fd.abs()).max(1e-3),
        "analytic {analytic} vs finite difference {fd}"
    );
}

/// The end-to-end forward in ROI mode never touches the embedding cache (the crop depends on `P`, §7.7.5), its
/// embeddings are those of the cropped image, and far outside the ROI the refined logits are the coarse logits.
#[test]
fn roi_forward_bypasses_cache_and_keeps_coarse_outside() {
    let cfg = tiny().model;
    let dev = Device::Cpu;
    let tu_vars = VarMap::new();
    let tu = build_trainable(&cfg.transunet, &tu_vars, "", DType::F32, &dev, 3, None).unwrap();
    let (sam, _) = sam_f32(&cfg.sam);
    let fp = sam.image_encoder.fingerprint().unwrap();
    let model = UltraRefiner::new(tu, SamRefiner::new(sam, roi_settings()));
    let s = cfg.transunet.img_size;
    let x = ((noise(&[2, 1, s, s], 21, DType::F32) + 1.0).unwrap() * 0.5).unwrap();
    let cache = EmbeddingCache::new(None, &fp, 1 << 26).unwrap();
    let opts = ForwardOptions {
        cache: Some(&cache),
        ..ForwardOptions::default()
    };
    // The full forward (random TransUNet: P ≈ 0.5 everywhere, the ROI is the whole image) …
    let full = model.forward_with(&x, &opts).unwrap();
    assert!(vals(&full.refined_logits_s).iter().all(|v| v.is_finite()));
    // … and the refiner half on a compact coarse mask.
    let p = Tensor::cat(
        &[
            blob(s, DType::F32),
            blob(s, DType::F32).affine(0.8, 0.0).unwrap(),
        ],
        0,
    )
    .unwrap();
    let (sam_inputs, emb, r, _) = model.refine_coarse(&x, &p, &opts).unwrap();
    assert_eq!(
        (cache.misses(), cache.hits()),
        (0, 0),
        "ROI mode must bypass the cache"
    );
    let crop = model
        .refiner
        .roi_image(&sam_inputs.image, &sam_inputs.coarse)
        .unwrap();
    let e = model.refiner.embed(&crop, None).unwrap();
    assert_eq!(vals(&e), vals(&emb));
    struct Out {
        sam_inputs: ultrarefiner::refiner::SamInputs,
        refined_logits_n: Tensor,
    }
    let out = Out {
        sam_inputs,
        refined_logits_n: r.refined_n,
    };
    // Refined = coarse logits where ω < 1e-9 (≥ ~4 px outside the box).
    let n = cfg.sam.img_size;
    let b = vals(&ultrarefiner::refiner::roi::roi_box(&out.sam_inputs.coarse, 0.2).unwrap());
    let cl = vals(&ultrarefiner::refiner::roi::coarse_logits(&out.sam_inputs.coarse).unwrap());
    let z = vals(&out.refined_logits_n);
    let mut outside = 0;
    for bi in 0..2 {
        let (x1, y1, x2, y2) = (b[4 * bi], b[4 * bi + 1], b[4 * bi + 2], b[4 * bi + 3]);
        for i in 0..n {
            for j in 0..n {
                let (xf, yf) = (j as f64, i as f64);
                if (x1 - xf).max(xf - x2).max(y1 - yf).max(yf - y2) >= 5.0 {
                    let k = bi * n * n + i * n + j;
                    outside += 1;
                    assert!(
                        (z[k] - cl[k]).abs() < 1e-4,
                        "({bi},{i},{j}): {} vs {}",
                        z[k],
                        cl[k]
                    );
                }
            }
        }
    }
    assert!(
        outside > 0,
        "the ROI covers the whole image; the check is vacuous"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Trainer runs

const S2: usize = 96;
const S3: usize = 64;

struct Fixture {
    _tmp: tempfile::TempDir,
    processed: PathBuf,
    augmented: PathBuf,
    transunet96: PathBuf,
    transunet64: PathBuf,
}

fn save_transunet(dir: &Path, s: usize) -> PathBuf {
    let p = dir.join(format!("phase1_{s}.safetensors"));
    random_transunet_checkpoint(&p, s).unwrap();
    p
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let processed = prepared_phantom(tmp.path(), 16, true).unwrap();
        let augmented = tmp.path().join("augmented");
        synthetic_phantom_run(&processed, &augmented, 24, S2, 42).unwrap();
        Fixture {
            transunet96: save_transunet(tmp.path(), S2),
            transunet64: save_transunet(tmp.path(), S3),
            _tmp: tmp,
            processed,
            augmented,
        }
    })
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn roi_of(m: &EvalModel) -> Option<f64> {
    m.members
        .iter()
        .find_map(|m| match m {
            Member::Full(u) => Some(u.refiner.settings.roi_expand_ratio),
            Member::Coarse(_) => None,
        })
        .flatten()
}

/// A 1-epoch Phase 2 run with `use_roi_crop` (8 training samples): completes without the embedding cache, records
/// the ROI setting in `best.json` and `best_sam.json`, and evaluation of Phase 1 + `best_sam.safetensors` picks it
/// up from `best_sam.json` and predicts.
#[test]
fn phase2_roi_run_records_and_evaluate_honours_it() {
    use ultrarefiner::train::phase2::{run, Phase2Options, Phase2Status};
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let o = Phase2Options {
        data_root: f.augmented.clone(),
        dataset: "PHANTOM".into(),
        processed_root: f.processed.clone(),
        sam_checkpoint: "random".into(),
        config: "tiny".into(),
        epochs: Some(1),
        batch_size: Some(4),
        lr: 1e-3,
        val_fraction: 0.2,
        transunet_img_size: S2,
        max_samples: Some(8),
        output_dir: tmp.path().to_path_buf(),
        device: Some("cpu".into()),
        quiet: true,
        use_roi_crop: true,
        roi_expand_ratio: 0.3,
        ..Default::default()
    };
    let out = run(&o, &StopFlag::new()).unwrap();
    assert_eq!(out.status, Phase2Status::Complete);
    assert_eq!(
        out.encoder_forwards, 0,
        "no cached full-image embeddings in ROI mode"
    );
    let h = &out.history[0];
    assert!(h.train_loss.is_some_and(f64::is_finite) && h.val_dice.is_some());
    let log = std::fs::read_to_string(out.run_dir.join("train.log")).unwrap();
    assert!(log.contains("ROI crop"), "{log}");
    let best = read_json(&out.run_dir.join("best.json"));
    assert_eq!(best["config"]["refiner"]["use_roi_crop"], true, "{best}");
    assert_eq!(best["config"]["refiner"]["roi_expand_ratio"], 0.3);
    let sam_json = read_json(&out.run_dir.join("best_sam.json"));
    assert_eq!(sam_json["refiner"]["use_roi_crop"], true, "{sam_json}");
    assert_eq!(sam_json["refiner"]["roi_expand_ratio"], 0.3);
    // Evaluation: Phase 1 TransUNet + Phase 2 best_sam → the ROI setting from best_sam.json.
    let m = EvalModel::load(
        &ModelSource::Pair {
            transunet: f.transunet96.clone(),
            sam: out.run_dir.join("best_sam.safetensors"),
        },
        &tiny(),
        &Device::Cpu,
    )
    .unwrap();
    assert!(m.refiner.as_ref().is_some_and(|r| r.use_roi_crop));
    assert_eq!(roi_of(&m), Some(0.3));
    let x = ((noise(&[1, 1, S2, S2], 3, DType::F32) + 1.0).unwrap() * 0.5).unwrap();
    let p = m.predict(&x, false).unwrap();
    let rv = vals(p.refined.as_ref().unwrap());
    assert!(rv.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
}

/// A 1-epoch Phase 3 run with `use_roi_crop`: completes, records the setting in `best.json`, evaluation of the
/// Phase 3 checkpoint runs the ROI refiner without flags, and resuming without the flag is refused.
#[test]
fn phase3_roi_run_records_and_evaluate_honours_it() {
    use ultrarefiner::device::DeviceSpec;
    use ultrarefiner::train::phase3::{run, Phase3Options};
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let mut o = Phase3Options::new(&f.processed);
    o.dataset = Some("PHANTOM".into());
    o.config = "tiny".into();
    o.img_size = Some(S3);
    o.transunet_checkpoint = Some(f.transunet64.clone());
    o.sam_checkpoint = "random".into();
    o.max_epochs = Some(1);
    o.batch_size = Some(4);
    o.transunet_lr = 1e-3;
    o.sam_lr = 1e-3;
    o.refined_loss_size = Some(S3);
    o.output_dir = tmp.path().to_path_buf();
    o.device = Some(DeviceSpec::Cpu);
    o.num_workers = 2;
    o.quiet = true;
    o.use_roi_crop = true;
    let out = run(&o).unwrap();
    let dir = tmp.path().join("PHANTOM").join("fold_0");
    assert_eq!(out.exit_code(), 0, "{out:?}");
    let best = read_json(&dir.join("best.json"));
    assert_eq!(best["config"]["refiner"]["use_roi_crop"], true, "{best}");
    assert_eq!(best["config"]["refiner"]["roi_expand_ratio"], 0.2);
    let log = std::fs::read_to_string(dir.join("train.log")).unwrap();
    assert!(log.contains("ROI crop"), "{log}");
    let m = EvalModel::load(
        &ModelSource::Phase3 {
            checkpoint: dir.join("best.safetensors"),
        },
        &tiny(),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(roi_of(&m), Some(0.2));
    let x = ((noise(&[2, 1, S3, S3], 5, DType::F32) + 1.0).unwrap() * 0.5).unwrap();
    let p = m.predict(&x, false).unwrap();
    assert!(vals(p.refined.as_ref().unwrap())
        .iter()
        .all(|v| v.is_finite()));
    // Resume without --use-roi-crop: refused with a message naming the flag.
    let mut o2 = o.clone();
    o2.use_roi_crop = false;
    o2.max_epochs = Some(2);
    o2.resume = Some(dir.join("latest.safetensors").display().to_string());
    let e = run(&o2).unwrap_err().to_string();
    assert!(e.contains("--use-roi-crop"), "{e}");
}
