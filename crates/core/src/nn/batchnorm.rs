//! BatchNorm2d with PyTorch train/eval semantics (TransUNet decoder, SPEC §5.2).
//!
//! Running statistics are *buffers* (SPEC §16.3): plain tensors that are checkpointed but never handed to the
//! optimiser. They live behind a `Mutex` so `forward_t(&self, …)` can update them in train mode while the module is
//! shared (models are used through `&self`, possibly from several threads).
use super::batchnorm_fused as fused;
use super::init::{ONES, ZEROS};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};
use std::sync::{Mutex, MutexGuard};

#[derive(Debug, Clone)]
struct BnState {
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: i64,
}

/// `BatchNorm2d(C, eps, momentum)`; parameters `weight`/`bias` (init 1/0), buffers `running_mean` (init 0),
/// `running_var` (init 1), `num_batches_tracked` (i64 scalar, init 0).
#[derive(Debug)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    momentum: f64,
    state: Mutex<BnState>,
}

impl Clone for BatchNorm2d {
    fn clone(&self) -> Self {
        let state = self
            .state
            .lock()
            .map(|s| s.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        Self {
            weight: self.weight.clone(),
            bias: self.bias.clone(),
            eps: self.eps,
            momentum: self.momentum,
            state: Mutex::new(state),
        }
    }
}

/// Reads a buffer if the builder has it, as a detached plain tensor (never a `Var`, even from a `VarMap` backend).
/// `get_with_hints` (not `get_unchecked`) because it works for every backend, `VarMap` included, and checks the shape.
fn read_buffer(vb: &VarBuilder, name: &str, channels: usize, init: f64) -> Result<Tensor> {
    if vb.contains_tensor(name) {
        let t = vb
            .get_with_hints(channels, name, Init::Const(init))
            .map_err(|e| {
                Error::Weights(format!("BatchNorm2d buffer `{}.{name}`: {e}", vb.prefix()))
            })?;
        // `copy` gives the buffer its own storage, so it can never alias a Var.
        Ok(t.detach().to_dtype(vb.dtype())?.copy()?)
    } else {
        Ok((Tensor::ones(channels, vb.dtype(), vb.device())? * init)?)
    }
}

/// `num_batches_tracked` is optional on load (SPEC §5.3); PyTorch stores an i64 scalar, read through f64.
fn read_count(vb: &VarBuilder) -> Result<i64> {
    if !vb.contains_tensor("num_batches_tracked") {
        return Ok(0);
    }
    let t = vb
        .get_with_hints_dtype((), "num_batches_tracked", Init::Const(0.0), DType::F64)
        .map_err(|e| Error::Weights(format!("`{}.num_batches_tracked`: {e}", vb.prefix())))?;
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()? as i64)
}

impl BatchNorm2d {
    /// Builds the layer; buffers are taken from `vb` when present (checkpoints), otherwise PyTorch's defaults.
    pub fn new(channels: usize, eps: f64, momentum: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", ONES)?;
        let bias = vb.get_with_hints(channels, "bias", ZEROS)?;
        let running_mean = read_buffer(&vb, "running_mean", channels, 0.0)?;
        let running_var = read_buffer(&vb, "running_var", channels, 1.0)?;
        let num_batches_tracked = read_count(&vb)?;
        Ok(Self {
            weight,
            bias,
            eps,
            momentum,
            state: Mutex::new(BnState {
                running_mean,
                running_var,
                num_batches_tracked,
            }),
        })
    }

    fn lock(&self) -> Result<MutexGuard<'_, BnState>> {
        self.state
            .lock()
            .map_err(|_| Error::msg("BatchNorm2d: running-statistics lock poisoned by a panic"))
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    /// `train = true`: normalise with the batch statistics (biased variance) and update the running statistics
    /// (momentum, **unbiased** variance, `num_batches_tracked += 1`). `train = false`: use the running statistics.
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_maybe_relu(x, train, false)
    }

    /// `relu(self.forward_t(x, train))` (Conv-BN-ReLU); in train mode on the CPU in f32/f64 the ReLU is part of the
    /// fused BatchNorm op (no separate node), with the same values and gradients.
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward_maybe_relu(x, train, true)
    }

    fn forward_maybe_relu(&self, x: &Tensor, train: bool, relu: bool) -> Result<Tensor> {
        let then_relu = |y: Tensor| if relu { super::relu(&y) } else { Ok(y) };
        let (b, c, h, w) = x.dims4()?;
        if !train {
            let st = self.lock()?;
            let rm = st.running_mean.reshape((1, c, 1, 1))?;
            let rv = st.running_var.reshape((1, c, 1, 1))?;
            drop(st);
            let y = x
                .broadcast_sub(&rm)?
                .broadcast_div(&(rv + self.eps)?.sqrt()?)?;
            let wt = self.weight.reshape((1, c, 1, 1))?;
            let bs = self.bias.reshape((1, c, 1, 1))?;
            return then_relu(y.broadcast_mul(&wt)?.broadcast_add(&bs)?);
        }
        let n = b * h * w;
        if n < 2 {
            return Err(Error::Arg(format!(
                "BatchNorm2d in train mode needs more than one value per channel, got input {:?}",
                x.dims()
            )));
        }
        let (y, batch_mean, batch_var) = if fused::applies(x, &self.weight, &self.bias) {
            let (y, st) = fused::train_forward(x, &self.weight, &self.bias, self.eps, relu)?;
            let stat = |v: Vec<f64>| Tensor::new(v, x.device())?.to_dtype(x.dtype());
            (y, stat(st.mean)?, stat(st.var)?)
        } else {
            let (y, mean, var) = self.train_composed(x)?;
            (
                then_relu(y)?,
                mean.detach().flatten_all()?,
                var.detach().flatten_all()?,
            )
        };
        let m = self.momentum;
        let batch_var_unbiased = (batch_var * (n as f64 / (n as f64 - 1.0)))?;
        let mut st = self.lock()?;
        st.running_mean = ((&st.running_mean * (1.0 - m))? + (batch_mean * m)?)?;
        st.running_var = ((&st.running_var * (1.0 - m))? + (batch_var_unbiased * m)?)?;
        st.num_batches_tracked += 1;
        Ok(y)
    }

    /// Train-mode output from composed candle ops (any device), with the batch mean and biased variance
    /// `(1, C, 1, 1)`. On the CPU in f32/f64 the fused kernel of `batchnorm_fused` computes the same.
    fn train_composed(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let c = x.dim(1)?;
        let mean = x.mean_keepdim((0, 2, 3))?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim((0, 2, 3))?;
        let y = xc.broadcast_div(&(&var + self.eps)?.sqrt()?)?;
        let wt = self.weight.reshape((1, c, 1, 1))?;
        let bs = self.bias.reshape((1, c, 1, 1))?;
        Ok((y.broadcast_mul(&wt)?.broadcast_add(&bs)?, mean, var))
    }

    /// [`forward_t`](Self::forward_t) in train mode through composed ops only (no running-statistics update): the
    /// reference the fused CPU kernel is tested against.
    pub fn train_output_composed(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.train_composed(x)?.0)
    }

    pub fn running_mean(&self) -> Result<Tensor> {
        Ok(self.lock()?.running_mean.clone())
    }

    pub fn running_var(&self) -> Result<Tensor> {
        Ok(self.lock()?.running_var.clone())
    }

    pub fn num_batches_tracked(&self) -> Result<i64> {
        Ok(self.lock()?.num_batches_tracked)
    }

    /// The buffers under their PyTorch names (prefix them with the module path to checkpoint them);
    /// `num_batches_tracked` is an i64 scalar.
    pub fn buffers(&self) -> Result<Vec<(String, Tensor)>> {
        let st = self.lock()?;
        let nbt = Tensor::new(st.num_batches_tracked, st.running_mean.device())?;
        Ok(vec![
            ("running_mean".to_string(), st.running_mean.clone()),
            ("running_var".to_string(), st.running_var.clone()),
            ("num_batches_tracked".to_string(), nbt),
        ])
    }

    /// Restores one buffer by its PyTorch name (e.g. when resuming from a checkpoint).
    pub fn set_buffer(&self, name: &str, value: &Tensor) -> Result<()> {
        let mut st = self.lock()?;
        let c = st.running_mean.dim(0)?;
        let (dtype, device) = (st.running_mean.dtype(), st.running_mean.device().clone());
        let as_channels = |v: &Tensor| -> Result<Tensor> {
            if v.dims() != [c] {
                return Err(Error::Weights(format!(
                    "BatchNorm2d buffer `{name}`: shape {:?}, expected ({c})",
                    v.dims()
                )));
            }
            Ok(v.detach().to_dtype(dtype)?.to_device(&device)?.copy()?)
        };
        match name {
            "running_mean" => st.running_mean = as_channels(value)?,
            "running_var" => st.running_var = as_channels(value)?,
            "num_batches_tracked" => {
                let v = value
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?;
                st.num_batches_tracked = v.first().copied().unwrap_or(0.0) as i64;
            }
            other => {
                return Err(Error::Weights(format!(
                    "BatchNorm2d has no buffer `{other}`"
                )))
            }
        }
        Ok(())
    }
}
