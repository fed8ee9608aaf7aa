//! Small building blocks shared by the TransUNet modules: PyTorch-initialised Conv2d/Linear with explicit `Init`
//! hints (SPEC §5.4, §16.3) and a dropout that is a no-op for `p = 0` or without a seed.
use crate::Result;
use candle_core::Tensor;
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};

/// `Conv2d(cin → cout, k×k, stride, padding)` with PyTorch's default init (via `crate::nn::conv2d`); keys
/// `weight` `(cout, cin, k, k)` and (optionally) `bias`.
pub fn conv2d(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
    bias: bool,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        dilation: 1,
        groups: 1,
        cudnn_fwd_algo: None,
    };
    crate::nn::conv2d(cin, cout, k, cfg, bias, vb)
}

/// `Linear(cin → cout)` with bias and PyTorch's default init; weight `(cout, cin)`.
pub fn linear(cin: usize, cout: usize, vb: VarBuilder) -> Result<Linear> {
    crate::nn::linear(cin, cout, true, vb)
}

/// Dropout with a host-generated mask (SPEC §11.1.6); identity when `p = 0` or when no seed is given (eval).
#[derive(Debug, Clone)]
pub struct Dropout {
    p: f64,
    inner: crate::nn::Dropout,
}

impl Dropout {
    pub fn new(p: f64) -> Self {
        Self {
            p,
            inner: crate::nn::Dropout::new(p),
        }
    }

    pub fn forward_t(&self, x: &Tensor, seed: Option<u64>) -> Result<Tensor> {
        match seed {
            Some(s) if self.is_active(seed) => self.inner.forward_t(x, Some(s)),
            _ => Ok(x.clone()),
        }
    }

    /// `self.forward_t(&gelu(x), seed)`, one fused op on the CPU.
    pub fn forward_gelu_t(&self, x: &Tensor, seed: Option<u64>) -> Result<Tensor> {
        crate::nn::gelu_dropout(x, &self.inner, seed)
    }

    /// Whether [`Self::forward_t`] with this seed changes its input (training mode and `p > 0`).
    pub fn is_active(&self, seed: Option<u64>) -> bool {
        seed.is_some() && self.p > 0.0
    }
}

/// `SimpleBackend` over a [`candle_nn::VarMap`] that creates missing variables from the project RNG (SPEC §0):
/// each variable draws from its own stream `stream_rng(seed, "init", [fnv1a64(name)])`, so the initial weights
/// depend only on the seed and the variable name — not on build order or thread count — and two fresh runs with
/// the same seed start identically (needed for the resume-equals-uninterrupted guarantee of SPEC §11.1.6).
/// Existing variables are returned as they are (shape-checked), like candle's own `VarMap` backend.
pub struct SeededVarMap {
    varmap: candle_nn::VarMap,
    seed: u64,
}

fn seeded_values(
    init: candle_nn::Init,
    n: usize,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Option<Vec<f64>> {
    use rand::Rng;
    let uniform = |lo: f64, up: f64, rng: &mut rand_chacha::ChaCha8Rng| -> Vec<f64> {
        (0..n).map(|_| lo + (up - lo) * rng.gen::<f64>()).collect()
    };
    match init {
        candle_nn::Init::Const(v) => Some(vec![v; n]),
        candle_nn::Init::Uniform { lo, up } => Some(uniform(lo, up, rng)),
        candle_nn::Init::Randn { mean, stdev } => Some(
            (0..n)
                .map(|_| {
                    // Box–Muller on (0, 1] × [0, 1).
                    let u1: f64 = 1.0 - rng.gen::<f64>();
                    let u2: f64 = rng.gen::<f64>();
                    mean + stdev * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
                })
                .collect(),
        ),
        candle_nn::Init::Kaiming { .. } => None,
    }
}

impl candle_nn::var_builder::SimpleBackend for SeededVarMap {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        dtype: candle_core::DType,
        dev: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        let mut vars = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        if let Some(v) = vars.get(name) {
            if v.shape() != &s {
                candle_core::bail!(
                    "shape mismatch for {name}: existing {:?}, requested {:?}",
                    v.dims(),
                    s.dims()
                );
            }
            return Ok(v.as_tensor().clone());
        }
        let n = s.elem_count();
        let mut rng = crate::rng::stream_rng(self.seed, "init", &[crate::rng::fnv1a64(name)]);
        let var = match seeded_values(h, n, &mut rng) {
            Some(vals) => {
                let t = Tensor::from_vec(vals, s, &candle_core::Device::Cpu)?
                    .to_dtype(dtype)?
                    .to_device(dev)?;
                candle_core::Var::from_tensor(&t)?
            }
            // Kaiming hints are not used by the project; keep candle's (unseeded) implementation for them.
            None => h.var(s, dtype, dev)?,
        };
        let t = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: candle_core::DType,
        _dev: &candle_core::Device,
    ) -> candle_core::Result<Tensor> {
        let vars = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?;
        match vars.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("cannot find tensor {name}"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|v| v.contains_key(name))
            .unwrap_or(false)
    }
}

/// A `VarBuilder` whose new variables are created in `varmap` with seeded initial values (see [`SeededVarMap`]).
pub fn seeded_varbuilder(
    varmap: &candle_nn::VarMap,
    seed: u64,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> VarBuilder<'static> {
    let backend: Box<dyn candle_nn::var_builder::SimpleBackend> = Box::new(SeededVarMap {
        varmap: varmap.clone(),
        seed,
    });
    VarBuilder::from_backend(backend, dtype, device.clone())
}
