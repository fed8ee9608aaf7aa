//! Learning-rate schedules (SPEC §11.1.2).
//!
//! * poly (Phase 1): per optimiser step, `lr_t = base·(1 − t/T)^0.9` with `t` the 0-based index of the step about to
//!   be taken (no one-step lag) and `T = max_epochs·steps_per_epoch`.
//! * cosine (Phases 2, 3): per epoch, `lr_e = η_min + (base − η_min)(1 + cos(πe/E))/2`, applied to every group from
//!   epoch 0 (frozen groups included).
use super::optim::Optimizer;
use serde::{Deserialize, Serialize};

/// `base·(1 − t/T)^power` (`t` clamped to `[0, T]`; `T = 0` gives `base`).
pub fn poly_lr(base: f64, t: u64, total: u64, power: f64) -> f64 {
    if total == 0 {
        return base;
    }
    let frac = (t.min(total) as f64) / total as f64;
    base * (1.0 - frac).powf(power)
}

/// `η_min + (base − η_min)(1 + cos(πe/E))/2` for 0-based epoch `e` of `E` (`E = 0` gives `base`).
pub fn cosine_lr(base: f64, min_lr: f64, epoch: u64, epochs: u64) -> f64 {
    if epochs == 0 {
        return base;
    }
    min_lr + (base - min_lr) * (1.0 + (std::f64::consts::PI * epoch as f64 / epochs as f64).cos()) / 2.0
}

/// Schedule description and position, stored in the sidecar (`scheduler`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Schedule {
    /// Per-step poly decay. `position` = optimiser steps taken so far (the next step's `t`).
    Poly { power: f64, total_steps: u64, position: u64 },
    /// Per-epoch cosine. `position` = the epoch whose rate is in force (0-based).
    Cosine { min_lr: f64, epochs: u64, position: u64 },
}

impl Schedule {
    /// Phase 1: poly(0.9) over `max_epochs·steps_per_epoch` steps.
    pub fn poly(max_epochs: u64, steps_per_epoch: u64) -> Self {
        Schedule::Poly { power: 0.9, total_steps: max_epochs * steps_per_epoch, position: 0 }
    }
    /// Phases 2/3: cosine over `epochs` with floor `min_lr`.
    pub fn cosine(min_lr: f64, epochs: u64) -> Self {
        Schedule::Cosine { min_lr, epochs, position: 0 }
    }
    /// The rate of a group with base rate `base` at the current position.
    pub fn lr_for(&self, base: f64) -> f64 {
        match *self {
            Schedule::Poly { power, total_steps, position } => poly_lr(base, position, total_steps, power),
            Schedule::Cosine { min_lr, epochs, position } => cosine_lr(base, min_lr, position, epochs),
        }
    }
    /// Sets every group's LR from its base rate at the current position.
    pub fn apply(&self, opt: &mut dyn Optimizer) {
        for g in opt.groups_mut() {
            g.lr = self.lr_for(g.base_lr);
        }
    }
    /// Poly: call before every optimiser step (sets the LR for step `position`, then advances). No effect for cosine.
    pub fn before_step(&mut self, opt: &mut dyn Optimizer) {
        if let Schedule::Poly { .. } = self {
            self.apply(opt);
            if let Schedule::Poly { position, .. } = self {
                *position += 1;
            }
        }
    }
    /// Cosine: call at the start of epoch `epoch` (0-based); sets every group's LR. No effect for poly.
    pub fn start_epoch(&mut self, epoch: u64, opt: &mut dyn Optimizer) {
        if let Schedule::Cosine { position, .. } = self {
            *position = epoch;
            self.apply(opt);
        }
    }
    pub fn position(&self) -> u64 {
        match *self {
            Schedule::Poly { position, .. } | Schedule::Cosine { position, .. } => position,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::{ParamGroup, Sgd};

    #[test]
    fn poly_values() {
        assert_eq!(poly_lr(0.01, 0, 100, 0.9), 0.01);
        assert!((poly_lr(0.01, 1, 100, 0.9) - 0.01 * 0.99f64.powf(0.9)).abs() < 1e-18);
        assert_eq!(poly_lr(0.01, 100, 100, 0.9), 0.0);
        assert_eq!(poly_lr(0.01, 150, 100, 0.9), 0.0);
    }

    #[test]
    fn cosine_values() {
        assert_eq!(cosine_lr(1e-4, 1e-6, 0, 50), 1e-4);
        assert!((cosine_lr(1e-4, 1e-6, 25, 50) - (1e-6 + (1e-4 - 1e-6) * 0.5)).abs() < 1e-18);
        assert!((cosine_lr(1.0, 0.0, 1, 4) - (1.0 + (std::f64::consts::PI / 4.0).cos()) / 2.0).abs() < 1e-15);
    }

    #[test]
    fn poly_without_lag_and_all_groups_follow_cosine() {
        let mut opt = Sgd::new(
            vec![ParamGroup::new("a", 0.01, 0.0, vec![]), ParamGroup::new("b", 0.001, 0.0, vec![])],
            0.9,
        )
        .unwrap();
        let mut s = Schedule::poly(2, 5);
        s.before_step(&mut opt);
        assert_eq!(opt.lrs()[0].1, 0.01);
        s.before_step(&mut opt);
        // the second step already uses t = 1 (the original used base twice)
        assert!((opt.lrs()[0].1 - 0.01 * 0.9f64.powf(0.9)).abs() < 1e-18);
        assert_eq!(s.position(), 2);

        let mut c = Schedule::cosine(1e-6, 10);
        c.start_epoch(3, &mut opt);
        assert!((opt.lrs()[1].1 - cosine_lr(0.001, 1e-6, 3, 10)).abs() < 1e-18);
        assert!((opt.lrs()[0].1 - cosine_lr(0.01, 1e-6, 3, 10)).abs() < 1e-18);
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(j, r#"{"type":"cosine","min_lr":1e-6,"epochs":10,"position":3}"#);
        assert_eq!(serde_json::from_str::<Schedule>(&j).unwrap(), c);
    }
}
