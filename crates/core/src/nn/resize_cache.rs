//! Small cache of per-axis resampling tensors (indices and weights) already on the target device.
//!
//! A training step resizes the same few size pairs (224↔1024, 256→1024, ×2 decoder upsamplings) many times; building
//! the taps on the host and copying them to a GPU each time costs synchronous host-to-device transfers. The cache is
//! keyed by everything that determines the tensors; devices are compared with `same_device` (two CUDA handles on
//! the same ordinal are distinct devices in candle).
use crate::Result;
use candle_core::{DType, Device, Tensor};
use std::sync::Mutex;

/// What identifies one axis' tensors: kernel (`Some(ac)` bilinear, `None` nearest), sizes, axis, dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct AxisKey {
    pub align_corners: Option<bool>,
    pub n_in: usize,
    pub n_out: usize,
    pub dim: usize,
    pub dtype: DType,
}

/// Index tensors (u32) and, for bilinear, the weight tensors shaped to broadcast along the axis.
#[derive(Debug, Clone)]
pub(super) enum AxisTensors {
    Nearest {
        idx: Tensor,
    },
    Bilinear {
        i0: Tensor,
        i1: Tensor,
        l0: Tensor,
        l1: Tensor,
    },
}

/// Bounded so that a run over many odd sizes (e.g. ROI crops) cannot grow it without limit.
const CAPACITY: usize = 64;

static CACHE: Mutex<Vec<(AxisKey, Device, AxisTensors)>> = Mutex::new(Vec::new());

/// Returns the cached tensors for `key` on `dev`, building them with `build` on a miss.
pub(super) fn get_or_build(
    key: AxisKey,
    dev: &Device,
    build: impl FnOnce() -> Result<AxisTensors>,
) -> Result<AxisTensors> {
    // A poisoned lock only means another thread panicked mid-insert; the Vec is still valid.
    {
        let cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, t)) = cache
            .iter()
            .find(|(k, d, _)| *k == key && d.same_device(dev))
        {
            return Ok(t.clone());
        }
    }
    let t = build()?;
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if cache.len() >= CAPACITY {
        cache.remove(0);
    }
    cache.push((key, dev.clone(), t.clone()));
    Ok(t)
}
