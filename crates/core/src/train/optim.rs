//! Optimisers with parameter groups and exportable state (SPEC §11.1.1), gradient collection, accumulation and
//! clipping (§11.1.3).
//!
//! Usage per optimiser step:
//! ```ignore
//! let mut grads = Grads::new();
//! for micro in 0..k {                       // --grad-accum k
//!     let loss = (compute_loss(micro)? / k as f64)?;
//!     grads.accumulate(&loss.backward()?, opt.groups())?;
//! }
//! grads.clip_norm(1.0)?;                    // --grad-clip, 0 disables
//! opt.step(&grads)?;
//! ```
use super::optim_fused;
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Prefix of every optimiser tensor in a checkpoint.
pub const OPTIM_PREFIX: &str = "__optim__.";

/// A named parameter group with its own learning rate, base learning rate and weight decay. Parameter keys are the
/// canonical checkpoint keys and must be unique across all groups of an optimiser.
#[derive(Debug, Clone)]
pub struct ParamGroup {
    pub name: String,
    pub lr: f64,
    pub base_lr: f64,
    pub weight_decay: f64,
    pub params: Vec<(String, Var)>,
}

impl ParamGroup {
    /// A group whose current LR starts at `base_lr`.
    pub fn new(
        name: impl Into<String>,
        base_lr: f64,
        weight_decay: f64,
        params: Vec<(String, Var)>,
    ) -> Self {
        ParamGroup {
            name: name.into(),
            lr: base_lr,
            base_lr,
            weight_decay,
            params,
        }
    }
}

/// Group description written to the sidecar (§11.1.4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupInfo {
    pub name: String,
    pub base_lr: f64,
    pub lr: f64,
    pub weight_decay: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub momentum: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub betas: Option<[f64; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eps: Option<f64>,
}

/// Optimiser description for the sidecar: `type` and per-group settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerInfo {
    #[serde(rename = "type")]
    pub kind: String,
    pub groups: Vec<GroupInfo>,
}

/// Gradients by parameter key (collected from one or more `GradStore`s).
#[derive(Debug, Clone, Default)]
pub struct Grads {
    map: HashMap<String, Tensor>,
}

impl Grads {
    pub fn new() -> Self {
        Self::default()
    }
    /// Gradients of every parameter of `groups` found in `store` (parameters without a gradient are absent).
    pub fn from_store(store: &GradStore, groups: &[ParamGroup]) -> Result<Self> {
        let mut g = Grads::new();
        g.accumulate(store, groups)?;
        Ok(g)
    }
    /// Adds the gradients in `store` (gradient accumulation: sum over micro-batches).
    pub fn accumulate(&mut self, store: &GradStore, groups: &[ParamGroup]) -> Result<()> {
        for grp in groups {
            for (key, var) in &grp.params {
                if let Some(g) = store.get(var.as_tensor()) {
                    let g = g.detach();
                    let new = match self.map.remove(key) {
                        Some(prev) => (prev + g)?,
                        None => g,
                    };
                    self.map.insert(key.clone(), new);
                }
            }
        }
        Ok(())
    }
    /// Inserts (or replaces) one gradient.
    pub fn insert(&mut self, key: impl Into<String>, grad: Tensor) {
        self.map.insert(key.into(), grad);
    }
    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.map.get(key)
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.map.keys()
    }
    /// Total L2 norm over all gradients (accumulated in f64, keys in sorted order for determinism).
    pub fn total_norm(&self) -> Result<f64> {
        let mut keys: Vec<&String> = self.map.keys().collect();
        keys.sort();
        let mut s = 0.0f64;
        for k in keys {
            s += self.map[k]
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
        Ok(s.sqrt())
    }
    /// Multiplies every gradient by `f`.
    pub fn scale(&mut self, f: f64) -> Result<()> {
        for g in self.map.values_mut() {
            *g = g.affine(f, 0.0)?;
        }
        Ok(())
    }
    /// §11.1.3 clipping: with `n` the total norm, if `c/(n + 1e-6) < 1` every gradient is multiplied by
    /// `c/(n + 1e-6)`. `max_norm ≤ 0` disables clipping. Returns `n` (before clipping).
    pub fn clip_norm(&mut self, max_norm: f64) -> Result<f64> {
        let n = self.total_norm()?;
        if max_norm > 0.0 {
            let f = max_norm / (n + 1e-6);
            if f < 1.0 {
                self.scale(f)?;
            }
        }
        Ok(n)
    }
}

/// Optimiser steps per epoch with `--grad-accum k`: `⌊batches/k⌋` (leftover micro-batches are dropped).
pub fn steps_per_epoch(batches: usize, grad_accum: usize) -> usize {
    batches / grad_accum.max(1)
}

/// Common interface of the project optimisers.
pub trait Optimizer {
    /// One update of every parameter that has a gradient in `grads`; parameters without one are skipped entirely.
    fn step(&mut self, grads: &Grads) -> Result<()>;
    fn groups(&self) -> &[ParamGroup];
    fn groups_mut(&mut self) -> &mut [ParamGroup];
    /// Optimiser state as named tensors `__optim__.<group>.<kind>.<param key>` (§11.1.4).
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>>;
    /// Restores the state written by [`Optimizer::state_tensors`] (other keys are ignored). A parameter without stored
    /// state starts fresh; a stored tensor whose shape does not match its parameter is an error.
    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()>;
    /// Sidecar description.
    fn info(&self) -> OptimizerInfo;
    /// Sets the current LR of the group named `name`.
    fn set_lr(&mut self, name: &str, lr: f64) -> Result<()> {
        let g = self
            .groups_mut()
            .iter_mut()
            .find(|g| g.name == name)
            .ok_or_else(|| Error::Arg(format!("optimiser has no parameter group `{name}`")))?;
        g.lr = lr;
        Ok(())
    }
    /// `(group name, lr)` for every group, in group order.
    fn lrs(&self) -> Vec<(String, f64)> {
        self.groups()
            .iter()
            .map(|g| (g.name.clone(), g.lr))
            .collect()
    }
}

fn check_unique(groups: &[ParamGroup]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for g in groups {
        if g.name.is_empty() || g.name.contains('.') {
            return Err(Error::Arg(format!(
                "parameter group name `{}` must be non-empty and contain no `.`",
                g.name
            )));
        }
        for (k, _) in &g.params {
            if !seen.insert(k.clone()) {
                return Err(Error::Arg(format!(
                    "parameter `{k}` appears in more than one optimiser group"
                )));
            }
        }
    }
    Ok(())
}

fn state_key(group: &str, kind: &str, param: &str) -> String {
    format!("{OPTIM_PREFIX}{group}.{kind}.{param}")
}

fn take_state(tensors: &HashMap<String, Tensor>, key: &str, like: &Var) -> Result<Option<Tensor>> {
    match tensors.get(key) {
        None => Ok(None),
        Some(t) => {
            if t.dims() != like.as_tensor().dims() {
                return Err(Error::Weights(format!(
                    "optimiser state `{key}` has shape {:?}, its parameter has {:?}",
                    t.dims(),
                    like.as_tensor().dims()
                )));
            }
            // A copy of its own: the CPU kernels update the optimiser state in place, and the caller's tensor
            // (e.g. a loaded checkpoint) must not change under it.
            Ok(Some(
                t.to_dtype(like.dtype())?.to_device(like.device())?.copy()?,
            ))
        }
    }
}

/// SGD with momentum, PyTorch semantics (dampening 0, no Nesterov): `d = ∇θ + wd·θ`; `buf = d` on the first step,
/// else `buf = μ·buf + d`; `θ ← θ − lr·buf`.
pub struct Sgd {
    groups: Vec<ParamGroup>,
    momentum: f64,
    bufs: HashMap<String, Tensor>,
}

impl Sgd {
    pub fn new(groups: Vec<ParamGroup>, momentum: f64) -> Result<Self> {
        check_unique(&groups)?;
        Ok(Sgd {
            groups,
            momentum,
            bufs: HashMap::new(),
        })
    }
    pub fn momentum(&self) -> f64 {
        self.momentum
    }
    /// The momentum buffer of a parameter (None before its first step).
    pub fn momentum_buffer(&self, key: &str) -> Option<&Tensor> {
        self.bufs.get(key)
    }
}

impl Sgd {
    /// [`Optimizer::step`] with the in-place CPU kernels (`true`, the default) or the composed ops (`false`, the
    /// path CUDA takes), for benchmarks.
    pub fn step_with(&mut self, grads: &Grads, in_place: bool) -> Result<()> {
        self.step_impl(grads, in_place)
    }

    /// One step; `in_place` uses the fused CPU kernels of [`super::optim_fused`] where they apply (same bits as the
    /// composed ops, which run elsewhere and in the tests).
    fn step_impl(&mut self, grads: &Grads, in_place: bool) -> Result<()> {
        for grp in &self.groups {
            for (key, var) in &grp.params {
                let Some(g) = grads.get(key) else { continue };
                let theta = var.as_tensor().detach();
                let g = g.to_dtype(theta.dtype())?;
                let buf = self.bufs.get(key).filter(|_| self.momentum != 0.0);
                if in_place {
                    let g = g.contiguous()?;
                    if let Some(b) = buf {
                        if optim_fused::supported(&[&theta, b, &g]) {
                            optim_fused::sgd_momentum_step(
                                &theta,
                                b,
                                &g,
                                grp.lr,
                                self.momentum,
                                grp.weight_decay,
                            )?;
                            continue;
                        }
                    } else if optim_fused::supported(&[&theta, &g]) {
                        // First step: the buffer starts as the decayed gradient (a fresh tensor, never the gradient
                        // itself, since later steps update it in place).
                        let d = if grp.weight_decay != 0.0 {
                            (&g + theta.affine(grp.weight_decay, 0.0)?)?
                        } else if self.momentum != 0.0 {
                            g.copy()?
                        } else {
                            g
                        };
                        optim_fused::sgd_apply(&theta, &d, grp.lr)?;
                        if self.momentum != 0.0 {
                            self.bufs.insert(key.clone(), d);
                        }
                        continue;
                    }
                }
                let d = if grp.weight_decay != 0.0 {
                    (g + theta.affine(grp.weight_decay, 0.0)?)?
                } else {
                    g
                };
                let buf = match buf {
                    None => d,
                    Some(b) => (b.affine(self.momentum, 0.0)? + d)?,
                };
                let new = (theta - buf.affine(grp.lr, 0.0)?)?;
                var.set(&new)?;
                if self.momentum != 0.0 {
                    self.bufs.insert(key.clone(), buf);
                }
            }
        }
        Ok(())
    }
}

impl Optimizer for Sgd {
    fn step(&mut self, grads: &Grads) -> Result<()> {
        self.step_impl(grads, true)
    }
    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }
    fn groups_mut(&mut self) -> &mut [ParamGroup] {
        &mut self.groups
    }
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for grp in &self.groups {
            for (key, _) in &grp.params {
                if let Some(b) = self.bufs.get(key) {
                    out.push((state_key(&grp.name, "momentum", key), b.clone()));
                }
            }
        }
        Ok(out)
    }
    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.bufs.clear();
        for grp in &self.groups {
            for (key, var) in &grp.params {
                if let Some(t) = take_state(tensors, &state_key(&grp.name, "momentum", key), var)? {
                    self.bufs.insert(key.clone(), t);
                }
            }
        }
        Ok(())
    }
    fn info(&self) -> OptimizerInfo {
        OptimizerInfo {
            kind: "sgd".into(),
            groups: self
                .groups
                .iter()
                .map(|g| GroupInfo {
                    name: g.name.clone(),
                    base_lr: g.base_lr,
                    lr: g.lr,
                    weight_decay: g.weight_decay,
                    momentum: Some(self.momentum),
                    betas: None,
                    eps: None,
                })
                .collect(),
        }
    }
}

/// Per-parameter AdamW state.
#[derive(Debug, Clone)]
struct AdamState {
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// AdamW, PyTorch semantics: `θ ← θ·(1 − lr·wd)`; `m ← β₁m + (1 − β₁)g`; `v ← β₂v + (1 − β₂)g²`; `t ← t + 1`;
/// `θ ← θ − lr·(m/(1 − β₁ᵗ))/(sqrt(v/(1 − β₂ᵗ)) + ε)`, computed in PyTorch's order
/// (`denom = sqrt(v)/sqrt(1 − β₂ᵗ) + ε`, `θ −= (lr/(1 − β₁ᵗ))·m/denom`).
pub struct AdamW {
    groups: Vec<ParamGroup>,
    beta1: f64,
    beta2: f64,
    eps: f64,
    state: HashMap<String, AdamState>,
}

impl AdamW {
    /// AdamW with `β = (0.9, 0.999)`, `ε = 1e-8`.
    pub fn new(groups: Vec<ParamGroup>) -> Result<Self> {
        Self::with_params(groups, 0.9, 0.999, 1e-8)
    }
    pub fn with_params(groups: Vec<ParamGroup>, beta1: f64, beta2: f64, eps: f64) -> Result<Self> {
        check_unique(&groups)?;
        Ok(AdamW {
            groups,
            beta1,
            beta2,
            eps,
            state: HashMap::new(),
        })
    }
    /// Step count of one parameter (0 before its first update).
    pub fn param_step(&self, key: &str) -> u64 {
        self.state.get(key).map(|s| s.step).unwrap_or(0)
    }
    /// `(exp_avg, exp_avg_sq)` of one parameter.
    pub fn moments(&self, key: &str) -> Option<(&Tensor, &Tensor)> {
        self.state.get(key).map(|s| (&s.exp_avg, &s.exp_avg_sq))
    }
}

impl AdamW {
    /// One step; `in_place` as for [`Sgd`].
    fn step_impl(&mut self, grads: &Grads, in_place: bool) -> Result<()> {
        for grp in &self.groups {
            for (key, var) in &grp.params {
                let Some(g) = grads.get(key) else { continue };
                let theta = var.as_tensor().detach();
                let g = g.to_dtype(theta.dtype())?;
                let st = match self.state.remove(key) {
                    Some(s) => s,
                    None => AdamState {
                        step: 0,
                        exp_avg: theta.zeros_like()?,
                        exp_avg_sq: theta.zeros_like()?,
                    },
                };
                let step = st.step + 1;
                let bc1 = 1.0 - self.beta1.powi(step as i32);
                let bc2 = 1.0 - self.beta2.powi(step as i32);
                let step_size = grp.lr / bc1;
                let g = if in_place { g.contiguous()? } else { g };
                if in_place && optim_fused::supported(&[&theta, &st.exp_avg, &st.exp_avg_sq, &g]) {
                    let decay =
                        (grp.weight_decay != 0.0).then_some(1.0 - grp.lr * grp.weight_decay);
                    optim_fused::adamw_step(
                        &theta,
                        &st.exp_avg,
                        &st.exp_avg_sq,
                        &g,
                        (self.beta1, self.beta2, self.eps),
                        decay,
                        step_size,
                        1.0 / bc2.sqrt(),
                    )?;
                    self.state.insert(key.clone(), AdamState { step, ..st });
                    continue;
                }
                let theta = if grp.weight_decay != 0.0 {
                    theta.affine(1.0 - grp.lr * grp.weight_decay, 0.0)?
                } else {
                    theta
                };
                // m.lerp_(g, 1 − β₁) = m + (g − m)(1 − β₁)
                let exp_avg =
                    (&st.exp_avg + (g.sub(&st.exp_avg)?.affine(1.0 - self.beta1, 0.0)?))?;
                let exp_avg_sq = (st.exp_avg_sq.affine(self.beta2, 0.0)?
                    + g.sqr()?.affine(1.0 - self.beta2, 0.0)?)?;
                let denom = exp_avg_sq.sqrt()?.affine(1.0 / bc2.sqrt(), self.eps)?;
                let upd = exp_avg.div(&denom)?.affine(step_size, 0.0)?;
                var.set(&(theta - upd)?)?;
                self.state.insert(
                    key.clone(),
                    AdamState {
                        step,
                        exp_avg,
                        exp_avg_sq,
                    },
                );
            }
        }
        Ok(())
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, grads: &Grads) -> Result<()> {
        self.step_impl(grads, true)
    }
    fn groups(&self) -> &[ParamGroup] {
        &self.groups
    }
    fn groups_mut(&mut self) -> &mut [ParamGroup] {
        &mut self.groups
    }
    fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for grp in &self.groups {
            for (key, var) in &grp.params {
                if let Some(s) = self.state.get(key) {
                    out.push((state_key(&grp.name, "exp_avg", key), s.exp_avg.clone()));
                    out.push((
                        state_key(&grp.name, "exp_avg_sq", key),
                        s.exp_avg_sq.clone(),
                    ));
                    let st = Tensor::new(s.step as i64, var.device())?;
                    out.push((state_key(&grp.name, "step", key), st));
                }
            }
        }
        Ok(out)
    }
    fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        self.state.clear();
        for grp in &self.groups {
            for (key, var) in &grp.params {
                let m = take_state(tensors, &state_key(&grp.name, "exp_avg", key), var)?;
                let v = take_state(tensors, &state_key(&grp.name, "exp_avg_sq", key), var)?;
                let sk = state_key(&grp.name, "step", key);
                let step = tensors.get(&sk);
                match (m, v, step) {
                    (None, None, None) => {}
                    (Some(m), Some(v), Some(s)) => {
                        let step = s.to_dtype(DType::I64)?.flatten_all()?.to_vec1::<i64>()?;
                        let step = match step.as_slice() {
                            [x] if *x >= 0 => *x as u64,
                            _ => return Err(Error::Weights(format!("optimiser state `{sk}` must be one non-negative i64"))),
                        };
                        self.state.insert(key.clone(), AdamState { step, exp_avg: m, exp_avg_sq: v });
                    }
                    _ => {
                        return Err(Error::Weights(format!(
                            "optimiser state of `{key}` (group `{}`) is incomplete: exp_avg, exp_avg_sq and step must all be present",
                            grp.name
                        )))
                    }
                }
            }
        }
        Ok(())
    }
    fn info(&self) -> OptimizerInfo {
        OptimizerInfo {
            kind: "adamw".into(),
            groups: self
                .groups
                .iter()
                .map(|g| GroupInfo {
                    name: g.name.clone(),
                    base_lr: g.base_lr,
                    lr: g.lr,
                    weight_decay: g.weight_decay,
                    momentum: None,
                    betas: Some([self.beta1, self.beta2]),
                    eps: Some(self.eps),
                })
                .collect(),
        }
    }
}

/// Splits a checkpoint's tensors into model tensors and optimiser tensors (`__optim__.*`).
pub fn split_optim_state(
    tensors: HashMap<String, Tensor>,
) -> (HashMap<String, Tensor>, HashMap<String, Tensor>) {
    let mut model = HashMap::new();
    let mut optim = HashMap::new();
    for (k, v) in tensors {
        if k.starts_with(OPTIM_PREFIX) {
            optim.insert(k, v);
        } else {
            model.insert(k, v);
        }
    }
    (model, optim)
}

/// Checks that the groups described in a sidecar match this optimiser (names and order), returning a message for
/// the first difference.
pub fn check_groups_match(opt: &dyn Optimizer, info: &OptimizerInfo) -> Result<()> {
    let mine = opt.info();
    if mine.kind != info.kind {
        return Err(Error::Config(format!(
            "checkpoint optimiser is `{}`, this run uses `{}`",
            info.kind, mine.kind
        )));
    }
    let a: Vec<&str> = mine.groups.iter().map(|g| g.name.as_str()).collect();
    let b: Vec<&str> = info.groups.iter().map(|g| g.name.as_str()).collect();
    if a != b {
        return Err(Error::Config(format!(
            "checkpoint optimiser groups {b:?} differ from this run's {a:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(v: &[f64]) -> Var {
        Var::new(v, &Device::Cpu).unwrap()
    }
    fn vals(v: &Var) -> Vec<f64> {
        v.as_tensor().to_vec1().unwrap()
    }
    fn grads(pairs: &[(&str, &[f64])]) -> Grads {
        let mut g = Grads::new();
        for (k, v) in pairs {
            g.insert(*k, Tensor::new(*v, &Device::Cpu).unwrap());
        }
        g
    }

    #[test]
    fn sgd_momentum_hand_computed() {
        let w = var(&[1.0, -2.0]);
        let mut opt = Sgd::new(
            vec![ParamGroup::new(
                "g",
                0.1,
                0.01,
                vec![("w".into(), w.clone())],
            )],
            0.9,
        )
        .unwrap();
        // step 1: d = g + wd·θ = [0.5 + 0.01, 1.0 − 0.02] = [0.51, 0.98]; buf = d; θ = θ − 0.1·buf
        opt.step(&grads(&[("w", &[0.5, 1.0])])).unwrap();
        let t1 = [1.0 - 0.1 * 0.51, -2.0 - 0.1 * 0.98];
        let v = vals(&w);
        assert!((v[0] - t1[0]).abs() < 1e-15 && (v[1] - t1[1]).abs() < 1e-15);
        // step 2: d = g + wd·θ1; buf = 0.9·buf + d
        opt.step(&grads(&[("w", &[0.5, 1.0])])).unwrap();
        let d2 = [0.5 + 0.01 * t1[0], 1.0 + 0.01 * t1[1]];
        let b2 = [0.9 * 0.51 + d2[0], 0.9 * 0.98 + d2[1]];
        let t2 = [t1[0] - 0.1 * b2[0], t1[1] - 0.1 * b2[1]];
        let v = vals(&w);
        assert!((v[0] - t2[0]).abs() < 1e-15 && (v[1] - t2[1]).abs() < 1e-15);
    }

    #[test]
    fn adamw_hand_computed_two_steps() {
        let w = var(&[1.0, -2.0]);
        let (lr, wd, b1, b2, eps) = (0.01, 0.1, 0.9, 0.999, 1e-8);
        let mut opt = AdamW::new(vec![ParamGroup::new(
            "g",
            lr,
            wd,
            vec![("w".into(), w.clone())],
        )])
        .unwrap();
        let gs = [[0.5, -1.0], [0.25, 2.0]];
        let mut th = [1.0f64, -2.0];
        let mut m = [0.0f64; 2];
        let mut v = [0.0f64; 2];
        for (t, g) in gs.iter().enumerate() {
            opt.step(&grads(&[("w", g)])).unwrap();
            let t = (t + 1) as i32;
            for i in 0..2 {
                th[i] *= 1.0 - lr * wd;
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let mh = m[i] / (1.0 - b1.powi(t));
                let vh = v[i] / (1.0 - b2.powi(t));
                th[i] -= lr * mh / (vh.sqrt() + eps);
            }
            let got = vals(&w);
            for i in 0..2 {
                assert!(
                    (got[i] - th[i]).abs() < 1e-12,
                    "step {t} elem {i}: {} vs {}",
                    got[i],
                    th[i]
                );
            }
        }
        assert_eq!(opt.param_step("w"), 2);
    }

    #[test]
    fn params_without_grad_are_skipped() {
        let a = var(&[1.0]);
        let b = var(&[1.0]);
        let mut opt = AdamW::new(vec![ParamGroup::new(
            "g",
            0.1,
            0.5,
            vec![("a".into(), a.clone()), ("b".into(), b.clone())],
        )])
        .unwrap();
        opt.step(&grads(&[("a", &[1.0])])).unwrap();
        assert_eq!(vals(&b), vec![1.0]);
        assert_eq!(opt.param_step("b"), 0);
        assert_eq!(opt.param_step("a"), 1);
        let st = opt.state_tensors().unwrap();
        assert_eq!(st.len(), 3);
        assert!(st.iter().any(|(k, _)| k == "__optim__.g.step.a"));
    }

    #[test]
    fn duplicate_keys_rejected() {
        let a = var(&[1.0]);
        let r = Sgd::new(
            vec![
                ParamGroup::new("x", 0.1, 0.0, vec![("a".into(), a.clone())]),
                ParamGroup::new("y", 0.1, 0.0, vec![("a".into(), a.clone())]),
            ],
            0.9,
        );
        assert!(r.is_err());
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let run = |split: bool| -> Vec<f64> {
            let w = var(&[0.3, -0.7, 1.1]);
            let mk = |w: &Var| {
                AdamW::new(vec![ParamGroup::new(
                    "sam",
                    1e-2,
                    0.01,
                    vec![("w".into(), w.clone())],
                )])
                .unwrap()
            };
            let mut opt = mk(&w);
            let g = [[0.1, 0.2, -0.3], [0.4, -0.1, 0.0], [-0.2, 0.3, 0.5]];
            opt.step(&grads(&[("w", &g[0])])).unwrap();
            if split {
                let st: HashMap<String, Tensor> =
                    opt.state_tensors().unwrap().into_iter().collect();
                let w2 = var(&vals(&w));
                let mut o2 = mk(&w2);
                o2.load_state(&st).unwrap();
                o2.step(&grads(&[("w", &g[1])])).unwrap();
                o2.step(&grads(&[("w", &g[2])])).unwrap();
                vals(&w2)
            } else {
                opt.step(&grads(&[("w", &g[1])])).unwrap();
                opt.step(&grads(&[("w", &g[2])])).unwrap();
                vals(&w)
            }
        };
        assert_eq!(run(false), run(true));
    }

    #[test]
    fn sgd_state_round_trip() {
        let w = var(&[0.3, -0.7]);
        let mut opt = Sgd::new(
            vec![ParamGroup::new(
                "transunet",
                0.1,
                1e-4,
                vec![("w".into(), w.clone())],
            )],
            0.9,
        )
        .unwrap();
        opt.step(&grads(&[("w", &[0.1, 0.2])])).unwrap();
        let st: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
        assert!(st.contains_key("__optim__.transunet.momentum.w"));
        let mut o2 = Sgd::new(
            vec![ParamGroup::new(
                "transunet",
                0.1,
                1e-4,
                vec![("w".into(), w.clone())],
            )],
            0.9,
        )
        .unwrap();
        o2.load_state(&st).unwrap();
        let b: Vec<f64> = o2.momentum_buffer("w").unwrap().to_vec1().unwrap();
        assert_eq!(
            b,
            opt.momentum_buffer("w").unwrap().to_vec1::<f64>().unwrap()
        );
        let bad: HashMap<String, Tensor> = [(
            "__optim__.transunet.momentum.w".to_string(),
            Tensor::new(&[1.0f64], &Device::Cpu).unwrap(),
        )]
        .into();
        assert!(o2.load_state(&bad).is_err());
    }

    #[test]
    fn clipping_and_accumulation() {
        let mut g = grads(&[("a", &[3.0]), ("b", &[4.0])]);
        let n = g.clip_norm(1.0).unwrap();
        assert_eq!(n, 5.0);
        let a: Vec<f64> = g.get("a").unwrap().to_vec1().unwrap();
        assert!((a[0] - 3.0 / (5.0 + 1e-6)).abs() < 1e-15);
        // below the threshold: unchanged
        let mut g2 = grads(&[("a", &[0.3])]);
        g2.clip_norm(1.0).unwrap();
        assert_eq!(g2.get("a").unwrap().to_vec1::<f64>().unwrap(), vec![0.3]);
        // disabled
        let mut g3 = grads(&[("a", &[30.0])]);
        g3.clip_norm(0.0).unwrap();
        assert_eq!(g3.get("a").unwrap().to_vec1::<f64>().unwrap(), vec![30.0]);
        // accumulation over GradStores
        let w = var(&[2.0]);
        let grp = vec![ParamGroup::new(
            "g",
            0.1,
            0.0,
            vec![("w".into(), w.clone())],
        )];
        let mut acc = Grads::new();
        for k in 1..=2 {
            let loss = (w.as_tensor().sqr().unwrap() * (k as f64 / 2.0))
                .unwrap()
                .sum_all()
                .unwrap();
            acc.accumulate(&loss.backward().unwrap(), &grp).unwrap();
        }
        // d/dw (0.5 w² + 1.0 w²) = 3w = 6
        assert_eq!(acc.get("w").unwrap().to_vec1::<f64>().unwrap(), vec![6.0]);
        assert_eq!(steps_per_epoch(10, 3), 3);
        assert_eq!(steps_per_epoch(10, 1), 10);
    }

    /// Parameters and per-step gradients with values of both signs and a spread of magnitudes.
    fn random_problem(seed: u64) -> (Vec<Vec<f64>>, Vec<Vec<Vec<f64>>>) {
        use rand::Rng;
        let mut rng = crate::rng::stream_rng(seed, "optim-fused-test", &[]);
        let mut draw = |n: usize| -> Vec<f64> {
            (0..n)
                .map(|_| rng.gen_range(-1.0..1.0) * 10f64.powi(rng.gen_range(-3..2)))
                .collect()
        };
        let params = vec![draw(70_001), draw(3), draw(1)];
        let steps = (0..4)
            .map(|_| params.iter().map(|p| draw(p.len())).collect())
            .collect();
        (params, steps)
    }

    /// Runs `steps` updates of one optimiser kind with the in-place kernels and with the composed ops and returns
    /// both final parameter sets and state tensors.
    fn fused_and_composed(
        dtype: DType,
        make: &dyn Fn(
            Vec<ParamGroup>,
        ) -> Box<dyn FnMut(&Grads, bool) -> Result<Vec<(String, Tensor)>>>,
        wd: f64,
    ) -> [Vec<Vec<f64>>; 2] {
        let (params, steps) = random_problem(41);
        let run = |in_place: bool| -> Vec<Vec<f64>> {
            let vars: Vec<Var> = params
                .iter()
                .map(|p| {
                    Var::from_tensor(
                        &Tensor::new(p.as_slice(), &Device::Cpu)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap(),
                    )
                    .unwrap()
                })
                .collect();
            let named: Vec<(String, Var)> = vars
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("p{i}"), v.clone()))
                .collect();
            let mut step = make(vec![ParamGroup::new("g", 0.05, wd, named)]);
            let mut state = Vec::new();
            for gs in &steps {
                let mut g = Grads::new();
                for (i, v) in gs.iter().enumerate() {
                    g.insert(
                        format!("p{i}"),
                        Tensor::new(v.as_slice(), &Device::Cpu)
                            .unwrap()
                            .to_dtype(dtype)
                            .unwrap(),
                    );
                }
                state = step(&g, in_place).unwrap();
            }
            let mut out: Vec<Vec<f64>> = vars
                .iter()
                .map(|v| {
                    v.as_tensor()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect();
            for (_, t) in state {
                out.push(
                    t.to_dtype(DType::F64)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap(),
                );
            }
            out
        };
        [run(true), run(false)]
    }

    #[test]
    fn in_place_updates_equal_the_composed_ops_bit_for_bit() {
        for dtype in [DType::F32, DType::F64] {
            for wd in [0.0, 1e-4] {
                for momentum in [0.0, 0.9] {
                    let [a, b] = fused_and_composed(
                        dtype,
                        &|groups| {
                            let mut opt = Sgd::new(groups, momentum).unwrap();
                            Box::new(move |g: &Grads, in_place: bool| {
                                opt.step_impl(g, in_place)?;
                                opt.state_tensors()
                            })
                        },
                        wd,
                    );
                    assert_eq!(a.len(), if momentum != 0.0 { 6 } else { 3 });
                    // Bits, not values: to_bits distinguishes −0 from +0 and every rounding.
                    let bits = |v: &Vec<Vec<f64>>| -> Vec<Vec<u64>> {
                        v.iter()
                            .map(|p| p.iter().map(|x| x.to_bits()).collect())
                            .collect()
                    };
                    assert_eq!(
                        bits(&a),
                        bits(&b),
                        "SGD {dtype:?} wd {wd} momentum {momentum}"
                    );
                }
                let [a, b] = fused_and_composed(
                    dtype,
                    &|groups| {
                        let mut opt = AdamW::new(groups).unwrap();
                        Box::new(move |g: &Grads, in_place: bool| {
                            opt.step_impl(g, in_place)?;
                            opt.state_tensors()
                        })
                    },
                    wd * 100.0,
                );
                assert_eq!(a.len(), 3 + 3 * 3);
                let bits = |v: &Vec<Vec<f64>>| -> Vec<Vec<u64>> {
                    v.iter()
                        .map(|p| p.iter().map(|x| x.to_bits()).collect())
                        .collect()
                };
                assert_eq!(bits(&a), bits(&b), "AdamW {dtype:?} wd {}", wd * 100.0);
            }
        }
    }

    #[test]
    fn loaded_state_is_not_changed_by_later_steps() {
        let w = var(&[1.0, -2.0]);
        let group = || {
            vec![ParamGroup::new(
                "g",
                0.1,
                0.0,
                vec![("w".into(), w.clone())],
            )]
        };
        let mut opt = Sgd::new(group(), 0.9).unwrap();
        opt.step(&grads(&[("w", &[0.5, 0.25])])).unwrap();
        let saved: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
        let before: Vec<Vec<f64>> = saved.values().map(|t| t.to_vec1().unwrap()).collect();
        let mut resumed = Sgd::new(group(), 0.9).unwrap();
        resumed.load_state(&saved).unwrap();
        resumed.step(&grads(&[("w", &[1.0, 1.0])])).unwrap();
        let after: Vec<Vec<f64>> = saved.values().map(|t| t.to_vec1().unwrap()).collect();
        assert_eq!(before, after);
        let buf: Vec<f64> = resumed.momentum_buffer("w").unwrap().to_vec1().unwrap();
        assert_eq!(buf, vec![0.9 * 0.5 + 1.0, 0.9 * 0.25 + 1.0]);
    }
}
