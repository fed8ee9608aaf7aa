//! Device checks (SPEC §17.1, run by `make gpu-check` with `--features cuda -- --ignored`): the `narrow` SAM on CUDA
//! agrees with the fixture / CPU, the bf16 frozen encoder agrees with f32 within 2e-2 relative, and the decoder
//! gradients on the GPU match. Without a CUDA device the tests return early.
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use ultrarefiner::config::Config;
use ultrarefiner::models::sam::{load_sam_weights, normalize_sam, Sam};
use ultrarefiner::testing::{assert_close, assert_grad_close, fixture_path, get_f32, load_fixture};

fn cuda() -> Option<Device> {
    match Device::cuda_if_available(0) {
        Ok(d) if d.is_cuda() => Some(d),
        _ => None,
    }
}

#[test]
#[ignore = "needs a CUDA device (make gpu-check)"]
fn sam_gpu_encoder_f32_bf16_and_decoder() {
    let Some(dev) = cuda() else {
        eprintln!("no CUDA device: skipped");
        return;
    };
    let cfg = Config::narrow().model.sam;
    let io = load_fixture("sam_narrow_io.safetensors").unwrap();
    let w = load_sam_weights(&fixture_path("sam_narrow.pth").unwrap(), Some(&cfg), &dev).unwrap();
    let x = normalize_sam(&get_f32(&io, "image_u8").unwrap())
        .unwrap()
        .to_device(&dev)
        .unwrap();
    let want = get_f32(&io, "image_embeddings").unwrap();

    let vm = VarMap::new();
    let sam = Sam::from_weights(&cfg, &w, &vm, &dev, DType::F32, None).unwrap();
    let t = std::time::Instant::now();
    let e32 = sam.image_encoder.forward_frozen(&x).unwrap();
    let _ = e32.sum_all().unwrap().to_scalar::<f32>().unwrap();
    eprintln!(
        "narrow encoder f32 on CUDA: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    assert_close(
        "cuda f32 embeddings",
        &e32.to_device(&Device::Cpu).unwrap(),
        &want,
        0.0,
        1e-4,
    );
    let et = sam.image_encoder.forward_trainable(&x, None).unwrap();
    assert_close(
        "cuda trainable path",
        &et.to_device(&Device::Cpu).unwrap(),
        &want,
        0.0,
        1e-4,
    );

    let vm16 = VarMap::new();
    let sam16 = Sam::from_weights(&cfg, &w, &vm16, &dev, DType::BF16, None).unwrap();
    let e16 = sam16.image_encoder.forward_frozen(&x).unwrap();
    assert_eq!(e16.dtype(), DType::F32);
    assert_close(
        "bf16 vs f32 encoder",
        &e16.to_device(&Device::Cpu).unwrap(),
        &want,
        0.0,
        2e-2,
    );

    // Decoder forward + gradients on the GPU (set 1).
    let g = |k: &str| get_f32(&io, k).unwrap().to_device(&dev).unwrap();
    let pts = Var::from_tensor(&g("set1.point_coords")).unwrap();
    let boxes = Var::from_tensor(&g("set1.boxes")).unwrap();
    let masks = Var::from_tensor(&g("set1.mask_inputs")).unwrap();
    let emb = g("image_embeddings");
    let out = sam
        .decode(
            &emb,
            Some((pts.as_tensor(), &g("set1.point_labels"))),
            Some(boxes.as_tensor()),
            Some(masks.as_tensor()),
            true,
        )
        .unwrap();
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
    let lr = get_f32(&io, "set1.low_res_masks").unwrap();
    assert_close("cuda low_res_masks", &cpu(&out.masks), &lr, 0.0, 1e-4);
    let loss = (candle_nn::ops::sigmoid(&out.masks).unwrap() * g("grad.target_T"))
        .unwrap()
        .mean_all()
        .unwrap();
    let loss = (loss + out.iou.sqr().unwrap().mean_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    for (name, v) in [
        ("grad.d_point_coords", &pts),
        ("grad.d_boxes", &boxes),
        ("grad.d_mask_inputs", &masks),
    ] {
        let gr = grads.get(v.as_tensor()).unwrap();
        assert_grad_close(name, &cpu(gr), &get_f32(&io, name).unwrap(), 1e-3, 0.9999);
    }
}

/// Timing of the frozen `paper` (vit_b) encoder on random weights at 1024² (bf16 and f32), batch 1.
#[test]
#[ignore = "needs a CUDA device (make gpu-check)"]
fn sam_gpu_paper_encoder_timing() {
    let Some(dev) = cuda() else {
        eprintln!("no CUDA device: skipped");
        return;
    };
    let cfg = Config::paper().model.sam;
    let tensors = ultrarefiner::models::sam::weights::random_weights(&cfg, 1, &dev).unwrap();
    let w = ultrarefiner::models::sam::SamWeights {
        tensors,
        format: ultrarefiner::models::sam::weights::SamFormat::Original,
    };
    let x = Tensor::randn(0f32, 1.0, (1, 3, cfg.img_size, cfg.img_size), &dev).unwrap();
    let mut outs = Vec::new();
    for dt in [DType::BF16, DType::F32] {
        let vm = VarMap::new();
        let sam = Sam::from_weights(&cfg, &w, &vm, &dev, dt, None).unwrap();
        let _ = sam
            .image_encoder
            .forward_frozen(&x)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let t = std::time::Instant::now();
        let n = 3;
        let mut e = None;
        for _ in 0..n {
            let y = sam.image_encoder.forward_frozen(&x).unwrap();
            let _ = y.sum_all().unwrap().to_scalar::<f32>().unwrap();
            e = Some(y);
        }
        eprintln!(
            "vit_b encoder {dt:?}: {:.1} ms / image",
            t.elapsed().as_secs_f64() * 1e3 / n as f64
        );
        outs.push(e.unwrap().to_device(&Device::Cpu).unwrap());
    }
    assert_close("vit_b bf16 vs f32", &outs[0], &outs[1], 0.0, 2e-2);
}
