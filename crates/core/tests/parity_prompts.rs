//! Parity of the prompt generator (SPEC §7.2–§7.3, §7.6) with `shared/fixtures/prompts.safetensors`.
//!
//! `P1024 = bilinear(ac=false)(masks_256 → 1024)`; prompts are computed batched (B = 6) on P1024. Tolerances from the
//! fixture README: coordinates abs 2e-3 px, corner index exact, direct mask rel 5e-6, gaussian mask rel 1e-4.
use candle_core::{DType, Tensor, Var};
use ultrarefiner::refiner::prompts::{
    extract_prompts, mask_prompt, negative_point, positive_point, soft_box, MaskPromptStyle,
    PromptConfig,
};
use ultrarefiner::testing::{assert_close, get_f32, load_fixture};

/// Prints the worst absolute deviation (visible with `--nocapture`), then checks the tolerance.
fn check(name: &str, got: &Tensor, want: &Tensor, atol: f64, rtol: f64) {
    let d = (got - want)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    eprintln!("{name}: max |diff| = {:.3e}", d.to_scalar::<f32>().unwrap());
    assert_close(name, got, want, atol, rtol);
}

fn p1024() -> (std::collections::HashMap<String, Tensor>, Tensor) {
    let fx = load_fixture("prompts.safetensors").expect("prompts.safetensors");
    let m = get_f32(&fx, "masks_256").unwrap(); // (6,256,256)
    let p = ultrarefiner::nn::resize_bilinear(&m.unsqueeze(1).unwrap(), 1024, 1024, false)
        .unwrap()
        .squeeze(1)
        .unwrap();
    (fx, p)
}

#[test]
fn parity_prompts_geometry() {
    let (fx, p) = p1024();
    let pos = positive_point(&p).unwrap();
    check(
        "point_pos",
        &pos.unsqueeze(1).unwrap(),
        &get_f32(&fx, "point_pos").unwrap(),
        2e-3,
        0.0,
    );
    let bx = soft_box(&p, 2.5, 5.0).unwrap();
    check("box", &bx, &get_f32(&fx, "box").unwrap(), 2e-3, 0.0);
    let (neg, k) = negative_point(&bx, &pos).unwrap();
    check(
        "point_neg",
        &neg.unsqueeze(1).unwrap(),
        &get_f32(&fx, "point_neg").unwrap(),
        2e-3,
        0.0,
    );
    let want_k: Vec<i64> = fx["neg_corner_index"]
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(
        k.iter().map(|v| *v as i64).collect::<Vec<_>>(),
        want_k,
        "neg_corner_index"
    );

    // The same through the batched entry point.
    let pr = extract_prompts(&p, &PromptConfig::default(), 256).unwrap();
    let pts = pr.points.unwrap();
    check(
        "points[:,0]",
        &pts.narrow(1, 0, 1).unwrap(),
        &get_f32(&fx, "point_pos").unwrap(),
        2e-3,
        0.0,
    );
    check(
        "points[:,1]",
        &pts.narrow(1, 1, 1).unwrap(),
        &get_f32(&fx, "point_neg").unwrap(),
        2e-3,
        0.0,
    );
    check(
        "boxes",
        &pr.boxes.unwrap(),
        &get_f32(&fx, "box").unwrap(),
        2e-3,
        0.0,
    );
}

#[test]
fn parity_prompts_mask_direct() {
    let (fx, p) = p1024();
    let got = mask_prompt(&p, MaskPromptStyle::Direct, 256).unwrap();
    check(
        "mask_prompt_direct",
        &got,
        &get_f32(&fx, "mask_prompt_direct").unwrap(),
        0.0,
        5e-6,
    );
}

#[test]
fn parity_prompts_mask_gaussian() {
    let (fx, p) = p1024();
    let got = mask_prompt(&p, MaskPromptStyle::Gaussian, 256).unwrap();
    check(
        "mask_prompt_gaussian",
        &got,
        &get_f32(&fx, "mask_prompt_gaussian").unwrap(),
        0.0,
        1e-4,
    );
}

/// All-zero (mask 4 of the fixture) and all-one maps at N = 1024: finite prompts and finite gradients (SPEC §7.6).
#[test]
fn prompts_degenerate_1024_finite() {
    let (_, p) = p1024();
    let zero = p.narrow(0, 4, 1).unwrap();
    assert_eq!(
        zero.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0,
        "fixture mask 4 is all zero"
    );
    let one = zero.ones_like().unwrap();
    for (name, base) in [("zero", zero), ("one", one)] {
        for style in [MaskPromptStyle::Direct, MaskPromptStyle::Gaussian] {
            let var = Var::from_tensor(&base).unwrap();
            let cfg = PromptConfig {
                mask_style: style,
                ..PromptConfig::default()
            };
            let pr = extract_prompts(var.as_tensor(), &cfg, 256).unwrap();
            let f = (pr.points.unwrap().sum_all().unwrap()
                + pr.boxes.unwrap().sum_all().unwrap()
                + pr.mask.unwrap().mean_all().unwrap())
            .unwrap();
            assert!(
                f.to_scalar::<f32>().unwrap().is_finite(),
                "{name} {style}: value"
            );
            let g = f.backward().unwrap();
            let g = g.get(var.as_tensor()).expect("gradient");
            let s: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(s.is_finite(), "{name} {style}: gradient not finite");
        }
    }
}
