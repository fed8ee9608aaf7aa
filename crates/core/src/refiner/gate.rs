//! Gated residual refinement (SPEC §7.8, `--use-gated-refinement`): an uncertainty gate blends the SAM refinement
//! into the coarse probability,
//!
//! `s = σ(refined_N)`, `gate = g_min + (g_max − g_min)·(1 − |2·coarse_n − 1|^γ)`,
//! `refined_prob = coarse_n + gate·(s − coarse_n)`,
//!
//! and the model keeps returning **logits**, `logit(clamp(refined_prob, 1e-6, 1 − 1e-6))`, so every consumer (loss,
//! metrics, evaluation, inference) treats the refined output as in the plain model. Confident coarse pixels
//! (`coarse_n` near 0 or 1) keep (almost) their coarse value (gate → `g_min`); uncertain ones (`coarse_n` near 0.5)
//! take up to `g_max` of the SAM refinement. Every operation is differentiable in both inputs, so the TransUNet
//! receives gradient through the gate and the residual as well as through the prompts.
use crate::config::RefinerConfig;
use crate::{Error, Result};
use candle_core::Tensor;

/// Clamp of the gated probability before the logit (SPEC §7.8).
pub const GATE_PROB_EPS: f64 = 1e-6;

/// Floor of `|2c − 1|` before `^γ` when `γ ≠ 1`: keeps the derivative `γ·u^(γ−1)` finite at `c = 0.5` for `γ < 1`
/// (the value changes by at most `1e-12^γ`).
const GATE_BASE_FLOOR: f64 = 1e-12;

/// The uncertainty gate's parameters (defaults `γ = 1`, `g_min = 0`, `g_max = 0.8`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gate {
    /// `γ` (`--gate-gamma`), > 0.
    pub gamma: f64,
    /// `g_min` (`--gate-min`): the gate of a confident coarse pixel (`coarse_n ∈ {0, 1}`).
    pub g_min: f64,
    /// `g_max` (`--gate-max`): the gate at `coarse_n = 0.5`.
    pub g_max: f64,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            gamma: 1.0,
            g_min: 0.0,
            g_max: 0.8,
        }
    }
}

impl Gate {
    /// A checked gate: `γ > 0` and `0 ≤ g_min ≤ g_max ≤ 1` (finite).
    pub fn new(gamma: f64, g_min: f64, g_max: f64) -> Result<Self> {
        if !(gamma.is_finite() && gamma > 0.0) {
            return Err(Error::Config(format!(
                "gate gamma (--gate-gamma) must be a finite value > 0, got {gamma}"
            )));
        }
        if !(0.0..=1.0).contains(&g_min) || !(0.0..=1.0).contains(&g_max) || g_min > g_max {
            return Err(Error::Config(format!(
                "gate bounds must satisfy 0 <= --gate-min <= --gate-max <= 1, got {g_min} and {g_max}"
            )));
        }
        Ok(Gate {
            gamma,
            g_min,
            g_max,
        })
    }

    /// The gate of a refiner configuration (`refiner.use_gated_refinement`, `gate_gamma`, `gate_min`, `gate_max`);
    /// `None` when gating is off.
    pub fn from_config(cfg: &RefinerConfig) -> Result<Option<Self>> {
        if !cfg.use_gated_refinement {
            return Ok(None);
        }
        Gate::new(cfg.gate_gamma, cfg.gate_min, cfg.gate_max).map(Some)
    }

    /// `gate = g_min + (g_max − g_min)·(1 − |2c − 1|^γ)` for a coarse probability `c` in `[0, 1]` (any shape).
    pub fn gate(&self, coarse: &Tensor) -> Result<Tensor> {
        let u = coarse.affine(2.0, -1.0)?.abs()?;
        let u = if self.gamma == 1.0 {
            u
        } else {
            u.clamp(GATE_BASE_FLOOR, 1.0)?.powf(self.gamma)?
        };
        let span = self.g_max - self.g_min;
        // g_min + span·(1 − u) = (−span)·u + (g_min + span)
        Ok(u.affine(-span, self.g_min + span)?)
    }

    /// `refined_prob = c + gate(c)·(σ(z) − c)` for refined logits `z` and the coarse probability `c` (same shape).
    pub fn refined_prob(&self, refined_logits: &Tensor, coarse: &Tensor) -> Result<Tensor> {
        if refined_logits.dims() != coarse.dims() {
            return Err(Error::Arg(format!(
                "gated refinement: refined logits {:?} and coarse probability {:?} differ in shape",
                refined_logits.dims(),
                coarse.dims()
            )));
        }
        let s = crate::nn::sigmoid(refined_logits)?;
        let g = self.gate(coarse)?;
        Ok((coarse + (g * (s - coarse)?)?)?)
    }

    /// The gated model's refined **logits**: `logit(clamp(refined_prob, 1e-6, 1 − 1e-6))` (SPEC §7.8).
    pub fn apply(&self, refined_logits: &Tensor, coarse: &Tensor) -> Result<Tensor> {
        let p = self
            .refined_prob(refined_logits, coarse)?
            .clamp(GATE_PROB_EPS, 1.0 - GATE_PROB_EPS)?;
        Ok((p.log()? - p.affine(-1.0, 1.0)?.log()?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn v(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64).unwrap().to_vec1().unwrap()
    }

    fn sig(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    /// The formula on hand values (f64), with the default and a non-default gate.
    #[test]
    fn gate_formula_on_hand_values() -> Result<()> {
        let dev = Device::Cpu;
        let c = Tensor::new(&[0.0f64, 0.25, 0.5, 0.9, 1.0], &dev)?;
        let g = Gate::default();
        // |2c−1| = 1, 0.5, 0, 0.8, 1 → gate = 0.8·(1 − u)
        let want = [0.0, 0.4, 0.8, 0.16, 0.0];
        for (a, b) in v(&g.gate(&c)?).iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        let g2 = Gate::new(2.0, 0.1, 0.9)?;
        // gate = 0.1 + 0.8·(1 − u²): u = 1, .5, 0, .8, 1
        let want = [0.1, 0.1 + 0.8 * 0.75, 0.9, 0.1 + 0.8 * (1.0 - 0.64), 0.1];
        for (a, b) in v(&g2.gate(&c)?).iter().zip(want) {
            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
        // refined_prob and logits by hand: c = 0.25, z = 2 → s = σ(2), gate 0.4.
        let c = Tensor::new(&[0.25f64], &dev)?;
        let z = Tensor::new(&[2.0f64], &dev)?;
        let p = 0.25 + 0.4 * (sig(2.0) - 0.25);
        assert!((v(&g.refined_prob(&z, &c)?)[0] - p).abs() < 1e-12);
        assert!((v(&g.apply(&z, &c)?)[0] - (p / (1.0 - p)).ln()).abs() < 1e-9);
        Ok(())
    }

    /// `g_max` at coarse 0.5, `g_min` at 0 and 1; the gated probability lies between the coarse probability and
    /// `σ(refined)`; the clamp keeps the logits finite at saturated inputs.
    #[test]
    fn gate_bounds_and_interpolation() -> Result<()> {
        let dev = Device::Cpu;
        for g in [
            Gate::default(),
            Gate::new(0.5, 0.05, 0.7)?,
            Gate::new(3.0, 0.2, 1.0)?,
        ] {
            let ends = v(&g.gate(&Tensor::new(&[0f32, 0.5, 1.0], &dev)?)?);
            assert!((ends[0] - g.g_min).abs() < 1e-6, "{g:?}: {ends:?}");
            assert!((ends[1] - g.g_max).abs() < 1e-5, "{g:?}: {ends:?}");
            assert!((ends[2] - g.g_min).abs() < 1e-6, "{g:?}: {ends:?}");
            let c = Tensor::rand(0f32, 1.0, (4, 8, 8), &dev)?;
            let z = Tensor::randn(0f32, 6.0, (4, 8, 8), &dev)?;
            let gate = v(&g.gate(&c)?.flatten_all()?);
            assert!(gate
                .iter()
                .all(|x| *x >= g.g_min - 1e-6 && *x <= g.g_max + 1e-6));
            let p = v(&g.refined_prob(&z, &c)?.flatten_all()?);
            let s = v(&crate::nn::sigmoid(&z)?.flatten_all()?);
            let cc = v(&c.flatten_all()?);
            for i in 0..p.len() {
                let (lo, hi) = (cc[i].min(s[i]), cc[i].max(s[i]));
                assert!(
                    p[i] >= lo - 1e-6 && p[i] <= hi + 1e-6,
                    "{i}: {} ∉ [{lo}, {hi}]",
                    p[i]
                );
            }
            // Logits round-trip to the probability (inside the clamp).
            let back = v(&crate::nn::sigmoid(&g.apply(&z, &c)?)?.flatten_all()?);
            for i in 0..p.len() {
                let want = p[i].clamp(GATE_PROB_EPS, 1.0 - GATE_PROB_EPS);
                assert!((back[i] - want).abs() < 1e-5, "{i}: {} vs {want}", back[i]);
            }
        }
        // Saturated inputs: coarse exactly 0/1 with extreme refined logits stay finite (clamped).
        let c = Tensor::new(&[0f32, 1.0, 0.0, 1.0], &dev)?;
        let z = Tensor::new(&[-100f32, 100.0, 100.0, -100.0], &dev)?;
        let l = v(&Gate::default().apply(&z, &c)?);
        assert!(l.iter().all(|x| x.is_finite()), "{l:?}");
        assert!((l[0] - (1e-6f64 / (1.0 - 1e-6)).ln()).abs() < 1e-2, "{l:?}");
        assert!(Gate::new(0.0, 0.0, 0.8).is_err());
        assert!(Gate::new(1.0, 0.9, 0.8).is_err());
        assert!(Gate::new(1.0, 0.0, 1.5).is_err());
        let mut rc = RefinerConfig::default();
        assert_eq!(Gate::from_config(&rc)?, None);
        rc.use_gated_refinement = true;
        assert_eq!(Gate::from_config(&rc)?, Some(Gate::default()));
        Ok(())
    }

    /// Analytic gradients of the gated logits with respect to both the coarse probability and the refined logits
    /// match central finite differences in f64 (away from the |·| kink at 0.5 and the clamp).
    #[test]
    fn gate_gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let c0 = [0.03f64, 0.2, 0.35, 0.62, 0.8, 0.97];
        let z0 = [-3.0f64, 1.5, -0.4, 0.7, -2.0, 4.0];
        let w = Tensor::new(&[0.7f64, -1.3, 0.4, 2.0, -0.6, 1.1], &dev)?;
        for g in [
            Gate::default(),
            Gate::new(0.5, 0.1, 0.9)?,
            Gate::new(2.5, 0.0, 1.0)?,
        ] {
            let f = |c: &[f64], z: &[f64]| -> Result<f64> {
                let out = g.apply(&Tensor::new(z, &dev)?, &Tensor::new(c, &dev)?)?;
                Ok((out * &w)?.sum_all()?.to_scalar::<f64>()?)
            };
            let cv = Var::new(&c0, &dev)?;
            let zv = Var::new(&z0, &dev)?;
            let out = g.apply(zv.as_tensor(), cv.as_tensor())?;
            let grads = (out * &w)?.sum_all()?.backward()?;
            let gc = v(grads.get(cv.as_tensor()).expect("coarse gradient"));
            let gz = v(grads.get(zv.as_tensor()).expect("refined gradient"));
            let h = 1e-6;
            for i in 0..c0.len() {
                // Central difference in input `which` (0: coarse, 1: refined logits) at index i.
                let fd = |which: usize| -> Result<f64> {
                    let mut x = [c0, z0];
                    x[which][i] += h;
                    let up = f(&x[0], &x[1])?;
                    x[which][i] -= 2.0 * h;
                    Ok((up - f(&x[0], &x[1])?) / (2.0 * h))
                };
                for (which, name, an) in [(0, "dc", gc[i]), (1, "dz", gz[i])] {
                    let d = fd(which)?;
                    assert!(
                        (d - an).abs() < 1e-5 * (1.0 + d.abs()),
                        "{g:?} {name}[{i}]: {an} vs fd {d}"
                    );
                }
                assert!(gz[i] != 0.0 && gc[i] != 0.0, "{g:?}: zero gradient at {i}");
            }
        }
        Ok(())
    }
}
