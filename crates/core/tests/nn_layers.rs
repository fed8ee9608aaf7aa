//! Behaviour of the stateful / initialised layers of `ultrarefiner::nn`: BatchNorm running statistics, dropout
//! masks, LoRA merging, PyTorch-default initialisation bounds.
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::collections::HashMap;
use ultrarefiner::nn;
use ultrarefiner::testing::assert_close;

fn cpu() -> Device {
    Device::Cpu
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

#[test]
fn batch_norm_updates_running_stats_like_pytorch() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &cpu());
    let bn = nn::BatchNorm2d::new(2, 1e-5, 0.1, vb).unwrap();
    // Only weight and bias are trainable; buffers never enter the VarMap (SPEC §16.3).
    let mut keys: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, vec!["bias".to_string(), "weight".to_string()]);

    let x = Tensor::arange(0.0f64, 24.0, &cpu())
        .unwrap()
        .sqr()
        .unwrap()
        .reshape((3, 2, 2, 2))
        .unwrap();
    let y = bn.forward_t(&x, true).unwrap();
    let xv = to_vec(&x);
    for c in 0..2 {
        let vals: Vec<f64> = (0..3)
            .flat_map(|b| (0..4).map(move |k| (b, k)))
            .map(|(b, k)| xv[b * 8 + c * 4 + k])
            .collect();
        let n = vals.len() as f64;
        let mean = vals.iter().sum::<f64>() / n;
        let var_b = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let rm = to_vec(&bn.running_mean().unwrap())[c];
        let rv = to_vec(&bn.running_var().unwrap())[c];
        assert!((rm - 0.1 * mean).abs() < 1e-9, "running_mean {rm}");
        assert!(
            (rv - (0.9 + 0.1 * var_b * n / (n - 1.0))).abs() < 1e-9,
            "running_var {rv}"
        );
        // Normalisation uses the biased batch variance.
        let yv = to_vec(&y);
        let y0 = yv[c * 4];
        assert!((y0 - (vals[0] - mean) / (var_b + 1e-5).sqrt()).abs() < 1e-9);
    }
    assert_eq!(bn.num_batches_tracked().unwrap(), 1);
    bn.forward_t(&x, true).unwrap();
    assert_eq!(bn.num_batches_tracked().unwrap(), 2);
    // Eval does not touch the buffers.
    let before = to_vec(&bn.running_mean().unwrap());
    bn.forward_t(&x, false).unwrap();
    assert_eq!(before, to_vec(&bn.running_mean().unwrap()));
    let bufs = bn.buffers().unwrap();
    let names: Vec<&str> = bufs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        ["running_mean", "running_var", "num_batches_tracked"]
    );
    assert_eq!(bufs[2].1.dtype(), DType::I64);
}

#[test]
fn batch_norm_loads_and_restores_buffers() {
    let mut m = HashMap::new();
    m.insert(
        "weight".to_string(),
        Tensor::new(&[2.0f32, 3.0], &cpu()).unwrap(),
    );
    m.insert(
        "bias".to_string(),
        Tensor::new(&[0.5f32, -0.5], &cpu()).unwrap(),
    );
    m.insert(
        "running_mean".to_string(),
        Tensor::new(&[1.0f32, -1.0], &cpu()).unwrap(),
    );
    m.insert(
        "running_var".to_string(),
        Tensor::new(&[4.0f32, 0.25], &cpu()).unwrap(),
    );
    m.insert(
        "num_batches_tracked".to_string(),
        Tensor::new(7i64, &cpu()).unwrap(),
    );
    let bn =
        nn::BatchNorm2d::new(2, 0.0, 0.1, VarBuilder::from_tensors(m, DType::F32, &cpu())).unwrap();
    assert_eq!(bn.num_batches_tracked().unwrap(), 7);
    let x = Tensor::new(&[3.0f32, 0.0], &cpu())
        .unwrap()
        .reshape((1, 2, 1, 1))
        .unwrap();
    let y = to_vec(&bn.forward_t(&x, false).unwrap());
    assert_eq!(
        y,
        vec![2.0 * (3.0 - 1.0) / 2.0 + 0.5, 3.0 * (0.0 + 1.0) / 0.5 - 0.5]
    );
    bn.set_buffer("running_var", &Tensor::new(&[1.0f32, 1.0], &cpu()).unwrap())
        .unwrap();
    bn.set_buffer("num_batches_tracked", &Tensor::new(3i64, &cpu()).unwrap())
        .unwrap();
    assert_eq!(to_vec(&bn.running_var().unwrap()), vec![1.0, 1.0]);
    assert_eq!(bn.num_batches_tracked().unwrap(), 3);
    assert!(bn
        .set_buffer("running_var", &Tensor::new(&[1.0f32], &cpu()).unwrap())
        .is_err());
    assert!(bn
        .set_buffer("nope", &Tensor::new(&[1.0f32], &cpu()).unwrap())
        .is_err());
}

#[test]
fn dropout_mask_is_deterministic_and_scaled() {
    let d = nn::Dropout::new(0.25);
    let x = Tensor::ones((4, 1000), DType::F32, &cpu()).unwrap();
    assert_eq!(to_vec(&d.forward_t(&x, None).unwrap()), to_vec(&x));
    let a = to_vec(&d.forward_t(&x, Some(11)).unwrap());
    let b = to_vec(&d.forward_t(&x, Some(11)).unwrap());
    let c = to_vec(&d.forward_t(&x, Some(12)).unwrap());
    assert_eq!(a, b);
    assert_ne!(a, c);
    let kept = a.iter().filter(|v| **v != 0.0).count() as f64 / a.len() as f64;
    assert!((kept - 0.75).abs() < 0.03, "kept fraction {kept}");
    for v in &a {
        assert!(*v == 0.0 || (*v - 1.0 / 0.75).abs() < 1e-6, "value {v}");
    }
    assert_eq!(a, to_vec(&nn::dropout_mask(&[4, 1000], 0.25, 11).unwrap()));
    assert!(nn::Dropout::new(1.5).forward_t(&x, Some(1)).is_err());
}

#[test]
fn lora_merged_equals_unmerged() {
    let mut vm = VarMap::new();
    let w = Tensor::randn(0.0f64, 1.0, (6, 5), &cpu()).unwrap();
    let b = Tensor::randn(0.0f64, 1.0, 6, &cpu()).unwrap();
    let x = Tensor::randn(0.0f64, 1.0, (3, 4, 5), &cpu()).unwrap();
    let base = candle_nn::Linear::new(w.clone(), Some(b.clone()))
        .forward(&x)
        .unwrap();
    {
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &cpu());
        let lora =
            nn::LoraLinear::new(w.clone(), Some(b.clone()), 2, 4.0, 0.0, vb.pp("qkv")).unwrap();
        assert_eq!(lora.scale(), 2.0);
        // B = 0 at init: the adapted layer equals the base layer.
        assert_close("lora init", &lora.forward(&x).unwrap(), &base, 1e-12, 0.0);
    }
    // Make B non-zero (as after training), then merged and unmerged must agree.
    vm.set_one(
        "qkv.lora_b",
        Tensor::randn(0.0f64, 1.0, (6, 2), &cpu()).unwrap(),
    )
    .unwrap();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &cpu());
    let lora = nn::LoraLinear::new(w, Some(b), 2, 4.0, 0.0, vb.pp("qkv")).unwrap();
    let unmerged = lora.forward(&x).unwrap();
    let merged = lora.merged_linear().unwrap().forward(&x).unwrap();
    assert_close("lora merged", &merged, &unmerged, 1e-12, 1e-12);
    assert!(to_vec(&(&merged - &base).unwrap().abs().unwrap())
        .iter()
        .any(|v| *v > 1e-3));
    // Gradients reach A and B.
    let loss = lora.forward(&x).unwrap().sqr().unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    assert!(g.get(lora.lora_a()).is_some() && g.get(lora.lora_b()).is_some());
}

#[test]
fn default_init_bounds_match_pytorch() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &cpu());
    let conv = nn::conv2d(8, 16, 3, Default::default(), true, vb.pp("c")).unwrap();
    let lin = nn::linear(50, 10, true, vb.pp("l")).unwrap();
    let ct = nn::conv_transpose2d(
        16,
        4,
        2,
        nn::ConvTranspose2dConfig {
            stride: 2,
            ..Default::default()
        },
        true,
        vb.pp("t"),
    )
    .unwrap();
    let sc = nn::StdConv2d::new(3, 8, 7, 2, 3, false, vb.pp("s")).unwrap();
    let check = |name: &str, t: &Tensor, fan_in: f64| {
        let v = to_vec(t);
        let bound = 1.0 / fan_in.sqrt();
        let m = v.iter().fold(0.0f64, |a, b| a.max(b.abs()));
        assert!(
            m <= bound + 1e-7 && m > 0.5 * bound,
            "{name}: max |w| {m} vs bound {bound}"
        );
    };
    check("conv weight", conv.weight(), 72.0);
    check("conv bias", conv.bias().unwrap(), 72.0);
    check("linear weight", lin.weight(), 50.0);
    check("conv_t weight", ct.weight(), 16.0);
    assert_eq!(ct.weight().dims(), &[16, 4, 2, 2]);
    check("stdconv weight", sc.weight(), 147.0);
    let ln = nn::LayerNorm::new(4, 1e-6, vb.pp("ln")).unwrap();
    assert_eq!(to_vec(ln.weight()), vec![1.0; 4]);
    assert_eq!(to_vec(ln.bias()), vec![0.0; 4]);
    let ln2 = nn::LayerNorm2d::new(4, 1e-6, vb.pp("ln2")).unwrap();
    assert_eq!(to_vec(ln2.weight()), vec![1.0; 4]);
    let gn = nn::GroupNorm::new(2, 4, 1e-6, vb.pp("gn")).unwrap();
    assert_eq!(to_vec(gn.weight()), vec![1.0; 4]);
    assert!(nn::GroupNorm::new(3, 4, 1e-6, vb.pp("bad")).is_err());
    // Conv-transpose k2 s2 doubles the resolution (SAM output upscaling).
    let x = Tensor::zeros((1, 16, 5, 5), DType::F32, &cpu()).unwrap();
    assert_eq!(ct.forward(&x).unwrap().dims(), &[1, 4, 10, 10]);
}

#[test]
fn strided_std_conv_rejects_mixed_parity() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &cpu());
    let sc = nn::StdConv2d::new(3, 4, 3, 2, 1, false, vb).unwrap();
    assert!(sc
        .forward(&Tensor::zeros((1, 3, 8, 7), DType::F32, &cpu()).unwrap())
        .is_err());
    assert_eq!(
        sc.forward(&Tensor::zeros((1, 3, 8, 10), DType::F32, &cpu()).unwrap())
            .unwrap()
            .dims(),
        &[1, 4, 4, 5]
    );
}

#[test]
fn layer_norm_half_precision_uses_f32_statistics() {
    let x = (Tensor::randn(0.0f32, 1.0, (2, 5, 256), &cpu()).unwrap() + 3.0).unwrap();
    let vm = VarMap::new();
    let ln =
        nn::LayerNorm::new(256, 1e-6, VarBuilder::from_varmap(&vm, DType::F32, &cpu())).unwrap();
    let want = ln.forward(&x).unwrap();
    let ln16 = nn::LayerNorm::from_tensors(
        ln.weight().to_dtype(DType::BF16).unwrap(),
        ln.bias().to_dtype(DType::BF16).unwrap(),
        1e-6,
    );
    let got = ln16.forward(&x.to_dtype(DType::BF16).unwrap()).unwrap();
    assert_eq!(got.dtype(), DType::BF16);
    assert_close(
        "bf16 LayerNorm",
        &got.to_dtype(DType::F32).unwrap(),
        &want,
        0.0,
        2e-2,
    );
}

#[test]
fn batch_norm_reads_buffers_from_a_seeded_varmap_as_plain_tensors() {
    let vm = VarMap::new();
    {
        let mut d = vm.data().lock().unwrap();
        let rm =
            candle_core::Var::from_tensor(&Tensor::new(&[1.0f32, 2.0], &cpu()).unwrap()).unwrap();
        d.insert("bn.running_mean".to_string(), rm);
        let nbt = candle_core::Var::from_tensor(&Tensor::new(5.0f32, &cpu()).unwrap()).unwrap();
        d.insert("bn.num_batches_tracked".to_string(), nbt);
    }
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &cpu());
    let bn = nn::BatchNorm2d::new(2, 1e-5, 0.1, vb.pp("bn")).unwrap();
    assert_eq!(to_vec(&bn.running_mean().unwrap()), vec![1.0, 2.0]);
    assert_eq!(to_vec(&bn.running_var().unwrap()), vec![1.0, 1.0]);
    assert_eq!(bn.num_batches_tracked().unwrap(), 5);
    assert!(!bn.running_mean().unwrap().is_variable());
    // A wrong shape names the buffer.
    let mut m = HashMap::new();
    m.insert(
        "running_var".to_string(),
        Tensor::new(&[1.0f32, 2.0, 3.0], &cpu()).unwrap(),
    );
    m.insert(
        "weight".to_string(),
        Tensor::new(&[1.0f32, 1.0], &cpu()).unwrap(),
    );
    m.insert(
        "bias".to_string(),
        Tensor::new(&[0.0f32, 0.0], &cpu()).unwrap(),
    );
    let err = nn::BatchNorm2d::new(
        2,
        1e-5,
        0.1,
        VarBuilder::from_tensors(m, DType::F32, &cpu()),
    )
    .unwrap_err();
    assert!(err.to_string().contains("running_var"), "{err}");
}
