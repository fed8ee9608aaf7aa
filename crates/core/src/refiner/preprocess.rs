//! The one shared path from TransUNet-resolution tensors to SAM inputs (SPEC §7.1).
//!
//! Phase 2 (`preprocess_phase2_sample` / `preprocess_phase2_batch`), Phase 3, evaluation and inference
//! (`UltraRefiner`, which calls [`preprocess`] directly) all go through [`preprocess`]; a unit test checks that both
//! entry points give bitwise-identical tensors.
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use std::fmt;
use std::str::FromStr;

/// Version string of this preprocessing, part of the embedding-cache key (SPEC §6.9); defined next to the cache.
/// Change it whenever the numerics of [`preprocess_image`] change.
pub use crate::models::sam::cache::PREPROCESS_VERSION;

/// SAM pixel mean (RGB, 0..255 scale), SPEC §6.1.
pub const SAM_PIXEL_MEAN: [f32; 3] = [123.675, 116.28, 103.53];
/// SAM pixel std (RGB, 0..255 scale), SPEC §6.1.
pub const SAM_PIXEL_STD: [f32; 3] = [58.395, 57.12, 57.375];

/// Input normalisation of the SAM image (SPEC §7.1; `--sam-normalization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SamNormalization {
    /// `(x − mean_c)/std_c` on the 0..255 scale (SAM; also what the original used for every checkpoint).
    Sam,
    /// Per image `(x − min)/max(max − min, 1e-8)` on the 0..1 scale (MedSAM contract).
    Unit,
}

impl SamNormalization {
    pub fn as_str(&self) -> &'static str {
        match self {
            SamNormalization::Sam => "sam",
            SamNormalization::Unit => "unit",
        }
    }

    /// Resolves `auto|sam|unit` against the weight provenance (`"medsam"` selects `unit` under `auto`).
    pub fn resolve(mode: &str, provenance: Option<&str>) -> Result<Self> {
        match mode.trim().to_ascii_lowercase().as_str() {
            "sam" => Ok(SamNormalization::Sam),
            "unit" => Ok(SamNormalization::Unit),
            "auto" => Ok(match provenance.map(|p| p.to_ascii_lowercase()) {
                Some(p) if p == "medsam" => SamNormalization::Unit,
                _ => SamNormalization::Sam,
            }),
            other => Err(Error::Config(format!(
                "sam normalization `{other}` is unknown (expected `auto`, `sam` or `unit`)"
            ))),
        }
    }
}

impl fmt::Display for SamNormalization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SamNormalization {
    type Err = Error;
    /// Parses `sam` or `unit` (use [`SamNormalization::resolve`] for `auto`).
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Err(Error::Config(
                "sam normalization `auto` needs the weight provenance; resolve it with SamNormalization::resolve".into(),
            )),
            _ => SamNormalization::resolve(s, None),
        }
    }
}

/// SAM inputs of one batch.
#[derive(Debug, Clone)]
pub struct SamInputs {
    /// `(B, 3, N, N)` normalised image, detached.
    pub image: Tensor,
    /// `(B, N, N)` coarse probability at `N` (differentiable with respect to `coarse_s`).
    pub coarse: Tensor,
}

fn check_image(image_s: &Tensor) -> Result<(usize, usize, usize)> {
    let (b, c, h, w) = image_s.dims4().map_err(|_| {
        Error::Arg(format!(
            "preprocess: image must be (B, 1, S, S), got shape {:?}",
            image_s.dims()
        ))
    })?;
    if c != 1 || h != w || h == 0 {
        return Err(Error::Arg(format!(
            "preprocess: image must be (B, 1, S, S), got shape {:?}",
            image_s.dims()
        )));
    }
    Ok((b, h, w))
}

/// SAM image `(B, 3, N, N)` from a grey `(B, 1, S, S)` image in `[0, 1]`: `×255`, 3 channels, `bilinear(ac=false)` to
/// `N`, then the normalisation. Detached (the image never carries a gradient).
pub fn preprocess_image(image_s: &Tensor, n: usize, norm: SamNormalization) -> Result<Tensor> {
    check_image(image_s)?;
    let dt = match image_s.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let x = image_s.detach().to_dtype(dt)?.affine(255.0, 0.0)?;
    // The resize is per channel, so resizing the grey channel once and repeating it is bitwise identical to
    // repeating first (and three times cheaper).
    let x = crate::nn::resize_bilinear(&x.contiguous()?, n, n, false)?.repeat((1, 3, 1, 1))?;
    let dev = x.device();
    let out = match norm {
        SamNormalization::Sam => {
            let mean = Tensor::from_slice(&SAM_PIXEL_MEAN, (1, 3, 1, 1), dev)?.to_dtype(dt)?;
            let std = Tensor::from_slice(&SAM_PIXEL_STD, (1, 3, 1, 1), dev)?.to_dtype(dt)?;
            x.broadcast_sub(&mean)?.broadcast_div(&std)?
        }
        SamNormalization::Unit => {
            let x = (x / 255.0)?;
            let b = x.dim(0)?;
            let flat = x.reshape((b, ()))?;
            let mn = flat.min_keepdim(1)?.reshape((b, 1, 1, 1))?;
            let mx = flat.max_keepdim(1)?.reshape((b, 1, 1, 1))?;
            let range = mx.broadcast_sub(&mn)?.maximum(1e-8)?;
            x.broadcast_sub(&mn)?.broadcast_div(&range)?
        }
    };
    Ok(out.detach())
}

/// Coarse probability `(B, S, S)` → `(B, N, N)` with the differentiable `bilinear(ac=false)` resize.
pub fn resize_coarse(coarse_s: &Tensor, n: usize) -> Result<Tensor> {
    let (_, h, w) = coarse_s.dims3().map_err(|_| {
        Error::Arg(format!(
            "preprocess: coarse mask must be (B, S, S), got shape {:?}",
            coarse_s.dims()
        ))
    })?;
    if h != w || h == 0 {
        return Err(Error::Arg(format!(
            "preprocess: coarse mask must be square, got shape {:?}",
            coarse_s.dims()
        )));
    }
    Ok(
        crate::nn::resize_bilinear(&coarse_s.unsqueeze(1)?.contiguous()?, n, n, false)?
            .squeeze(1)?,
    )
}

/// Ground truth `(B, S, S)` → `(B, N, N)` with the `nearest` kernel (targets of Phases 2 and 3).
pub fn resize_target(gt_s: &Tensor, n: usize) -> Result<Tensor> {
    gt_s.dims3().map_err(|_| {
        Error::Arg(format!(
            "preprocess: target must be (B, S, S), got shape {:?}",
            gt_s.dims()
        ))
    })?;
    Ok(crate::nn::resize_nearest(&gt_s.detach().unsqueeze(1)?.contiguous()?, n, n)?.squeeze(1)?)
}

/// SPEC §7.1: `(image_s (B,1,S,S) in [0,1], coarse_s (B,S,S) in [0,1])` → SAM image `(B,3,N,N)` and `coarse_n (B,N,N)`.
/// The **only** path from TransUNet-resolution tensors to SAM tensors.
pub fn preprocess(
    image_s: &Tensor,
    coarse_s: &Tensor,
    n: usize,
    norm: SamNormalization,
) -> Result<SamInputs> {
    let (b, s, _) = check_image(image_s)?;
    if coarse_s.dims() != [b, s, s] {
        return Err(Error::Arg(format!(
            "preprocess: coarse mask shape {:?} does not match image shape {:?} (expected ({b}, {s}, {s}))",
            coarse_s.dims(),
            image_s.dims()
        )));
    }
    let image = preprocess_image(image_s, n, norm)?;
    let coarse = resize_coarse(coarse_s, n)?;
    Ok(SamInputs { image, coarse })
}

/// Phase 2 inputs of a batch: SAM inputs plus the target at `N` (SPEC §11.3 step 3).
#[derive(Debug, Clone)]
pub struct Phase2Inputs {
    pub sam: SamInputs,
    /// `(B, N, N)` target, `nearest(gt_S → N)`.
    pub gt: Tensor,
}

/// Phase 2 entry point for one sample: `image_s (S,S)` or `(1,S,S)`, `coarse_s (S,S)`, `gt_s (S,S)` (all in `[0,1]`,
/// at the TransUNet size `S`) → batch-of-one SAM inputs through [`preprocess`].
pub fn preprocess_phase2_sample(
    image_s: &Tensor,
    coarse_s: &Tensor,
    gt_s: &Tensor,
    n: usize,
    norm: SamNormalization,
) -> Result<Phase2Inputs> {
    let s = coarse_s.dim(coarse_s.rank().saturating_sub(1))?;
    let image = image_s.reshape((1, 1, s, s)).map_err(|_| {
        Error::Arg(format!(
            "phase 2 sample: image shape {:?} is not (S,S) or (1,S,S) with S = {s}",
            image_s.dims()
        ))
    })?;
    let coarse = coarse_s.reshape((1, s, s)).map_err(|_| {
        Error::Arg(format!(
            "phase 2 sample: coarse shape {:?} is not (S,S)",
            coarse_s.dims()
        ))
    })?;
    let gt = gt_s.reshape((1, s, s)).map_err(|_| {
        Error::Arg(format!(
            "phase 2 sample: target shape {:?} is not (S,S)",
            gt_s.dims()
        ))
    })?;
    preprocess_phase2_batch(&image, &coarse, &gt, n, norm)
}

/// Phase 2 entry point for a stacked batch (`image_s (B,1,S,S)`, `coarse_s (B,S,S)`, `gt_s (B,S,S)`).
pub fn preprocess_phase2_batch(
    image_s: &Tensor,
    coarse_s: &Tensor,
    gt_s: &Tensor,
    n: usize,
    norm: SamNormalization,
) -> Result<Phase2Inputs> {
    let sam = preprocess(image_s, coarse_s, n, norm)?;
    if gt_s.dims() != coarse_s.dims() {
        return Err(Error::Arg(format!(
            "phase 2 batch: target shape {:?} differs from coarse shape {:?}",
            gt_s.dims(),
            coarse_s.dims()
        )));
    }
    let gt = resize_target(&gt_s.to_dtype(coarse_s.dtype())?, n)?;
    Ok(Phase2Inputs { sam, gt })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn sample_batch(b: usize, s: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let dev = Device::Cpu;
        let img: Vec<f32> = (0..b * s * s)
            .map(|i| ((i * 37 % 101) as f32) / 100.0)
            .collect();
        let coarse: Vec<f32> = (0..b * s * s)
            .map(|i| ((i * 53 % 97) as f32) / 96.0)
            .collect();
        let gt: Vec<f32> = (0..b * s * s)
            .map(|i| ((i * 7 % 5) == 0) as u8 as f32)
            .collect();
        Ok((
            Tensor::from_vec(img, (b, 1, s, s), &dev)?,
            Tensor::from_vec(coarse, (b, s, s), &dev)?,
            Tensor::from_vec(gt, (b, s, s), &dev)?,
        ))
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn sam_mode_matches_formula() -> Result<()> {
        // S = N: the resize is the identity, so the output is (255·x − mean_c)/std_c exactly.
        let (img, coarse, _) = sample_batch(2, 8)?;
        let out = preprocess(&img, &coarse, 8, SamNormalization::Sam)?;
        assert_eq!(out.image.dims(), &[2, 3, 8, 8]);
        let x: Vec<f32> = img.flatten_all()?.to_vec1()?;
        let y: Vec<f32> = out.image.flatten_all()?.to_vec1()?;
        for b in 0..2 {
            for c in 0..3 {
                for p in 0..64 {
                    let want = (x[b * 64 + p] * 255.0 - SAM_PIXEL_MEAN[c]) / SAM_PIXEL_STD[c];
                    assert_eq!(y[(b * 3 + c) * 64 + p].to_bits(), want.to_bits());
                }
            }
        }
        assert_eq!(bits(&out.coarse), bits(&coarse));
        Ok(())
    }

    #[test]
    fn unit_mode_spans_zero_to_one_and_handles_constants() -> Result<()> {
        let (img, coarse, _) = sample_batch(2, 8)?;
        let out = preprocess(&img, &coarse, 16, SamNormalization::Unit)?;
        let v: Vec<f32> = out.image.flatten_all()?.to_vec1()?;
        for b in 0..2 {
            let s = &v[b * 3 * 256..(b + 1) * 3 * 256];
            let mn = s.iter().cloned().fold(f32::INFINITY, f32::min);
            let mx = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            assert!(
                mn.abs() < 1e-6 && (mx - 1.0).abs() < 1e-6,
                "sample {b}: [{mn}, {mx}]"
            );
        }
        let flat = Tensor::full(0.5f32, (1, 1, 8, 8), &Device::Cpu)?;
        let out = preprocess(&flat, &coarse.narrow(0, 0, 1)?, 16, SamNormalization::Unit)?;
        assert!(out
            .image
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| *v == 0.0));
        Ok(())
    }

    #[test]
    fn normalization_resolution() -> Result<()> {
        assert_eq!(
            SamNormalization::resolve("auto", Some("medsam"))?,
            SamNormalization::Unit
        );
        assert_eq!(
            SamNormalization::resolve("auto", Some("sam"))?,
            SamNormalization::Sam
        );
        assert_eq!(
            SamNormalization::resolve("auto", None)?,
            SamNormalization::Sam
        );
        assert_eq!(
            SamNormalization::resolve("sam", Some("medsam"))?,
            SamNormalization::Sam
        );
        assert_eq!("unit".parse::<SamNormalization>()?, SamNormalization::Unit);
        assert!("auto".parse::<SamNormalization>().is_err());
        assert!(SamNormalization::resolve("zscore", None).is_err());
        Ok(())
    }

    /// Per-sample Phase 2 preprocessing stacked equals the batched call bit for bit.
    #[test]
    fn phase2_sample_equals_batch_bitwise() -> Result<()> {
        let (img, coarse, gt) = sample_batch(3, 12)?;
        let batch = preprocess_phase2_batch(&img, &coarse, &gt, 40, SamNormalization::Sam)?;
        for b in 0..3 {
            let one = preprocess_phase2_sample(
                &img.get(b)?.squeeze(0)?,
                &coarse.get(b)?,
                &gt.get(b)?,
                40,
                SamNormalization::Sam,
            )?;
            assert_eq!(
                bits(&one.sam.image),
                bits(&batch.sam.image.narrow(0, b, 1)?)
            );
            assert_eq!(
                bits(&one.sam.coarse),
                bits(&batch.sam.coarse.narrow(0, b, 1)?)
            );
            assert_eq!(bits(&one.gt), bits(&batch.gt.narrow(0, b, 1)?));
        }
        // Nearest target keeps binary values.
        assert!(batch
            .gt
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| *v == 0.0 || *v == 1.0));
        Ok(())
    }

    #[test]
    fn coarse_is_differentiable_image_is_detached() -> Result<()> {
        let (img, coarse, _) = sample_batch(1, 8)?;
        let vi = Var::from_tensor(&img)?;
        let vc = Var::from_tensor(&coarse)?;
        let out = preprocess(vi.as_tensor(), vc.as_tensor(), 20, SamNormalization::Sam)?;
        let g = (out.coarse.sum_all()? + out.image.sum_all()?)?.backward()?;
        assert!(
            g.get(vi.as_tensor()).is_none(),
            "the SAM image must not carry a gradient"
        );
        let gc: Vec<f32> = g
            .get(vc.as_tensor())
            .expect("coarse gradient")
            .flatten_all()?
            .to_vec1()?;
        // Bilinear weights of each output pixel sum to 1: total gradient mass = N².
        let total: f32 = gc.iter().sum();
        assert!((total - 400.0).abs() < 1e-3, "{total}");
        Ok(())
    }

    #[test]
    fn shape_errors_name_the_problem() {
        let dev = Device::Cpu;
        let img = Tensor::zeros((1, 3, 8, 8), DType::F32, &dev).unwrap();
        let c = Tensor::zeros((1, 8, 8), DType::F32, &dev).unwrap();
        let e = preprocess(&img, &c, 16, SamNormalization::Sam)
            .unwrap_err()
            .to_string();
        assert!(e.contains("(B, 1, S, S)"), "{e}");
        let img = Tensor::zeros((1, 1, 8, 8), DType::F32, &dev).unwrap();
        let c = Tensor::zeros((1, 9, 9), DType::F32, &dev).unwrap();
        let e = preprocess(&img, &c, 16, SamNormalization::Sam)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not match"), "{e}");
    }
}
