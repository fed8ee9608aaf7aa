//! Pretrained-weight conversion (SPEC §5.5 npz, §5.6 timm) and strict canonical loading (SPEC §5.7, §11.1.4).
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use ultrarefiner::config::TransUnetConfig;
use ultrarefiner::convert::npz::{convert_npz, encoder_shapes, resize_pos_grid};
use ultrarefiner::convert::timm::convert_timm;
use ultrarefiner::models::transunet::{read_checkpoint, save_safetensors_atomic, TransUnet};
use ultrarefiner::testing::{fixture_path, shared_dir};

fn preset(name: &str) -> TransUnetConfig {
    ultrarefiner::config::Config::load(name)
        .expect("preset")
        .model
        .transunet
}

fn fixture_weights() -> HashMap<String, Tensor> {
    read_checkpoint(&fixture_path("transunet_narrow.safetensors").unwrap(), "").unwrap()
}

fn npz_path() -> std::path::PathBuf {
    fixture_path("transunet_narrow_pretrained.npz").unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// Rewrites the members of an npz archive (optionally dropping one, replacing one, or deflate-compressing all).
fn rewrite_npz(
    src: &Path,
    dst: &Path,
    deflate: bool,
    skip: Option<&str>,
    replace: Option<(&str, &Tensor)>,
) {
    let mut zin = zip::ZipArchive::new(std::fs::File::open(src).unwrap()).unwrap();
    let mut zout = zip::ZipWriter::new(std::fs::File::create(dst).unwrap());
    let method = if deflate {
        zip::CompressionMethod::Deflated
    } else {
        zip::CompressionMethod::Stored
    };
    let opts = zip::write::SimpleFileOptions::default().compression_method(method);
    for i in 0..zin.len() {
        let mut f = zin.by_index(i).unwrap();
        let name = f.name().to_string();
        let arr = name.trim_end_matches(".npy");
        if skip == Some(arr) {
            continue;
        }
        let mut buf = Vec::new();
        match replace {
            Some((r, t)) if r == arr => {
                let tmp = dst.with_extension("member.npy");
                t.write_npy(&tmp).unwrap();
                buf = std::fs::read(&tmp).unwrap();
                std::fs::remove_file(&tmp).unwrap();
            }
            _ => {
                f.read_to_end(&mut buf).unwrap();
            }
        }
        zout.start_file(name, opts).unwrap();
        zout.write_all(&buf).unwrap();
    }
    zout.finish().unwrap();
}

#[test]
fn transunet_npz_narrow_reproduces_fixture_encoder() {
    let cfg = preset("narrow");
    let conv = convert_npz(&npz_path(), &cfg).expect("convert narrow npz");
    let w = fixture_weights();
    let want: Vec<&String> = w.keys().filter(|k| k.starts_with("transformer.")).collect();
    assert_eq!(want.len(), 76);
    assert_eq!(conv.tensors.len(), 76);
    assert_eq!(conv.read.len(), 76);
    assert_eq!(
        conv.ignored,
        vec![
            "cls",
            "head/bias",
            "head/kernel",
            "pre_logits/bias",
            "pre_logits/kernel"
        ]
    );
    for k in want {
        let got = conv
            .tensors
            .get(k)
            .unwrap_or_else(|| panic!("conversion lacks `{k}`"));
        assert_eq!(got.dims(), w[k].dims(), "{k}");
        assert!(bits(got) == bits(&w[k]), "`{k}` differs from the fixture");
    }
    // Loading into the model: the converted encoder + the fixture decoder give a strict, complete state dict.
    let mut all: HashMap<String, Tensor> = w
        .iter()
        .filter(|(k, _)| !k.starts_with("transformer."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    all.extend(conv.tensors);
    TransUnet::from_tensors(&cfg, all, DType::F32, &Device::Cpu)
        .expect("strict load of converted weights");
}

#[test]
fn transunet_npz_deflate_compressed_loads() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("deflated.npz");
    rewrite_npz(&npz_path(), &p, true, None, None);
    let a = convert_npz(&npz_path(), &preset("narrow")).unwrap();
    let b = convert_npz(&p, &preset("narrow")).unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (k, t) in &a.tensors {
        assert!(bits(t) == bits(&b.tensors[k]), "{k}");
    }
}

#[test]
fn transunet_npz_errors_name_the_key_or_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = preset("narrow");
    // Missing array.
    let p = dir.path().join("missing.npz");
    let key = "Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel";
    rewrite_npz(&npz_path(), &p, false, Some(key), None);
    let e = convert_npz(&p, &cfg).unwrap_err().to_string();
    assert!(e.contains(key) && e.contains("missing"), "{e}");
    // Wrong shape.
    let p = dir.path().join("shape.npz");
    let key = "block2/unit1/conv2/kernel";
    let bad = Tensor::zeros((3, 3, 64, 65), DType::F32, &Device::Cpu).unwrap();
    rewrite_npz(&npz_path(), &p, false, None, Some((key, &bad)));
    let e = convert_npz(&p, &cfg).unwrap_err().to_string();
    assert!(e.contains(key) && e.contains("shape"), "{e}");
    // Truncated file.
    let p = dir.path().join("truncated.npz");
    let bytes = std::fs::read(npz_path()).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = convert_npz(&p, &cfg).unwrap_err().to_string();
    assert!(e.contains("truncated.npz"), "{e}");
    // Nonexistent file.
    let e = convert_npz(&dir.path().join("nope.npz"), &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.npz"), "{e}");
    // Wrong preset: the narrow npz does not fit `tiny`.
    let e = convert_npz(&npz_path(), &preset("tiny"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("shape"), "{e}");
}

/// The manifest of the real `R50+ViT-B_16.npz`: a random npz with exactly those keys and shapes converts for `paper`
/// (353 arrays read, 5 ignored) and yields every encoder tensor of the `paper` model.
#[test]
fn transunet_npz_paper_manifest_covered() {
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("r50_vit_b16_npz_keys.json").unwrap()).unwrap(),
    )
    .unwrap();
    let keys = manifest["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 358);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("r50_vit_b16_random.npz");
    {
        let mut zout =
            zip::ZipWriter::new(std::io::BufWriter::new(std::fs::File::create(&p).unwrap()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(false);
        let mut state: u64 = 0x1234_5678;
        for k in keys {
            let name = k["key"].as_str().unwrap();
            let shape: Vec<usize> = k["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            let n: usize = shape.iter().product();
            let sh = shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(",");
            let sh = if shape.len() == 1 {
                format!("{sh},")
            } else {
                sh
            };
            let mut header =
                format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({sh}), }}");
            while (10 + header.len() + 1) % 64 != 0 {
                header.push(' ');
            }
            header.push('\n');
            let mut buf = Vec::with_capacity(10 + header.len() + 4 * n);
            buf.extend_from_slice(b"\x93NUMPY\x01\x00");
            buf.extend_from_slice(&(header.len() as u16).to_le_bytes());
            buf.extend_from_slice(header.as_bytes());
            for _ in 0..n {
                // xorshift values in [-1, 1)
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let v = (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                buf.extend_from_slice(&v.to_le_bytes());
            }
            zout.start_file(format!("{name}.npy"), opts).unwrap();
            zout.write_all(&buf).unwrap();
        }
        zout.finish().unwrap();
    }
    let cfg = preset("paper");
    let conv = convert_npz(&p, &cfg).expect("paper npz converts");
    assert_eq!(conv.read.len(), 353);
    assert_eq!(
        conv.ignored,
        vec![
            "cls",
            "head/bias",
            "head/kernel",
            "pre_logits/bias",
            "pre_logits/kernel"
        ]
    );
    let expected = encoder_shapes(&cfg);
    assert_eq!(expected.len(), conv.tensors.len());
    for (k, shape) in &expected {
        assert_eq!(conv.tensors[k].dims(), shape.as_slice(), "{k}");
    }
    // Manifest entries flagged `read_by_load_from` are exactly the arrays read.
    let mut flagged: Vec<String> = keys
        .iter()
        .filter(|k| k["read_by_load_from"].as_bool().unwrap())
        .map(|k| k["key"].as_str().unwrap().to_string())
        .collect();
    flagged.sort();
    assert_eq!(flagged, conv.read);
}

#[test]
fn transunet_pos_embed_resize_for_other_grids() {
    let mut cfg = preset("narrow");
    cfg.img_size = 256; // grid 16
    let conv = convert_npz(&npz_path(), &cfg).unwrap();
    let pe = &conv.tensors["transformer.embeddings.position_embeddings"];
    assert_eq!(pe.dims(), &[1, 256, 64]);
    // Corner-aligned: the four corners equal the source corners.
    let src = &fixture_weights()["transformer.embeddings.position_embeddings"]
        .squeeze(0)
        .unwrap();
    let dst = pe.squeeze(0).unwrap();
    for (s, d) in [(0usize, 0usize), (13, 15), (182, 240), (195, 255)] {
        let a = src.get(s).unwrap().to_vec1::<f32>().unwrap();
        let b = dst.get(d).unwrap().to_vec1::<f32>().unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6, "corner {s}->{d}: {x} vs {y}");
        }
    }
    // Same grid: identity.
    let g = resize_pos_grid(src, 14).unwrap();
    assert!(bits(&g) == bits(src));
}

/// timm layout built from the canonical narrow tensors (fused qkv, cls row in pos_embed) converts back exactly.
#[test]
fn transunet_timm_layout_converts() {
    let cfg = preset("narrow");
    let w = fixture_weights();
    let hm = "transformer.embeddings.hybrid_model";
    let mut t: HashMap<String, Tensor> = HashMap::new();
    t.insert(
        "patch_embed.backbone.stem.conv.weight".into(),
        w[&format!("{hm}.root.conv.weight")].clone(),
    );
    for s in ["weight", "bias"] {
        t.insert(
            format!("patch_embed.backbone.stem.norm.{s}"),
            w[&format!("{hm}.root.gn.{s}")].clone(),
        );
        t.insert(
            format!("patch_embed.proj.{s}"),
            w[&format!("transformer.embeddings.patch_embeddings.{s}")].clone(),
        );
        t.insert(
            format!("norm.{s}"),
            w[&format!("transformer.encoder.encoder_norm.{s}")].clone(),
        );
    }
    for b in 1..=3 {
        let st = format!("patch_embed.backbone.stages.{}.blocks.0", b - 1);
        let u = format!("{hm}.body.block{b}.unit1");
        for k in 1..=3 {
            t.insert(
                format!("{st}.conv{k}.weight"),
                w[&format!("{u}.conv{k}.weight")].clone(),
            );
            for s in ["weight", "bias"] {
                t.insert(
                    format!("{st}.norm{k}.{s}"),
                    w[&format!("{u}.gn{k}.{s}")].clone(),
                );
            }
        }
        t.insert(
            format!("{st}.downsample.conv.weight"),
            w[&format!("{u}.downsample.weight")].clone(),
        );
        for s in ["weight", "bias"] {
            t.insert(
                format!("{st}.downsample.norm.{s}"),
                w[&format!("{u}.gn_proj.{s}")].clone(),
            );
        }
    }
    let pe = &w["transformer.embeddings.position_embeddings"];
    let cls = Tensor::ones((1, 1, 64), DType::F32, &Device::Cpu).unwrap();
    t.insert("pos_embed".into(), Tensor::cat(&[&cls, pe], 1).unwrap());
    t.insert("cls_token".into(), cls);
    for i in 0..2 {
        let l = format!("transformer.encoder.layer.{i}");
        for s in ["weight", "bias"] {
            t.insert(
                format!("blocks.{i}.norm1.{s}"),
                w[&format!("{l}.attention_norm.{s}")].clone(),
            );
            t.insert(
                format!("blocks.{i}.norm2.{s}"),
                w[&format!("{l}.ffn_norm.{s}")].clone(),
            );
            t.insert(
                format!("blocks.{i}.mlp.fc1.{s}"),
                w[&format!("{l}.ffn.fc1.{s}")].clone(),
            );
            t.insert(
                format!("blocks.{i}.mlp.fc2.{s}"),
                w[&format!("{l}.ffn.fc2.{s}")].clone(),
            );
            t.insert(
                format!("blocks.{i}.attn.proj.{s}"),
                w[&format!("{l}.attn.out.{s}")].clone(),
            );
            let qkv: Vec<&Tensor> = ["query", "key", "value"]
                .iter()
                .map(|n| &w[&format!("{l}.attn.{n}.{s}")])
                .collect();
            t.insert(
                format!("blocks.{i}.attn.qkv.{s}"),
                Tensor::cat(&qkv, 0).unwrap(),
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("timm.safetensors");
    candle_core::safetensors::save(&t, &p).unwrap();
    let conv = convert_timm(&p, &cfg).expect("timm conversion");
    assert_eq!(conv.ignored, vec!["cls_token"]);
    let npz = convert_npz(&npz_path(), &cfg).unwrap();
    assert_eq!(conv.tensors.len(), npz.tensors.len());
    for (k, v) in &npz.tensors {
        assert!(
            bits(v) == bits(&conv.tensors[k]),
            "{k}: timm and npz conversions differ"
        );
    }
    // An unknown tensor is an error naming it.
    t.insert(
        "blocks.9.attn.qkv.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&t, &p).unwrap();
    let e = convert_timm(&p, &cfg).unwrap_err().to_string();
    assert!(e.contains("blocks.9.attn.qkv.weight"), "{e}");
}

/// SPEC §5.6: with both real files present (weights/), the npz and timm conversions are identical.
#[test]
fn transunet_real_npz_equals_timm_when_present() {
    let root = shared_dir().unwrap().parent().unwrap().to_path_buf();
    let npz = ["weights/R50+ViT-B_16.npz", "main/weights/R50+ViT-B_16.npz"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_file());
    let timm = [
        "weights/vit_base_r50_s16_224.orig_in21k.safetensors",
        "main/weights/vit_base_r50_s16_224.orig_in21k.safetensors",
    ]
    .iter()
    .map(|p| root.join(p))
    .find(|p| p.is_file());
    let (Some(npz), Some(timm)) = (npz, timm) else {
        eprintln!("skipped: real R50+ViT-B_16 npz and timm safetensors not both present");
        return;
    };
    let cfg = preset("paper");
    let a = convert_npz(&npz, &cfg).unwrap();
    let b = convert_timm(&timm, &cfg).unwrap();
    for (k, v) in &a.tensors {
        assert!(bits(v) == bits(&b.tensors[k]), "{k}");
    }
}

#[test]
fn transunet_canonical_loading_is_strict() {
    let cfg = preset("narrow");
    let w = fixture_weights();
    // Complete: loads; num_batches_tracked optional.
    let mut no_nbt = w.clone();
    no_nbt.retain(|k, _| !k.ends_with("num_batches_tracked"));
    TransUnet::from_tensors(&cfg, no_nbt, DType::F32, &Device::Cpu)
        .expect("num_batches_tracked is optional");
    // Missing key.
    let mut m = w.clone();
    m.remove("decoder.blocks.2.conv1.0.weight");
    m.remove("decoder.conv_more.1.running_var");
    let e = TransUnet::from_tensors(&cfg, m, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("decoder.blocks.2.conv1.0.weight")
            && e.contains("decoder.conv_more.1.running_var"),
        "{e}"
    );
    // Unexpected key.
    let mut u = w.clone();
    u.insert(
        "decoder.extra.weight".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = TransUnet::from_tensors(&cfg, u, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("decoder.extra.weight"), "{e}");
    // Wrong shape.
    let mut s = w.clone();
    s.insert(
        "segmentation_head.0.bias".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = TransUnet::from_tensors(&cfg, s, DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("segmentation_head.0.bias"), "{e}");
    // __optim__ keys are ignored by read_checkpoint; a prefix selects a sub-model.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ckpt.safetensors");
    let mut with_optim: Vec<(String, Tensor)> = w
        .iter()
        .map(|(k, v)| (format!("transunet.{k}"), v.clone()))
        .collect();
    with_optim.push((
        "__optim__.g0.momentum.transunet.segmentation_head.0.bias".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    ));
    with_optim.push((
        "sam.some.weight".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    ));
    save_safetensors_atomic(&p, &with_optim).unwrap();
    TransUnet::from_checkpoint(&cfg, &p, "transunet", DType::F32, &Device::Cpu)
        .expect("prefixed checkpoint");
    let e = TransUnet::from_checkpoint(&cfg, &p, "", DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("sam.some.weight"), "{e}");
}

#[test]
fn transunet_convert_writes_canonical_file_atomically() {
    use ultrarefiner::convert::npz::{convert_encoder_file, EncoderFormat};
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sub").join("r50-narrow.safetensors");
    let conv =
        convert_encoder_file(EncoderFormat::Npz, &npz_path(), &out, &preset("narrow")).unwrap();
    let back = read_checkpoint(&out, "").unwrap();
    assert_eq!(back.len(), conv.tensors.len());
    for (k, v) in &conv.tensors {
        assert!(bits(v) == bits(&back[k]), "{k}");
    }
    let side: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(side["format"], "npz");
    assert_eq!(side["tensor_count"], 76);
    assert_eq!(side["source_sha256"].as_str().unwrap().len(), 64);
    let names: Vec<String> = std::fs::read_dir(out.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(names.len(), 2, "no temporary files left: {names:?}");
    // The converted file is accepted as a pretrained encoder source.
    let enc =
        ultrarefiner::models::transunet::load_pretrained_encoder(&out, &preset("narrow")).unwrap();
    assert_eq!(enc.len(), 76);
}

#[test]
fn transunet_npz_rejects_fortran_order() {
    use ultrarefiner::convert::npz::decode_npy;
    let t = Tensor::arange(0f32, 6f32, &Device::Cpu)
        .unwrap()
        .reshape((2, 3))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.npy");
    t.write_npy(&p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let back = decode_npy(&bytes).unwrap();
    assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    let pat = b"'fortran_order': False";
    let i = bytes.windows(pat.len()).position(|w| w == pat).unwrap();
    let mut fortran = bytes.clone();
    fortran[i..i + pat.len()].copy_from_slice(b"'fortran_order': True ");
    let e = decode_npy(&fortran).unwrap_err();
    assert!(e.contains("Fortran"), "{e}");
    assert!(decode_npy(&bytes[..bytes.len() - 3])
        .unwrap_err()
        .contains("truncated"));
}

/// Parameter count of `narrow` equals the reference model's (`transunet_narrow.config.json`: 1168434).
#[test]
fn transunet_narrow_parameter_count() {
    use candle_nn::{VarBuilder, VarMap};
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let _model = TransUnet::new(&preset("narrow"), vb).unwrap();
    let n: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_path("transunet_narrow.config.json").unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(n as u64, cfg["num_parameters"].as_u64().unwrap());
    // Every fixture tensor that is not a BatchNorm buffer is a Var with the same shape.
    let w = fixture_weights();
    let vars = varmap.data().lock().unwrap();
    for (k, t) in &w {
        if k.contains("running_") || k.ends_with("num_batches_tracked") {
            assert!(!vars.contains_key(k), "{k} must be a buffer, not a Var");
        } else {
            assert_eq!(vars[k].dims(), t.dims(), "{k}");
        }
    }
    assert_eq!(vars.len() + 3 * 9, w.len());
}

/// A trainable model under a prefix (Phase 3 layout) loads the fixture strictly, its state dict round-trips through
/// a canonical file, and the pretrained-encoder mode fills only `transformer.*`.
#[test]
fn transunet_varmap_loading_and_state_dict() {
    use candle_nn::{VarBuilder, VarMap};
    use ultrarefiner::models::transunet::checkpoint::{state_dict, LoadMode};
    use ultrarefiner::models::transunet::load_into_varmap;
    let cfg = preset("narrow");
    let w = fixture_weights();
    let io = ultrarefiner::testing::load_fixture("transunet_narrow_io.safetensors").unwrap();
    let x = ultrarefiner::testing::get_f32(&io, "input").unwrap();
    let want = ultrarefiner::testing::get_f32(&io, "eval.logits").unwrap();

    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu).pp("transunet");
    let model = TransUnet::new(&cfg, vb).unwrap();
    assert_eq!(model.prefix(), "transunet");
    load_into_varmap(&model, &varmap, &w, LoadMode::Strict).unwrap();
    let got = model.forward(&x).unwrap();
    ultrarefiner::testing::assert_close("prefixed eval.logits", &got, &want, 0.0, 2e-4);
    assert!(varmap
        .data()
        .lock()
        .unwrap()
        .keys()
        .all(|k| k.starts_with("transunet.")));

    let sd = state_dict(&model, &varmap).unwrap();
    assert_eq!(sd.len(), w.len());
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("phase1.safetensors");
    save_safetensors_atomic(&p, &sd).unwrap();
    let frozen = TransUnet::from_checkpoint(&cfg, &p, "", DType::F32, &Device::Cpu).unwrap();
    let again = frozen.forward(&x).unwrap();
    assert!(
        bits(&again) == bits(&got),
        "state dict round trip changes the output"
    );

    // Unexpected key in a strict varmap load.
    let mut extra = w.clone();
    extra.insert(
        "decoder.blocks.9.conv1.0.weight".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = load_into_varmap(&model, &varmap, &extra, LoadMode::Strict)
        .unwrap_err()
        .to_string();
    assert!(e.contains("decoder.blocks.9.conv1.0.weight"), "{e}");

    // Pretrained encoder only: decoder stays, encoder gets the npz weights.
    let varmap2 = VarMap::new();
    let vb2 = VarBuilder::from_varmap(&varmap2, DType::F32, &Device::Cpu);
    let model2 = TransUnet::new(&cfg, vb2).unwrap();
    let enc: HashMap<String, Tensor> =
        ultrarefiner::models::transunet::load_pretrained_encoder(&npz_path(), &cfg)
            .unwrap()
            .into_iter()
            .collect();
    let rep = load_into_varmap(&model2, &varmap2, &enc, LoadMode::Encoder).unwrap();
    assert_eq!(rep.loaded.len(), 76);
    assert!(rep.missing.iter().all(|k| !k.starts_with("transformer.")));
    let e = load_into_varmap(&model2, &varmap2, &enc, LoadMode::Strict)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing keys") && e.contains("decoder."), "{e}");

    // build_trainable with a pretrained npz gives the same encoder Vars.
    let varmap3 = VarMap::new();
    let _m3 = ultrarefiner::models::transunet::build_trainable(
        &cfg,
        &varmap3,
        "",
        DType::F32,
        &Device::Cpu,
        42,
        Some(&npz_path()),
    )
    .unwrap();
    let v3 = varmap3.data().lock().unwrap();
    for (k, t) in &enc {
        assert!(bits(v3[k].as_tensor()) == bits(t), "{k}");
    }
}

/// Seeded initialisation: same seed → identical Vars (independent of build order), another seed → different;
/// explicit initialisers are honoured (norm weights 1, biases 0, position embeddings 0, PyTorch uniform bounds).
#[test]
fn transunet_seeded_init_is_reproducible() {
    use candle_nn::VarMap;
    use ultrarefiner::models::transunet::build_trainable;
    let cfg = preset("tiny");
    let build = |seed: u64| {
        let vm = VarMap::new();
        build_trainable(&cfg, &vm, "", DType::F32, &Device::Cpu, seed, None).unwrap();
        let data = vm.data().lock().unwrap();
        let mut v: Vec<(String, Tensor)> = data
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    };
    let a = build(7);
    let b = build(7);
    let c = build(8);
    assert_eq!(a.len(), b.len());
    let mut differs = 0;
    for ((ka, ta), ((kb, tb), (_, tc))) in a.iter().zip(b.iter().zip(c.iter())) {
        assert_eq!(ka, kb);
        assert!(
            bits(ta) == bits(tb),
            "{ka} differs between two builds with the same seed"
        );
        if bits(ta) != bits(tc) {
            differs += 1;
        }
        let v = ta.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        if ka.ends_with("position_embeddings")
            || (ka.contains("norm") || ka.contains(".gn")) && ka.ends_with("bias")
        {
            assert!(v.iter().all(|x| *x == 0.0), "{ka} must start at 0");
        }
        if (ka.contains("norm") || ka.contains(".gn")) && ka.ends_with("weight") {
            assert!(v.iter().all(|x| *x == 1.0), "{ka} must start at 1");
        }
        if ka == "segmentation_head.0.weight" {
            let bound = 1.0 / ((8 * 9) as f32).sqrt();
            assert!(
                v.iter().all(|x| x.abs() <= bound),
                "{ka} outside U(±1/√fan_in)"
            );
        }
    }
    assert!(
        differs > 10,
        "a different seed must change the random tensors"
    );
}
