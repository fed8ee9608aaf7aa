//! Central finite-difference checks (f64, CPU) of every `ultrarefiner::nn` op on a gradient path (SPEC §16.5),
//! plus stability checks of the BCE. The loss is `Σ f(inputs) ⊙ R` with a fixed random `R`, so every output element
//! contributes with a distinct weight.
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use rand::Rng;
use std::collections::HashMap;
use ultrarefiner::nn;
use ultrarefiner::rng::stream_rng;

type Res<T> = ultrarefiner::Result<T>;

/// Random f64 tensor in `[lo, hi)` from the project RNG.
fn rand_t(shape: &[usize], lo: f64, hi: f64, seed: u64) -> Tensor {
    let mut rng = stream_rng(seed, "test", &[]);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.flatten_all().unwrap().to_vec1::<f64>().unwrap()
}

/// Checks d(Σ f(x)·R)/dx for every input against central differences with step `h`: max abs error ≤
/// `rtol · max|numeric|` (+ a tiny absolute floor for all-zero gradients). At most `max_elems` elements per input
/// are probed (evenly spaced) to keep the test fast.
fn fd_check<F>(name: &str, inputs: &[Tensor], f: F, rtol: f64, max_elems: usize)
where
    F: Fn(&[Tensor]) -> Res<Tensor>,
{
    let h = 1e-6;
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(t).unwrap())
        .collect();
    let tracked: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let out = f(&tracked).unwrap();
    let r = rand_t(out.dims(), -1.0, 1.0, 977);
    let loss = (&out * &r).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let eval = |xs: &[Tensor]| -> f64 {
        let o = f(xs).unwrap();
        (&o * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    for (k, v) in vars.iter().enumerate() {
        let analytic = match grads.get(v.as_tensor()) {
            Some(g) => to_vec(g),
            None => panic!("{name}: input {k} received no gradient"),
        };
        let base = to_vec(&inputs[k]);
        let n = base.len();
        let step = n.div_ceil(max_elems).max(1);
        let mut max_num = 0.0f64;
        let mut worst = (0usize, 0.0f64, 0.0f64, 0.0f64);
        for j in (0..n).step_by(step) {
            let mut plus = base.clone();
            plus[j] += h;
            let mut minus = base.clone();
            minus[j] -= h;
            let with = |vals: Vec<f64>| -> Vec<Tensor> {
                let mut xs = inputs.to_vec();
                xs[k] = Tensor::from_vec(vals, inputs[k].dims(), &Device::Cpu).unwrap();
                xs
            };
            let num = (eval(&with(plus)) - eval(&with(minus))) / (2.0 * h);
            max_num = max_num.max(num.abs());
            let d = (num - analytic[j]).abs();
            if d > worst.1 {
                worst = (j, d, analytic[j], num);
            }
        }
        let tol = rtol * max_num + 1e-9;
        assert!(
            worst.1 <= tol,
            "{name}: input {k}: |analytic − numeric| {:.3e} > {:.3e} at {} (analytic {}, numeric {})",
            worst.1,
            tol,
            worst.0,
            worst.2,
            worst.3
        );
        assert!(
            max_num > 0.0,
            "{name}: input {k}: numeric gradient is identically zero"
        );
    }
}

const RTOL: f64 = 1e-6;

#[test]
fn fd_layer_norm() {
    let x = rand_t(&[2, 3, 6], -2.0, 2.0, 1);
    let w = rand_t(&[6], 0.5, 1.5, 2);
    let b = rand_t(&[6], -0.5, 0.5, 3);
    fd_check(
        "LayerNorm",
        &[x, w, b],
        |t| nn::LayerNorm::from_tensors(t[1].clone(), t[2].clone(), 1e-6).forward(&t[0]),
        RTOL,
        200,
    );
}

#[test]
fn fd_layer_norm_2d() {
    let x = rand_t(&[2, 4, 3, 5], -2.0, 2.0, 4);
    let w = rand_t(&[4], 0.5, 1.5, 5);
    let b = rand_t(&[4], -0.5, 0.5, 6);
    fd_check(
        "LayerNorm2d",
        &[x, w, b],
        |t| nn::LayerNorm2d::from_tensors(t[1].clone(), t[2].clone(), 1e-6).forward(&t[0]),
        RTOL,
        200,
    );
}

#[test]
fn layer_norm_fast_matches_differentiable() {
    let x = rand_t(&[2, 4, 3, 5], -2.0, 2.0, 7)
        .to_dtype(DType::F32)
        .unwrap();
    let w = rand_t(&[4], 0.5, 1.5, 8).to_dtype(DType::F32).unwrap();
    let b = rand_t(&[4], -0.5, 0.5, 9).to_dtype(DType::F32).unwrap();
    let ln2 = nn::LayerNorm2d::from_tensors(w.clone(), b.clone(), 1e-6);
    ultrarefiner::testing::assert_close(
        "LayerNorm2d fast",
        &ln2.forward_fast(&x).unwrap(),
        &ln2.forward(&x).unwrap(),
        0.0,
        1e-5,
    );
    let xl = x.permute((0, 2, 3, 1)).unwrap();
    let ln = nn::LayerNorm::from_tensors(w, b, 1e-6);
    ultrarefiner::testing::assert_close(
        "LayerNorm fast",
        &ln.forward_fast(&xl).unwrap(),
        &ln.forward(&xl).unwrap(),
        0.0,
        1e-5,
    );
}

#[test]
fn fd_softmax() {
    let x = rand_t(&[2, 3, 5], -3.0, 3.0, 10);
    for dim in 0..3 {
        fd_check(
            &format!("softmax dim {dim}"),
            std::slice::from_ref(&x),
            |t| nn::softmax(&t[0], dim),
            RTOL,
            200,
        );
    }
    // Rows sum to one even for huge logits (max subtraction).
    let big = (rand_t(&[3, 4], -1.0, 1.0, 11) * 1e3).unwrap();
    let s = nn::softmax(&big, 1).unwrap().sum(1).unwrap();
    for v in to_vec(&s) {
        assert!((v - 1.0).abs() < 1e-12, "softmax row sum {v}");
    }
}

#[test]
fn fd_log_softmax_and_sigmoid() {
    let x = rand_t(&[2, 3, 5], -3.0, 3.0, 35);
    for dim in 0..3 {
        fd_check(
            &format!("log_softmax dim {dim}"),
            std::slice::from_ref(&x),
            |t| nn::log_softmax(&t[0], dim),
            RTOL,
            200,
        );
    }
    // exp(log_softmax) == softmax
    let a = nn::log_softmax(&x, 1).unwrap().exp().unwrap();
    let b = nn::softmax(&x, 1).unwrap();
    ultrarefiner::testing::assert_close("exp(log_softmax)", &a, &b, 1e-15, 0.0);
    fd_check(
        "sigmoid",
        std::slice::from_ref(&x),
        |t| nn::sigmoid(&t[0]),
        RTOL,
        200,
    );
}

#[test]
fn fd_resize_bilinear() {
    let x = rand_t(&[1, 2, 5, 7], -1.0, 1.0, 12);
    for &ac in &[false, true] {
        for &(oh, ow) in &[(9, 4), (3, 11), (5, 7), (2, 3), (1, 1)] {
            fd_check(
                &format!("bilinear ac={ac} 5x7->{oh}x{ow}"),
                std::slice::from_ref(&x),
                |t| nn::resize_bilinear(&t[0], oh, ow, ac),
                RTOL,
                100,
            );
        }
    }
}

#[test]
fn fd_resize_nearest() {
    let x = rand_t(&[1, 2, 5, 7], -1.0, 1.0, 13);
    for &(oh, ow) in &[(9, 4), (3, 11), (10, 14)] {
        fd_check(
            &format!("nearest 5x7->{oh}x{ow}"),
            std::slice::from_ref(&x),
            |t| nn::resize_nearest(&t[0], oh, ow),
            RTOL,
            100,
        );
    }
}

#[test]
fn fd_max_pool() {
    // Distinct values (random), odd and even sizes: 9x8 -> 4x3.
    let x = rand_t(&[2, 2, 9, 8], -1.0, 1.0, 14);
    fd_check(
        "max_pool_3x3_s2",
        &[x],
        |t| nn::max_pool_3x3_s2(&t[0]),
        RTOL,
        300,
    );
}

#[test]
fn max_pool_shape_and_values() {
    let v: Vec<f64> = (0..7 * 7).map(|i| ((i * 37) % 50) as f64).collect();
    let x = Tensor::from_vec(v.clone(), (1, 1, 7, 7), &Device::Cpu).unwrap();
    let y = nn::max_pool_3x3_s2(&x).unwrap();
    assert_eq!(y.dims(), &[1, 1, 3, 3]);
    let yv = to_vec(&y);
    for oi in 0..3 {
        for oj in 0..3 {
            let mut m = f64::MIN;
            for di in 0..3 {
                for dj in 0..3 {
                    m = m.max(v[(2 * oi + di) * 7 + 2 * oj + dj]);
                }
            }
            assert_eq!(yv[oi * 3 + oj], m);
        }
    }
    // TransUNet root geometry: 112 -> 55.
    let z = Tensor::zeros((1, 1, 112, 112), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(nn::max_pool_3x3_s2(&z).unwrap().dims(), &[1, 1, 55, 55]);
}

#[test]
fn fd_std_conv2d() {
    let x = rand_t(&[2, 3, 6, 6], -1.0, 1.0, 15);
    let w = rand_t(&[4, 3, 3, 3], -1.0, 1.0, 16);
    let b = rand_t(&[4], -0.5, 0.5, 17);
    for &(stride, pad) in &[(1, 1), (2, 1)] {
        fd_check(
            &format!("StdConv2d s{stride} p{pad}"),
            &[x.clone(), w.clone(), b.clone()],
            |t| {
                nn::StdConv2d::from_tensors(t[1].clone(), Some(t[2].clone()), stride, pad)
                    .forward(&t[0])
            },
            RTOL,
            120,
        );
    }
}

#[test]
fn std_conv2d_standardises_per_output_channel() {
    let w = rand_t(&[4, 3, 3, 3], -1.0, 2.0, 18);
    let sw = nn::StdConv2d::from_tensors(w, None, 1, 0)
        .standardised_weight()
        .unwrap();
    let flat = sw.reshape((4, 27)).unwrap();
    for row in flat.to_vec2::<f64>().unwrap() {
        let m = row.iter().sum::<f64>() / 27.0;
        let v = row.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / 27.0;
        assert!(m.abs() < 1e-12, "mean {m}");
        // var(ŵ) = var/(var + 1e-5) < 1
        assert!(v < 1.0 && v > 0.999, "var {v}");
    }
}

#[test]
fn fd_group_norm() {
    let x = rand_t(&[2, 6, 3, 4], -2.0, 2.0, 19);
    let w = rand_t(&[6], 0.5, 1.5, 20);
    let b = rand_t(&[6], -0.5, 0.5, 21);
    for &(groups, eps) in &[(3, 1e-6), (6, 1e-5), (1, 1e-6)] {
        fd_check(
            &format!("GroupNorm g{groups}"),
            &[x.clone(), w.clone(), b.clone()],
            |t| nn::GroupNorm::from_tensors(groups, t[1].clone(), t[2].clone(), eps).forward(&t[0]),
            RTOL,
            150,
        );
    }
}

fn bn_from(w: &Tensor, b: &Tensor) -> nn::BatchNorm2d {
    let mut m = HashMap::new();
    m.insert("weight".to_string(), w.clone());
    m.insert("bias".to_string(), b.clone());
    let vb = VarBuilder::from_tensors(m, DType::F64, &Device::Cpu);
    nn::BatchNorm2d::new(w.dim(0).unwrap(), 1e-5, 0.1, vb).unwrap()
}

#[test]
fn fd_batch_norm_train() {
    let x = rand_t(&[3, 4, 3, 2], -2.0, 2.0, 22);
    let w = rand_t(&[4], 0.5, 1.5, 23);
    let b = rand_t(&[4], -0.5, 0.5, 24);
    fd_check(
        "BatchNorm2d train",
        &[x, w, b],
        |t| bn_from(&t[1], &t[2]).forward_t(&t[0], true),
        RTOL,
        150,
    );
}

#[test]
fn fd_batch_norm_eval() {
    let x = rand_t(&[2, 4, 3, 2], -2.0, 2.0, 25);
    let w = rand_t(&[4], 0.5, 1.5, 26);
    let b = rand_t(&[4], -0.5, 0.5, 27);
    fd_check(
        "BatchNorm2d eval",
        &[x, w, b],
        |t| bn_from(&t[1], &t[2]).forward_t(&t[0], false),
        RTOL,
        150,
    );
}

#[test]
fn fd_bce_with_logits() {
    let z = rand_t(&[3, 7], -8.0, 8.0, 28);
    let y = rand_t(&[3, 7], 0.0, 1.0, 29);
    fd_check(
        "bce_with_logits",
        &[z, y],
        |t| nn::bce_with_logits(&t[0], &t[1]),
        RTOL,
        100,
    );
}

#[test]
fn bce_is_finite_at_extreme_logits() {
    for dt in [DType::F32, DType::F64] {
        let z = Var::from_tensor(
            &Tensor::new(&[-100.0f64, 100.0, -100.0, 100.0, 0.0], &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap(),
        )
        .unwrap();
        let y = Tensor::new(&[0.0f64, 1.0, 1.0, 0.0, 1.0], &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        let l = nn::bce_with_logits(z.as_tensor(), &y).unwrap();
        let lv = to_vec(&l.to_dtype(DType::F64).unwrap());
        let want = [0.0, 0.0, 100.0, 100.0, std::f64::consts::LN_2];
        for (a, b) in lv.iter().zip(want) {
            assert!(
                a.is_finite() && (a - b).abs() < 1e-5,
                "{dt:?}: loss {a} vs {b}"
            );
        }
        let g = l.sum_all().unwrap().backward().unwrap();
        let gv = to_vec(&g.get(z.as_tensor()).unwrap().to_dtype(DType::F64).unwrap());
        // d/dz = σ(z) − y
        let want_g = [0.0, 0.0, -1.0, 1.0, -0.5];
        for (a, b) in gv.iter().zip(want_g) {
            assert!(
                a.is_finite() && (a - b).abs() < 1e-6,
                "{dt:?}: grad {a} vs {b}"
            );
        }
    }
}

#[test]
fn fd_attention() {
    // (B, N, D) = (2, 4, 6) over 2 heads; unrelated q, k, v.
    let q = rand_t(&[2, 4, 6], -1.5, 1.5, 61);
    let k = rand_t(&[2, 4, 6], -1.5, 1.5, 62);
    let v = rand_t(&[2, 4, 6], -1.5, 1.5, 63);
    fd_check(
        "attention",
        &[q, k, v],
        |t| nn::attention(&t[0], &t[1], &t[2], 2),
        RTOL,
        48,
    );
}

#[test]
fn fd_gelu_dropout() {
    // A fixed seed fixes the mask, so the op is a deterministic function of x.
    let x = rand_t(&[4, 50], -3.0, 3.0, 64);
    let d = nn::Dropout::new(0.3);
    fd_check(
        "gelu-dropout",
        &[x],
        |t| nn::gelu_dropout(&t[0], &d, Some(9)),
        RTOL,
        200,
    );
}

#[test]
fn fd_gelu() {
    let x = rand_t(&[11], -4.0, 4.0, 30);
    fd_check("gelu", &[x], |t| nn::gelu(&t[0]), RTOL, 20);
}

#[test]
fn fd_conv2d_strided_and_transpose() {
    // SAM mask_downscaling (conv k2 s2) and output upscaling (conv-transpose k2 s2) rely on candle's backward.
    let x = rand_t(&[2, 3, 4, 4], -1.0, 1.0, 31);
    let w = rand_t(&[5, 3, 2, 2], -1.0, 1.0, 32);
    fd_check(
        "conv2d k2 s2",
        &[x.clone(), w],
        |t| Ok(t[0].conv2d(&t[1], 0, 2, 1, 1)?),
        RTOL,
        100,
    );
    // Non-square strided input whose H and W agree modulo the stride (what `check_strided_input` admits).
    let xr = rand_t(&[1, 2, 6, 8], -1.0, 1.0, 36);
    let w3 = rand_t(&[3, 2, 3, 3], -1.0, 1.0, 37);
    fd_check(
        "StdConv2d s2 6x8",
        &[xr, w3],
        |t| nn::StdConv2d::from_tensors(t[1].clone(), None, 2, 1).forward(&t[0]),
        RTOL,
        100,
    );
    let wt = rand_t(&[3, 5, 2, 2], -1.0, 1.0, 33);
    fd_check(
        "conv_transpose2d k2 s2",
        &[x, wt],
        |t| Ok(t[0].conv_transpose2d(&t[1], 0, 0, 2, 1)?),
        RTOL,
        100,
    );
}

#[test]
fn fd_conv2d_gemm() {
    // The GEMM backward of the trainable TransUNet convs: 3×3 (s1/s2), the 7×7/s2 root, 1×1 (s1/s2), a
    // non-square input and a kernel that does not tile the input evenly.
    let cases: [(&[usize], &[usize], usize, usize); 6] = [
        (&[2, 3, 5, 5], &[4, 3, 3, 3], 1, 1),
        (&[1, 2, 7, 7], &[3, 2, 3, 3], 2, 1),
        (&[1, 2, 9, 9], &[2, 2, 7, 7], 2, 3),
        (&[2, 4, 3, 3], &[5, 4, 1, 1], 1, 0),
        (&[1, 3, 5, 5], &[2, 3, 1, 1], 2, 0),
        (&[1, 2, 4, 6], &[3, 2, 3, 3], 1, 0),
    ];
    for (i, (xs, ws, stride, pad)) in cases.into_iter().enumerate() {
        let x = rand_t(xs, -1.0, 1.0, 40 + i as u64);
        let w = rand_t(ws, -1.0, 1.0, 50 + i as u64);
        fd_check(
            &format!("conv2d_gemm {xs:?} k{ws:?} s{stride} p{pad}"),
            &[x, w],
            |t| nn::conv2d_gemm(&t[0], &t[1], stride, pad),
            RTOL,
            80,
        );
    }
}

#[test]
fn fd_conv2d_gemm_bias() {
    // The fused bias of conv2d_layer / StdConv2d: 3×3 (the segmentation head) and 1×1 (the patch embedding).
    let cases: [(&[usize], &[usize], usize, usize); 2] = [
        (&[2, 3, 5, 5], &[4, 3, 3, 3], 1, 1),
        (&[2, 4, 3, 3], &[5, 4, 1, 1], 1, 0),
    ];
    for (i, (xs, ws, stride, pad)) in cases.into_iter().enumerate() {
        let x = rand_t(xs, -1.0, 1.0, 60 + i as u64);
        let w = rand_t(ws, -1.0, 1.0, 70 + i as u64);
        let b = rand_t(&[ws[0]], -0.5, 0.5, 80 + i as u64);
        fd_check(
            &format!("conv2d_gemm_bias {xs:?} k{ws:?} s{stride} p{pad}"),
            &[x, w, b],
            |t| nn::conv2d_gemm_bias(&t[0], &t[1], Some(&t[2]), stride, pad),
            RTOL,
            80,
        );
    }
}

/// The harness itself must catch a wrong backward rule: candle's `max_pool2d` backward is wrong (SPEC §16.1).
#[test]
#[should_panic(expected = "analytic")]
fn fd_harness_detects_wrong_backward() {
    let x = rand_t(&[1, 1, 4, 4], -1.0, 1.0, 34);
    fd_check(
        "candle max_pool2d",
        &[x],
        |t| Ok(t[0].max_pool2d(2)?),
        RTOL,
        16,
    );
}

// ---------------------------------------------------------------------------------------------------------------
// The fused CPU kernels (GroupNorm, LayerNorm, softmax over the last axis, weight standardisation) against the
// composed candle graphs they replace (written out here as the reference), forward and every gradient.
// ---------------------------------------------------------------------------------------------------------------

/// Composed GroupNorm (the CUDA / half-precision path of `nn::GroupNorm`).
fn group_norm_ref(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, eps: f64) -> Res<Tensor> {
    let (n, c, h, wd) = x.dims4()?;
    let xg = x.reshape((n, groups, c / groups * h * wd))?;
    let mean = xg.mean_keepdim(2)?;
    let xc = xg.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(2)?;
    let y = xc
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape((n, c, h, wd))?;
    Ok(y.broadcast_mul(&w.reshape((1, c, 1, 1))?)?
        .broadcast_add(&b.reshape((1, c, 1, 1))?)?)
}

/// Composed normalisation over the last axis (LayerNorm without affine).
fn normalise_ref(x: &Tensor, eps: f64) -> Res<Tensor> {
    let d = x.rank() - 1;
    let xc = x.broadcast_sub(&x.mean_keepdim(d)?)?;
    let var = xc.sqr()?.mean_keepdim(d)?;
    Ok(xc.broadcast_div(&(var + eps)?.sqrt()?)?)
}

fn layer_norm_ref(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Res<Tensor> {
    Ok(normalise_ref(x, eps)?.broadcast_mul(w)?.broadcast_add(b)?)
}

fn softmax_ref(x: &Tensor) -> Res<Tensor> {
    let d = x.rank() - 1;
    let e = x.broadcast_sub(&x.max_keepdim(d)?.detach())?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(d)?)?)
}

/// Forward and the gradients of `Σ f(inputs)·R` of `fused` equal those of `reference`: tolerance
/// `rtol·(1 + max|reference|)` (the floor covers gradients that are zero in exact arithmetic). Only the inputs flagged in `track` are Vars (the others are plain tensors
/// and must get no gradient).
fn compare_fused<F, G>(
    name: &str,
    inputs: &[Tensor],
    track: &[bool],
    fused: F,
    reference: G,
    rtol: f64,
) where
    F: Fn(&[Tensor]) -> Res<Tensor>,
    G: Fn(&[Tensor]) -> Res<Tensor>,
{
    let run = |f: &dyn Fn(&[Tensor]) -> Res<Tensor>| {
        let ts: Vec<Tensor> = inputs
            .iter()
            .zip(track)
            .map(|(t, &tr)| {
                if tr {
                    Var::from_tensor(t).unwrap().as_tensor().clone()
                } else {
                    t.clone()
                }
            })
            .collect();
        let out = f(&ts).unwrap();
        let r = rand_t(out.dims(), -1.0, 1.0, 979)
            .to_dtype(out.dtype())
            .unwrap();
        let grads = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let gs: Vec<Option<Tensor>> = ts.iter().map(|t| grads.get(t).cloned()).collect();
        (out, gs)
    };
    let (yf, gf) = run(&fused);
    let (yr, gr) = run(&reference);
    ultrarefiner::testing::assert_close(&format!("{name}: forward"), &yf, &yr, rtol, rtol);
    for (k, (a, e)) in gf.iter().zip(&gr).enumerate() {
        match (a, e, track[k]) {
            (Some(a), Some(e), true) => ultrarefiner::testing::assert_close(
                &format!("{name}: gradient of input {k}"),
                a,
                e,
                rtol,
                rtol,
            ),
            (None, None, false) => {}
            _ => panic!(
                "{name}: input {k} (tracked: {}) got gradient {} (reference {})",
                track[k],
                a.is_some(),
                e.is_some()
            ),
        }
    }
}

const ALL3: [bool; 3] = [true, true, true];

/// [`compare_fused`] of a norm `(x, w, b)` in f64 (1e-12) and f32 (1e-5), with all inputs tracked and with only
/// x, only w, only b, only (w, b) tracked.
fn compare_norm<F, G>(name: &str, inputs: [&Tensor; 3], fused: F, reference: G)
where
    F: Fn(&[Tensor]) -> Res<Tensor>,
    G: Fn(&[Tensor]) -> Res<Tensor>,
{
    for (dtype, rtol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        let ins: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
        let tracks = [
            ALL3,
            [true, false, false],
            [false, true, false],
            [false, false, true],
            [false, true, true],
        ];
        for track in tracks {
            let name = format!("{name} {dtype:?} track {track:?}");
            compare_fused(&name, &ins, &track, &fused, &reference, rtol);
        }
    }
}

#[test]
fn fused_group_norm_matches_composed() {
    // (shape, groups, eps): TransUNet-like groups, one channel per group (gn_proj), one group, batch 1, odd sizes.
    let cases: [(&[usize], usize, f64); 6] = [
        (&[2, 6, 3, 4], 3, 1e-6),
        (&[2, 6, 3, 4], 6, 1e-5),
        (&[2, 6, 3, 4], 1, 1e-6),
        (&[1, 8, 5, 7], 4, 1e-6),
        (&[1, 5, 3, 1], 5, 1e-5),
        (&[3, 9, 7, 3], 3, 1e-6),
    ];
    for (i, (shape, groups, eps)) in cases.into_iter().enumerate() {
        let c = shape[1];
        let x = (rand_t(shape, -2.0, 2.0, 60 + i as u64) + 3.0).unwrap();
        let w = rand_t(&[c], 0.5, 1.5, 70 + i as u64);
        let b = rand_t(&[c], -0.5, 0.5, 80 + i as u64);
        compare_norm(
            &format!("GroupNorm {shape:?} g{groups}"),
            [&x, &w, &b],
            |t| nn::GroupNorm::from_tensors(groups, t[1].clone(), t[2].clone(), eps).forward(&t[0]),
            |t| group_norm_ref(&t[0], &t[1], &t[2], groups, eps),
        );
    }
    // Non-contiguous input (a transposed view).
    let x = rand_t(&[2, 4, 5, 3], -1.0, 1.0, 90);
    let w = rand_t(&[4], 0.5, 1.5, 91);
    let b = rand_t(&[4], -0.5, 0.5, 92);
    compare_fused(
        "GroupNorm non-contiguous",
        &[x, w, b],
        &ALL3,
        |t| {
            nn::GroupNorm::from_tensors(2, t[1].clone(), t[2].clone(), 1e-6)
                .forward(&t[0].transpose(2, 3)?)
        },
        |t| group_norm_ref(&t[0].transpose(2, 3)?, &t[1], &t[2], 2, 1e-6),
        1e-12,
    );
}

#[test]
fn fused_layer_norm_matches_composed() {
    let cases: [&[usize]; 5] = [&[2, 3, 6], &[1, 7], &[3, 5, 13], &[4, 1], &[2, 2, 3, 40]];
    for (i, shape) in cases.into_iter().enumerate() {
        let d = *shape.last().unwrap();
        let x = (rand_t(shape, -2.0, 2.0, 100 + i as u64) - 1.5).unwrap();
        let w = rand_t(&[d], 0.5, 1.5, 110 + i as u64);
        let b = rand_t(&[d], -0.5, 0.5, 120 + i as u64);
        compare_norm(
            &format!("LayerNorm {shape:?}"),
            [&x, &w, &b],
            |t| nn::LayerNorm::from_tensors(t[1].clone(), t[2].clone(), 1e-6).forward(&t[0]),
            |t| layer_norm_ref(&t[0], &t[1], &t[2], 1e-6),
        );
    }
    let x = rand_t(&[2, 5, 3], -1.0, 1.0, 130);
    let w = rand_t(&[5], 0.5, 1.5, 131);
    let b = rand_t(&[5], -0.5, 0.5, 132);
    compare_fused(
        "LayerNorm non-contiguous",
        &[x, w, b],
        &ALL3,
        |t| {
            nn::LayerNorm::from_tensors(t[1].clone(), t[2].clone(), 1e-5)
                .forward(&t[0].transpose(1, 2)?)
        },
        |t| layer_norm_ref(&t[0].transpose(1, 2)?, &t[1], &t[2], 1e-5),
        1e-12,
    );
}

#[test]
fn fused_softmax_matches_composed() {
    let cases: [&[usize]; 4] = [&[2, 3, 5], &[4, 1], &[1, 2, 7, 33], &[6]];
    for (i, shape) in cases.into_iter().enumerate() {
        let x = rand_t(shape, -4.0, 4.0, 140 + i as u64);
        for (dtype, rtol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let x = x.to_dtype(dtype).unwrap();
            compare_fused(
                &format!("softmax {shape:?} {dtype:?}"),
                std::slice::from_ref(&x),
                &[true],
                |t| nn::softmax(&t[0], t[0].rank() - 1),
                |t| softmax_ref(&t[0]),
                rtol,
            );
        }
    }
    let x = rand_t(&[3, 4, 5], -2.0, 2.0, 150);
    compare_fused(
        "softmax non-contiguous",
        &[x],
        &[true],
        |t| nn::softmax(&t[0].transpose(1, 2)?, 2),
        |t| softmax_ref(&t[0].transpose(1, 2)?),
        1e-12,
    );
}

#[test]
fn fused_std_conv_weight_matches_composed() {
    let w = rand_t(&[5, 3, 3, 3], -1.0, 2.0, 160);
    for (dtype, rtol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        compare_fused(
            &format!("standardised weight {dtype:?}"),
            &[w.to_dtype(dtype).unwrap()],
            &[true],
            |t| nn::StdConv2d::from_tensors(t[0].clone(), None, 1, 0).standardised_weight(),
            |t| Ok(normalise_ref(&t[0].reshape((5, 27))?, nn::STD_CONV_EPS)?.reshape((5, 3, 3, 3))?),
            rtol,
        );
    }
}

#[test]
fn fd_fused_odd_shapes_and_strided_inputs() {
    // Batch 1, one channel per group, odd sizes, non-contiguous inputs: the fused kernels' FD check.
    let x = rand_t(&[1, 5, 3, 7], -2.0, 2.0, 170);
    let w = rand_t(&[5], 0.5, 1.5, 171);
    let b = rand_t(&[5], -0.5, 0.5, 172);
    fd_check(
        "GroupNorm 1 channel/group, transposed input",
        &[x.clone(), w.clone(), b.clone()],
        |t| {
            nn::GroupNorm::from_tensors(5, t[1].clone(), t[2].clone(), 1e-5)
                .forward(&t[0].transpose(2, 3)?)
        },
        RTOL,
        150,
    );
    let xl = rand_t(&[3, 5, 7], -2.0, 2.0, 173);
    fd_check(
        "LayerNorm transposed input",
        &[xl, w, b],
        |t| {
            nn::LayerNorm::from_tensors(t[1].clone(), t[2].clone(), 1e-6)
                .forward(&t[0].transpose(1, 2)?)
        },
        RTOL,
        150,
    );
    let xs = rand_t(&[2, 7, 3], -3.0, 3.0, 174);
    fd_check(
        "softmax transposed input",
        &[xs],
        |t| nn::softmax(&t[0].transpose(1, 2)?, 2),
        RTOL,
        150,
    );
}

#[test]
fn fused_gelu_matches_candle_values_and_exact_gradient() {
    let x = rand_t(&[3, 5, 37], -5.0, 5.0, 180);
    // Reference backward with the exact 1/√(2π) (candle's own rounds it to 0.398942).
    let gelu_ref = |t: &[Tensor]| -> Res<Tensor> {
        let x = &t[0];
        let cdf = ((x / 2f64.sqrt())?.erf()? + 1.0)? * 0.5;
        let value = x.detach().gelu_erf()?;
        // Forward: candle's gelu_erf; gradient: that of the composed x·Φ(x), i.e. Φ(x) + x·φ(x).
        let surrogate = (x * cdf?)?;
        Ok(((surrogate.detach() - &value)?.neg()? + surrogate)?)
    };
    for (dtype, rtol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        let xt = x.to_dtype(dtype).unwrap();
        compare_fused(
            &format!("gelu {dtype:?}"),
            std::slice::from_ref(&xt),
            &[true],
            |t| nn::gelu(&t[0]),
            gelu_ref,
            rtol,
        );
        // f64 values are candle's gelu_erf bit for bit. f32 uses the vectorised A&S 7.1.26 erf (PyTorch's CPU
        // formula, |error| ≤ 1.5e-7), so y = x·(1 + erf)/2 may differ by x·0.75e-7 plus rounding.
        let a = to_vec(&nn::gelu(&xt).unwrap().to_dtype(DType::F64).unwrap());
        let b = to_vec(&xt.gelu_erf().unwrap().to_dtype(DType::F64).unwrap());
        if dtype == DType::F64 {
            assert_eq!(a, b, "gelu f64 forward bits");
        } else {
            let xs = to_vec(&x);
            for ((a, b), x) in a.iter().zip(&b).zip(&xs) {
                let tol = 1.0e-7 * x.abs() + 1.2e-7 * b.abs() + 1e-12;
                assert!((a - b).abs() <= tol, "gelu f32 at {x}: {a} vs candle {b}");
            }
        }
    }
    let xt = rand_t(&[4, 3], -3.0, 3.0, 181);
    fd_check(
        "gelu transposed input",
        &[xt],
        |t| nn::gelu(&t[0].t()?),
        RTOL,
        20,
    );
}

#[test]
fn fused_relu_matches_candle_and_has_zero_gradient_at_zero() {
    let x = rand_t(&[3, 5, 37], -2.0, 2.0, 185);
    for (dtype, rtol) in [(DType::F64, 0.0), (DType::F32, 0.0)] {
        let xt = x.to_dtype(dtype).unwrap();
        // Away from 0 both rules agree exactly: the value is x or 0 and the gradient dy or 0.
        compare_fused(
            &format!("relu {dtype:?}"),
            std::slice::from_ref(&xt),
            &[true],
            |t| nn::relu(&t[0]),
            |t| Ok(t[0].relu()?),
            rtol,
        );
    }
    // At exactly 0 the gradient is 0 (PyTorch's threshold_backward; candle's relu gives 1), and a transposed
    // (non-contiguous) input works.
    let x = Var::from_tensor(&Tensor::new(&[[-1.0f32, 0.0], [0.0, 2.5]], &Device::Cpu).unwrap())
        .unwrap();
    let y = nn::relu(&x.as_tensor().t().unwrap()).unwrap();
    assert_eq!(
        to_vec(&y.to_dtype(DType::F64).unwrap()),
        vec![0.0, 0.0, 0.0, 2.5]
    );
    let w = Tensor::new(&[[3.0f32, 5.0], [7.0, 11.0]], &Device::Cpu).unwrap();
    let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gx = g.get(x.as_tensor()).unwrap().to_dtype(DType::F64).unwrap();
    // y = xᵀ, so dL/dx = (w ⊙ [xᵀ > 0])ᵀ: only x[1][1] = 2.5 passes, with w[1][1] = 11.
    assert_eq!(to_vec(&gx), vec![0.0, 0.0, 0.0, 11.0]);
    fd_check(
        "relu",
        &[rand_t(&[4, 6], -3.0, 3.0, 186)],
        |t| nn::relu(&t[0]),
        RTOL,
        24,
    );
}

#[test]
fn fused_layer_norm_2d_matches_composed() {
    let reference = |t: &[Tensor]| -> Res<Tensor> {
        let x = &t[0];
        let c = x.dim(1)?;
        let xc = x.broadcast_sub(&x.mean_keepdim(1)?)?;
        let var = xc.sqr()?.mean_keepdim(1)?;
        let y = xc.broadcast_div(&(var + 1e-6)?.sqrt()?)?;
        Ok(y.broadcast_mul(&t[1].reshape((1, c, 1, 1))?)?
            .broadcast_add(&t[2].reshape((1, c, 1, 1))?)?)
    };
    // Odd sizes, batch 1, a map wider than one pixel block, a single channel.
    let cases: [&[usize]; 4] = [&[2, 4, 3, 5], &[1, 7, 19, 17], &[3, 5, 1, 1], &[2, 1, 3, 3]];
    for (i, shape) in cases.into_iter().enumerate() {
        let c = shape[1];
        let x = (rand_t(shape, -2.0, 2.0, 190 + i as u64) + 1.0).unwrap();
        let w = rand_t(&[c], 0.5, 1.5, 200 + i as u64);
        let b = rand_t(&[c], -0.5, 0.5, 210 + i as u64);
        compare_norm(
            &format!("LayerNorm2d {shape:?}"),
            [&x, &w, &b],
            |t| nn::LayerNorm2d::from_tensors(t[1].clone(), t[2].clone(), 1e-6).forward(&t[0]),
            reference,
        );
    }
    let x = rand_t(&[2, 5, 3, 4], -1.0, 1.0, 220);
    let w = rand_t(&[3], 0.5, 1.5, 221);
    let b = rand_t(&[3], -0.5, 0.5, 222);
    fd_check(
        "LayerNorm2d permuted input",
        &[x, w, b],
        |t| {
            nn::LayerNorm2d::from_tensors(t[1].clone(), t[2].clone(), 1e-6)
                .forward(&t[0].permute((0, 2, 1, 3))?)
        },
        RTOL,
        150,
    );
}

/// Timing of the fused kernels against the composed graphs at TransUNet / SAM sizes (f32, forward + backward,
/// best of 5 each, interleaved). Not a check: run by hand with
/// `cargo test --release -p ultrarefiner --test nn_grad fused_timing -- --ignored --nocapture`.
#[test]
#[ignore = "timing report, run by hand"]
fn fused_timing() {
    type Op = Box<dyn Fn(&[Tensor]) -> Res<Tensor>>;
    let f32t = |shape: &[usize], lo: f64, hi: f64, seed: u64| {
        rand_t(shape, lo, hi, seed).to_dtype(DType::F32).unwrap()
    };
    let cases: Vec<(&str, Vec<Tensor>, Op, Op)> =
        vec![
            (
                "GroupNorm (4,256,56,56) g32",
                vec![
                    f32t(&[4, 256, 56, 56], -2.0, 2.0, 1),
                    f32t(&[256], 0.5, 1.5, 2),
                    f32t(&[256], -0.5, 0.5, 3),
                ],
                Box::new(|t| {
                    nn::GroupNorm::from_tensors(32, t[1].clone(), t[2].clone(), 1e-6).forward(&t[0])
                }),
                Box::new(|t| group_norm_ref(&t[0], &t[1], &t[2], 32, 1e-6)),
            ),
            (
                "LayerNorm (4,196,768)",
                vec![
                    f32t(&[4, 196, 768], -2.0, 2.0, 4),
                    f32t(&[768], 0.5, 1.5, 5),
                    f32t(&[768], -0.5, 0.5, 6),
                ],
                Box::new(|t| {
                    nn::LayerNorm::from_tensors(t[1].clone(), t[2].clone(), 1e-6).forward(&t[0])
                }),
                Box::new(|t| layer_norm_ref(&t[0], &t[1], &t[2], 1e-6)),
            ),
            (
                "softmax (4,12,196,196)",
                vec![f32t(&[4, 12, 196, 196], -4.0, 4.0, 7)],
                Box::new(|t| nn::softmax(&t[0], 3)),
                Box::new(|t| softmax_ref(&t[0])),
            ),
            (
                "GELU (4,196,3072)",
                vec![f32t(&[4, 196, 3072], -4.0, 4.0, 8)],
                Box::new(|t| nn::gelu(&t[0])),
                Box::new(|t| Ok(t[0].gelu_erf()?)),
            ),
            (
                "weight standardisation (1024,512,3,3)",
                vec![f32t(&[1024, 512, 3, 3], -1.0, 1.0, 9)],
                Box::new(|t| {
                    nn::StdConv2d::from_tensors(t[0].clone(), None, 1, 1).standardised_weight()
                }),
                Box::new(|t| {
                    Ok(normalise_ref(&t[0].reshape((1024, 4608))?, 1e-5)?
                        .reshape((1024, 512, 3, 3))?)
                }),
            ),
        ];
    for (name, ins, fused, composed) in &cases {
        let vars: Vec<Var> = ins.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let r = fused(&ts).unwrap().ones_like().unwrap();
        let time = |f: &Op| {
            let t0 = std::time::Instant::now();
            let out = f(&ts).unwrap();
            let g = (&out * &r).unwrap().sum_all().unwrap().backward().unwrap();
            drop(g);
            t0.elapsed().as_secs_f64() * 1e3
        };
        let (mut best_f, mut best_c) = (f64::MAX, f64::MAX);
        for _ in 0..5 {
            best_f = best_f.min(time(fused));
            best_c = best_c.min(time(composed));
        }
        println!(
            "{name}: fused {best_f:.1} ms, composed {best_c:.1} ms (forward + backward, best of 5)"
        );
    }
}

/// The fused GroupNorm + ReLU and residual add + ReLU equal the ops they replace (GroupNorm then ReLU, add then
/// ReLU) bit for bit, forward and every gradient, in f32 and f64; and their gradients match finite differences.
#[test]
fn fused_relu_joins_equal_the_composed_ops_bit_for_bit() {
    let x = rand_t(&[2, 8, 5, 7], -2.0, 2.0, 190);
    let w = rand_t(&[8], 0.5, 1.5, 191);
    let b = rand_t(&[8], -0.5, 0.5, 192);
    let r = rand_t(&[2, 8, 5, 7], -2.0, 2.0, 193);
    for dtype in [DType::F64, DType::F32] {
        let ts: Vec<Tensor> = [&x, &w, &b, &r]
            .iter()
            .map(|t| t.to_dtype(dtype).unwrap())
            .collect();
        let gn = |t: &[Tensor]| nn::GroupNorm::from_tensors(4, t[1].clone(), t[2].clone(), 1e-6);
        compare_fused(
            &format!("group_norm + relu {dtype:?}"),
            &ts[..3],
            &[true, true, true],
            |t| gn(t).forward_relu(&t[0]),
            |t| nn::relu(&gn(t).forward(&t[0])?),
            0.0,
        );
        compare_fused(
            &format!("add + relu {dtype:?}"),
            &[ts[0].clone(), ts[3].clone()],
            &[true, true],
            |t| nn::add_relu(&t[0], &t[1]),
            |t| nn::relu(&(&t[0] + &t[1])?),
            0.0,
        );
    }
    fd_check(
        "group_norm + relu",
        &[x.clone(), w, b],
        |t| nn::GroupNorm::from_tensors(4, t[1].clone(), t[2].clone(), 1e-6).forward_relu(&t[0]),
        RTOL,
        150,
    );
    fd_check(
        "add + relu",
        &[x, r],
        |t| nn::add_relu(&t[0], &t[1]),
        RTOL,
        150,
    );
    // Operands of different shapes are refused, not broadcast.
    let a = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let c = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(nn::add_relu(&a, &c).is_err());
}
