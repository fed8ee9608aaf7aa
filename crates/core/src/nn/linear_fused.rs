//! Differentiable `y = x·Wᵀ (+ b)` on the CPU as one in-place GEMM per pass over all leading dimensions.
//!
//! candle 0.11.1's `Linear` on a `(B, N, in)` input broadcasts `W` to `(B, out, in)` and runs `B` products of inner
//! size `in`; its backward computes the weight gradient as `B` products of inner size `N` into a `(B, out, in)`
//! buffer that is then summed (for a ViT-B MLP at batch 4: a 38 MB buffer per layer and step), and the bias add is a
//! separate broadcast node with its own gradient buffer. Here the leading dimensions are flattened into `M` rows:
//!
//! * forward: `Y (M, out) = X (M, in) · Wᵀ`, accumulated onto rows pre-filled with `b`;
//! * input gradient: `dX = dY · W`;
//! * weight gradient: `dW = dYᵀ · X`, one product of inner size `M`;
//! * bias gradient: the column sums of `dY`.
//!
//! `Wᵀ` and `dYᵀ` are read through strides, never copied.
use super::buffer::uninit_vec;
use super::conv_gemm::{gemm_grad_op, gemm_layer_op, matmul, parallelism, with_float, Float, View};
use crate::{Error, Result};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, WithDType,
};

/// Shapes of one product: `m` rows (all leading dimensions), `k` input and `n` output features.
#[derive(Debug, Clone)]
struct Geom {
    x_shape: Shape,
    m: usize,
    k: usize,
    n: usize,
}

impl Geom {
    fn y_shape(&self) -> Shape {
        let mut d = self.x_shape.dims().to_vec();
        if let Some(last) = d.last_mut() {
            *last = self.n;
        }
        Shape::from(d)
    }
}

fn forward<T: Float>(g: &Geom, x: &[T], w: &[T], b: Option<&[T]>) -> Vec<T> {
    // SAFETY: written in full below: rows pre-filled with the bias, or by the non-accumulating product.
    let mut y = unsafe { uninit_vec::<T>(g.m * g.n) };
    if let Some(b) = b {
        for row in y.chunks_mut(g.n.max(1)) {
            row.copy_from_slice(b);
        }
    }
    let (xv, wt) = (View::rm(x, g.k), View::tr(w, g.k));
    matmul(
        &mut y,
        g.n,
        (g.m, g.n, g.k),
        xv,
        wt,
        b.is_some(),
        parallelism(),
    );
    y
}

fn input_grad<T: Float>(g: &Geom, dy: &[T], w: &[T]) -> Vec<T> {
    // SAFETY: written in full by the non-accumulating product (`gemm` does not read it).
    let mut dx = unsafe { uninit_vec::<T>(g.m * g.k) };
    let (dyv, wv) = (View::rm(dy, g.n), View::rm(w, g.k));
    matmul(&mut dx, g.k, (g.m, g.k, g.n), dyv, wv, false, parallelism());
    dx
}

fn weight_grad<T: Float>(g: &Geom, dy: &[T], x: &[T]) -> Vec<T> {
    // SAFETY: written in full by the non-accumulating product (`gemm` does not read it).
    let mut dw = unsafe { uninit_vec::<T>(g.n * g.k) };
    let (dyt, xv) = (View::tr(dy, g.n), View::rm(x, g.k));
    matmul(&mut dw, g.k, (g.n, g.k, g.m), dyt, xv, false, parallelism());
    dw
}

fn bias_grad<T: Float>(g: &Geom, dy: &[T]) -> Vec<T> {
    let mut db = vec![T::zero(); g.n];
    for row in dy.chunks(g.n.max(1)) {
        for (acc, &v) in db.iter_mut().zip(row) {
            *acc += v;
        }
    }
    db
}

/// `y = x·Wᵀ`: a [`CustomOp2`] without bias, a [`CustomOp3`] with it.
struct Linear(Geom);
/// `dX` from `(dY, W)` (no backward of its own).
struct InputGrad(Geom);
/// `dW` from `(dY, X)` (no backward of its own).
struct WeightGrad(Geom);
/// `db` from `dY` (no backward of its own).
struct BiasGrad(Geom);

gemm_layer_op!(
    Linear,
    ("linear-gemm", "linear-gemm-bias"),
    "linear",
    |g, x, w, bias| forward(g, x, w, bias),
    g.y_shape(),
    (InputGrad, WeightGrad, BiasGrad),
    |op| op.0.clone()
);
gemm_grad_op!(
    InputGrad,
    "linear-gemm-input-grad",
    ("linear gradient", "linear weight"),
    |g, dy, w| input_grad(g, dy, w),
    g.x_shape.clone()
);
gemm_grad_op!(
    WeightGrad,
    "linear-gemm-weight-grad",
    ("linear gradient", "linear input"),
    |g, dy, x| weight_grad(g, dy, x),
    Shape::from((g.n, g.k))
);

impl CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "linear-gemm-bias-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let db = with_float!(T, [s], {
            let dy = super::cpu_data::<T>(s, l, "linear gradient")?;
            T::to_cpu_storage_owned(bias_grad(&self.0, dy))
        });
        Ok((db, Shape::from(self.0.n)))
    }
}

/// Differentiable `x (…, in) · wᵀ (+ b)` with `w (out, in)` and `b (out)`: the value of candle's `Linear`. On the
/// CPU in f32/f64 the forward and every gradient are single GEMMs over the flattened leading dimensions (module
/// docs); elsewhere it is candle's broadcast matmul and broadcast add.
pub fn linear_fused(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (n, k) = w.dims2()?;
    let x_dims = x.dims();
    if x_dims.last() != Some(&k) || b.is_some_and(|b| b.dims() != [n]) {
        return Err(Error::Arg(format!(
            "linear: input {x_dims:?}, weight {:?} and bias {:?} do not fit together",
            w.dims(),
            b.map(|b| b.dims().to_vec())
        )));
    }
    let dt = x.dtype();
    let cpu = x.device().is_cpu()
        && w.device().is_cpu()
        && matches!(dt, DType::F32 | DType::F64)
        && w.dtype() == dt
        && b.is_none_or(|b| b.device().is_cpu() && b.dtype() == dt);
    if !cpu {
        let y = x.broadcast_matmul(&w.t()?)?;
        return Ok(match b {
            None => y,
            Some(b) => y.broadcast_add(b)?,
        });
    }
    let g = Geom {
        x_shape: x.shape().clone(),
        m: x.elem_count() / k.max(1),
        k,
        n,
    };
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    Ok(match b {
        None => x.apply_op2(&w, Linear(g))?,
        Some(b) => x.apply_op3(&w, &b.contiguous()?, Linear(g))?,
    })
}

/// [`linear_fused`] through a candle [`candle_nn::Linear`] layer (its weight and optional bias).
pub fn linear_layer(layer: &candle_nn::Linear, x: &Tensor) -> Result<Tensor> {
    linear_fused(x, layer.weight(), layer.bias())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::Module;

    use crate::nn::conv_gemm::tests::rel_diff;

    fn ramp(shape: &[usize], scale: f64, dt: DType) -> Tensor {
        crate::nn::conv_gemm::tests::ramp(shape, scale)
            .to_dtype(dt)
            .unwrap()
    }

    /// Values and all three gradients against candle's `Linear` (broadcast matmul + broadcast add), for 2-D, 3-D and
    /// 4-D inputs, with and without bias, in f64 (to rounding) and f32.
    #[test]
    fn matches_candle_linear_and_its_gradients() {
        for (dt, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            for (shape, bias) in [
                (vec![5, 7], true),
                (vec![2, 3, 7], true),
                (vec![2, 2, 3, 7], false),
                (vec![3, 7], false),
            ] {
                let x = Var::from_tensor(&ramp(&shape, 2.0, dt)).unwrap();
                let w = Var::from_tensor(&ramp(&[6, 7], 1.0, dt)).unwrap();
                let b = Var::from_tensor(&ramp(&[6], 0.5, dt)).unwrap();
                let bt = bias.then(|| b.as_tensor().clone());
                let ours = linear_fused(x.as_tensor(), w.as_tensor(), bt.as_ref()).unwrap();
                let theirs = candle_nn::Linear::new(w.as_tensor().clone(), bt.clone())
                    .forward(x.as_tensor())
                    .unwrap();
                let what = format!("{dt:?} {shape:?} bias {bias}");
                assert_eq!(ours.dims(), theirs.dims(), "{what}");
                assert!(rel_diff(&ours, &theirs) < tol, "{what}: forward");
                let r = ramp(theirs.dims(), 3.0, dt);
                let go = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let gt = (&theirs * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let mut vars = vec![("input", &x), ("weight", &w)];
                if bias {
                    vars.push(("bias", &b));
                }
                for (name, v) in vars {
                    let (a, e) = (
                        go.get(v.as_tensor()).unwrap(),
                        gt.get(v.as_tensor()).unwrap(),
                    );
                    assert!(rel_diff(a, e) < tol, "{what}: {name} gradient");
                }
            }
        }
    }

    /// Central finite differences in f64 of `Σ r ⊙ linear(x, w, b)` for every input, weight and bias element.
    #[test]
    fn gradients_match_finite_differences() {
        let x = Var::from_tensor(&ramp(&[2, 3, 4], 2.0, DType::F64)).unwrap();
        let w = Var::from_tensor(&ramp(&[5, 4], 1.0, DType::F64)).unwrap();
        let b = Var::from_tensor(&ramp(&[5], 0.5, DType::F64)).unwrap();
        let r = ramp(&[2, 3, 5], 3.0, DType::F64);
        let f = |x: &Tensor, w: &Tensor, b: &Tensor| -> f64 {
            (linear_fused(x, w, Some(b)).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let grads = (linear_fused(x.as_tensor(), w.as_tensor(), Some(b.as_tensor())).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let h = 1e-6;
        for which in 0..3 {
            let base = [x.as_tensor(), w.as_tensor(), b.as_tensor()][which].detach();
            let flat = base.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let analytic = grads
                .get([x.as_tensor(), w.as_tensor(), b.as_tensor()][which])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for i in 0..flat.len() {
                let bump = |d: f64| {
                    let mut v = flat.clone();
                    v[i] += d;
                    let t = Tensor::from_vec(v, base.shape(), &Device::Cpu).unwrap();
                    let mut args = [
                        x.as_tensor().detach(),
                        w.as_tensor().detach(),
                        b.as_tensor().detach(),
                    ];
                    args[which] = t;
                    f(&args[0], &args[1], &args[2])
                };
                let numeric = (bump(h) - bump(-h)) / (2.0 * h);
                assert!(
                    (numeric - analytic[i]).abs() < 1e-6 * (1.0 + numeric.abs()),
                    "operand {which} element {i}: numeric {numeric} analytic {}",
                    analytic[i]
                );
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let x = ramp(&[3, 4], 1.0, DType::F32);
        assert!(linear_fused(&x, &ramp(&[5, 3], 1.0, DType::F32), None).is_err());
        let w = ramp(&[5, 4], 1.0, DType::F32);
        assert!(linear_fused(&x, &w, Some(&ramp(&[4], 1.0, DType::F32))).is_err());
    }
}
