//! Host resize against `resize.safetensors` (SPEC §0, §3.7), dataset and loader behaviour (SPEC §3.6–§3.9).
use std::sync::Arc;
use ultrarefiner::data::dataset::{load_sample_s, Dataset, SegDataset, Split};
use ultrarefiner::data::loader::{epoch_order, Loader, LoaderOptions};
use ultrarefiner::data::prepare::{prepare_datasets, PrepareOptions};
use ultrarefiner::data::resize::{nearest_index, resize_bilinear, resize_nearest};
use ultrarefiner::data::DatasetKind;
use ultrarefiner::testing::{assert_close, get_f32, load_fixture, shared_dir};

fn plane(t: &candle_core::Tensor) -> (Vec<f32>, usize, usize) {
    let d = t.dims().to_vec();
    let (h, w) = (d[d.len() - 2], d[d.len() - 1]);
    (t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), h, w)
}

#[test]
fn host_resize_matches_fixture() {
    let fx = load_fixture("resize.safetensors").unwrap();
    let t = |k: &str| get_f32(&fx, k).unwrap();
    let check = |name: &str,
                 input: &candle_core::Tensor,
                 want: &candle_core::Tensor,
                 ac: bool,
                 tol: f64| {
        let (x, h, w) = plane(input);
        let dims = want.dims().to_vec();
        let (oh, ow) = (dims[dims.len() - 2], dims[dims.len() - 1]);
        let c = x.len() / (h * w);
        let mut out = Vec::new();
        for ch in 0..c {
            out.extend(resize_bilinear(
                &x[ch * h * w..(ch + 1) * h * w],
                h,
                w,
                oh,
                ow,
                ac,
            ));
        }
        let got =
            candle_core::Tensor::from_vec(out, want.dims(), &candle_core::Device::Cpu).unwrap();
        assert_close(name, &got, want, tol, 0.0);
    };
    let x224 = t("in_224");
    let x1024 = t("bilinear_224_to_1024_acF");
    check("224→1024 acF", &x224, &x1024, false, 1e-6);
    check(
        "256→1024 acF",
        &t("in_256"),
        &t("bilinear_256_to_1024_acF"),
        false,
        1e-6,
    );
    check(
        "1024→224 acF",
        &x1024,
        &t("bilinear_1024_to_224_acF"),
        false,
        1e-6,
    );
    check(
        "1024→224 acT",
        &x1024,
        &t("bilinear_1024_to_224_acT"),
        true,
        1e-6,
    );
    check(
        "1024→256 acF",
        &x1024,
        &t("bilinear_1024_to_256_acF"),
        false,
        1e-6,
    );
    check(
        "1024→256 acT",
        &x1024,
        &t("bilinear_1024_to_256_acT"),
        true,
        1e-6,
    );
    check(
        "14→28 acF",
        &t("in_14"),
        &t("bilinear_14_to_28_acF"),
        false,
        1e-6,
    );
    check(
        "14→28 acT",
        &t("in_14"),
        &t("bilinear_14_to_28_acT"),
        true,
        1e-6,
    );
    // f16 copies of the ac=true upsamplings: compare at f16 resolution.
    check(
        "224→1024 acT (f16 copy)",
        &x224,
        &t("bilinear_224_to_1024_acT"),
        true,
        2e-3,
    );
    // Nearest: indices and values exactly.
    let idx: Vec<i64> = fx["nearest_224_to_1024_src_index"].to_vec1().unwrap();
    assert_eq!(
        nearest_index(224, 1024)
            .iter()
            .map(|&i| i as i64)
            .collect::<Vec<_>>(),
        idx
    );
    let u8in: Vec<u8> = fx["in_224_u8"].flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<u8> = fx["nearest_224_to_1024"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(resize_nearest(&u8in, 224, 224, 1024, 1024), want);
}

fn prepared_busi() -> (tempfile::TempDir, std::path::PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("processed");
    prepare_datasets(&PrepareOptions {
        raw_root: shared_dir().unwrap().join("data"),
        output_root: out.clone(),
        datasets: vec![DatasetKind::Busi],
        verify: false,
        ..Default::default()
    })
    .unwrap();
    (tmp, out)
}

#[test]
fn dataset_and_loader_semantics() {
    let (_tmp, root) = prepared_busi();
    let s = 96;
    // Folds come from splits.json: val sizes 12, train 48.
    let val = SegDataset::open(&root, &["BUSI"], Split::FoldVal(0), s).unwrap();
    let tr = SegDataset::open(&root, &["BUSI"], Split::FoldTrain(0), s).unwrap();
    assert_eq!((val.len(), tr.len()), (12, 48));
    assert!(SegDataset::open(&root, &["BUSI"], Split::FoldVal(7), s).is_err());
    assert!(SegDataset::open(&root, &["BUS"], Split::Train, s)
        .unwrap_err()
        .to_string()
        .contains("not prepared"));
    // Combined datasets concatenate in the given order.
    let both = SegDataset::open(&root, &["BUSI", "BUSI"], Split::Test, s).unwrap();
    assert_eq!(both.len(), 30);

    // Evaluation sample: [0,1] image, {0,1} mask, equal to the standalone S-resolution loader.
    let e = val.get(3, 0).unwrap();
    assert_eq!((e.image.len(), e.mask.len()), (s * s, s * s));
    assert!(e.image.iter().all(|&v| (0.0..=1.0).contains(&v)));
    assert!(e.mask.iter().all(|&v| v == 0.0 || v == 1.0) && e.mask.contains(&1.0));
    let entry = &val.entries()[3];
    let direct = load_sample_s(&entry.image, entry.mask.as_deref(), s).unwrap();
    assert_eq!(direct.image, e.image);
    assert_eq!(direct.mask, e.mask);
    assert_eq!(direct.original_size, e.original_size);

    // Augmentation: deterministic per (seed, epoch, index), varies with the epoch, eval path unaffected.
    let aug = SegDataset::open(&root, &["BUSI"], Split::FoldTrain(0), s)
        .unwrap()
        .with_augmentation(5);
    let a0 = aug.get(2, 0).unwrap();
    assert_eq!(a0.image, aug.get(2, 0).unwrap().image);
    let differs = (1..6).any(|ep| aug.get(2, ep).unwrap().image != a0.image);
    assert!(differs);
    assert_eq!(aug.get_eval(2).unwrap().image, tr.get(2, 0).unwrap().image);

    // Loader: drop_last for train, ordering independent of the worker count, epoch order = Fisher–Yates stream.
    let ds: Arc<dyn Dataset> = Arc::new(aug);
    let l1 = Loader::new(ds.clone(), LoaderOptions::train(10, 5).with_workers(1)).unwrap();
    let l2 = Loader::new(ds.clone(), LoaderOptions::train(10, 5).with_workers(2)).unwrap();
    assert_eq!(l1.num_batches(), 4);
    let b1: Vec<_> = l1.epoch(3).map(|b| b.unwrap()).collect();
    let b2: Vec<_> = l2.epoch(3).map(|b| b.unwrap()).collect();
    assert_eq!(b1.len(), 4);
    let order = epoch_order(48, true, 5, 3);
    for (k, (x, y)) in b1.iter().zip(&b2).enumerate() {
        assert_eq!(x.images.dims(), &[10, 1, s, s]);
        assert_eq!(x.masks.dims(), &[10, s, s]);
        assert_eq!(x.indices, order[k * 10..(k + 1) * 10].to_vec());
        assert_eq!(x.indices, y.indices);
        let (vx, vy): (Vec<f32>, Vec<f32>) = (
            x.images.flatten_all().unwrap().to_vec1().unwrap(),
            y.images.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert_eq!(vx, vy, "batch {k} depends on the worker count");
    }
    let ev = Loader::new(Arc::new(val), LoaderOptions::eval(5)).unwrap();
    let sizes: Vec<usize> = ev.epoch(0).map(|b| b.unwrap().len()).collect();
    assert_eq!(sizes, vec![5, 5, 2]);
    // An early drop of the iterator stops the prefetch thread cleanly.
    let mut it = l2.epoch(9);
    assert!(it.next().is_some());
    drop(it);
}
