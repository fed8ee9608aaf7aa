//! One axis of a bilinear resize as a single CPU kernel with its adjoint as backward.
//!
//! The composed axis (two `index_select`s, two broadcast products, a sum) records five graph nodes, each a pass over
//! the output in the forward, and its backward runs two `index_add`s plus candle's per-node gradient bookkeeping.
//! Resizes sit on every decoder upsampling of TransUNet and on the 224↔256↔1024 paths of the refiner. The kernel
//! computes `y[o] = l0[o]·x[i0[o]] + l1[o]·x[i1[o]]` in the tensor's dtype with the same two roundings and the same
//! order as the composed form, so values are bit-identical; the backward adds `l0·dy` and `l1·dy` into `dx`.
use super::resize::LinearTaps;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// `(planes, n_in or n_out along the axis, inner)`: axis 2 has rows of length W as its inner block, axis 3 has 1.
#[derive(Debug, Clone, Copy)]
struct Geom {
    planes: usize,
    rows: usize,
    cols: usize,
}

#[derive(Debug, Clone)]
struct Lerp {
    dim: usize,
    n_in: usize,
    taps: LinearTaps,
}

/// Backward of [`Lerp`]: `dx` from `dy` (no backward of its own).
#[derive(Debug, Clone)]
struct LerpGrad(Lerp);

/// `(B·C, H, W)` of a 4-D layout.
fn geom(l: &Layout) -> candle_core::Result<Geom> {
    let (b, c, h, w) = l.shape().dims4()?;
    Ok(Geom {
        planes: b * c,
        rows: h,
        cols: w,
    })
}

impl Lerp {
    fn weights<T: WithDType>(&self) -> (Vec<T>, Vec<T>) {
        let cast = |v: &[f64]| v.iter().map(|&w| T::from_f64(w)).collect();
        (cast(&self.taps.l0), cast(&self.taps.l1))
    }

    fn out_shape(&self, g: Geom) -> (usize, usize) {
        let n_out = self.taps.i0.len();
        if self.dim == 2 {
            (n_out, g.cols)
        } else {
            (g.rows, n_out)
        }
    }

    fn forward<T: WithDType>(&self, x: &[T], g: Geom) -> Vec<T> {
        let (l0, l1) = self.weights::<T>();
        let (i0, i1) = (&self.taps.i0, &self.taps.i1);
        let (oh, ow) = self.out_shape(g);
        let mut y = vec![T::zero(); g.planes * oh * ow];
        y.par_chunks_mut(oh * ow).enumerate().for_each(|(p, out)| {
            let src = &x[p * g.rows * g.cols..(p + 1) * g.rows * g.cols];
            if self.dim == 2 {
                for (o, row) in out.chunks_mut(ow).enumerate() {
                    let a = &src[i0[o] as usize * g.cols..][..g.cols];
                    let b = &src[i1[o] as usize * g.cols..][..g.cols];
                    for ((d, &u), &v) in row.iter_mut().zip(a).zip(b) {
                        *d = u * l0[o] + v * l1[o];
                    }
                }
            } else {
                for (r, row) in out.chunks_mut(ow).enumerate() {
                    let s = &src[r * g.cols..(r + 1) * g.cols];
                    for (o, d) in row.iter_mut().enumerate() {
                        *d = s[i0[o] as usize] * l0[o] + s[i1[o] as usize] * l1[o];
                    }
                }
            }
        });
        y
    }

    /// `dy` has the output geometry `g_out`; `dx` the input geometry.
    fn backward<T: WithDType>(&self, dy: &[T], g_out: Geom) -> Vec<T> {
        let (l0, l1) = self.weights::<T>();
        let (i0, i1) = (&self.taps.i0, &self.taps.i1);
        let (ih, iw) = if self.dim == 2 {
            (self.n_in, g_out.cols)
        } else {
            (g_out.rows, self.n_in)
        };
        let plane_out = g_out.rows * g_out.cols;
        let mut dx = vec![T::zero(); g_out.planes * ih * iw];
        dx.par_chunks_mut(ih * iw).enumerate().for_each(|(p, out)| {
            let g = &dy[p * plane_out..(p + 1) * plane_out];
            if self.dim == 2 {
                for (o, grow) in g.chunks(g_out.cols).enumerate() {
                    for (i, l) in [(i0[o] as usize, l0[o]), (i1[o] as usize, l1[o])] {
                        let dst = &mut out[i * iw..(i + 1) * iw];
                        for (d, &v) in dst.iter_mut().zip(grow) {
                            *d += v * l;
                        }
                    }
                }
            } else {
                for (r, grow) in g.chunks(g_out.cols).enumerate() {
                    let dst = &mut out[r * iw..(r + 1) * iw];
                    for (o, &v) in grow.iter().enumerate() {
                        dst[i0[o] as usize] += v * l0[o];
                        dst[i1[o] as usize] += v * l1[o];
                    }
                }
            }
        });
        dx
    }
}

impl CustomOp1 for Lerp {
    fn name(&self) -> &'static str {
        "resize-lerp-axis"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = geom(l)?;
        let (b, c, _, _) = l.shape().dims4()?;
        let (oh, ow) = self.out_shape(g);
        let y = match s {
            CpuStorage::F32(_) => {
                CpuStorage::F32(self.forward(super::cpu_data::<f32>(s, l, "resize input")?, g))
            }
            CpuStorage::F64(_) => {
                CpuStorage::F64(self.forward(super::cpu_data::<f64>(s, l, "resize input")?, g))
            }
            _ => candle_core::bail!("resize: the fused axis kernel takes f32/f64"),
        };
        Ok((y, Shape::from((b, c, oh, ow))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?
                .apply_op1_no_bwd(&LerpGrad(self.clone()))?,
        ))
    }
}

impl CustomOp1 for LerpGrad {
    fn name(&self) -> &'static str {
        "resize-lerp-axis-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = geom(l)?;
        let (b, c, h, w) = l.shape().dims4()?;
        let dx = match s {
            CpuStorage::F32(_) => CpuStorage::F32(
                self.0
                    .backward(super::cpu_data::<f32>(s, l, "resize input")?, g),
            ),
            CpuStorage::F64(_) => CpuStorage::F64(
                self.0
                    .backward(super::cpu_data::<f64>(s, l, "resize input")?, g),
            ),
            _ => candle_core::bail!("resize: the fused axis kernel takes f32/f64"),
        };
        let shape = if self.0.dim == 2 {
            (b, c, self.0.n_in, w)
        } else {
            (b, c, h, self.0.n_in)
        };
        Ok((dx, Shape::from(shape)))
    }
}

/// Whether [`lerp_axis`] applies to `x`: a CPU tensor in f32/f64.
pub(super) fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// `l0·x[i0] + l1·x[i1]` along `dim` (2 or 3) of a 4-D CPU tensor, differentiable.
pub(super) fn lerp_axis(
    x: &Tensor,
    dim: usize,
    n_in: usize,
    taps: LinearTaps,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(Lerp { dim, n_in, taps })
}

#[cfg(test)]
mod tests {
    use super::super::resize::bilinear_taps;
    use candle_core::{DType, Device, Tensor, Var};

    /// The composed axis (index_select + broadcast products), written out independently of `resize.rs`.
    fn composed(x: &Tensor, dim: usize, n_out: usize, ac: bool) -> Tensor {
        let n_in = x.dim(dim).unwrap();
        let t = bilinear_taps(n_in, n_out, ac, x.dtype() == DType::F64);
        let mut shape = [1usize; 4];
        shape[dim] = n_out;
        let ids = |v: &[u32]| Tensor::new(v, &Device::Cpu).unwrap();
        let w = |v: &[f64]| {
            Tensor::from_slice(v, &shape[..], &Device::Cpu)
                .unwrap()
                .to_dtype(x.dtype())
                .unwrap()
        };
        let a = x
            .index_select(&ids(&t.i0), dim)
            .unwrap()
            .broadcast_mul(&w(&t.l0))
            .unwrap();
        let b = x
            .index_select(&ids(&t.i1), dim)
            .unwrap()
            .broadcast_mul(&w(&t.l1))
            .unwrap();
        (a + b).unwrap()
    }

    /// Bit-identical values and equal gradients (up to summation order) to the composed form, both axes, both
    /// corner modes, up- and down-sampling, f32 and f64.
    #[test]
    fn matches_the_composed_axis() {
        for dtype in [DType::F32, DType::F64] {
            let n = 2 * 3 * 5 * 7;
            let v: Vec<f64> = (0..n)
                .map(|i| ((i * 37 % 101) as f64 / 50.0) - 1.0)
                .collect();
            let x = Var::from_tensor(
                &Tensor::from_vec(v, (2, 3, 5, 7), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            for ac in [false, true] {
                for (dim, n_out) in [(2, 11), (2, 3), (3, 16), (3, 2), (2, 1)] {
                    let n_in = x.dim(dim).unwrap();
                    let taps = bilinear_taps(n_in, n_out, ac, dtype == DType::F64);
                    let fused = super::lerp_axis(x.as_tensor(), dim, n_in, taps).unwrap();
                    let reference = composed(x.as_tensor(), dim, n_out, ac);
                    let case = format!("{dtype:?} ac={ac} dim {dim} → {n_out}");
                    let bits = |t: &Tensor| -> Vec<f64> {
                        t.to_dtype(DType::F64)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1()
                            .unwrap()
                    };
                    assert_eq!(bits(&fused), bits(&reference), "{case}: values");
                    let r = Tensor::rand(-1.0, 1.0, fused.dims(), &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    let gf = (&fused * &r)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    let gr = (&reference * &r)
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .backward()
                        .unwrap();
                    let (a, b) = (
                        bits(gf.get(x.as_tensor()).unwrap()),
                        bits(gr.get(x.as_tensor()).unwrap()),
                    );
                    let worst = a
                        .iter()
                        .zip(&b)
                        .map(|(p, q)| (p - q).abs())
                        .fold(0.0, f64::max);
                    assert!(worst < 1e-5, "{case}: gradient differs by {worst}");
                }
            }
        }
    }
}
