//! `prepare datasets` / `verify` (SPEC §3.2–§3.5, §3.10, §3.11; §17.1 real-data test) on the shipped BUSI sample,
//! on synthetic folders mimicking each raw layout (every mask colour type), on the phantom, and on bad inputs.
use image::ExtendedColorType as C;
use std::path::{Path, PathBuf};
use std::time::Instant;
use ultrarefiner::data::phantom::{generate, PhantomOptions};
use ultrarefiner::data::pixels::{
    decode_png, encode_png, encode_png_indexed, to_binary_mask, to_gray,
};
use ultrarefiner::data::prepare::{prepare_datasets, DatasetStatus, PrepareOptions};
use ultrarefiner::data::splits::SplitsFile;
use ultrarefiner::data::verify::verify;
use ultrarefiner::data::DatasetKind;
use ultrarefiner::testing::shared_dir;

fn opts(raw: &Path, out: &Path, ds: &[DatasetKind]) -> PrepareOptions {
    PrepareOptions {
        raw_root: raw.into(),
        output_root: out.into(),
        datasets: ds.to_vec(),
        ..Default::default()
    }
}

#[test]
fn busi_sample_real_data() {
    let raw = shared_dir().unwrap().join("data");
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("processed");
    let t0 = Instant::now();
    let r = prepare_datasets(&opts(&raw, &out, &[DatasetKind::Busi])).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    println!("{r}\nprepare of the BUSI sample: {secs:.2} s");
    let d = r.dataset(DatasetKind::Busi).unwrap();
    // Images with more than one mask file in the sample.
    let mut multi = 0;
    for class in ["benign", "malignant"] {
        for e in std::fs::read_dir(raw.join("BUSI").join(class)).unwrap() {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            if n.ends_with("_mask_1.png") {
                multi += 1;
            }
        }
    }
    assert!(multi >= 1);
    assert_eq!(d.found, 83);
    assert_eq!(d.kept, 75);
    assert_eq!(d.excluded_normal, 8);
    assert_eq!(d.excluded_blank, 0);
    assert_eq!(d.merged, multi);
    assert_eq!((d.train, d.test), (60, 15));
    assert_eq!(d.fold_val_sizes, vec![12, 12, 12, 12, 12]);
    assert!(r.verify_ok(), "{r}");
    assert!(verify(&out).unwrap().is_ok());

    // Names, OR-merge and grey conversion of one multi-mask sample.
    let sp = SplitsFile::read(&out.join("BUSI/splits.json")).unwrap();
    assert!(sp
        .train
        .iter()
        .chain(&sp.test)
        .any(|n| n == "benign_benign_1"));
    assert_eq!(sp.excluded.normal.len(), 8);
    for class in ["benign", "malignant"] {
        for e in std::fs::read_dir(raw.join("BUSI").join(class)).unwrap() {
            let p = e.unwrap().path();
            let fname = p.file_name().unwrap().to_string_lossy().into_owned();
            let Some(base) = fname.strip_suffix("_mask_1.png") else {
                continue;
            };
            let name = format!("{class}_{}", base.replace(' ', "_").replace(['(', ')'], ""));
            let part = if sp.train.contains(&name) {
                "train"
            } else {
                "test"
            };
            let got =
                to_gray(&decode_png(&out.join(format!("BUSI/{part}/masks/{name}.png"))).unwrap())
                    .unwrap();
            let m0 =
                to_binary_mask(&decode_png(&p.with_file_name(format!("{base}_mask.png"))).unwrap());
            let m1 = to_binary_mask(&decode_png(&p).unwrap());
            let want: Vec<u8> = m0
                .data
                .iter()
                .zip(&m1.data)
                .map(|(a, b)| if a | b != 0 { 255 } else { 0 })
                .collect();
            assert_eq!(
                got.data, want,
                "{name}: merged mask is not the OR of its masks"
            );
            let img =
                to_gray(&decode_png(&out.join(format!("BUSI/{part}/images/{name}.png"))).unwrap())
                    .unwrap();
            let src =
                to_gray(&decode_png(&p.with_file_name(format!("{base}.png"))).unwrap()).unwrap();
            assert_eq!(img, src);
        }
    }
    assert!(out.join("BUSI/split_info.json").is_file());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["datasets"]["BUSI"]["kept"], 75);

    // A second run finds the dataset up to date; --overwrite re-processes identically.
    let r2 = prepare_datasets(&opts(&raw, &out, &[DatasetKind::Busi])).unwrap();
    assert_eq!(r2.datasets[0].status, DatasetStatus::UpToDate);
    let mut o = opts(&raw, &out, &[DatasetKind::Busi]);
    o.overwrite = true;
    let r3 = prepare_datasets(&o).unwrap();
    assert_eq!(r3.datasets[0].status, DatasetStatus::Processed);
    assert_eq!(SplitsFile::read(&out.join("BUSI/splits.json")).unwrap(), sp);
    assert!(
        secs < 10.0,
        "prepare of the BUSI sample took {secs:.1} s (target < 10 s)"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Synthetic raw layouts.

const W: usize = 24;
const H: usize = 16;

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// An RGB image with grey content and index-dependent texture.
fn image_png(k: usize) -> Vec<u8> {
    let px: Vec<u8> = (0..W * H)
        .flat_map(|i| {
            let v = ((i * 7 + k * 31) % 251) as u8;
            [v, v, v]
        })
        .collect();
    encode_png(&px, W, H, C::Rgb8).unwrap()
}

/// The binary foreground used for sample `k` (a small rectangle; empty when `blank`).
fn fg(k: usize, blank: bool) -> Vec<bool> {
    (0..W * H)
        .map(|i| {
            !blank && (i / W) >= 3 + k % 4 && (i / W) < 9 && (i % W) >= 4 && (i % W) < 12 + k % 5
        })
        .collect()
}

/// A mask PNG of `mode` for foreground `f`. Foreground colours are chosen so that their 8-bit luma is 0 where the
/// mode allows it (the compatibility note of SPEC §3.3).
fn mask_png(mode: &str, f: &[bool]) -> Vec<u8> {
    match mode {
        "L8" => encode_png(
            &f.iter().map(|&b| b as u8 * 255).collect::<Vec<_>>(),
            W,
            H,
            C::L8,
        )
        .unwrap(),
        "L1" => encode_png_indexed(
            W,
            H,
            1,
            None,
            &f.iter().map(|&b| b as u8).collect::<Vec<_>>(),
        )
        .unwrap(),
        "RGB" => encode_png(
            &f.iter().flat_map(|&b| [0, 0, b as u8]).collect::<Vec<_>>(),
            W,
            H,
            C::Rgb8,
        )
        .unwrap(),
        "RGBA" => encode_png(
            &f.iter()
                .flat_map(|&b| [b as u8 * 255, 0, 0, 255])
                .collect::<Vec<_>>(),
            W,
            H,
            C::Rgba8,
        )
        .unwrap(),
        "LA" => encode_png(
            &f.iter()
                .flat_map(|&b| [b as u8 * 200, 255])
                .collect::<Vec<_>>(),
            W,
            H,
            C::La8,
        )
        .unwrap(),
        "PAL" => encode_png_indexed(
            W,
            H,
            2,
            Some(&[[0, 0, 0], [0, 1, 0], [9, 9, 9], [7, 0, 0]]),
            &f.iter().map(|&b| b as u8).collect::<Vec<_>>(),
        )
        .unwrap(),
        "L16" => {
            let px: Vec<u8> = f
                .iter()
                .flat_map(|&b| (b as u16 * 100).to_ne_bytes())
                .collect();
            encode_png(&px, W, H, C::L16).unwrap()
        }
        "RGB16" => {
            let px: Vec<u8> = f
                .iter()
                .flat_map(|&b| {
                    [0u16, 0, b as u16]
                        .into_iter()
                        .flat_map(|v| v.to_ne_bytes())
                })
                .collect();
            encode_png(&px, W, H, C::Rgb16).unwrap()
        }
        m => panic!("unknown mode {m}"),
    }
}

const MODES: [&str; 8] = ["L8", "L1", "RGB", "RGBA", "LA", "PAL", "L16", "RGB16"];

/// Writes `n` samples (+1 blank) of a two-folder layout: `<img_dir>/<stem>.png`, `<mask_dir>/<mstem>.png`.
fn pair_layout(
    root: &Path,
    img_dir: &str,
    mask_dir: &str,
    n: usize,
    stem: impl Fn(usize) -> String,
    mstem: impl Fn(usize) -> String,
) {
    for k in 0..=n {
        let blank = k == n;
        write(
            &root.join(img_dir).join(format!("{}.png", stem(k))),
            &image_png(k),
        );
        write(
            &root.join(mask_dir).join(format!("{}.png", mstem(k))),
            &mask_png(MODES[k % MODES.len()], &fg(k, blank)),
        );
    }
}

fn check_dataset(out: &Path, ds: &str, expect: &[(String, usize)], test_only: bool) {
    let sp = SplitsFile::read(&out.join(ds).join("splits.json")).unwrap();
    let all: Vec<&String> = sp.train.iter().chain(&sp.test).collect();
    assert_eq!(all.len(), expect.len(), "{ds}: {all:?}");
    if test_only {
        assert!(sp.train.is_empty() && sp.folds.is_empty());
    }
    for (name, k) in expect {
        let part = if sp.train.contains(name) {
            "train"
        } else {
            "test"
        };
        let m = to_gray(
            &decode_png(
                &out.join(ds)
                    .join(part)
                    .join("masks")
                    .join(format!("{name}.png")),
            )
            .unwrap(),
        )
        .unwrap();
        let want: Vec<u8> = fg(*k, false).iter().map(|&b| b as u8 * 255).collect();
        assert_eq!(
            m.data,
            want,
            "{ds}/{name}: mask (mode {})",
            MODES[k % MODES.len()]
        );
        let img = to_gray(
            &decode_png(
                &out.join(ds)
                    .join(part)
                    .join("images")
                    .join(format!("{name}.png")),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(
            img.data[1],
            ((7 + k * 31) % 251) as u8,
            "{ds}/{name}: grey conversion"
        );
    }
    assert_eq!(
        sp.excluded.blank.len(),
        1,
        "{ds}: one blank sample excluded"
    );
}

#[test]
fn every_raw_layout_and_mask_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    let out = tmp.path().join("processed");
    let n = 10;
    // BUSI: benign/malignant/normal, one multi-mask sample.
    for k in 0..=n {
        let class = if k % 2 == 0 { "benign" } else { "malignant" };
        let base = format!("{class} ({k})");
        let d = raw.join("BUSI").join(class);
        write(&d.join(format!("{base}.png")), &image_png(k));
        if k == 3 {
            // Split into two masks, merged by OR.
            let f = fg(k, false);
            let (a, b): (Vec<bool>, Vec<bool>) = f
                .iter()
                .enumerate()
                .map(|(i, &v)| (v && i % W < 8, v && i % W >= 8))
                .unzip();
            write(&d.join(format!("{base}_mask.png")), &mask_png("RGBA", &a));
            write(&d.join(format!("{base}_mask_1.png")), &mask_png("PAL", &b));
        } else {
            write(
                &d.join(format!("{base}_mask.png")),
                &mask_png(MODES[k % MODES.len()], &fg(k, k == n)),
            );
        }
    }
    write(&raw.join("BUSI/normal/normal (1).png"), &image_png(0));
    write(
        &raw.join("BUSI/normal/normal (1)_mask.png"),
        &mask_png("L8", &fg(0, true)),
    );
    pair_layout(
        &raw.join("BUSBRA"),
        "Images",
        "Masks",
        n,
        |k| format!("bus_{k:04}"),
        |k| format!("mask_{k:04}"),
    );
    pair_layout(
        &raw.join("BUS"),
        "original",
        "GT",
        n,
        |k| format!("{k:06}"),
        |k| format!("{k:06}"),
    );
    pair_layout(
        &raw.join("UDIAT"),
        "original",
        "GT",
        n,
        |k| format!("{k:06}"),
        |k| format!("{k:06}"),
    );
    pair_layout(
        &raw.join("BUS_UC/All"),
        "images",
        "masks",
        n,
        |k| format!("{k:03}"),
        |k| format!("{k:03}"),
    );
    pair_layout(
        &raw.join("BUS_UCLM"),
        "images",
        "masks",
        n,
        |k| format!("case{k}"),
        |k| format!("case{k}"),
    );

    let r = prepare_datasets(&opts(&raw, &out, &[])).unwrap();
    println!("{r}");
    assert!(r.verify_ok(), "{r}");
    assert_eq!(r.datasets.len(), 6);
    let names = |f: &dyn Fn(usize) -> String| (0..n).map(|k| (f(k), k)).collect::<Vec<_>>();
    let busi: Vec<(String, usize)> = (0..n)
        .map(|k| {
            (
                format!(
                    "{}_{}_{k}",
                    if k % 2 == 0 { "benign" } else { "malignant" },
                    if k % 2 == 0 { "benign" } else { "malignant" }
                ),
                k,
            )
        })
        .collect();
    check_dataset(&out, "BUSI", &busi, false);
    check_dataset(&out, "BUSBRA", &names(&|k| format!("busbra_{k:04}")), false);
    check_dataset(&out, "BUS", &names(&|k| format!("bus_{k:06}")), false);
    check_dataset(&out, "UDIAT", &names(&|k| format!("udiat_{k:06}")), true);
    check_dataset(&out, "BUS_UC", &names(&|k| format!("bus_uc_{k:03}")), false);
    check_dataset(
        &out,
        "BUS_UCLM",
        &names(&|k| format!("bus_uclm_case{k}")),
        false,
    );
    let busi_r = r.dataset(DatasetKind::Busi).unwrap();
    assert_eq!(
        (busi_r.merged, busi_r.excluded_normal, busi_r.excluded_blank),
        (1, 1, 1)
    );
    let udiat = r.dataset(DatasetKind::Udiat).unwrap();
    assert_eq!((udiat.train, udiat.test), (0, 10));
    assert_eq!(
        r.dataset(DatasetKind::Bus).unwrap().fold_val_sizes,
        vec![1, 1, 1, 1, 4]
    );
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("UDIAT/split_info.json")).unwrap())
            .unwrap();
    assert_eq!(info["unseen"], true);
}

#[test]
fn bus_uc_class_layout() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    pair_layout(
        &raw.join("BUS_UC/Benign"),
        "images",
        "masks",
        4,
        |k| format!("{k}"),
        |k| format!("{k}"),
    );
    pair_layout(
        &raw.join("BUS_UC/Malignant"),
        "images",
        "masks",
        4,
        |k| format!("{k}"),
        |k| format!("{k}"),
    );
    let out = tmp.path().join("out");
    let r = prepare_datasets(&opts(&raw, &out, &[DatasetKind::BusUc])).unwrap();
    assert_eq!(r.datasets[0].kept, 8);
    let sp = SplitsFile::read(&out.join("BUS_UC/splits.json")).unwrap();
    assert!(sp
        .train
        .iter()
        .chain(&sp.test)
        .any(|n| n == "bus_uc_malignant_2"));
}

// ---------------------------------------------------------------------------------------------------------------
// Bad input.

fn small_bus(raw: &Path, n: usize) {
    pair_layout(
        &raw.join("BUS"),
        "original",
        "GT",
        n,
        |k| format!("{k:03}"),
        |k| format!("{k:03}"),
    );
}

fn err_of(o: &PrepareOptions) -> String {
    match prepare_datasets(o) {
        Ok(r) => panic!("expected an error, got\n{r}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_inputs_name_file_and_problem() {
    type Damage = (&'static str, &'static str, fn(&Path));
    let cases: Vec<Damage> = vec![
        ("zero-byte image", "001.png", |r| {
            std::fs::write(r.join("BUS/original/001.png"), b"").unwrap()
        }),
        ("corrupt image", "002.png", |r| {
            let p = r.join("BUS/original/002.png");
            let mut b = std::fs::read(&p).unwrap();
            b.truncate(b.len() / 2);
            b[40] ^= 0xff;
            std::fs::write(p, b).unwrap()
        }),
        ("corrupt mask", "003.png", |r| {
            std::fs::write(r.join("BUS/GT/003.png"), b"\x89PNG\r\n\x1a\nnonsense").unwrap()
        }),
        ("missing mask", "004.png", |r| {
            std::fs::remove_file(r.join("BUS/GT/004.png")).unwrap()
        }),
        ("size mismatch", "005.png", |r| {
            let px = vec![255u8; 10 * 10];
            std::fs::write(
                r.join("BUS/GT/005.png"),
                encode_png(&px, 10, 10, C::L8).unwrap(),
            )
            .unwrap()
        }),
    ];
    let problem_words = ["empty file", "corrupt", "not a PNG", "no mask", "differs"];
    for (what, file, damage) in &cases {
        let tmp = tempfile::tempdir().unwrap();
        let raw = tmp.path().join("raw");
        let out = tmp.path().join("out");
        small_bus(&raw, 8);
        damage(&raw);
        let msg = err_of(&opts(&raw, &out, &[DatasetKind::Bus]));
        assert!(
            msg.contains(file),
            "{what}: message does not name {file}: {msg}"
        );
        assert!(
            problem_words.iter().any(|w| msg.contains(w)),
            "{what}: message does not say the problem: {msg}"
        );
        assert!(
            !out.join("BUS").exists(),
            "{what}: nothing may be written on error"
        );
        // --skip-bad: a warning, the sample is skipped, the other 7 samples are kept.
        let mut o = opts(&raw, &out, &[DatasetKind::Bus]);
        o.skip_bad = true;
        let r = prepare_datasets(&o).unwrap();
        let d = &r.datasets[0];
        assert_eq!(d.kept, 7, "{what}: {r}");
        assert!(
            d.warnings.iter().any(|w| w.contains(file)),
            "{what}: warnings {:?}",
            d.warnings
        );
        assert!(
            r.to_string().contains(file),
            "{what}: summary does not list the skipped file"
        );
        assert!(r.verify_ok(), "{what}: {r}");
        let sp = SplitsFile::read(&out.join("BUS/splits.json")).unwrap();
        let stem = file.trim_end_matches(".png");
        assert!(
            !sp.train.iter().chain(&sp.test).any(|n| n.ends_with(stem)),
            "{what}: skipped sample was written"
        );
    }
}

#[test]
fn empty_folder_unknown_name_and_missing_raw_root() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    std::fs::create_dir_all(raw.join("BUSBRA/Images")).unwrap();
    let msg = err_of(&opts(&raw, &tmp.path().join("out"), &[DatasetKind::Busbra]));
    assert!(msg.contains("BUSBRA") && msg.contains("no images"), "{msg}");
    let e = ultrarefiner::data::parse_dataset_list(&["BUSI,NOPE"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("NOPE") && e.contains("unknown dataset"), "{e}");
    assert_eq!(
        ultrarefiner::data::parse_dataset_list(&["busi,BUS", "UDIAT"]).unwrap(),
        vec![DatasetKind::Busi, DatasetKind::Bus, DatasetKind::Udiat]
    );
    let msg = err_of(&opts(&raw, &tmp.path().join("out"), &[DatasetKind::Bus]));
    assert!(
        msg.contains("BUS") && msg.contains("does not exist"),
        "{msg}"
    );
}

#[test]
fn verify_reports_tampering() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    let out = tmp.path().join("out");
    small_bus(&raw, 12);
    let r = prepare_datasets(&opts(&raw, &out, &[DatasetKind::Bus])).unwrap();
    assert!(r.verify_ok());
    let sp = SplitsFile::read(&out.join("BUS/splits.json")).unwrap();
    // Duplicate image across train/test (warning), a mask of another size, a non-binary mask, an empty mask,
    // a missing mask, and a splits.json with an unknown name.
    let tr0 = &sp.train[0];
    let te0 = &sp.test[0];
    std::fs::copy(
        out.join(format!("BUS/train/images/{tr0}.png")),
        out.join(format!("BUS/test/images/{te0}.png")),
    )
    .unwrap();
    let tr1 = &sp.train[1];
    std::fs::write(
        out.join(format!("BUS/train/masks/{tr1}.png")),
        encode_png(&[255u8; 9], 3, 3, C::L8).unwrap(),
    )
    .unwrap();
    let tr2 = &sp.train[2];
    std::fs::write(
        out.join(format!("BUS/train/masks/{tr2}.png")),
        encode_png(&vec![7u8; W * H], W, H, C::L8).unwrap(),
    )
    .unwrap();
    let tr3 = &sp.train[3];
    std::fs::write(
        out.join(format!("BUS/train/masks/{tr3}.png")),
        encode_png(&vec![0u8; W * H], W, H, C::L8).unwrap(),
    )
    .unwrap();
    let tr4 = &sp.train[4];
    std::fs::remove_file(out.join(format!("BUS/train/masks/{tr4}.png"))).unwrap();
    let mut sp2 = sp.clone();
    sp2.train.push("ghost".into());
    sp2.folds[0].val.push(sp.train[5].clone());
    sp2.write(&out.join("BUS/splits.json")).unwrap();
    let v = verify(&out).unwrap();
    let errs = v.errors().join("\n");
    println!("{v}");
    assert!(!v.is_ok());
    for needle in [
        tr1.as_str(),
        tr2.as_str(),
        tr3.as_str(),
        tr4.as_str(),
        "ghost",
        "SHA-256",
        "val sets of folds",
    ] {
        assert!(errs.contains(needle), "missing `{needle}` in:\n{errs}");
    }
    assert!(
        errs.contains("not strictly") && errs.contains("empty") && errs.contains("has no mask")
    );
    assert!(v.warnings().join("\n").contains("across train/test"), "{v}");
    let strict =
        ultrarefiner::data::verify::verify_with(&ultrarefiner::data::verify::VerifyOptions {
            output_root: out.clone(),
            datasets: vec![],
            strict: true,
            num_workers: Some(1),
        })
        .unwrap();
    assert!(strict
        .errors()
        .join("\n")
        .contains("identical images across train/test"));
}

// ---------------------------------------------------------------------------------------------------------------
// Phantom through the ordinary path.

#[test]
fn phantom_prepares_and_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("raw");
    let po = PhantomOptions {
        out: raw.join("PHANTOM"),
        count: 16,
        seed: 7,
        height_range: (112, 144),
        width_range: (128, 176),
        annotations: true,
        num_workers: Some(2),
    };
    let rep = generate(&po).unwrap();
    assert_eq!((rep.benign, rep.malignant, rep.normal), (8, 5, 3));
    let r = prepare_datasets(&opts(
        &raw,
        &tmp.path().join("out"),
        &[DatasetKind::Phantom],
    ))
    .unwrap();
    println!("{r}");
    assert!(r.verify_ok(), "{r}");
    let d = &r.datasets[0];
    assert_eq!(d.excluded_normal, 3);
    assert_eq!(d.kept, 13);
    // Same seed, one thread → byte-identical files.
    let raw2 = tmp.path().join("raw2");
    generate(&PhantomOptions {
        out: raw2.clone(),
        num_workers: Some(1),
        ..po.clone()
    })
    .unwrap();
    let files = |root: &PathBuf| {
        let mut v = Vec::new();
        for c in ["benign", "malignant", "normal"] {
            for e in std::fs::read_dir(root.join(c)).unwrap() {
                let p = e.unwrap().path();
                v.push((
                    p.strip_prefix(root).unwrap().to_path_buf(),
                    std::fs::read(&p).unwrap(),
                ));
            }
        }
        v.sort();
        v
    };
    assert_eq!(files(&raw.join("PHANTOM")), files(&raw2));
    assert_eq!(
        std::fs::read(raw.join("PHANTOM/phantom.json")).unwrap(),
        std::fs::read(raw2.join("phantom.json")).unwrap()
    );
}
