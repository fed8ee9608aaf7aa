//! Parity of the end-to-end model (SPEC §7.5) with `shared/fixtures/e2e_narrow_io.safetensors` (+ its config):
//! TransUNet narrow + SAM narrow (from the MedSAM-style `{'model': …}` container, normalisation mode `sam` set
//! explicitly, SPEC §7.1 parity note), whole model in eval mode, styles `direct` and `gaussian`.
//! Compared: every stored intermediate, the Phase-3 loss (§9.3, weights 0.3/0.7) and its gradients, and the
//! refined-branch-only gradients (`grad_refined_only.*`, coarse weight 0). Tolerances: the README's per-tensor column.
//! Also the gradient-flow guards: L_refined alone reaches every TransUNet parameter; every trainable SAM variable
//! gets a gradient except the SPEC §16.5 allow-list.
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use std::collections::HashMap;
use ultrarefiner::config::Config;
use ultrarefiner::models::sam::{load_sam_weights, Sam};
use ultrarefiner::models::transunet::{
    checkpoint::LoadMode, load_into_varmap, read_checkpoint, TransUnet,
};
use ultrarefiner::refiner::preprocess::resize_target;
use ultrarefiner::refiner::{
    ForwardOptions, MaskPromptStyle, PromptConfig, SamNormalization, SamRefiner,
    SamRefinerSettings, UltraOutput, UltraRefiner,
};
use ultrarefiner::testing::{assert_close, fixture_path, get_f32, load_fixture, shared_dir};
use ultrarefiner::train::losses::{phase3_loss, Phase3LossConfig};

/// Tolerance column of the README section of `e2e_narrow_io.safetensors`: `(is_abs, value)`.
fn tolerances() -> HashMap<String, (bool, f64)> {
    let text = std::fs::read_to_string(shared_dir().unwrap().join("fixtures/README.md")).unwrap();
    let start = text
        .find("### `e2e_narrow_io.safetensors`")
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
        let tol = cols[5];
        let parse = |s: &str| s.split_whitespace().next().unwrap().parse::<f64>().unwrap();
        if let Some(x) = tol.strip_prefix("rel ") {
            m.insert(name, (false, parse(x)));
        } else if let Some(x) = tol.strip_prefix("abs ") {
            m.insert(name, (true, parse(x)));
        } else if tol == "exact" {
            m.insert(name, (true, 0.0));
        }
    }
    m
}

struct Fx {
    io: HashMap<String, Tensor>,
    tol: HashMap<String, (bool, f64)>,
}

impl Fx {
    fn new() -> Self {
        Self {
            io: load_fixture("e2e_narrow_io.safetensors").unwrap(),
            tol: tolerances(),
        }
    }
    fn get(&self, k: &str) -> Tensor {
        get_f32(&self.io, k).unwrap()
    }
    /// Compares with the README tolerance of `key`, printing the measured deviation (`--nocapture`).
    fn check(&self, key: &str, got: &Tensor) {
        let want = self.get(key);
        let &(is_abs, x) = self
            .tol
            .get(key)
            .unwrap_or_else(|| panic!("no README tolerance for {key}"));
        let g = got.to_dtype(DType::F32).unwrap();
        let d = (&g - &want)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        let m = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let (d, m) = (
            d.to_scalar::<f32>().unwrap() as f64,
            m.to_scalar::<f32>().unwrap() as f64,
        );
        if is_abs {
            eprintln!("{key}: max|diff| = {d:.2e} (tolerance abs {x:.0e})");
            assert_close(key, &g, &want, x, 0.0);
        } else {
            eprintln!(
                "{key}: max|diff|/max|ref| = {:.2e} (tolerance rel {x:.0e})",
                d / m.max(1e-30)
            );
            assert_close(key, &g, &want, 0.0, x);
        }
    }
}

struct Model {
    model: UltraRefiner,
    tu_vars: VarMap,
    sam_vars: VarMap,
}

fn build(style: MaskPromptStyle) -> Model {
    let dev = Device::Cpu;
    let cfg = Config::load("narrow").unwrap().model;
    let tu_vars = VarMap::new();
    let tu = TransUnet::new(
        &cfg.transunet,
        VarBuilder::from_varmap(&tu_vars, DType::F32, &dev),
    )
    .unwrap();
    let w = read_checkpoint(&fixture_path("transunet_narrow.safetensors").unwrap(), "").unwrap();
    let rep = load_into_varmap(&tu, &tu_vars, &w, LoadMode::Strict).unwrap();
    assert!(
        rep.missing.is_empty(),
        "TransUNet keys missing: {:?}",
        rep.missing
    );
    let sw = load_sam_weights(
        &fixture_path("sam_narrow_medsam_style.pth").unwrap(),
        Some(&cfg.sam),
        &dev,
    )
    .unwrap();
    let sam_vars = VarMap::new();
    let sam = Sam::from_weights(&cfg.sam, &sw, &sam_vars, &dev, DType::F32, None).unwrap();
    let settings = SamRefinerSettings {
        prompts: PromptConfig {
            mask_style: style,
            ..PromptConfig::default()
        },
        selection_temperature: 0.1,
        // Parity: the original normalised with SAM mean/std for every checkpoint (SPEC §7.1).
        normalization: SamNormalization::Sam,
        sharpen: None,
        ..SamRefinerSettings::default()
    };
    Model {
        model: UltraRefiner::new(tu, SamRefiner::new(sam, settings)),
        tu_vars,
        sam_vars,
    }
}

/// The Phase-3 loss of the library (SPEC §9.3, weights 0.3/0.7, refined loss at N): `(coarse_ce, coarse_dice,
/// L_coarse, L_refined, total)`. The fixture values are independent of this code, so this checks `train::losses` on
/// the real model outputs.
fn loss_terms(out: &UltraOutput, y: &Tensor) -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
    let n = out.refined_logits_n.dim(1).unwrap();
    let yn = resize_target(y, n).unwrap();
    let l = phase3_loss(
        &out.coarse_logits,
        y,
        &out.refined_logits_n,
        &yn,
        &Phase3LossConfig::default(),
        None,
    )
    .unwrap();
    let get = |k: &str| {
        l.get(k)
            .unwrap_or_else(|| panic!("loss has no `{k}`"))
            .clone()
    };
    (
        get("coarse_ce"),
        get("coarse_dice"),
        get("coarse"),
        get("refined"),
        l.total.clone(),
    )
}

fn var_map(vm: &VarMap) -> HashMap<String, Var> {
    vm.data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Parameters of the SAM prompt encoder/decoder that are unused by construction in this configuration
/// (points + box + mask prompt, multimask): SPEC §16.5 allow-list.
fn sam_allowed_without_grad(k: &str) -> bool {
    k.starts_with("mask_decoder.output_hypernetworks_mlps.0.")
        || k == "prompt_encoder.not_a_point_embed.weight"
        || k == "prompt_encoder.no_mask_embed.weight"
}

#[test]
fn parity_e2e_narrow_direct() {
    let fx = Fx::new();
    let m = build(MaskPromptStyle::Direct);
    let x = fx.get("input");
    let y = fx.get("labels");
    let out = m.model.forward(&x).unwrap();

    fx.check("coarse_logits", &out.coarse_logits);
    fx.check("coarse_prob", &out.coarse_prob);
    fx.check(
        "sam_image_1024_b0c0",
        &out.sam_inputs
            .image
            .narrow(0, 0, 1)
            .unwrap()
            .narrow(1, 0, 1)
            .unwrap(),
    );
    fx.check(
        "coarse_prob_1024_b0",
        &out.sam_inputs.coarse.narrow(0, 0, 1).unwrap(),
    );
    fx.check("image_embeddings", &out.embeddings);
    let pts = out.prompts.points.as_ref().unwrap();
    fx.check("prompts.point_coords", pts);
    fx.check("prompts.point_labels", out.prompts.labels.as_ref().unwrap());
    fx.check("prompts.boxes", out.prompts.boxes.as_ref().unwrap());
    assert_eq!(
        out.prompts.negative_corner.as_deref(),
        Some(&[1u32, 2][..]),
        "negative corners (README: [1, 2])"
    );
    fx.check("mask_inputs", out.prompts.mask.as_ref().unwrap());
    fx.check("low_res_masks", &out.low_res);
    fx.check("iou_predictions", &out.iou_pred);
    fx.check("selection_weights", &out.selection_weights);
    fx.check(
        "refined_logits_1024_b0",
        &out.refined_logits_n.narrow(0, 0, 1).unwrap(),
    );
    fx.check("refined_logits_224", &out.refined_logits_s);

    let (ce, dice, coarse, refined, total) = loss_terms(&out, &y);
    fx.check("loss.coarse_ce", &ce);
    fx.check("loss.coarse_dice", &dice);
    fx.check("loss.coarse_total", &coarse);
    fx.check("loss.refined", &refined);
    fx.check("loss.total", &total);

    let tu = var_map(&m.tu_vars);
    let sam = var_map(&m.sam_vars);
    let lookup = |name: &str| -> &Var {
        if let Some(k) = name.strip_prefix("transunet.") {
            tu.get(k)
                .unwrap_or_else(|| panic!("no TransUNet variable {k}"))
        } else if let Some(k) = name.strip_prefix("sam.") {
            sam.get(k).unwrap_or_else(|| panic!("no SAM variable {k}"))
        } else {
            panic!("unexpected gradient key {name}")
        }
    };
    for (loss, prefix) in [(&total, "grad."), (&refined, "grad_refined_only.")] {
        let grads = loss.backward().unwrap();
        let mut keys: Vec<&String> = fx.io.keys().filter(|k| k.starts_with(prefix)).collect();
        keys.sort();
        assert!(
            keys.len() >= 13,
            "{prefix}: expected the README's gradient tensors, found {}",
            keys.len()
        );
        for key in keys {
            let v = lookup(&key[prefix.len()..]);
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{key}: no gradient"));
            fx.check(key, g);
        }
        if prefix == "grad_refined_only." {
            // Gradient flow: L_refined alone reaches every TransUNet parameter through the prompts.
            let mut missing = Vec::new();
            for (k, v) in &tu {
                match grads.get(v.as_tensor()) {
                    Some(g) => {
                        let n = g
                            .sqr()
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap();
                        if !(n.is_finite() && n > 0.0) {
                            missing.push(format!("{k} (norm² {n})"));
                        }
                    }
                    None => missing.push(k.clone()),
                }
            }
            assert!(
                missing.is_empty(),
                "TransUNet parameters without gradient from L_refined: {missing:?}"
            );
            eprintln!(
                "refined-only gradient reaches all {} TransUNet variables",
                tu.len()
            );
        }
        let mut missing = Vec::new();
        for (k, v) in &sam {
            let ok = grads.get(v.as_tensor()).map(|g| {
                let n = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                n.is_finite() && n > 0.0
            });
            if ok != Some(true) && !sam_allowed_without_grad(k) {
                missing.push(k.clone());
            }
        }
        assert!(
            missing.is_empty(),
            "{prefix}: SAM variables without gradient: {missing:?}"
        );
    }
}

/// The `gaussian` variant, fed with the fixture's image embeddings (the cached-embedding path of the forward).
#[test]
fn parity_e2e_narrow_gaussian() {
    let fx = Fx::new();
    let m = build(MaskPromptStyle::Gaussian);
    let x = fx.get("input");
    let emb = fx.get("image_embeddings");
    let opts = ForwardOptions {
        embeddings: Some(&emb),
        ..ForwardOptions::default()
    };
    let out = m.model.forward_with(&x, &opts).unwrap();
    fx.check("gaussian.mask_inputs", out.prompts.mask.as_ref().unwrap());
    fx.check("gaussian.iou_predictions", &out.iou_pred);
    fx.check("gaussian.refined_logits_224", &out.refined_logits_s);
}
