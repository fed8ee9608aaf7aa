//! SAM weight loading and conversion (SPEC §6.5, §6.6, §13.5): `.pth` containers, strict key/shape checks, the real
//! vit_b manifest, `sam.` prefixes, HF mapping round trips and the converters.
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use ultrarefiner::config::Config;
use ultrarefiner::convert::{hf_sam, pth};
use ultrarefiner::models::sam::weights::{
    check_strict, expected_params, infer_config, load_sam_weights, random_weights,
    save_safetensors_atomic,
};
use ultrarefiner::testing::fixture_path;

fn narrow() -> ultrarefiner::config::SamConfig {
    Config::narrow().model.sam
}

fn assert_same_tensors(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) {
    assert_eq!(a.len(), b.len());
    for (k, t) in a {
        let u = b.get(k).unwrap_or_else(|| panic!("missing {k}"));
        assert_eq!(t.dims(), u.dims(), "{k}");
        let x: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let y: Vec<f32> = u.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            x.iter().zip(&y).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{k} differs"
        );
    }
}

#[test]
fn sam_pth_plain_and_container_load_identically() {
    let cfg = narrow();
    let a = load_sam_weights(
        &fixture_path("sam_narrow.pth").unwrap(),
        Some(&cfg),
        &Device::Cpu,
    )
    .unwrap();
    let b = load_sam_weights(
        &fixture_path("sam_narrow_medsam_style.pth").unwrap(),
        Some(&cfg),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(a.tensors.len(), 174);
    assert_same_tensors(&a.tensors, &b.tensors);
    // The configuration inferred from the shapes has the narrow preset's shapes.
    let shapes: HashMap<String, Vec<usize>> = a
        .tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    let inferred = infer_config(&shapes, "sam_narrow.pth").unwrap();
    assert_eq!(expected_params(&inferred), expected_params(&cfg));
    // The order of §6.5 keys equals the state-dict order recorded in the config json.
    let js: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("sam_narrow.config.json").unwrap()).unwrap(),
    )
    .unwrap();
    if let Some(list) = js.get("state_dict_keys").and_then(|v| v.as_array()) {
        let keys: Vec<String> = list
            .iter()
            .map(|e| e["key"].as_str().unwrap().to_string())
            .collect();
        let mine: Vec<String> = expected_params(&cfg).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, mine);
    }
}

#[test]
fn sam_vit_b_manifest_matches_paper_shapes() {
    let paper = Config::paper().model.sam;
    let js: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("sam_vit_b_keys.json").unwrap()).unwrap(),
    )
    .unwrap();
    let list: Vec<(String, Vec<usize>)> = js["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["key"].as_str().unwrap().to_string(),
                e["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect(),
            )
        })
        .collect();
    assert_eq!(list.len(), 314);
    // Same keys, shapes and state-dict order as the model's expectation: nothing missing or unexpected.
    assert_eq!(expected_params(&paper), list);
    let shapes: HashMap<String, Vec<usize>> = list.iter().cloned().collect();
    check_strict(&shapes, &paper, "vit_b manifest").unwrap();
    assert_eq!(
        infer_config(&shapes, "m")
            .map(|c| expected_params(&c))
            .unwrap(),
        list
    );
    // Anything else errors and names the offending keys.
    let mut extra = shapes.clone();
    extra.insert("image_encoder.blocks.12.norm1.weight".into(), vec![768]);
    let e = check_strict(&extra, &paper, "x").unwrap_err().to_string();
    assert!(
        e.contains("unexpected") && e.contains("blocks.12.norm1.weight"),
        "{e}"
    );
    let mut miss = shapes.clone();
    miss.remove("mask_decoder.iou_token.weight");
    let e = check_strict(&miss, &paper, "x").unwrap_err().to_string();
    assert!(
        e.contains("missing") && e.contains("mask_decoder.iou_token.weight"),
        "{e}"
    );
    let mut bad = shapes;
    bad.insert("image_encoder.pos_embed".into(), vec![1, 32, 32, 768]);
    let e = check_strict(&bad, &paper, "x").unwrap_err().to_string();
    assert!(e.contains("wrong shape") && e.contains("pos_embed"), "{e}");
}

#[test]
fn sam_prefixed_refiner_checkpoint_and_strictness() {
    let cfg = narrow();
    let dir = tempfile::tempdir().unwrap();
    let w = random_weights(&cfg, 7, &Device::Cpu).unwrap();
    // `sam.` prefix with the extras of original end-to-end checkpoints; pixel stats are ignored.
    let mut v: Vec<(String, Tensor)> = w
        .iter()
        .map(|(k, t)| (format!("sam.{k}"), t.clone()))
        .collect();
    v.push((
        "sam.pixel_mean".into(),
        Tensor::zeros((3, 1, 1), DType::F32, &Device::Cpu).unwrap(),
    ));
    v.push((
        "sam_refiner._dummy".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    ));
    v.push((
        "transunet.x".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    ));
    v.push((
        "sam_refiner.sam.image_encoder.pos_embed".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    ));
    let p = dir.path().join("e2e.safetensors");
    save_safetensors_atomic(&v, &p).unwrap();
    let l = load_sam_weights(&p, Some(&cfg), &Device::Cpu).unwrap();
    assert_same_tensors(&l.tensors, &w);
    // A missing tensor is an error naming it.
    let mut v2: Vec<(String, Tensor)> = w.iter().map(|(k, t)| (k.clone(), t.clone())).collect();
    v2.retain(|(k, _)| k != "prompt_encoder.no_mask_embed.weight");
    v2.push((
        "image_encoder.extra".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    ));
    let p2 = dir.path().join("bad.safetensors");
    save_safetensors_atomic(&v2, &p2).unwrap();
    let e = load_sam_weights(&p2, Some(&cfg), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("prompt_encoder.no_mask_embed.weight") && e.contains("image_encoder.extra"),
        "{e}"
    );
    // A file of the wrong kind errors with its path.
    let e = load_sam_weights(Path::new("/nonexistent/x.pth"), Some(&cfg), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/x.pth"), "{e}");
}

#[test]
fn sam_hf_mapping_round_trip_and_errors() {
    let cfg = narrow();
    let w = load_sam_weights(
        &fixture_path("sam_narrow.pth").unwrap(),
        Some(&cfg),
        &Device::Cpu,
    )
    .unwrap();
    let hf = hf_sam::canonical_to_hf(&w.tensors).unwrap();
    assert!(hf.contains_key("vision_encoder.neck.layer_norm2.weight"));
    assert!(hf.contains_key("mask_decoder.iou_prediction_head.proj_out.bias"));
    assert!(hf.contains_key("mask_decoder.output_hypernetworks_mlps.2.layers.0.weight"));
    assert!(hf.contains_key("shared_image_embedding.positional_embedding"));
    assert!(hf.keys().all(|k| !k.starts_with("image_encoder.")));
    let back = hf_sam::hf_to_canonical(hf.clone().into_iter().collect(), "hf").unwrap();
    assert_same_tensors(&back, &w.tensors);

    // Through files and the converter (HF file → canonical safetensors + sidecar).
    let dir = tempfile::tempdir().unwrap();
    let hf_path = dir.path().join("model.safetensors");
    save_safetensors_atomic(&hf.clone().into_iter().collect::<Vec<_>>(), &hf_path).unwrap();
    let out = dir.path().join("sam_from_hf.safetensors");
    let n = hf_sam::hf_sam_to_safetensors(&hf_path, &out, Some("medsam")).unwrap();
    assert_eq!(n, 174);
    let l = load_sam_weights(&out, Some(&cfg), &Device::Cpu).unwrap();
    assert_same_tensors(&l.tensors, &w.tensors);
    let side: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pth::sidecar_path(&out)).unwrap()).unwrap();
    assert_eq!(side["provenance"], "medsam");
    assert_eq!(side["format"], "hf-sam");
    assert_eq!(side["tensor_count"], 174);

    // An unmapped HF key fails loudly.
    let mut bad: Vec<(String, Tensor)> = hf.clone().into_iter().collect();
    bad.push((
        "vision_encoder.layers.0.new_thing.weight".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    ));
    let e = hf_sam::hf_to_canonical(bad, "hf").unwrap_err().to_string();
    assert!(
        e.contains("vision_encoder.layers.0.new_thing.weight"),
        "{e}"
    );
    // The duplicate Fourier matrix must equal the prompt encoder's copy.
    let mut dup: Vec<(String, Tensor)> = hf.into_iter().collect();
    for (k, t) in dup.iter_mut() {
        if k == "shared_image_embedding.positional_embedding" {
            *t = (t.clone() + 1.0).unwrap();
        }
    }
    assert!(hf_sam::hf_to_canonical(dup, "hf").is_err());
}

/// A real HF file (`$ULTRAREFINER_SAM_HF`) converts and loads into `paper`; skipped when absent.
#[test]
fn sam_hf_real_file_when_present() {
    let Ok(p) = std::env::var("ULTRAREFINER_SAM_HF") else {
        return;
    };
    let paper = Config::paper().model.sam;
    load_sam_weights(Path::new(&p), Some(&paper), &Device::Cpu).unwrap();
}

#[test]
fn sam_pth_converter_writes_canonical_file() {
    let cfg = narrow();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sub/sam_narrow.safetensors");
    let src = fixture_path("sam_narrow_medsam_style.pth").unwrap();
    let n = pth::sam_pth_to_safetensors(&src, &out).unwrap();
    assert_eq!(n, 174);
    let a = load_sam_weights(&out, Some(&cfg), &Device::Cpu).unwrap();
    let b = load_sam_weights(
        &fixture_path("sam_narrow.pth").unwrap(),
        Some(&cfg),
        &Device::Cpu,
    )
    .unwrap();
    assert_same_tensors(&a.tensors, &b.tensors);
    let side: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(pth::sidecar_path(&out)).unwrap()).unwrap();
    assert_eq!(side["source_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(side["format"], "sam-pth");
    // No temporary files are left behind.
    let names: Vec<_> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
}
