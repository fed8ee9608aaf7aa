//! Batch-pooled training/validation metrics of Phases 1 and 3 (SPEC §10.1), epoch averaging, and the Phase 2
//! validation accumulator (§10.5). Per-image metrics live in [`crate::eval::metrics`].
use crate::eval::metrics::{Confusion, RatioMetrics};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

const SMOOTH: f64 = 1e-5;

/// The §10.1 metrics of one batch (counts pooled over every pixel of the batch, smoothing 1e-5).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct PooledMetrics {
    pub dice: f64,
    pub iou: f64,
    pub precision: f64,
    pub recall: f64,
    pub accuracy: f64,
    pub specificity: f64,
}

impl PooledMetrics {
    /// Names in report order (equal to the field names).
    pub const NAMES: [&'static str; 6] = [
        "dice",
        "iou",
        "precision",
        "recall",
        "accuracy",
        "specificity",
    ];

    /// From pooled counts: `dice = (2TP+ε)/(|P|+|T|+ε)`, `iou = (TP+ε)/(|P|+|T|−TP+ε)`,
    /// `precision = (TP+ε)/(|P|+ε)`, `recall = (TP+ε)/(|T|+ε)`, `accuracy = (TP+TN)/#pixels`,
    /// `specificity = (TN+ε)/(#neg+ε)`, ε = 1e-5.
    pub fn from_confusion(c: &Confusion) -> Self {
        let tp = c.tp as f64;
        let p = c.pred_count() as f64;
        let t = c.gt_count() as f64;
        let tn = c.tn as f64;
        let neg = (c.tn + c.fp) as f64;
        let n = c.n_pixels() as f64;
        PooledMetrics {
            dice: (2.0 * tp + SMOOTH) / (p + t + SMOOTH),
            iou: (tp + SMOOTH) / (p + t - tp + SMOOTH),
            precision: (tp + SMOOTH) / (p + SMOOTH),
            recall: (tp + SMOOTH) / (t + SMOOTH),
            accuracy: if n > 0.0 { (tp + tn) / n } else { 1.0 },
            specificity: (tn + SMOOTH) / (neg + SMOOTH),
        }
    }

    /// Thresholds `pred > thr` and `target > thr` (tensors of equal shape, any float dtype, any device) and counts over
    /// all elements: the counting runs on the tensors' device; only four scalars are copied to the host.
    pub fn batch_confusion(pred: &Tensor, target: &Tensor, thr: f64) -> Result<Confusion> {
        if pred.dims() != target.dims() {
            return Err(Error::Arg(format!(
                "pooled metrics: prediction {:?} vs target {:?}",
                pred.dims(),
                target.dims()
            )));
        }
        // counts are summed in f64, exact for any realistic batch
        let p = pred.detach().gt(thr)?.to_dtype(DType::F64)?;
        let t = target
            .detach()
            .to_dtype(DType::F32)?
            .gt(thr)?
            .to_dtype(DType::F64)?;
        let tp = p.mul(&t)?.sum_all()?.to_scalar::<f64>()? as u64;
        let np = p.sum_all()?.to_scalar::<f64>()? as u64;
        let nt = t.sum_all()?.to_scalar::<f64>()? as u64;
        let n = pred.elem_count() as u64;
        Ok(Confusion {
            tp,
            fp: np - tp,
            fn_: nt - tp,
            tn: n - np - nt + tp,
        })
    }

    /// §10.1 metrics of one batch of probabilities against its target.
    pub fn from_batch(pred: &Tensor, target: &Tensor) -> Result<Self> {
        Ok(Self::from_confusion(&Self::batch_confusion(
            pred, target, 0.5,
        )?))
    }

    /// `(name, value)` pairs in [`Self::NAMES`] order.
    pub fn pairs(&self) -> [(&'static str, f64); 6] {
        [
            ("dice", self.dice),
            ("iou", self.iou),
            ("precision", self.precision),
            ("recall", self.recall),
            ("accuracy", self.accuracy),
            ("specificity", self.specificity),
        ]
    }
}

/// Ordered running means of named values (epoch loss and metric averages: "the epoch value is the unweighted mean
/// over batches").
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MeanTracker {
    entries: Vec<(String, f64, u64)>,
}

impl MeanTracker {
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds one observation of `name` (first use fixes its position in the order).
    pub fn add(&mut self, name: &str, value: f64) {
        match self.entries.iter_mut().find(|(n, _, _)| n == name) {
            Some(e) => {
                e.1 += value;
                e.2 += 1;
            }
            None => self.entries.push((name.to_string(), value, 1)),
        }
    }
    /// Adds every metric of a batch, each name prefixed with `prefix` (e.g. `"val_"`).
    pub fn add_pooled(&mut self, prefix: &str, m: &PooledMetrics) {
        for (n, v) in m.pairs() {
            self.add(&format!("{prefix}{n}"), v);
        }
    }
    /// The means of the metrics added with [`add_pooled`](Self::add_pooled) under `prefix` (NaN where never observed).
    pub fn pooled_mean(&self, prefix: &str) -> PooledMetrics {
        let m = |k: &str| self.mean(&format!("{prefix}{k}")).unwrap_or(f64::NAN);
        PooledMetrics {
            dice: m("dice"),
            iou: m("iou"),
            precision: m("precision"),
            recall: m("recall"),
            accuracy: m("accuracy"),
            specificity: m("specificity"),
        }
    }
    /// Mean of `name` (None if never observed).
    pub fn mean(&self, name: &str) -> Option<f64> {
        self.entries
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, s, c)| s / *c as f64)
    }
    /// Number of observations of `name`.
    pub fn count(&self, name: &str) -> u64 {
        self.entries
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|e| e.2)
            .unwrap_or(0)
    }
    /// All means in first-use order.
    pub fn means(&self) -> Vec<(String, f64)> {
        self.entries
            .iter()
            .map(|(n, s, c)| (n.clone(), s / *c as f64))
            .collect()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Phase 2 validation (§10.5): per sample, refined `σ(z) > 0.5` and coarse `c > 0.5` against `g`; per-image Dice, IoU,
/// precision, recall, accuracy (§10.2 policy) averaged over samples; `improvement = mean(Dice_refined − Dice_coarse)`.
#[derive(Debug, Clone, Default)]
pub struct Phase2Validation {
    refined: Vec<RatioMetrics>,
    coarse: Vec<RatioMetrics>,
    losses: Vec<f64>,
}

/// Averages reported by [`Phase2Validation::finish`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Phase2ValidationSummary {
    pub n_samples: usize,
    pub loss: f64,
    pub refined: RatioMetricsMean,
    pub coarse: RatioMetricsMean,
    pub improvement: f64,
}

/// Means of the five §10.5 metrics.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RatioMetricsMean {
    pub dice: f64,
    pub iou: f64,
    pub precision: f64,
    pub recall: f64,
    pub accuracy: f64,
}

fn mean_of(v: &[RatioMetrics]) -> RatioMetricsMean {
    let n = v.len().max(1) as f64;
    let mut m = RatioMetricsMean::default();
    for r in v {
        m.dice += r.dice / n;
        m.iou += r.iou / n;
        m.precision += r.precision / n;
        m.recall += r.recall / n;
        m.accuracy += r.accuracy / n;
    }
    m
}

impl Phase2Validation {
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds one batch: refined probabilities `σ(refined_N)`, coarse `coarse_n`, target `g`, all `(B,N,N)`, and the
    /// batch loss.
    pub fn add_batch(
        &mut self,
        refined_prob: &Tensor,
        coarse: &Tensor,
        gt: &Tensor,
        batch_loss: f64,
    ) -> Result<()> {
        use crate::eval::metrics::binarize_tensor;
        let (r, _, _) = binarize_tensor(refined_prob, 0.5)?;
        let (c, _, _) = binarize_tensor(coarse, 0.5)?;
        let (g, _, _) = binarize_tensor(gt, 0.5)?;
        if r.len() != g.len() || c.len() != g.len() {
            return Err(Error::Arg("phase 2 validation: batch sizes differ".into()));
        }
        for ((ri, ci), gi) in r.iter().zip(&c).zip(&g) {
            self.refined
                .push(RatioMetrics::from_confusion(&Confusion::from_masks(
                    ri, gi,
                )?));
            self.coarse
                .push(RatioMetrics::from_confusion(&Confusion::from_masks(
                    ci, gi,
                )?));
        }
        self.losses.push(batch_loss);
        Ok(())
    }
    pub fn finish(&self) -> Phase2ValidationSummary {
        let refined = mean_of(&self.refined);
        let coarse = mean_of(&self.coarse);
        let loss = if self.losses.is_empty() {
            f64::NAN
        } else {
            self.losses.iter().sum::<f64>() / self.losses.len() as f64
        };
        Phase2ValidationSummary {
            n_samples: self.refined.len(),
            loss,
            refined,
            coarse,
            improvement: refined.dice - coarse.dice,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pooled_counts_on_tensors() {
        let p = Tensor::new(&[[0.9f32, 0.5, 0.2], [0.7, 0.6, 0.0]], &Device::Cpu).unwrap();
        let t = Tensor::new(&[[1.0f32, 1.0, 0.0], [0.0, 1.0, 0.0]], &Device::Cpu).unwrap();
        let c = PooledMetrics::batch_confusion(&p, &t, 0.5).unwrap();
        assert_eq!(
            c,
            Confusion {
                tp: 2,
                fp: 1,
                fn_: 1,
                tn: 2
            }
        );
        let m = PooledMetrics::from_confusion(&c);
        assert!((m.dice - (4.0 + 1e-5) / (6.0 + 1e-5)).abs() < 1e-15);
        assert!((m.accuracy - 4.0 / 6.0).abs() < 1e-15);
        // empty prediction and target: every smoothed ratio is 1
        let z = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let e = PooledMetrics::from_batch(&z, &z).unwrap();
        assert_eq!(
            (e.dice, e.iou, e.precision, e.recall, e.specificity),
            (1.0, 1.0, 1.0, 1.0, 1.0)
        );
    }

    #[test]
    fn mean_tracker_order_and_means() {
        let mut t = MeanTracker::new();
        t.add("loss", 1.0);
        t.add("dice", 0.5);
        t.add("loss", 3.0);
        assert_eq!(
            t.means(),
            vec![("loss".to_string(), 2.0), ("dice".to_string(), 0.5)]
        );
        assert_eq!(t.count("loss"), 2);
    }

    #[test]
    fn phase2_validation_improvement() {
        let g = Tensor::new(&[[[1.0f32, 1.0], [0.0, 0.0]]], &Device::Cpu).unwrap();
        let r = Tensor::new(&[[[0.9f32, 0.8], [0.1, 0.1]]], &Device::Cpu).unwrap();
        let c = Tensor::new(&[[[0.9f32, 0.2], [0.1, 0.1]]], &Device::Cpu).unwrap();
        let mut v = Phase2Validation::new();
        v.add_batch(&r, &c, &g, 0.25).unwrap();
        let s = v.finish();
        assert_eq!(s.refined.dice, 1.0);
        assert!((s.coarse.dice - 2.0 / 3.0).abs() < 1e-15);
        assert!((s.improvement - 1.0 / 3.0).abs() < 1e-15);
        assert_eq!(s.loss, 0.25);
    }
}
