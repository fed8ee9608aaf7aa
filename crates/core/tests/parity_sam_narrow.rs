//! Parity of the SAM port with `shared/fixtures/sam_narrow_io.safetensors` (SPEC §17.2): image encoder (both
//! execution paths), dense PE, prompt encoder (3 prompt sets incl. the padding point), mask decoder (multimask and
//! `single.*`), and gradients w.r.t. prompts and parameters. Tolerances: the fixture README's per-tensor column.
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use std::collections::HashMap;
use ultrarefiner::config::{Config, SamConfig};
use ultrarefiner::models::sam::{load_sam_weights, normalize_sam, Sam, SamWeights};
use ultrarefiner::testing::{
    assert_close, assert_grad_close, fixture_path, get_f32, load_fixture, shared_dir,
};

fn cfg() -> SamConfig {
    Config::narrow().model.sam
}

/// Per-tensor `rel X` tolerances of the `sam_narrow_io.safetensors` section of the fixture README.
fn tolerances() -> HashMap<String, f64> {
    let text = std::fs::read_to_string(shared_dir().unwrap().join("fixtures/README.md")).unwrap();
    let start = text
        .find("### `sam_narrow_io.safetensors`")
        .expect("README section");
    let rest = &text[start + 4..];
    let section = &rest[..rest.find("\n### ").unwrap_or(rest.len())];
    let mut m = HashMap::new();
    for line in section.lines() {
        let cols: Vec<&str> = line.split('|').map(|c| c.trim()).collect();
        if cols.len() < 7 || !cols[1].starts_with('`') {
            continue;
        }
        let name = cols[1].trim_matches('`').to_string();
        if let Some(x) = cols[5].strip_prefix("rel ") {
            m.insert(name, x.parse::<f64>().unwrap());
        }
    }
    m
}

fn check(name: &str, got: &Tensor, io: &HashMap<String, Tensor>, tol: &HashMap<String, f64>) {
    let want = get_f32(io, name).unwrap();
    let rel = *tol
        .get(name)
        .unwrap_or_else(|| panic!("no README tolerance for {name}"));
    if std::env::var("SAM_PARITY_SHOW").is_ok() {
        let d = (got - &want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let m = want
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        eprintln!(
            "{name}: max|diff|/max|ref| = {:.2e} (tol {rel:.0e})",
            d / m.max(1e-30)
        );
    }
    assert_close(name, got, &want, 0.0, rel);
}

fn weights() -> SamWeights {
    load_sam_weights(
        &fixture_path("sam_narrow.pth").unwrap(),
        Some(&cfg()),
        &Device::Cpu,
    )
    .unwrap()
}

/// SAM with every tensor as a plain tensor (no gradients).
fn plain_sam(w: &SamWeights) -> Sam {
    let vb = w.var_builder(DType::F32, &Device::Cpu);
    Sam::new(&cfg(), vb.clone(), vb).unwrap()
}

#[test]
fn sam_narrow_io_image_encoder_both_paths() {
    let io = load_fixture("sam_narrow_io.safetensors").unwrap();
    let tol = tolerances();
    let sam = plain_sam(&weights());
    let x = normalize_sam(&get_f32(&io, "image_u8").unwrap()).unwrap();
    let frozen = sam.image_encoder.forward_frozen(&x).unwrap();
    check("image_embeddings", &frozen, &io, &tol);
    // The differentiable path of the same model definition gives the same embeddings.
    let trainable = sam.image_encoder.forward_trainable(&x, None).unwrap();
    check("image_embeddings", &trainable, &io, &tol);
    assert_close("frozen vs trainable", &frozen, &trainable, 0.0, 1e-5);
    assert!(!frozen.is_variable());
}

#[test]
fn sam_narrow_io_prompt_encoder_and_decoder() {
    let io = load_fixture("sam_narrow_io.safetensors").unwrap();
    let tol = tolerances();
    let sam = plain_sam(&weights());
    let g = |k: &str| get_f32(&io, k).unwrap();
    let emb = g("image_embeddings");
    let pe = sam.prompt_encoder.get_dense_pe().unwrap();
    check("dense_pe", &pe, &io, &tol);

    let sets: [(&str, bool, bool, bool); 3] = [
        ("set1", true, true, true),
        ("set2", false, true, false),
        ("set3", true, false, false),
    ];
    for (s, has_pts, has_box, has_mask) in sets {
        let pts = has_pts.then(|| {
            (
                g(&format!("{s}.point_coords")),
                g(&format!("{s}.point_labels")),
            )
        });
        let bx = has_box.then(|| g(&format!("{s}.boxes")));
        let mk = has_mask.then(|| g(&format!("{s}.mask_inputs")));
        let (sparse, dense) = sam
            .prompt_encoder
            .forward(pts.as_ref().map(|(a, b)| (a, b)), bx.as_ref(), mk.as_ref())
            .unwrap();
        check(&format!("{s}.sparse_embeddings"), &sparse, &io, &tol);
        if io.contains_key(&format!("{s}.dense_embeddings")) {
            check(&format!("{s}.dense_embeddings"), &dense, &io, &tol);
        }
        let multi = sam
            .mask_decoder
            .forward(&emb, &pe, &sparse, &dense, true)
            .unwrap();
        check(&format!("{s}.low_res_masks"), &multi.masks, &io, &tol);
        check(&format!("{s}.iou_predictions"), &multi.iou, &io, &tol);
        let single = sam
            .mask_decoder
            .forward(&emb, &pe, &sparse, &dense, false)
            .unwrap();
        check(
            &format!("{s}.single.low_res_masks"),
            &single.masks,
            &io,
            &tol,
        );
        check(
            &format!("{s}.single.iou_predictions"),
            &single.iou,
            &io,
            &tol,
        );
    }
}

/// Batched decoding: two prompt sets with their own embeddings in one call equal two single calls.
#[test]
fn sam_batched_decoding_equals_per_sample() {
    let io = load_fixture("sam_narrow_io.safetensors").unwrap();
    let sam = plain_sam(&weights());
    let g = |k: &str| get_f32(&io, k).unwrap();
    let emb = g("image_embeddings");
    let emb2 = (&emb * 0.5).unwrap();
    let b1 = g("set1.boxes");
    let b2 = g("set2.boxes");
    let pts1 = g("set1.point_coords");
    let lab1 = g("set1.point_labels");
    let pts2 = (&pts1 + 7.0).unwrap();
    let m1 = g("set1.mask_inputs");
    let m2 = (&m1 * -1.0).unwrap();
    let cat = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 0).unwrap();
    let both = sam
        .decode(
            &cat(&emb, &emb2),
            Some((&cat(&pts1, &pts2), &cat(&lab1, &lab1))),
            Some(&cat(&b1, &b2)),
            Some(&cat(&m1, &m2)),
            true,
        )
        .unwrap();
    let one = sam
        .decode(&emb, Some((&pts1, &lab1)), Some(&b1), Some(&m1), true)
        .unwrap();
    let two = sam
        .decode(&emb2, Some((&pts2, &lab1)), Some(&b2), Some(&m2), true)
        .unwrap();
    assert_close(
        "batch[0] masks",
        &both.masks.narrow(0, 0, 1).unwrap(),
        &one.masks,
        1e-5,
        1e-5,
    );
    assert_close(
        "batch[1] masks",
        &both.masks.narrow(0, 1, 1).unwrap(),
        &two.masks,
        1e-5,
        1e-5,
    );
    assert_close(
        "batch[1] iou",
        &both.iou.narrow(0, 1, 1).unwrap(),
        &two.iou,
        1e-5,
        1e-5,
    );
}

/// Prompt encoder + decoder over a `VarMap` seeded with the fixture weights, image encoder from plain tensors.
fn trainable_sam(w: &SamWeights) -> (Sam, VarMap) {
    let vm = VarMap::new();
    w.seed_varmap(&vm).unwrap();
    let frozen = w.var_builder(DType::F32, &Device::Cpu);
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let sam = Sam::new(&cfg(), frozen, vb).unwrap();
    (sam, vm)
}

#[test]
fn sam_narrow_io_gradients() {
    let io = load_fixture("sam_narrow_io.safetensors").unwrap();
    let tol = tolerances();
    let w = weights();
    let (sam, vm) = trainable_sam(&w);
    let g = |k: &str| get_f32(&io, k).unwrap();
    let pts = Var::from_tensor(&g("set1.point_coords")).unwrap();
    let boxes = Var::from_tensor(&g("set1.boxes")).unwrap();
    let masks = Var::from_tensor(&g("set1.mask_inputs")).unwrap();
    let labels = g("set1.point_labels");
    let emb = g("image_embeddings");
    let out = sam
        .decode(
            &emb,
            Some((pts.as_tensor(), &labels)),
            Some(boxes.as_tensor()),
            Some(masks.as_tensor()),
            true,
        )
        .unwrap();
    let target = g("grad.target_T");
    let loss = (candle_nn::ops::sigmoid(&out.masks).unwrap() * &target)
        .unwrap()
        .mean_all()
        .unwrap();
    let loss = (loss + out.iou.sqr().unwrap().mean_all().unwrap()).unwrap();
    check("grad.loss", &loss, &io, &tol);
    let grads = loss.backward().unwrap();
    for (name, v) in [
        ("grad.d_point_coords", &pts),
        ("grad.d_boxes", &boxes),
        ("grad.d_mask_inputs", &masks),
    ] {
        let gr = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        check(name, gr, &io, &tol);
        assert_grad_close(name, gr, &g(name), 1e-3, 0.9999);
    }
    let data = vm.data().lock().unwrap();
    let mut n = 0;
    for key in io.keys().filter(|k| k.starts_with("grad.param.")) {
        let p = key.strip_prefix("grad.param.").unwrap();
        let var = data
            .get(p)
            .unwrap_or_else(|| panic!("{p} is not a trainable variable"));
        let gr = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {p}"));
        check(key, gr, &io, &tol);
        assert_grad_close(key, gr, &g(key), 1e-3, 0.9999);
        n += 1;
    }
    assert_eq!(n, 14, "the fixture lists 14 parameter gradients");
}

/// SPEC §16.5: every trainable variable of the prompt encoder and the mask decoder gets a finite, non-zero
/// gradient under the full prompt set (points incl. negative, box, mask), except the allow-list.
#[test]
fn sam_every_trainable_var_gets_gradient() {
    let io = load_fixture("sam_narrow_io.safetensors").unwrap();
    let w = weights();
    let g = |k: &str| get_f32(&io, k).unwrap();
    let emb = g("image_embeddings");
    // Full prompt set: positive + negative point, box, mask (no padding point, so not_a_point_embed is unused).
    // A second run with points only covers not_a_point_embed and no_mask_embed.
    type Case = (bool, bool, &'static [&'static str]);
    let cases: [Case; 2] = [
        (
            true,
            true,
            &[
                "mask_decoder.output_hypernetworks_mlps.0.",
                "prompt_encoder.not_a_point_embed",
                "prompt_encoder.no_mask_embed",
            ],
        ),
        (
            false,
            false,
            &[
                "mask_decoder.output_hypernetworks_mlps.0.",
                "prompt_encoder.mask_downscaling.",
                "prompt_encoder.point_embeddings.2",
                "prompt_encoder.point_embeddings.3",
            ],
        ),
    ];
    for (with_box, with_mask, allow) in cases {
        let (sam, vm) = trainable_sam(&w);
        let pts = g("set1.point_coords");
        let labels = g("set1.point_labels");
        let bx = with_box.then(|| g("set1.boxes"));
        let mk = with_mask.then(|| g("set1.mask_inputs"));
        let out = sam
            .decode(&emb, Some((&pts, &labels)), bx.as_ref(), mk.as_ref(), true)
            .unwrap();
        let loss = (candle_nn::ops::sigmoid(&out.masks).unwrap() * g("grad.target_T"))
            .unwrap()
            .mean_all()
            .unwrap();
        let loss = (loss + out.iou.sqr().unwrap().mean_all().unwrap()).unwrap();
        let grads = loss.backward().unwrap();
        let data = vm.data().lock().unwrap();
        assert!(!data.contains_key("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"));
        let mut missing = Vec::new();
        for (k, v) in data.iter() {
            if allow.iter().any(|a| k.starts_with(a)) {
                continue;
            }
            let ok = grads.get(v.as_tensor()).map(|gr| {
                let n = gr
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                n.is_finite() && n > 0.0
            });
            if ok != Some(true) {
                missing.push(k.clone());
            }
        }
        missing.sort();
        assert!(
            missing.is_empty(),
            "box={with_box} mask={with_mask}: no finite non-zero gradient for {missing:?}"
        );
    }
}
