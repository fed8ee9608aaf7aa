//! Parity of the TransUNet `narrow` model with `transunet_narrow_io.safetensors` (SPEC §5, §17.2): eval-mode forward
//! (logits, skips, ResNet output, embeddings, encoder output) and train-mode BatchNorm (dropout off): logits, running
//! statistics after the step, Phase-1 loss and parameter gradients. Weights from `transunet_narrow.safetensors`.
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use std::collections::HashMap;
use ultrarefiner::config::TransUnetConfig;
use ultrarefiner::models::transunet::{
    build_trainable, checkpoint::LoadMode, load_into_varmap, read_checkpoint, TransUnet,
};
use ultrarefiner::testing::{assert_close, assert_grad_close, fixture_path, get_f32, load_fixture};

fn narrow() -> TransUnetConfig {
    ultrarefiner::config::Config::load("narrow")
        .expect("narrow preset")
        .model
        .transunet
}

fn weights() -> HashMap<String, Tensor> {
    read_checkpoint(&fixture_path("transunet_narrow.safetensors").unwrap(), "")
        .expect("fixture weights")
}

/// `max|got − want| ≤ rel·max|want|` (the README's `rel X`); prints the measured ratio (`--nocapture`).
fn rel(name: &str, got: &Tensor, want: &Tensor, r: f64) {
    let d = (got.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let m = want
        .to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    let m = m.to_scalar::<f64>().unwrap();
    eprintln!(
        "{name}: max|diff|/max|ref| = {:.2e} (tolerance {r:.0e})",
        d / m.max(1e-30)
    );
    assert_close(name, got, want, 0.0, r);
}

/// Relative L2 error and cosine of a gradient, printed; then the SPEC §17.3 check.
fn grad(name: &str, got: &Tensor, want: &Tensor) {
    let g = got.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let w = want.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let s = |t: &Tensor| t.sum_all().unwrap().to_scalar::<f64>().unwrap();
    let rel_l2 = s(&(&g - &w).unwrap().sqr().unwrap()).sqrt() / s(&w.sqr().unwrap()).sqrt();
    let cos = s(&(&g * &w).unwrap()) / (s(&g.sqr().unwrap()).sqrt() * s(&w.sqr().unwrap()).sqrt());
    eprintln!("{name}: rel L2 {rel_l2:.2e}, cosine {cos:.8}");
    assert_grad_close(name, got, want, 1e-3, 0.9999);
}

/// The library's Phase-1 loss (SPEC §9.1) as `(loss, ce, dice)`; the fixture's values are the independent check.
fn phase1_loss(logits: &Tensor, y: &Tensor) -> (Tensor, Tensor, Tensor) {
    let l = ultrarefiner::train::losses::phase1_loss(logits, y).expect("phase1 loss");
    let get = |k: &str| {
        l.get(k)
            .unwrap_or_else(|| panic!("loss has no `{k}`"))
            .clone()
    };
    (l.total.clone(), get("ce"), get("dice"))
}

#[test]
fn parity_transunet_narrow_eval() {
    let io = load_fixture("transunet_narrow_io.safetensors").unwrap();
    let model = TransUnet::from_tensors(&narrow(), weights(), DType::F32, &Device::Cpu)
        .expect("strict load");
    let x = get_f32(&io, "input").unwrap();
    let out = model.forward_with_intermediates(&x, false, None).unwrap();
    rel(
        "eval.embeddings",
        &out.embeddings,
        &get_f32(&io, "eval.embeddings").unwrap(),
        2e-5,
    );
    rel(
        "eval.hidden_states",
        &out.hidden_states,
        &get_f32(&io, "eval.hidden_states").unwrap(),
        5e-5,
    );
    rel(
        "eval.logits",
        &out.logits,
        &get_f32(&io, "eval.logits").unwrap(),
        2e-4,
    );
    let b0 = |t: &Tensor| t.narrow(0, 0, 1).unwrap();
    rel(
        "eval.resnet_out_b0",
        &b0(&out.resnet_out),
        &get_f32(&io, "eval.resnet_out_b0").unwrap(),
        2e-3,
    );
    for (i, name) in ["eval.skip0_28_b0", "eval.skip1_56_b0", "eval.skip2_112_b0"]
        .iter()
        .enumerate()
    {
        rel(
            name,
            &b0(&out.features[i]),
            &get_f32(&io, name).unwrap(),
            2e-3,
        );
    }
    // The padded row/column of the 55→56 skip is exactly zero.
    let pad = out.features[1]
        .narrow(2, 55, 1)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert_eq!(pad.to_scalar::<f32>().unwrap(), 0.0);
    // forward_t agrees with the intermediates' logits.
    let l2 = model.forward_t(&x, false, Some(7)).unwrap();
    rel(
        "eval.logits (dropout seed ignored in eval)",
        &l2,
        &out.logits,
        0.0,
    );
}

#[test]
fn parity_transunet_narrow_train_bn() {
    let io = load_fixture("transunet_narrow_io.safetensors").unwrap();
    let w = weights();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = TransUnet::new(&narrow(), vb).unwrap();
    let report =
        load_into_varmap(&model, &varmap, &w, LoadMode::Strict).expect("strict varmap load");
    assert!(report.missing.is_empty(), "missing {:?}", report.missing);
    let x = get_f32(&io, "input").unwrap();
    let y = get_f32(&io, "labels").unwrap();
    let logits = model.forward_t(&x, true, None).unwrap();
    rel(
        "train_bn.logits",
        &logits,
        &get_f32(&io, "train_bn.logits").unwrap(),
        2e-4,
    );
    let bufs: HashMap<String, Tensor> = model.bn_buffers().unwrap().into_iter().collect();
    for s in ["running_mean", "running_var"] {
        let key = format!("train_bn.decoder.conv_more.1.{s}_after");
        rel(
            &key,
            &bufs[&format!("decoder.conv_more.1.{s}")],
            &get_f32(&io, &key).unwrap(),
            1e-5,
        );
    }
    let nbt = &bufs["decoder.conv_more.1.num_batches_tracked"];
    let nbt0 = w["decoder.conv_more.1.num_batches_tracked"]
        .to_dtype(DType::I64)
        .unwrap()
        .to_scalar::<i64>()
        .unwrap();
    assert_eq!(nbt.to_scalar::<i64>().unwrap(), nbt0 + 1);

    let (loss, ce, dice) = phase1_loss(&logits, &y);
    rel(
        "train_bn.loss",
        &loss,
        &get_f32(&io, "train_bn.loss").unwrap(),
        5e-5,
    );
    rel(
        "train_bn.ce",
        &ce,
        &get_f32(&io, "train_bn.ce").unwrap(),
        2e-5,
    );
    rel(
        "train_bn.dice",
        &dice,
        &get_f32(&io, "train_bn.dice").unwrap(),
        5e-5,
    );

    let grads = loss.backward().unwrap();
    let vars = varmap.data().lock().unwrap();
    let mut n = 0;
    for key in io.keys().filter(|k| k.starts_with("train_bn.grad.")) {
        let pname = key.strip_prefix("train_bn.grad.").unwrap();
        let var: &Var = vars
            .get(pname)
            .unwrap_or_else(|| panic!("no Var `{pname}`"));
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("no gradient for `{pname}`"));
        grad(key, g, &get_f32(&io, key).unwrap());
        n += 1;
    }
    assert_eq!(n, 11, "number of gradient tensors in the fixture");
}

/// SPEC §16.5: after one Phase-1 forward/backward at `tiny` (random init, train mode, dropout on), every trainable
/// Var has a finite, non-zero gradient.
#[test]
fn transunet_tiny_every_var_gets_a_gradient() {
    let cfg = ultrarefiner::config::Config::load("tiny")
        .unwrap()
        .model
        .transunet;
    let s = cfg.img_size;
    let varmap = VarMap::new();
    let model = build_trainable(&cfg, &varmap, "", DType::F32, &Device::Cpu, 42, None).unwrap();
    // Input: smooth image with a bright disc; target: the disc.
    let mut img = vec![0f32; 2 * s * s];
    let mut lab = vec![0f32; 2 * s * s];
    for b in 0..2 {
        for i in 0..s {
            for j in 0..s {
                let (cy, cx, r) = (
                    s as f32 * (0.4 + 0.1 * b as f32),
                    s as f32 * 0.5,
                    s as f32 * 0.2,
                );
                let inside = ((i as f32 - cy).powi(2) + (j as f32 - cx).powi(2)).sqrt() < r;
                let v = 0.2
                    + 0.3 * ((i * 7 + j * 13 + b * 5) % 17) as f32 / 17.0
                    + if inside { 0.4 } else { 0.0 };
                img[b * s * s + i * s + j] = v;
                lab[b * s * s + i * s + j] = inside as u8 as f32;
            }
        }
    }
    let x = Tensor::from_vec(img, (2, 1, s, s), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(lab, (2, s, s), &Device::Cpu).unwrap();
    let seed = ultrarefiner::rng::mix(42, "dropout", &[0, 0]);
    let logits = model.forward_t(&x, true, Some(seed)).unwrap();
    assert_eq!(logits.dims(), &[2, cfg.n_classes, s, s]);
    let (loss, _, _) = phase1_loss(&logits, &y);
    let grads = loss.backward().unwrap();
    let vars = varmap.data().lock().unwrap();
    assert!(!vars.is_empty());
    let mut bad = Vec::new();
    for (name, var) in vars.iter() {
        match grads.get(var) {
            None => bad.push(format!("{name}: no gradient")),
            Some(g) => {
                let n = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                if !n.is_finite() || n == 0.0 {
                    bad.push(format!("{name}: gradient norm² {n}"));
                }
            }
        }
        assert!(
            !name.contains("running_"),
            "BatchNorm buffer `{name}` must not be a Var"
        );
    }
    assert!(
        bad.is_empty(),
        "parameters without a usable gradient:\n{}",
        bad.join("\n")
    );
}

/// Dropout is deterministic per seed and changes the output; train mode without a seed equals no dropout.
#[test]
fn transunet_tiny_dropout_is_seeded() {
    let cfg = ultrarefiner::config::Config::load("tiny")
        .unwrap()
        .model
        .transunet;
    let s = cfg.img_size;
    let varmap = VarMap::new();
    let model = build_trainable(&cfg, &varmap, "", DType::F32, &Device::Cpu, 42, None).unwrap();
    let x = Tensor::rand(0f32, 1f32, (2, 1, s, s), &Device::Cpu).unwrap();
    let a = model.forward_t(&x, true, Some(1)).unwrap();
    let b = model.forward_t(&x, true, Some(1)).unwrap();
    let c = model.forward_t(&x, true, Some(2)).unwrap();
    let d = model.forward_t(&x, true, None).unwrap();
    let diff = |p: &Tensor, q: &Tensor| {
        (p - q)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    // BatchNorm running stats change between calls but train-mode outputs use batch statistics only.
    assert_eq!(diff(&a, &b), 0.0);
    assert!(diff(&a, &c) > 0.0);
    assert!(diff(&a, &d) > 0.0);
}

/// Paper-size forward with random weights (batch 1) — slow on 2 cores.
#[test]
#[ignore = "paper-size model (~105M parameters): slow on CPU"]
fn transunet_paper_forward_random() {
    let cfg = ultrarefiner::config::Config::load("paper")
        .unwrap()
        .model
        .transunet;
    let varmap = VarMap::new();
    let model = build_trainable(&cfg, &varmap, "", DType::F32, &Device::Cpu, 42, None).unwrap();
    let x = Tensor::rand(0f32, 1f32, (1, 1, 224, 224), &Device::Cpu).unwrap();
    let out = model.forward_with_intermediates(&x, false, None).unwrap();
    assert_eq!(out.logits.dims(), &[1, 2, 224, 224]);
    assert_eq!(out.features[0].dims(), &[1, 512, 28, 28]);
    assert_eq!(out.features[1].dims(), &[1, 256, 56, 56]);
    assert_eq!(out.features[2].dims(), &[1, 64, 112, 112]);
    assert_eq!(out.hidden_states.dims(), &[1, 196, 768]);
    let m = out
        .logits
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(m.is_finite());
}

/// The model is dtype-generic: an f64 build (used by finite-difference checks) reproduces the eval logits.
#[test]
fn transunet_narrow_eval_f64() {
    let io = load_fixture("transunet_narrow_io.safetensors").unwrap();
    let model = TransUnet::from_tensors(&narrow(), weights(), DType::F64, &Device::Cpu).unwrap();
    let x = get_f32(&io, "input").unwrap().to_dtype(DType::F64).unwrap();
    let out = model.forward_with_intermediates(&x, false, None).unwrap();
    assert_eq!(out.logits.dtype(), DType::F64);
    rel(
        "eval.logits (f64)",
        &out.logits,
        &get_f32(&io, "eval.logits").unwrap(),
        2e-4,
    );
    let bufs = model.bn_buffers().unwrap();
    assert!(bufs
        .iter()
        .all(|(k, t)| k.ends_with("num_batches_tracked") || t.dtype() == DType::F64));
}
