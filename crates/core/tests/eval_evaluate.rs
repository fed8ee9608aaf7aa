//! SPEC §13.1–§13.3: `evaluate`, `infer` and fold ensembles on a tiny phantom dataset with randomly initialised
//! `tiny` models saved to safetensors.
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use std::path::{Path, PathBuf};
use ultrarefiner::config::Config;
use ultrarefiner::data::phantom::{generate, PhantomOptions};
use ultrarefiner::data::pixels::{decode_png, encode_png};
use ultrarefiner::data::prepare::{prepare_datasets, PrepareOptions};
use ultrarefiner::data::DatasetKind;
use ultrarefiner::eval::evaluate::{self, EvalSplit, EvaluateOptions};
use ultrarefiner::eval::infer::{self, InferMode, InferOptions};
use ultrarefiner::eval::model::{EvalModel, ModelSource};
use ultrarefiner::models::sam::weights::{random_weights, save_safetensors_atomic as save_sam};
use ultrarefiner::models::transunet::{build_trainable, save_safetensors_atomic, state_dict};

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    processed: PathBuf,
    transunet: PathBuf,
    transunet_b: PathBuf,
    sam: PathBuf,
}

/// Random tiny TransUNet tensors; `flip` negates the segmentation head so that two models differ for sure.
fn transunet_tensors(flip: bool) -> Vec<(String, Tensor)> {
    let cfg = Config::tiny().model.transunet;
    let vm = VarMap::new();
    let m = build_trainable(
        &cfg,
        &vm,
        "",
        DType::F32,
        &Device::Cpu,
        if flip { 12 } else { 11 },
        None,
    )
    .unwrap();
    let mut sd = state_dict(&m, &vm).unwrap();
    if flip {
        for (k, t) in sd.iter_mut() {
            if k.starts_with("segmentation_head") && k.ends_with("weight") {
                *t = t.neg().unwrap();
            }
        }
    }
    sd
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let raw = root.join("raw");
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
    let processed = root.join("processed");
    prepare_datasets(&PrepareOptions {
        raw_root: raw,
        output_root: processed.clone(),
        datasets: vec![DatasetKind::Phantom],
        verify: false,
        ..Default::default()
    })
    .unwrap();
    let transunet = root.join("transunet.safetensors");
    save_safetensors_atomic(&transunet, &transunet_tensors(false)).unwrap();
    let transunet_b = root.join("transunet_b.safetensors");
    save_safetensors_atomic(&transunet_b, &transunet_tensors(true)).unwrap();
    let sam_cfg = Config::tiny().model.sam;
    let sam_t = random_weights(&sam_cfg, 11, &Device::Cpu).unwrap();
    let sam_v: Vec<(String, Tensor)> = sam_t.into_iter().collect();
    let sam = root.join("sam.safetensors");
    save_sam(&sam_v, &sam).unwrap();
    Fixture {
        _tmp: tmp,
        root,
        processed,
        transunet,
        transunet_b,
        sam,
    }
}

fn eval_opts(f: &Fixture, source: ModelSource, out: &str) -> EvaluateOptions {
    EvaluateOptions {
        source,
        config: "tiny".into(),
        data_root: f.processed.clone(),
        datasets: vec!["PHANTOM".into()],
        split: EvalSplit::Test,
        batch_size: 2,
        output_dir: Some(f.root.join(out)),
        ..Default::default()
    }
}

fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .unwrap()
        .split(',')
        .map(|s| s.to_string())
        .collect();
    let rows = lines
        .map(|l| l.split(',').map(|s| s.to_string()).collect())
        .collect();
    (header, rows)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn n_test(f: &Fixture) -> usize {
    json(&f.processed.join("PHANTOM/splits.json"))["test"]
        .as_array()
        .unwrap()
        .len()
}

#[test]
fn evaluate_pair_transunet_only_and_phase3() {
    let f = fixture();
    let n = n_test(&f);
    assert!(n >= 2, "phantom test split too small: {n}");

    // --- TransUNet + SAM, with overlays
    let mut o = eval_opts(
        &f,
        ModelSource::Pair {
            transunet: f.transunet.clone(),
            sam: f.sam.clone(),
        },
        "pair",
    );
    o.visualize = true;
    o.num_visualize = 2;
    let r = evaluate::run(&o).unwrap();
    println!("{}", evaluate::console_table(&r));
    let line = evaluate::demo_summary_line(&r);
    println!("{line}");
    assert!(
        line.starts_with("demo: coarse Dice 0.") || line.starts_with("demo: coarse Dice 1."),
        "{line}"
    );
    assert!(r.mean_coarse_dice().is_finite() && r.mean_refined_dice().unwrap().is_finite());
    let out = f.root.join("pair");
    let res = json(&out.join("PHANTOM/test_result.json"));
    assert_eq!(res["n_samples"].as_u64().unwrap() as usize, n);
    for part in ["coarse", "refined"] {
        for m in [
            "dice",
            "iou",
            "precision",
            "recall",
            "accuracy",
            "specificity",
            "hd95",
            "assd",
        ] {
            let v = res[part][m]["mean"]
                .as_f64()
                .unwrap_or_else(|| panic!("{part}.{m} missing/not finite: {res}"));
            assert!(v.is_finite() && v >= 0.0, "{part}.{m} = {v}");
        }
    }
    let (h, rows) = read_csv(&out.join("PHANTOM/per_case.csv"));
    assert_eq!(rows.len(), n);
    assert!(h.contains(&"refined_dice".to_string()) && h.contains(&"delta_dice".to_string()));
    let s = json(&out.join("summary.json"));
    assert!(s["all"]["coarse"]["dice"]["mean"].is_number());
    assert!(s["average"]["refined"]["dice"]["mean"].is_number());
    let (_, srows) = read_csv(&out.join("summary.csv"));
    assert_eq!(
        srows.iter().map(|r| r[0].as_str()).collect::<Vec<_>>(),
        vec!["PHANTOM", "AVERAGE", "ALL"]
    );
    let png = decode_png(&out.join("summary.png")).unwrap();
    assert_eq!((png.width(), png.height()), (1800, 600));
    let vis: Vec<PathBuf> = std::fs::read_dir(out.join("PHANTOM/visualizations"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(vis.len(), 2, "{vis:?}");
    for v in &vis {
        let name = v.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            name.starts_with("sample_") && name.contains("_imp") && name.ends_with(".png"),
            "{name}"
        );
        decode_png(v).unwrap();
    }
    // Keep one overlay and the summary for a human look.
    if let Ok(d) = std::env::var("EVAL_TEST_KEEP") {
        let d = PathBuf::from(d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(out.join("summary.png"), d.join("summary.png")).unwrap();
        std::fs::copy(&vis[0], d.join("overlay.png")).unwrap();
        // tiny random models for CLI smoke runs
        std::fs::copy(&f.transunet, d.join("transunet_tiny.safetensors")).unwrap();
        std::fs::copy(&f.sam, d.join("sam_tiny.safetensors")).unwrap();
    }

    // --- TransUNet only: no refined metrics anywhere
    let r = evaluate::run(&eval_opts(
        &f,
        ModelSource::TransUnetOnly {
            transunet: f.transunet.clone(),
        },
        "coarse",
    ))
    .unwrap();
    assert!(r.refined.is_none() && r.mean_refined_dice().is_none());
    let out = f.root.join("coarse");
    let res = json(&out.join("PHANTOM/test_result.json"));
    assert!(res["refined"].is_null());
    let (h, rows) = read_csv(&out.join("PHANTOM/per_case.csv"));
    assert_eq!(rows.len(), n);
    assert!(!h.iter().any(|c| c.starts_with("refined_")), "{h:?}");
    assert!(evaluate::demo_summary_line(&r).ends_with("refined Dice n/a"));
    assert!(out.join("summary.png").is_file() && out.join("summary.csv").is_file());

    // --- Phase 3 file assembled from the two parts (+ sidecar with refiner settings)
    let mut p3: Vec<(String, Tensor)> = transunet_tensors(false)
        .into_iter()
        .map(|(k, t)| (format!("transunet.{k}"), t))
        .collect();
    let sam_t = random_weights(&Config::tiny().model.sam, 11, &Device::Cpu).unwrap();
    p3.extend(sam_t.into_iter().map(|(k, t)| (format!("sam.{k}"), t)));
    p3.push((
        "__optim__.sam.exp_avg.x".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    ));
    let p3_path = f.root.join("p3/best.safetensors");
    save_safetensors_atomic(&p3_path, &p3).unwrap();
    let sidecar = serde_json::json!({"kind": "phase3", "config": {"refiner": {"mask_prompt_style": "gaussian", "add_negative_point": false}}});
    std::fs::write(f.root.join("p3/best.json"), sidecar.to_string()).unwrap();
    let mut o = eval_opts(
        &f,
        ModelSource::Phase3 {
            checkpoint: p3_path.clone(),
        },
        "p3",
    );
    o.split = EvalSplit::Val;
    let r = evaluate::run(&o).unwrap();
    assert!(r.mean_refined_dice().unwrap().is_finite());
    let res = json(&f.root.join("p3/PHANTOM/val_fold0_result.json"));
    assert_eq!(res["model"]["refiner"]["mask_prompt_style"], "gaussian");
    assert_eq!(res["model"]["refiner"]["add_negative_point"], false);
    // default output folder name
    let mut o2 = o.clone();
    o2.output_dir = None;
    assert_eq!(
        o2.resolved_output_dir(),
        PathBuf::from("./results/val_fold0_evaluation")
    );
    o2.split = EvalSplit::Test;
    o2.fold = None;
    assert_eq!(
        o2.resolved_output_dir(),
        PathBuf::from("./results/test_evaluation")
    );
    // A Phase 1 file given as --checkpoint evaluates the coarse path alone, with the same coarse metrics as
    // --transunet-only.
    let r1 = evaluate::run(&eval_opts(
        &f,
        ModelSource::Phase3 {
            checkpoint: f.transunet.clone(),
        },
        "p1_as_checkpoint",
    ))
    .unwrap();
    assert!(r1.refined.is_none());
    assert!(evaluate::console_table(&r1).contains("coarse (TransUNet) path only"));
    let r2 = evaluate::run(&eval_opts(
        &f,
        ModelSource::TransUnetOnly {
            transunet: f.transunet.clone(),
        },
        "p1_only",
    ))
    .unwrap();
    assert_eq!(r1.mean_coarse_dice(), r2.mean_coarse_dice());
    let e = evaluate::run(&eval_opts(
        &f,
        ModelSource::Phase3 {
            checkpoint: f.root.join("missing.safetensors"),
        },
        "bad",
    ))
    .unwrap_err();
    assert!(e.to_string().contains("missing.safetensors"), "{e}");
}

fn write_png(path: &Path, data: &[u8], w: usize, h: usize, c: image::ExtendedColorType) {
    std::fs::write(path, encode_png(data, w, h, c).unwrap()).unwrap();
}

#[test]
fn infer_odd_sizes_and_modes_and_ensemble() {
    let f = fixture();
    let inp = f.root.join("scans");
    std::fs::create_dir_all(&inp).unwrap();
    // RGBA 8-bit 77×53, grey 8-bit 101×61, grey 16-bit 64×97
    let rgba: Vec<u8> = (0..77 * 53 * 4).map(|i| ((i * 37) % 251) as u8).collect();
    write_png(
        &inp.join("a_rgba.png"),
        &rgba,
        77,
        53,
        image::ExtendedColorType::Rgba8,
    );
    let grey: Vec<u8> = (0..101 * 61).map(|i| ((i * 13) % 256) as u8).collect();
    write_png(
        &inp.join("b_grey.png"),
        &grey,
        101,
        61,
        image::ExtendedColorType::L8,
    );
    let g16: Vec<u8> = (0..64 * 97)
        .flat_map(|i: usize| (((i * 977) % 65536) as u16).to_be_bytes())
        .collect();
    write_png(
        &inp.join("c_grey16.png"),
        &g16,
        64,
        97,
        image::ExtendedColorType::L16,
    );
    // grey+alpha 137×211 (odd), JPEG (RGB) 211×137, 1×1-pixel-wide edge case 3×131
    let la: Vec<u8> = (0..137 * 211 * 2).map(|i| ((i * 7) % 253) as u8).collect();
    write_png(
        &inp.join("d_la.png"),
        &la,
        137,
        211,
        image::ExtendedColorType::La8,
    );
    let rgb: Vec<u8> = (0..211 * 137 * 3).map(|i| ((i * 11) % 256) as u8).collect();
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 90)
        .encode(&rgb, 211, 137, image::ExtendedColorType::Rgb8)
        .unwrap();
    std::fs::write(inp.join("e_photo.jpg"), jpg).unwrap();
    let thin: Vec<u8> = (0..3 * 131).map(|i| (i % 256) as u8).collect();
    write_png(
        &inp.join("f_thin.png"),
        &thin,
        3,
        131,
        image::ExtendedColorType::L8,
    );
    let sizes = [
        ("a_rgba", 77u32, 53u32),
        ("b_grey", 101, 61),
        ("c_grey16", 64, 97),
        ("d_la", 137, 211),
        ("e_photo", 211, 137),
        ("f_thin", 3, 131),
    ];

    let opts = InferOptions {
        source: ModelSource::Pair {
            transunet: f.transunet.clone(),
            sam: f.sam.clone(),
        },
        config: "tiny".into(),
        input: inp.clone(),
        output: f.root.join("pred"),
        mode: InferMode::Full,
        batch_size: 2,
        save_prob: true,
        ..Default::default()
    };
    let r = infer::run(&opts).unwrap();
    assert_eq!(r.rows.len(), sizes.len());
    for (name, w, h) in sizes {
        for suffix in ["coarse", "refined"] {
            let img = decode_png(&opts.output.join(format!("{name}_{suffix}.png"))).unwrap();
            assert_eq!((img.width(), img.height()), (w, h), "{name}_{suffix}");
            let l = img.to_luma8();
            assert!(
                l.as_raw().iter().all(|&v| v == 0 || v == 255),
                "{name}_{suffix} not binary"
            );
        }
        let ov = decode_png(&opts.output.join(format!("{name}_overlay.png"))).unwrap();
        assert_eq!((ov.width(), ov.height()), (w, h));
        let (shape, prob) = read_npy(&opts.output.join(format!("{name}_prob.npy")));
        assert_eq!(shape, (h as usize, w as usize), "{name}_prob.npy");
        assert!(prob.iter().all(|v| (0.0..=1.0).contains(v)));
        // the refined mask is the thresholded probability
        let l = decode_png(&opts.output.join(format!("{name}_refined.png")))
            .unwrap()
            .to_luma8();
        for (m, p) in l.as_raw().iter().zip(&prob) {
            assert_eq!(*m == 255, *p > 0.5, "{name}: mask and probability disagree");
        }
    }
    let (hdr, rows) = read_csv(&opts.output.join("predictions.csv"));
    assert_eq!(
        hdr,
        [
            "name",
            "width",
            "height",
            "coarse_area_px",
            "refined_area_px",
            "mean_refined_prob",
            "iou_coarse_refined",
            "n_components",
            "rejected",
            "fused",
            "runtime_ms"
        ]
    );
    assert_eq!(rows.len(), sizes.len());
    assert_eq!(rows[0][1..3], ["77".to_string(), "53".to_string()]);
    assert_eq!(rows[3][1..3], ["137".to_string(), "211".to_string()]);

    // transunet mode: coarse only
    let o2 = InferOptions {
        source: ModelSource::TransUnetOnly {
            transunet: f.transunet.clone(),
        },
        output: f.root.join("pred_coarse"),
        mode: InferMode::Transunet,
        ..opts.clone()
    };
    let r2 = infer::run(&o2).unwrap();
    assert!(r2.rows.iter().all(|r| r.refined_area_px.is_none()));
    assert!(!o2.output.join("a_rgba_refined.png").exists());
    assert!(o2.output.join("a_rgba_coarse.png").is_file());

    // --- ensemble of two different Phase 1 models + shared SAM = mean of probabilities
    let ens_dir = f.root.join("ens");
    std::fs::create_dir_all(ens_dir.join("fold_0")).unwrap();
    std::fs::create_dir_all(ens_dir.join("fold_1")).unwrap();
    std::fs::copy(&f.transunet, ens_dir.join("fold_0/best.safetensors")).unwrap();
    std::fs::copy(&f.transunet_b, ens_dir.join("fold_1/best.safetensors")).unwrap();
    let cfg = Config::tiny();
    let dev = Device::Cpu;
    let pattern = format!("{}/fold_{{k}}/best.safetensors", ens_dir.display());
    let ens = EvalModel::load(&two_folds(&pattern, &f), &cfg, &dev).unwrap();
    let a = EvalModel::load(
        &ModelSource::Pair {
            transunet: f.transunet.clone(),
            sam: f.sam.clone(),
        },
        &cfg,
        &dev,
    )
    .unwrap();
    let b = EvalModel::load(
        &ModelSource::Pair {
            transunet: f.transunet_b.clone(),
            sam: f.sam.clone(),
        },
        &cfg,
        &dev,
    )
    .unwrap();
    let s = cfg.model.transunet.img_size;
    let x: Vec<f32> = (0..s * s).map(|i| ((i * 31) % 97) as f32 / 96.0).collect();
    let x = Tensor::from_vec(x, (1, 1, s, s), &dev).unwrap();
    let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (pe, pa, pb) = (
        ens.predict(&x, false).unwrap(),
        a.predict(&x, false).unwrap(),
        b.predict(&x, false).unwrap(),
    );
    for (which, e, a, b) in [
        ("coarse", v(&pe.coarse), v(&pa.coarse), v(&pb.coarse)),
        (
            "refined",
            v(&pe.refined.unwrap()),
            v(&pa.refined.unwrap()),
            v(&pb.refined.unwrap()),
        ),
    ] {
        let max_diff = |p: &[f32], q: &[f32]| {
            p.iter()
                .zip(q)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max)
        };
        // The coarse maps differ by construction (negated head); the refined maps of a random SAM usually do too,
        // but a random TransUNet can leave both prompts degenerate, so only the coarse difference is required.
        let differ = max_diff(&a, &b) > 1e-3;
        assert!(
            differ || which == "refined",
            "{which}: the two models should differ"
        );
        if differ {
            assert!(
                max_diff(&e, &a) > 1e-4 && max_diff(&e, &b) > 1e-4,
                "{which}: ensemble equals a single model"
            );
        }
        let mean: Vec<f32> = a.iter().zip(&b).map(|(x, y)| (x + y) / 2.0).collect();
        assert!(
            max_diff(&e, &mean) < 1e-6,
            "{which}: ensemble is not the mean of probabilities"
        );
    }
    // ensemble through infer as well
    let o3 = InferOptions {
        source: two_folds(&pattern, &f),
        output: f.root.join("pred_ens"),
        ..opts.clone()
    };
    assert_eq!(infer::run(&o3).unwrap().rows.len(), sizes.len());
}

/// Folds 0 and 1 of `pattern` (Phase 1 files) with the fixture's shared SAM.
fn two_folds(pattern: &str, f: &Fixture) -> ModelSource {
    ModelSource::Ensemble {
        pattern: pattern.to_string(),
        folds: vec![0, 1],
        sam: Some(f.sam.clone()),
        transunet_only: false,
    }
}

/// `(shape, data)` of a 2-D little-endian f32 `.npy`.
fn read_npy(path: &Path) -> ((usize, usize), Vec<f32>) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
    let hl = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = std::str::from_utf8(&b[10..10 + hl]).unwrap();
    assert!(header.contains("'descr': '<f4'"), "{header}");
    let shape = header.split("'shape': (").nth(1).unwrap();
    let shape = shape.split(')').next().unwrap();
    let dims: Vec<usize> = shape
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().unwrap())
        .collect();
    let data: Vec<f32> = b[10 + hl..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(data.len(), dims[0] * dims[1]);
    ((dims[0], dims[1]), data)
}

fn max_abs_diff(p: &[f32], q: &[f32]) -> f32 {
    assert_eq!(p.len(), q.len());
    p.iter()
        .zip(q)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// Fold ensembles through the whole `infer` path, checked against the single-fold outputs (mean of probabilities,
/// §13.3), `coarse-then-refine`, and clear errors for unreadable inputs.
#[test]
fn infer_ensemble_equals_mean_of_folds_and_errors_name_files() {
    let f = fixture();
    let inp = f.root.join("scans");
    std::fs::create_dir_all(&inp).unwrap();
    let grey: Vec<u8> = (0..137 * 211)
        .map(|i| (((i % 137) as f32 / 137.0 * 180.0) as usize + (i * 13) % 60) as u8)
        .collect();
    write_png(
        &inp.join("scan.png"),
        &grey,
        137,
        211,
        image::ExtendedColorType::L8,
    );
    let ens_dir = f.root.join("ens");
    for (k, src) in [(0, &f.transunet), (1, &f.transunet_b)] {
        std::fs::create_dir_all(ens_dir.join(format!("fold_{k}"))).unwrap();
        std::fs::copy(src, ens_dir.join(format!("fold_{k}/best.safetensors"))).unwrap();
    }
    let pattern = format!("{}/fold_{{k}}/best.safetensors", ens_dir.display());
    let base = InferOptions {
        config: "tiny".into(),
        input: inp.clone(),
        save_prob: true,
        ..Default::default()
    };
    let prob = |source: ModelSource, mode: InferMode, out: &str| -> Vec<f32> {
        let o = InferOptions {
            source,
            mode,
            output: f.root.join(out),
            ..base.clone()
        };
        infer::run(&o).unwrap();
        read_npy(&o.output.join("scan_prob.npy")).1
    };
    for mode in [InferMode::Transunet, InferMode::Full] {
        let tag = format!("{mode:?}");
        let a = prob(
            ModelSource::Pair {
                transunet: f.transunet.clone(),
                sam: f.sam.clone(),
            },
            mode,
            &format!("a_{tag}"),
        );
        let b = prob(
            ModelSource::Pair {
                transunet: f.transunet_b.clone(),
                sam: f.sam.clone(),
            },
            mode,
            &format!("b_{tag}"),
        );
        let e = prob(two_folds(&pattern, &f), mode, &format!("e_{tag}"));
        // independent definition: the element-wise mean of the two single-fold probabilities (bilinear resampling
        // to the original size is linear, so the mean commutes with it)
        let mean: Vec<f32> = a.iter().zip(&b).map(|(x, y)| 0.5 * (x + y)).collect();
        assert!(
            max_abs_diff(&e, &mean) < 1e-5,
            "{tag}: ensemble ≠ mean of folds"
        );
        let ab = max_abs_diff(&a, &b);
        if mode == InferMode::Transunet {
            assert!(ab > 1e-3, "the two folds should differ (negated head)");
        }
        if ab > 1e-3 {
            assert!(
                max_abs_diff(&e, &a) > 1e-4 && max_abs_diff(&e, &b) > 1e-4,
                "{tag}: ensemble equals a single fold"
            );
        }
    }

    // coarse-then-refine: coarse = mean of the fold TransUNet probabilities; refined = SAM once on that mean
    use ultrarefiner::eval::model::{EnsembleMode, LoadOptions, Member};
    let cfg = Config::tiny();
    let dev = Device::Cpu;
    let ctr = EvalModel::load_with(
        &two_folds(&pattern, &f),
        &cfg,
        &dev,
        &LoadOptions {
            ensemble_mode: EnsembleMode::CoarseThenRefine,
            ..Default::default()
        },
    )
    .unwrap();
    let single = |t: &PathBuf| {
        EvalModel::load(
            &ModelSource::Pair {
                transunet: t.clone(),
                sam: f.sam.clone(),
            },
            &cfg,
            &dev,
        )
        .unwrap()
    };
    let (ma, mb) = (single(&f.transunet), single(&f.transunet_b));
    let s = cfg.model.transunet.img_size;
    let x: Vec<f32> = (0..s * s).map(|i| ((i * 31) % 97) as f32 / 96.0).collect();
    let x = Tensor::from_vec(x, (1, 1, s, s), &dev).unwrap();
    let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let pc = ctr.predict(&x, false).unwrap();
    let (pa, pb) = (
        ma.predict(&x, false).unwrap(),
        mb.predict(&x, false).unwrap(),
    );
    let mean_c: Vec<f32> = v(&pa.coarse)
        .iter()
        .zip(v(&pb.coarse))
        .map(|(p, q)| 0.5 * (p + q))
        .collect();
    assert!(max_abs_diff(&v(&pc.coarse), &mean_c) < 1e-6);
    let Member::Full(u) = &ma.members[0] else {
        panic!("pair model must refine")
    };
    let mean_t = Tensor::from_vec(mean_c, (1, s, s), &dev).unwrap();
    let (_, _, _, refined_s) = u.refine_coarse(&x, &mean_t, &Default::default()).unwrap();
    let want = v(&ultrarefiner::nn::sigmoid(&refined_s).unwrap());
    assert!(max_abs_diff(&v(&pc.refined.unwrap()), &want) < 1e-5);
    // coarse-then-refine needs Phase 1 folds + a shared SAM
    let e = EvalModel::load_with(
        &ModelSource::Pair {
            transunet: f.transunet.clone(),
            sam: f.sam.clone(),
        },
        &cfg,
        &dev,
        &LoadOptions {
            ensemble_mode: EnsembleMode::CoarseThenRefine,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("coarse-then-refine"), "{e}");

    // unreadable inputs: the error names the file
    for (file, bytes) in [
        ("broken.png", b"\x89PNG\r\n\x1a\nnot really".to_vec()),
        ("broken.jpg", b"garbage".to_vec()),
        ("empty.png", Vec::new()),
    ] {
        let d = f.root.join(format!("bad_{file}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(file), bytes).unwrap();
        let o = InferOptions {
            source: ModelSource::TransUnetOnly {
                transunet: f.transunet.clone(),
            },
            mode: InferMode::Transunet,
            input: d.clone(),
            output: f.root.join(format!("bad_out_{file}")),
            ..base.clone()
        };
        let e = infer::run(&o).unwrap_err().to_string();
        assert!(e.contains(file), "error does not name {file}: {e}");
    }
    // a folder without images
    let d = f.root.join("no_images");
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("notes.txt"), "x").unwrap();
    let o = InferOptions {
        source: ModelSource::TransUnetOnly {
            transunet: f.transunet.clone(),
        },
        mode: InferMode::Transunet,
        input: d,
        output: f.root.join("none_out"),
        ..base.clone()
    };
    assert!(infer::run(&o)
        .unwrap_err()
        .to_string()
        .contains("no images"));
}

/// `--eval-size original`, `--spacing-csv` and §13.4 post-processing through `evaluate`, with one case recomputed
/// independently.
#[test]
fn evaluate_original_size_spacing_and_post_processing() {
    use ultrarefiner::data::dataset::{SegDataset, Split};
    use ultrarefiner::eval::evaluate::EvalSize;
    use ultrarefiner::eval::infer::prob_to_original;
    use ultrarefiner::eval::metrics::{binarize, image_metrics};
    use ultrarefiner::eval::postprocess::PostProcess;
    let f = fixture();
    let n = n_test(&f);
    let ds = SegDataset::open(&f.processed, &["PHANTOM"], Split::Test, 64).unwrap();
    // spacing for every test image: s_x = 0.1, s_y = 0.2 mm
    let mut csv = String::from("dataset,name,spacing_x_mm,spacing_y_mm\n");
    for e in ds.entries() {
        csv.push_str(&format!("PHANTOM,{},0.1,0.2\n", e.name));
    }
    let spacing = f.root.join("spacing.csv");
    std::fs::write(&spacing, csv).unwrap();
    let source = ModelSource::Pair {
        transunet: f.transunet.clone(),
        sam: f.sam.clone(),
    };
    let mut o = eval_opts(&f, source.clone(), "orig");
    o.eval_size = EvalSize::Original;
    o.spacing_csv = Some(spacing);
    o.post = PostProcess {
        use_rejection_rules: true,
        use_boundary_fusion: true,
        ..Default::default()
    };
    o.visualize = true;
    o.num_visualize = 1;
    let r = evaluate::run(&o).unwrap();
    let out = f.root.join("orig");
    let res = json(&out.join("PHANTOM/test_result.json"));
    assert_eq!(res["args"]["eval_size"], "original");
    assert!(res["coarse"]["hd95_mm"]["mean"].is_number(), "{res}");
    let (h, rows) = read_csv(&out.join("PHANTOM/per_case.csv"));
    assert_eq!(rows.len(), n);
    for c in ["coarse_hd95_mm", "refined_assd_mm", "rejected", "fused"] {
        assert!(h.contains(&c.to_string()), "{c} missing in {h:?}");
    }
    let col = |name: &str| h.iter().position(|c| c == name).unwrap();
    let n_rej: usize = rows
        .iter()
        .map(|r| r[col("rejected")].parse::<usize>().unwrap())
        .sum();
    let n_fus: usize = rows
        .iter()
        .map(|r| r[col("fused")].parse::<usize>().unwrap())
        .sum();
    assert_eq!(
        res["stabilization"]["rejected"].as_u64().unwrap() as usize,
        n_rej
    );
    assert_eq!(
        res["stabilization"]["fused"].as_u64().unwrap() as usize,
        n_fus
    );
    assert_eq!(n_rej + n_fus, n, "every case is either rejected or fused");
    assert_eq!(r.datasets[0].n_rejected, n_rej);

    // independent recomputation of the first case's coarse metrics at the original size
    let model = EvalModel::load(&source, &Config::tiny(), &Device::Cpu).unwrap();
    let s = model.img_size;
    let ds = SegDataset::open(&f.processed, &["PHANTOM"], Split::Test, s).unwrap();
    let idx: usize = rows[0][col("index")].parse().unwrap();
    let sample = ds.get_eval(idx).unwrap();
    let x = Tensor::from_vec(sample.image.clone(), (1, 1, s, s), &Device::Cpu).unwrap();
    let p: Vec<f32> = model
        .predict(&x, false)
        .unwrap()
        .coarse
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let (h0, w0) = sample.original_size;
    let pm = binarize(&prob_to_original(&p, s, h0, w0), 0.5);
    let gt_img = decode_png(&ds.entries()[idx].mask.clone().unwrap())
        .unwrap()
        .to_luma8();
    let gt: Vec<bool> = gt_img.as_raw().iter().map(|&v| v > 127).collect();
    assert_eq!(gt.len(), h0 * w0);
    let m = image_metrics(&pm, &gt, h0, w0, Some((0.2, 0.1))).unwrap();
    let got = |c: &str| rows[0][col(c)].parse::<f64>().unwrap();
    assert!((got("coarse_dice") - m.dice).abs() < 1e-6);
    assert!((got("coarse_hd95") - m.hd95).abs() < 1e-5);
    assert!((got("coarse_hd95_mm") - m.hd95_mm.unwrap()).abs() < 1e-5);
    if m.one_empty() {
        let diag = ((h0 * h0 + w0 * w0) as f64).sqrt();
        assert!(
            (m.hd95 - diag).abs() < 1e-9,
            "one-empty penalty at the original grid"
        );
    }
}
