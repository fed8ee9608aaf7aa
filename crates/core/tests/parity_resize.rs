//! Parity of `nn::resize_bilinear` / `nn::resize_nearest` with PyTorch `F.interpolate` on every case of
//! `fixtures/resize.safetensors` (tolerances from fixtures/README.md; f16 debug copies at rel 2e-3).
use candle_core::{DType, Tensor};
use std::collections::HashMap;
use ultrarefiner::nn;
use ultrarefiner::testing::{assert_close, get_f32, load_fixture};

fn fixture() -> HashMap<String, Tensor> {
    load_fixture("resize.safetensors").expect("fixtures/resize.safetensors")
}

/// `(output key, input key, out size, align_corners, rel tolerance, stored as f16)`.
const CASES: &[(&str, &str, usize, bool, f64, bool)] = &[
    (
        "bilinear_224_to_1024_acF",
        "in_224",
        1024,
        false,
        1e-6,
        false,
    ),
    ("bilinear_224_to_1024_acT", "in_224", 1024, true, 2e-3, true),
    (
        "bilinear_256_to_1024_acF",
        "in_256",
        1024,
        false,
        1e-6,
        false,
    ),
    ("bilinear_256_to_1024_acT", "in_256", 1024, true, 2e-3, true),
    (
        "bilinear_1024_to_256_acF",
        "bilinear_224_to_1024_acF",
        256,
        false,
        1e-6,
        false,
    ),
    (
        "bilinear_1024_to_256_acT",
        "bilinear_224_to_1024_acF",
        256,
        true,
        2e-5,
        false,
    ),
    (
        "bilinear_1024_to_224_acF",
        "bilinear_224_to_1024_acF",
        224,
        false,
        2e-5,
        false,
    ),
    (
        "bilinear_1024_to_224_acT",
        "bilinear_224_to_1024_acF",
        224,
        true,
        1e-5,
        false,
    ),
    ("bilinear_14_to_28_acT", "in_14", 28, true, 5e-6, false),
    ("bilinear_14_to_28_acF", "in_14", 28, false, 1e-6, false),
    ("up2_14_28_nnmodule", "in_14", 28, true, 1e-6, false),
];

#[test]
fn bilinear_matches_fixture() {
    let f = fixture();
    for &(key, input, size, ac, rtol, f16) in CASES {
        let x = get_f32(&f, input).unwrap();
        let want = get_f32(&f, key).unwrap();
        let mut got = nn::resize_bilinear(&x, size, size, ac).unwrap();
        if f16 {
            // The fixture is an f16-rounded copy: compare at f16 precision.
            got = got
                .to_dtype(DType::F16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
        }
        assert_close(key, &got, &want, 0.0, rtol);
    }
}

#[test]
fn nearest_matches_fixture() {
    let f = fixture();
    let x = get_f32(&f, "in_224_u8").unwrap();
    let want = get_f32(&f, "nearest_224_to_1024").unwrap();
    let got = nn::resize_nearest(&x, 1024, 1024).unwrap();
    assert_close("nearest_224_to_1024", &got, &want, 0.0, 0.0);

    let idx: Vec<i64> = f["nearest_224_to_1024_src_index"].to_vec1::<i64>().unwrap();
    let ours: Vec<i64> = nn::nearest_indices(224, 1024)
        .into_iter()
        .map(i64::from)
        .collect();
    assert_eq!(ours, idx, "nearest source indices");
}

#[test]
fn bilinear_closed_form_2_to_4() {
    // ac=false, r = 0.5: s = [−0.25→0, 0.25, 0.75, 1.25] → y = [x0, ¾x0+¼x1, ¼x0+¾x1, x1].
    let t = nn::bilinear_taps(2, 4, false, false);
    assert_eq!(t.i0, vec![0, 0, 0, 1]);
    assert_eq!(t.i1, vec![1, 1, 1, 1]);
    assert_eq!(t.l1[..3], [0.0, 0.25, 0.75]);
    let x = Tensor::new(&[[[[1.0f32, 5.0]]]], &candle_core::Device::Cpu).unwrap();
    let y = nn::resize_bilinear(&x, 1, 4, false)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(y, vec![1.0, 2.0, 4.0, 5.0]);
    // ac=true, r = 1/3: y = [x0, ⅔x0+⅓x1, ⅓x0+⅔x1, x1].
    let y = nn::resize_bilinear(&x, 1, 4, true)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let want = [1.0f32, 1.0 + 4.0 / 3.0, 1.0 + 8.0 / 3.0, 5.0];
    for (a, b) in y.iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{y:?} vs {want:?}");
    }
    // Same size is the identity in both modes.
    for ac in [false, true] {
        let z = nn::resize_bilinear(&x, 1, 2, ac)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(z, vec![1.0, 5.0]);
    }
}

#[test]
fn cached_taps_are_per_dtype_and_reused() {
    // The per-axis tap cache must key on dtype: the same sizes in f32, f64 and again f32 give consistent results.
    let f = fixture();
    let x = get_f32(&f, "in_14").unwrap();
    let want = get_f32(&f, "bilinear_14_to_28_acT").unwrap();
    let a = nn::resize_bilinear(&x, 28, 28, true).unwrap();
    let x64 = x.to_dtype(DType::F64).unwrap();
    let b = nn::resize_bilinear(&x64, 28, 28, true).unwrap();
    assert_eq!(b.dtype(), DType::F64);
    let c = nn::resize_bilinear(&x, 28, 28, true).unwrap();
    assert_close("f32 first", &a, &want, 0.0, 5e-6);
    assert_close("f64", &b, &want, 0.0, 5e-6);
    assert_close("f32 cached", &c, &a, 0.0, 0.0);
    // Non-square, different per-axis sizes reuse axis entries independently.
    let d = nn::resize_bilinear(&x, 28, 7, false).unwrap();
    assert_eq!(d.dims(), &[1, 2, 28, 7]);
    let n = nn::resize_nearest(&x, 28, 9).unwrap();
    assert_eq!(n.dims(), &[1, 2, 28, 9]);
}
