//! LoRA on the image encoder (SPEC §6.8) and the embedding cache (SPEC §6.9), on the `tiny` geometry with
//! deterministic random weights.
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ultrarefiner::config::{Config, SamConfig};
use ultrarefiner::models::sam::weights::{random_weights, SamFormat, SamWeights};
use ultrarefiner::models::sam::{EmbeddingCache, LoraConfig, LoraTarget, Sam};
use ultrarefiner::testing::assert_close;

fn tiny() -> SamConfig {
    Config::tiny().model.sam
}

fn tiny_weights() -> SamWeights {
    SamWeights {
        tensors: random_weights(&tiny(), 3, &Device::Cpu).unwrap(),
        format: SamFormat::Original,
    }
}

fn images(b: usize, seed: f64) -> Tensor {
    let s = tiny().img_size;
    let n = b * 3 * s * s;
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as f64 * 0.37 + seed).sin() * 1.5) as f32)
        .collect();
    Tensor::from_vec(v, (b, 3, s, s), &Device::Cpu).unwrap()
}

fn lora_sam(lcfg: &LoraConfig) -> (Sam, VarMap) {
    let w = tiny_weights();
    let vm = VarMap::new();
    w.seed_varmap(&vm).unwrap();
    let frozen = w.var_builder(DType::F32, &Device::Cpu);
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let sam = Sam::new_with_lora(&tiny(), frozen, vb, Some(lcfg)).unwrap();
    (sam, vm)
}

/// Sets every `lora_b` to small non-zero values (B is zero-initialised, which would make the test trivial).
fn perturb_lora_b(vm: &VarMap) {
    let data = vm.data().lock().unwrap();
    for (k, v) in data.iter() {
        if k.ends_with("lora_b") {
            let n = v.elem_count();
            let vals: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.7).sin() * 0.05).collect();
            v.set(&Tensor::from_vec(vals, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

#[test]
fn sam_lora_keys_training_set_and_merge() {
    let lcfg = LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: vec![LoraTarget::Qkv, LoraTarget::Proj, LoraTarget::Mlp],
    };
    let (sam, vm) = lora_sam(&lcfg);
    let cfg = tiny();
    let d = cfg.encoder_embed_dim;
    {
        let data = vm.data().lock().unwrap();
        // Only LoRA adapters, prompt encoder and mask decoder train; no frozen encoder weight is a Var.
        for k in data.keys() {
            let ok = (k.starts_with("image_encoder.")
                && (k.ends_with(".lora_a") || k.ends_with(".lora_b")))
                || k.starts_with("prompt_encoder.")
                || k.starts_with("mask_decoder.");
            assert!(ok, "unexpected trainable variable {k}");
        }
        let a = data.get("image_encoder.blocks.0.attn.qkv.lora_a").unwrap();
        assert_eq!(a.dims(), &[2, d]);
        assert_eq!(
            data.get("image_encoder.blocks.0.attn.qkv.lora_b")
                .unwrap()
                .dims(),
            &[3 * d, 2]
        );
        assert!(data.contains_key("image_encoder.blocks.3.mlp.lin2.lora_a"));
        assert!(data.contains_key("image_encoder.blocks.1.attn.proj.lora_b"));
        // B starts at zero, A within the kaiming bound 1/sqrt(in).
        let b: Vec<f32> = data["image_encoder.blocks.0.attn.qkv.lora_b"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(b.iter().all(|x| *x == 0.0));
        let av: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let bound = 1.0 / (d as f32).sqrt();
        assert!(av.iter().all(|x| x.abs() <= bound) && av.iter().any(|x| *x != 0.0));
    }
    perturb_lora_b(&vm);
    let x = images(1, 0.0);
    // Gradients reach every adapter (and not the frozen encoder, which holds no Vars).
    let emb = sam.image_encoder.forward_trainable(&x, Some(11)).unwrap();
    let out = sam
        .decode(
            &emb,
            None,
            Some(&Tensor::new(&[[40f32, 60., 200., 180.]], &Device::Cpu).unwrap()),
            None,
            true,
        )
        .unwrap();
    let loss = (candle_nn::ops::sigmoid(&out.masks)
        .unwrap()
        .mean_all()
        .unwrap()
        + out.iou.sqr().unwrap().mean_all().unwrap())
    .unwrap();
    let grads = loss.backward().unwrap();
    let data = vm.data().lock().unwrap();
    for (k, v) in data.iter().filter(|(k, _)| k.contains("lora_")) {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {k}"));
        let n = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n.is_finite() && n > 0.0, "{k}: gradient norm {n}");
    }
    drop(data);
    // Merging gives the same embeddings as the unmerged adapters.
    let unmerged = sam.image_encoder.forward_trainable(&x, None).unwrap();
    let mut merged = sam.image_encoder.clone();
    merged.merge_lora().unwrap();
    assert!(!merged.has_lora());
    let m = merged.forward_frozen(&x).unwrap();
    assert_close("merged vs unmerged", &m, &unmerged, 1e-5, 1e-4);
    // Export contains exactly the §6.5 tensors with merged weights.
    let ex = sam.export_tensors(true).unwrap();
    assert_eq!(
        ex.len(),
        ultrarefiner::models::sam::expected_params(&cfg).len()
    );
    assert!(sam.export_tensors(false).is_err());
}

#[test]
fn sam_lora_zero_b_is_identity() {
    let (sam, _vm) = lora_sam(&LoraConfig::default());
    let w = tiny_weights();
    let vb = w.var_builder(DType::F32, &Device::Cpu);
    let plain = Sam::new(&tiny(), vb.clone(), vb).unwrap();
    let x = images(1, 1.0);
    let a = sam.image_encoder.forward_trainable(&x, None).unwrap();
    let b = plain.image_encoder.forward_frozen(&x).unwrap();
    assert_close("lora(B=0) vs plain", &a, &b, 1e-5, 1e-4);
}

#[test]
fn sam_embedding_cache_second_run_has_no_encoder_forwards() {
    let w = tiny_weights();
    let vb = w.var_builder(DType::F32, &Device::Cpu);
    let sam = Sam::new(&tiny(), vb.clone(), vb).unwrap();
    let enc = &sam.image_encoder;
    let fp = enc.fingerprint().unwrap();
    assert_eq!(fp.len(), 64);
    let dir = tempfile::tempdir().unwrap();
    // Grey inputs at S = 32; the SAM input is a deterministic function of them.
    let s = 32;
    let grey: Vec<f32> = (0..3 * s * s)
        .map(|i| ((i * 7919) % 255) as f32 / 255.0)
        .collect();
    let grey = Tensor::from_vec(grey, (3, 1, s, s), &Device::Cpu).unwrap();
    let n = tiny().img_size;
    let make = |g: &Tensor| {
        let g = g.clone();
        move |idx: &[usize]| -> ultrarefiner::Result<Tensor> {
            let ids = Tensor::new(
                idx.iter().map(|&i| i as u32).collect::<Vec<_>>().as_slice(),
                &Device::Cpu,
            )?;
            let x = g.index_select(&ids, 0)?.upsample_nearest2d(n, n)?;
            Ok(((x.repeat((1, 3, 1, 1))? * 255.0)? - 120.0)?.affine(1.0 / 58.0, 0.0)?)
        }
    };
    let c1 = EmbeddingCache::new(Some(dir.path()), &fp, 1 << 30).unwrap();
    let e1 = c1.embed(enc, &grey, "sam", make(&grey)).unwrap();
    assert_eq!(enc.forward_count(), 3);
    assert_eq!((c1.hits(), c1.misses()), (0, 3));
    // Same cache instance (memory hits) and a fresh instance over the same folder (disk hits): zero forwards.
    let e2 = c1.embed(enc, &grey, "sam", make(&grey)).unwrap();
    let c2 = EmbeddingCache::new(Some(dir.path()), &fp, 1 << 30).unwrap();
    let e3 = c2.embed(enc, &grey, "sam", make(&grey)).unwrap();
    assert_eq!(
        enc.forward_count(),
        3,
        "second run must not run the encoder"
    );
    assert_eq!(c2.hits(), 3);
    assert_close("memory hit", &e2, &e1, 0.0, 0.0);
    assert_close("disk hit", &e3, &e1, 0.0, 0.0);
    let files = std::fs::read_dir(dir.path().join(&fp)).unwrap().count();
    assert_eq!(files, 3);
    // Cached embeddings equal fresh ones within the f16 storage error, and give the same decoder outputs.
    let fresh = enc
        .forward_frozen(&make(&grey)(&[0, 1, 2]).unwrap())
        .unwrap();
    assert_close("cached vs fresh", &e1, &fresh, 0.0, 1e-3);
    let bx = Tensor::new(&[[10f32, 20., 200., 150.]; 3], &Device::Cpu).unwrap();
    let a = sam.decode(&e1, None, Some(&bx), None, true).unwrap();
    let b = sam.decode(&fresh, None, Some(&bx), None, true).unwrap();
    assert_close("refined from cache", &a.masks, &b.masks, 0.0, 2e-2);
    // A different image or normalisation mode is a different key; a tiny memory budget still works.
    let k1 = c1.key(&grey.get(0).unwrap(), "sam", DType::F32).unwrap();
    assert_ne!(
        k1,
        c1.key(&grey.get(1).unwrap(), "sam", DType::F32).unwrap()
    );
    assert_ne!(
        k1,
        c1.key(&grey.get(0).unwrap(), "unit", DType::F32).unwrap()
    );
    let c3 = EmbeddingCache::new(None, &fp, 1).unwrap();
    let grey2 = (&grey * 0.5).unwrap();
    c3.embed(enc, &grey2, "sam", make(&grey2)).unwrap();
    c3.embed(enc, &grey2, "sam", make(&grey2)).unwrap();
    assert_eq!(
        enc.forward_count(),
        3 + 3 + 3 + 3,
        "memory-only cache with no room recomputes"
    );
}

/// SPEC §16.3: the image encoder is never built over `Var`s, even from a `VarMap` builder; the decoder is.
#[test]
fn sam_encoder_over_varmap_stays_frozen() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let sam = Sam::new(&tiny(), vb.clone(), vb).unwrap();
    let enc = &sam.image_encoder;
    assert!(!enc.pos_embed.is_variable());
    assert!(!enc.patch_embed.weight.is_variable());
    assert!(!enc.blocks[0].attn.qkv.base.weight.is_variable());
    assert!(!enc.neck3.weight.is_variable());
    assert!(!sam.prompt_encoder.pe_layer.gaussian.is_variable());
    assert!(sam.mask_decoder.iou_token.is_variable());
    assert!(sam.prompt_encoder.no_mask_embed.is_variable());
}
