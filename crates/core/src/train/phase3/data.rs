//! Phase 3 training data: the Phase 1 folds (§11.4.1 step 1) with the §3.8 augmentation adapted to the frozen SAM
//! image encoder and its embedding cache (§6.9).
//!
//! The SAM input is a deterministic function of the augmented `S×S` grey image, and the cache is keyed by the exact
//! bytes of that image. A continuous rotation angle would make every training image new (a cache miss per sample
//! and step), so with the cache on the rotation angle is restricted to a fixed set:
//!
//! * [`RotationPolicy::Fixed`]`(0)` (default, `--rotation-angles 0`): no rotation, horizontal flip only. Each
//!   training image has 2 variants → at most `2·n_train` encoder forwards over the whole run and `2·n_train`
//!   cached embeddings (paper: 2 MiB each in f16, ~1.6 GiB for BUSI's 409 training images).
//! * `Fixed(K)`, `K ≥ 1`: the §3.8 draw is kept (p = 0.5, `θ ~ U(−20°, 20°)`), then `θ` is snapped to the centre of
//!   its bin among `K` equal bins of [−20°, 20°]. Each image has up to `2(K + 1)` variants, i.e. `K + 1` times the
//!   encoder forwards and cache memory of the flip-only policy.
//! * [`RotationPolicy::Continuous`] (`--no-embed-cache`): exactly §3.8; the encoder runs inside every training step
//!   (one forward per sample and step: the `e2e-train-step-uncached` cost).
use crate::data::dataset::{Dataset, Sample, SegDataset};
use crate::data::transforms::AugmentParams;
use crate::Result;

/// How the §3.8 rotation is applied in Phase 3 training batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationPolicy {
    /// `K` fixed angles (bin centres of [−20°, 20°]); `0` disables rotation (flip only).
    Fixed(usize),
    /// Continuous angles exactly as §3.8 (used without the embedding cache).
    Continuous,
}

impl RotationPolicy {
    /// The angle actually applied for a §3.8 draw.
    pub fn apply(&self, p: AugmentParams) -> AugmentParams {
        match *self {
            RotationPolicy::Continuous => p,
            RotationPolicy::Fixed(0) => AugmentParams {
                rotation_deg: None,
                ..p
            },
            RotationPolicy::Fixed(k) => AugmentParams {
                rotation_deg: p.rotation_deg.map(|t| snap_angle(t, k)),
                ..p
            },
        }
    }

    /// Distinct SAM inputs one training image can produce (cache entries per image); `None` = unbounded.
    pub fn variants_per_image(&self) -> Option<usize> {
        match *self {
            RotationPolicy::Fixed(k) => Some(2 * (k + 1)),
            RotationPolicy::Continuous => None,
        }
    }

    pub fn describe(&self) -> String {
        match *self {
            RotationPolicy::Fixed(0) => "flip only (rotation off for the cached SAM branch)".into(),
            RotationPolicy::Fixed(k) => format!("rotation snapped to {k} fixed angles + flip"),
            RotationPolicy::Continuous => "rotation ±20° + flip (encoder runs every step)".into(),
        }
    }
}

/// Centre of the bin of `theta` among `k` equal bins of [−20°, 20°].
pub fn snap_angle(theta: f64, k: usize) -> f64 {
    let k = k.max(1);
    let j = (((theta + 20.0) / 40.0 * k as f64).floor() as i64).clamp(0, k as i64 - 1);
    -20.0 + 40.0 * (j as f64 + 0.5) / k as f64
}

/// The training fold with the Phase 3 augmentation (`None` seed: no augmentation, `--no-augment`).
pub struct Phase3TrainSet {
    pub inner: SegDataset,
    pub augment_seed: Option<u64>,
    pub rotation: RotationPolicy,
}

impl Dataset for Phase3TrainSet {
    fn len(&self) -> usize {
        self.inner.entries().len()
    }
    fn get(&self, index: usize, epoch: u64) -> Result<Sample> {
        let aug = self.augment_seed.map(|seed| {
            self.rotation
                .apply(AugmentParams::draw(seed, epoch, index as u64))
        });
        self.inner.make(index, aug)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapping_uses_bin_centres() {
        assert_eq!(snap_angle(-20.0, 4), -15.0);
        assert_eq!(snap_angle(-0.1, 4), -5.0);
        assert_eq!(snap_angle(0.0, 4), 5.0);
        assert_eq!(snap_angle(19.99, 4), 15.0);
        assert_eq!(snap_angle(7.0, 1), 0.0);
        let p = AugmentParams {
            rotation_deg: Some(3.3),
            hflip: true,
        };
        assert_eq!(RotationPolicy::Fixed(0).apply(p).rotation_deg, None);
        assert!(RotationPolicy::Fixed(0).apply(p).hflip);
        assert_eq!(RotationPolicy::Fixed(2).apply(p).rotation_deg, Some(10.0));
        assert_eq!(RotationPolicy::Continuous.apply(p), p);
        assert_eq!(RotationPolicy::Fixed(0).variants_per_image(), Some(2));
    }
}
