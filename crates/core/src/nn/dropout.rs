//! Dropout with a host-generated Bernoulli mask from the project RNG (SPEC §0: every random stream is a
//! counter-based ChaCha8 stream, so masks are reproducible and independent of thread counts and devices).
use crate::rng::stream_rng;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use rand::RngCore;
use rayon::prelude::*;

/// Inverted dropout with drop probability `p`: kept elements are scaled by `1/(1−p)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    p: f64,
}

impl Dropout {
    /// `p` is validated when the layer is applied in train mode.
    pub fn new(p: f64) -> Self {
        Self { p }
    }

    pub fn p(&self) -> f64 {
        self.p
    }

    /// `rng_seed = None` (evaluation) or `p = 0` returns `x` unchanged. Otherwise the mask is drawn from
    /// `stream_rng(seed, "dropout", [])`; the caller passes a seed already mixed with epoch/step/layer so that each
    /// application gets its own stream.
    pub fn forward_t(&self, x: &Tensor, rng_seed: Option<u64>) -> Result<Tensor> {
        let Some(seed) = rng_seed else {
            return Ok(x.clone());
        };
        if !(0.0..=1.0).contains(&self.p) {
            return Err(Error::Arg(format!(
                "dropout probability {} is outside [0, 1]",
                self.p
            )));
        }
        if self.p == 0.0 {
            return Ok(x.clone());
        }
        if self.p >= 1.0 {
            return Ok(x.zeros_like()?);
        }
        if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
            let keep = bernoulli_keep_flags(x.elem_count(), self.p, seed);
            let op = MaskScale {
                keep: std::sync::Arc::new(keep),
                scale: 1.0 / (1.0 - self.p),
            };
            return Ok(x.contiguous()?.apply_op1(op)?);
        }
        let mask = bernoulli_keep_mask(x.elem_count(), self.p, seed);
        let mask = Tensor::from_vec(mask, x.shape(), &Device::Cpu)?
            .to_dtype(x.dtype())?
            .to_device(x.device())?;
        Ok((x * mask)?)
    }
}

/// Inverted dropout on the CPU as one op: `y = x·scale` where kept, `0` elsewhere. candle's `x * mask` would, in
/// backward, also compute the (unused) gradient of the mask and allocate a zero gradient buffer for each operand;
/// here the backward is the same masking applied to the incoming gradient. Values equal `x * mask` bit for bit
/// (`scale` is rounded to the element type as the mask tensor's entries are).
#[derive(Clone)]
struct MaskScale {
    keep: std::sync::Arc<Vec<bool>>,
    scale: f64,
}

/// Elements per parallel task of the mask draw and its application.
const MASK_BLOCK: usize = 1 << 15;

impl MaskScale {
    fn apply<T: candle_core::WithDType>(&self, x: &[T]) -> Vec<T> {
        let scale = T::from_f64(self.scale);
        // SAFETY: each parallel chunk below writes every element of its part of `y`.
        let mut y = unsafe { super::buffer::uninit_vec::<T>(x.len()) };
        y.par_chunks_mut(MASK_BLOCK)
            .zip(
                x.par_chunks(MASK_BLOCK)
                    .zip(self.keep.par_chunks(MASK_BLOCK)),
            )
            .for_each(|(y, (x, keep))| {
                for ((o, &v), &k) in y.iter_mut().zip(x).zip(keep) {
                    *o = if k { v * scale } else { v * T::zero() };
                }
            });
        y
    }
}

impl candle_core::CustomOp1 for MaskScale {
    fn name(&self) -> &'static str {
        "dropout-mask"
    }

    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as S;
        if l.shape().elem_count() != self.keep.len() {
            candle_core::bail!(
                "dropout: mask of {} for {} elements",
                self.keep.len(),
                l.shape().elem_count()
            );
        }
        let y = match s {
            S::F32(_) => S::F32(self.apply(super::cpu_data::<f32>(s, l, "dropout input")?)),
            S::F64(_) => S::F64(self.apply(super::cpu_data::<f64>(s, l, "dropout input")?)),
            _ => candle_core::bail!("dropout: only f32/f64 on the CPU"),
        };
        Ok((y, l.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// The keep decisions of [`bernoulli_keep_mask`]: element `i` keeps when the `i`-th 32-bit word `u` of the stream
/// satisfies `u/2³² ≥ p` (compared exactly in f64). One word per element, so blocks of elements are drawn in
/// parallel by seeking the stream to their first word; the flags do not depend on the thread count. (A word rather
/// than a 53-bit `f64` per element halves the ChaCha work, which bounded dropout's cost; `p` is resolved to 2⁻³².)
pub(super) fn bernoulli_keep_flags(n: usize, p: f64, seed: u64) -> Vec<bool> {
    let base = stream_rng(seed, "dropout", &[]);
    let threshold = p * 4_294_967_296.0;
    let mut keep = vec![false; n];
    keep.par_chunks_mut(MASK_BLOCK)
        .enumerate()
        .for_each(|(b, flags)| {
            let mut rng = base.clone();
            rng.set_word_pos((b * MASK_BLOCK) as u128);
            for f in flags {
                *f = rng.next_u32() as f64 >= threshold;
            }
        });
    keep
}

/// `n` values, each `1/(1−p)` with probability `1−p` and `0` otherwise (f64 so the scale is exact before casting).
fn bernoulli_keep_mask(n: usize, p: f64, seed: u64) -> Vec<f64> {
    let keep = 1.0 / (1.0 - p);
    bernoulli_keep_flags(n, p, seed)
        .into_iter()
        .map(|k| if k { keep } else { 0.0 })
        .collect()
}

/// The mask `forward_t` would apply, as an f32 tensor (tests and debugging).
pub fn dropout_mask(shape: &[usize], p: f64, seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    Ok(
        Tensor::from_vec(bernoulli_keep_mask(n, p, seed), shape, &Device::Cpu)?
            .to_dtype(DType::F32)?,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// The block-parallel draw equals one sequential pass over the stream, across block boundaries.
    #[test]
    fn parallel_flags_equal_the_sequential_stream() {
        let n = 2 * MASK_BLOCK + 123;
        let mut rng = stream_rng(9, "dropout", &[]);
        let want: Vec<bool> = (0..n)
            .map(|_| rng.next_u32() as f64 / 4_294_967_296.0 >= 0.1)
            .collect();
        assert_eq!(bernoulli_keep_flags(n, 0.1, 9), want);
        assert_eq!(bernoulli_keep_flags(5, 0.1, 9), want[..5]);
    }

    /// The fused CPU op equals the composed `x * mask` (the path other devices take) bit for bit, forward and
    /// gradient, in f32 and f64.
    #[test]
    fn fused_cpu_path_equals_the_mask_product() {
        for dt in [DType::F32, DType::F64] {
            let v: Vec<f64> = (0..600)
                .map(|i| ((i * 29 % 97) as f64 - 48.0) / 7.0)
                .collect();
            let x = Var::from_tensor(
                &Tensor::from_vec(v, (4, 5, 30), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap(),
            )
            .unwrap();
            let fused = Dropout::new(0.3).forward_t(x.as_tensor(), Some(5)).unwrap();
            // The mask the other devices' path builds: f64 values cast to the element type.
            let mask = Tensor::from_vec(bernoulli_keep_mask(600, 0.3, 5), (4, 5, 30), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let composed = x.as_tensor().mul(&mask).unwrap();
            let flat = |t: &Tensor| {
                t.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            assert_eq!(flat(&fused), flat(&composed), "{dt:?} forward");
            let dropped = flat(&mask).iter().filter(|&&m| m == 0.0).count();
            assert!(
                dropped > 120 && dropped < 240,
                "{dropped} of 600 dropped at p = 0.3"
            );
            let r = Tensor::arange(0f64, 600.0, &Device::Cpu)
                .unwrap()
                .reshape((4, 5, 30))
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let gf = (&fused * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gc = (&composed * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert_eq!(
                flat(gf.get(x.as_tensor()).unwrap()),
                flat(gc.get(x.as_tensor()).unwrap()),
                "{dt:?} gradient"
            );
        }
    }
}
