//! Parity with `shared/fixtures/losses_metrics.safetensors` + `losses_metrics.json` (SPEC §17.2).
//!
//! Compared as they are: §9.1 Phase 1 loss, its components and `d_logits`; §9.3 Phase 3 loss, components and both
//! gradients (fixture weights 0.3/0.7, β = 0, α = 1) and the nearest-resized target; §10.1 batch-pooled metrics
//! (`training_metrics_utils` per image, `training_metrics_pooled_over_all_8` as one batch); §10.2/§10.3 per-image
//! metrics of `test_metrics_evaluate_test` for cases 0 and 3–7.
//!
//! Skipped or reinterpreted per the SPEC §18 compatibility notes ("Parity" lines of §9.2 and §10.2):
//! * §9.2: only `phase2b.input_quality` (q_b), `phase2b.penalty_weight` (w_b) and, from the JSON, `bce` and `dice`
//!   of both variants and variant (b)'s `change_penalty` (= L_chg/λ with the soft coarse mask) are compared. Skipped
//!   because they encode replaced loss variants: `phase2a.loss`, `phase2b.loss`, `phase2a.d_pred_logits`,
//!   `phase2b.d_pred_logits`, the `focal` term, variant (a)'s L1 change penalty, and all `phase2b_iou.*`. Gradients
//!   of L₂ are covered by finite-difference unit tests in `train::losses`.
//! * §10.2: in the one-empty cases the original values are replaced — case 1 `precision` 1 → 0 and `hd95`
//!   null → sqrt(224² + 224²); case 2 `recall` 1 → 0 and `hd95` null → the same diagonal; their other values are
//!   compared as they are. The ≈1e-11 values of the reference (eps/count) are 0 here (within 1e-6 absolute).
//! * `phase3_gated.refined_loss` (probability-space loss of the gated model) is not compared: §7.8 makes the gated
//!   model return logits, so the same `L_refined` applies.
use candle_core::{DType, Device, Tensor, Var};
use serde_json::Value;
use ultrarefiner::eval::metrics::{binarize, image_metrics, Confusion};
use ultrarefiner::testing::{assert_close, fixture_path, get_f32, load_fixture};
use ultrarefiner::train::losses::{
    change_penalty, change_penalty_weights, dice_loss_per_sample, nearest_target, phase1_loss, phase2_loss,
    phase3_loss, scalar_f64, Phase2LossConfig, Phase3LossConfig,
};
use ultrarefiner::train::metrics::PooledMetrics;

fn json() -> Value {
    let p = fixture_path("losses_metrics.json").unwrap();
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn jf(v: &Value, path: &[&str]) -> f64 {
    let mut x = v;
    for k in path {
        x = &x[*k];
    }
    x.as_f64().unwrap_or_else(|| panic!("fixture json has no number at {path:?}"))
}

/// Scalar comparison: relative `rtol` or absolute `atol`.
fn close(name: &str, got: f64, want: f64, rtol: f64, atol: f64) {
    let d = (got - want).abs();
    assert!(d <= atol || d <= rtol * want.abs(), "{name}: got {got}, want {want} (|diff| {d:.3e})");
}

#[test]
fn phase1_loss_and_gradient() {
    let fx = load_fixture("losses_metrics.safetensors").unwrap();
    let j = json();
    let logits = Var::from_tensor(&get_f32(&fx, "phase1.logits").unwrap()).unwrap();
    let labels = get_f32(&fx, "phase1.labels").unwrap();
    let out = phase1_loss(logits.as_tensor(), &labels).unwrap();
    close("phase1.loss", out.total_f64().unwrap(), jf(&j, &["losses", "phase1", "loss"]), 1e-6, 0.0);
    assert_close("phase1.loss tensor", &out.total, &get_f32(&fx, "phase1.loss").unwrap(), 0.0, 1e-6);
    close("phase1.ce", scalar_f64(out.get("ce").unwrap()).unwrap(), jf(&j, &["losses", "phase1", "ce"]), 1e-6, 0.0);
    close("phase1.dice", scalar_f64(out.get("dice").unwrap()).unwrap(), jf(&j, &["losses", "phase1", "dice"]), 1e-6, 0.0);
    let g = out.total.backward().unwrap();
    let d = g.get(logits.as_tensor()).unwrap();
    assert_close("phase1.d_logits", d, &get_f32(&fx, "phase1.d_logits").unwrap(), 0.0, 1e-5);
}

#[test]
fn phase2_components_kept_by_spec() {
    let fx = load_fixture("losses_metrics.safetensors").unwrap();
    let j = json();
    let z = get_f32(&fx, "phase2.pred_logits").unwrap();
    let g = get_f32(&fx, "phase2.gt").unwrap();
    let c = get_f32(&fx, "phase2.coarse").unwrap();
    let cfg = Phase2LossConfig { iou_loss_weight: 1.0, change_penalty_weight: 0.5 };
    let out = phase2_loss(&z, &g, &c, None, &cfg).unwrap();
    for variant in ["phase2a_offline_hybrid", "phase2b_online_augmented"] {
        close(
            &format!("{variant}.bce"),
            scalar_f64(out.get("bce").unwrap()).unwrap(),
            jf(&j, &["losses", variant, "bce"]),
            1e-6,
            0.0,
        );
        close(
            &format!("{variant}.dice"),
            scalar_f64(out.get("dice").unwrap()).unwrap(),
            jf(&j, &["losses", variant, "dice"]),
            1e-6,
            0.0,
        );
    }
    close(
        "phase2b.dice (direct)",
        scalar_f64(&dice_loss_per_sample(&z, &g).unwrap()).unwrap(),
        jf(&j, &["losses", "phase2b_online_augmented", "dice"]),
        1e-6,
        0.0,
    );
    // change component = λ·(L_chg/λ); the fixture stores L_chg/λ (soft coarse mask)
    let want_chg = jf(&j, &["losses", "phase2b_online_augmented", "change_penalty"]);
    close("phase2b.change_penalty", scalar_f64(out.get("change").unwrap()).unwrap() / 0.5, want_chg, 2e-6, 0.0);
    let (q, w) = change_penalty_weights(&c, &g).unwrap();
    close("phase2b.change_penalty (direct)", scalar_f64(&change_penalty(&z, &c, &w).unwrap()).unwrap(), want_chg, 2e-6, 0.0);
    assert_close("phase2b.input_quality", &q, &get_f32(&fx, "phase2b.input_quality").unwrap(), 0.0, 1e-6);
    assert_close("phase2b.penalty_weight", &w, &get_f32(&fx, "phase2b.penalty_weight").unwrap(), 1e-7, 1e-6);
    assert_close("aux input_quality", out.get("input_quality").unwrap(), &q, 0.0, 0.0);
    // with no candidates the IoU term is exactly 0 and the total is the sum of the components
    assert_eq!(scalar_f64(out.get("iou").unwrap()).unwrap(), 0.0);
    let sum = ["bce", "dice", "change"].iter().map(|k| scalar_f64(out.get(k).unwrap()).unwrap()).sum::<f64>();
    close("phase2 total", out.total_f64().unwrap(), sum, 1e-6, 0.0);
}

#[test]
fn phase3_loss_and_gradients() {
    let fx = load_fixture("losses_metrics.safetensors").unwrap();
    let j = json();
    let coarse = Var::from_tensor(&get_f32(&fx, "phase3.coarse_logits").unwrap()).unwrap();
    let refined = Var::from_tensor(&get_f32(&fx, "phase3.refined_logits").unwrap()).unwrap();
    let target = get_f32(&fx, "phase3.target").unwrap();
    let tr = nearest_target(&target, 128).unwrap();
    assert_close("phase3.target_resized", &tr, &get_f32(&fx, "phase3.target_resized").unwrap(), 0.0, 0.0);
    let cfg = Phase3LossConfig { coarse_weight: jf(&j, &["losses", "phase3", "coarse_weight"]), refined_weight: jf(&j, &["losses", "phase3", "refined_weight"]) };
    assert_eq!(cfg, Phase3LossConfig::default());
    let out = phase3_loss(coarse.as_tensor(), &target, refined.as_tensor(), &tr, &cfg, None).unwrap();
    close("phase3.total", out.total_f64().unwrap(), jf(&j, &["losses", "phase3", "total"]), 1e-6, 0.0);
    assert_close("phase3.loss", &out.total, &get_f32(&fx, "phase3.loss").unwrap(), 0.0, 1e-6);
    let sc = |k: &str| scalar_f64(out.get(k).unwrap()).unwrap();
    close("phase3.coarse_total", sc("coarse"), jf(&j, &["losses", "phase3", "coarse_total"]), 1e-6, 0.0);
    close("phase3.coarse_ce", sc("coarse_ce"), jf(&j, &["losses", "phase3", "coarse_ce"]), 1e-6, 0.0);
    close("phase3.coarse_dice", sc("coarse_dice"), jf(&j, &["losses", "phase3", "coarse_dice"]), 1e-6, 0.0);
    close("phase3.refined", sc("refined"), jf(&j, &["losses", "phase3", "refined"]), 1e-6, 0.0);
    let g = out.total.backward().unwrap();
    assert_close(
        "phase3.d_coarse_logits",
        g.get(coarse.as_tensor()).unwrap(),
        &get_f32(&fx, "phase3.d_coarse_logits").unwrap(),
        0.0,
        1e-5,
    );
    assert_close(
        "phase3.d_refined_logits",
        g.get(refined.as_tensor()).unwrap(),
        &get_f32(&fx, "phase3.d_refined_logits").unwrap(),
        0.0,
        1e-5,
    );
}

fn metric_masks() -> (Vec<Vec<bool>>, Vec<Vec<bool>>, usize, usize) {
    let fx = load_fixture("losses_metrics.safetensors").unwrap();
    let pred = get_f32(&fx, "metrics.pred").unwrap();
    let tgt = get_f32(&fx, "metrics.target").unwrap();
    let (n, h, w) = pred.dims3().unwrap();
    let pv: Vec<f32> = pred.flatten_all().unwrap().to_vec1().unwrap();
    let tv: Vec<f32> = tgt.flatten_all().unwrap().to_vec1().unwrap();
    let p = (0..n).map(|i| binarize(&pv[i * h * w..(i + 1) * h * w], 0.5)).collect();
    let t = (0..n).map(|i| binarize(&tv[i * h * w..(i + 1) * h * w], 0.5)).collect();
    (p, t, h, w)
}

#[test]
fn per_image_metrics_evaluate_test() {
    let j = json();
    let (p, t, h, w) = metric_masks();
    let cases = j["metrics"]["per_image"].as_array().unwrap();
    assert_eq!(cases.len(), p.len());
    let diag = ((h * h + w * w) as f64).sqrt();
    for (i, case) in cases.iter().enumerate() {
        let m = image_metrics(&p[i], &t[i], h, w, None).unwrap();
        let r = &case["test_metrics_evaluate_test"];
        let mut want: Vec<(&str, f64)> = ["dice", "iou", "precision", "recall", "accuracy", "specificity"]
            .iter()
            .map(|k| (*k, r[*k].as_f64().unwrap()))
            .collect();
        let want_hd = r["hd95"].as_f64();
        let hd = match i {
            // §10.2 replacements for the one-empty cases
            1 => {
                assert!(m.pred_empty && !m.gt_empty);
                want[2].1 = 0.0; // precision 1 → 0
                assert!(want_hd.is_none());
                diag
            }
            2 => {
                assert!(!m.pred_empty && m.gt_empty);
                want[3].1 = 0.0; // recall 1 → 0
                assert!(want_hd.is_none());
                diag
            }
            _ => want_hd.unwrap(),
        };
        let got = [m.dice, m.iou, m.precision, m.recall, m.accuracy, m.specificity];
        for ((k, wv), g) in want.iter().zip(got) {
            close(&format!("case {i} {k}"), g, *wv, 1e-5, 1e-6);
        }
        close(&format!("case {i} hd95"), m.hd95, hd, 0.0, 1e-9);
        if i == 1 || i == 2 {
            assert!((m.hd95 - 316.783837972).abs() < 1e-6);
            assert_eq!(m.assd, m.hd95);
        }
    }
}

#[test]
fn pooled_training_metrics() {
    let j = json();
    let (p, t, _, _) = metric_masks();
    let cases = j["metrics"]["per_image"].as_array().unwrap();
    let keys = ["dice", "iou", "precision", "recall", "accuracy", "specificity"];
    let mut pooled = Confusion::default();
    for (i, case) in cases.iter().enumerate() {
        let c = Confusion::from_masks(&p[i], &t[i]).unwrap();
        pooled = pooled.add(&c);
        let m = PooledMetrics::from_confusion(&c);
        let r = &case["training_metrics_utils"];
        for (k, g) in keys.iter().zip(m.pairs()) {
            assert_eq!(*k, g.0);
            close(&format!("case {i} pooled {k}"), g.1, r[*k].as_f64().unwrap(), 1e-5, 1e-6);
        }
    }
    let m = PooledMetrics::from_confusion(&pooled);
    let r = &j["metrics"]["training_metrics_pooled_over_all_8"];
    for (k, g) in m.pairs() {
        close(&format!("all-8 pooled {k}"), g, r[k].as_f64().unwrap(), 1e-5, 1e-6);
    }
    // the same pooled counts from tensors on the device path
    let fx = load_fixture("losses_metrics.safetensors").unwrap();
    let pred = get_f32(&fx, "metrics.pred").unwrap();
    let tgt = fx["metrics.target"].to_dtype(DType::F32).unwrap();
    let mt = PooledMetrics::from_batch(&pred, &tgt).unwrap();
    assert_eq!(mt, m);
    let _ = Tensor::zeros(1, DType::F32, &Device::Cpu);
}
