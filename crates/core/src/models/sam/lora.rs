//! LoRA adapters on the image-encoder linears (SPEC §6.8).
//!
//! `y = W x + b + (α/r)·B(A(dropout(x)))`, `A (r,in)` kaiming-uniform `U(−1/√in, 1/√in)`, `B (out,r)` zeros; `W`, `b`
//! frozen plain tensors, `A`, `B` trainable (keys `<linear>.lora_a`, `<linear>.lora_b`).
use super::ops::{torch_uniform, Linear};
use crate::{Error, Result};
use candle_core::Tensor;
use candle_nn::{Init, VarBuilder};
use rand::Rng;

/// Which encoder linears get an adapter (`--lora-targets`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoraTarget {
    /// `attn.qkv`
    Qkv,
    /// `attn.proj`
    Proj,
    /// `mlp.lin1` and `mlp.lin2`
    Mlp,
}

impl LoraTarget {
    /// Parses `qkv`, `proj` or `mlp`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim() {
            "qkv" => Ok(Self::Qkv),
            "proj" => Ok(Self::Proj),
            "mlp" => Ok(Self::Mlp),
            o => Err(Error::Arg(format!(
                "unknown LoRA target `{o}` (expected qkv, proj or mlp)"
            ))),
        }
    }
    /// Parses a comma-separated list, e.g. `qkv,proj`.
    pub fn parse_list(s: &str) -> Result<Vec<Self>> {
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(Self::parse)
            .collect()
    }
}

/// LoRA hyper-parameters (defaults r = 4, α = 4, dropout 0, targets `qkv`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<LoraTarget>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: 4.0,
            dropout: 0.0,
            targets: vec![LoraTarget::Qkv],
        }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }
    pub fn has(&self, t: LoraTarget) -> bool {
        self.targets.contains(&t)
    }
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::Arg("LoRA rank must be >= 1".into()));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Arg(format!(
                "LoRA dropout must be in [0,1), got {}",
                self.dropout
            )));
        }
        Ok(())
    }
}

/// A low-rank adapter `(A, B, scale, dropout)`.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
}

impl LoraAdapter {
    /// Creates (or reads, when the builder's backend holds them) `lora_a (r,in)` and `lora_b (out,r)`.
    pub fn new(in_dim: usize, out_dim: usize, cfg: &LoraConfig, vb: VarBuilder) -> Result<Self> {
        let a = vb.get_with_hints((cfg.rank, in_dim), "lora_a", torch_uniform(in_dim))?;
        let b = vb.get_with_hints((out_dim, cfg.rank), "lora_b", Init::Const(0.0))?;
        Ok(Self {
            a,
            b,
            scale: cfg.scale(),
            dropout: cfg.dropout,
        })
    }

    /// `(α/r)·B(A(dropout(x)))` for `x (..., in)`. `dropout_seed`: `Some(seed)` in training (mask drawn from the
    /// project RNG stream `"dropout"`), `None` in evaluation.
    pub fn delta(&self, x: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let x = match dropout_seed {
            Some(seed) if self.dropout > 0.0 => {
                let n = x.elem_count();
                let mut rng = crate::rng::stream_rng(seed, "dropout", &[n as u64]);
                let keep = 1.0 - self.dropout;
                let mask: Vec<f32> = (0..n)
                    .map(|_| {
                        if rng.gen::<f64>() < keep {
                            (1.0 / keep) as f32
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let m = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
                (x * m)?
            }
            _ => x.clone(),
        };
        let dims = x.dims().to_vec();
        let cin = dims[dims.len() - 1];
        let lead: usize = dims[..dims.len() - 1].iter().product();
        let h = x.reshape((lead, cin))?.matmul(&self.a.t()?)?;
        let y = h.matmul(&self.b.t()?)?;
        let mut out = dims;
        *out.last_mut().expect("rank>0") = self.b.dim(0)?;
        Ok((y.reshape(out)? * self.scale)?)
    }

    /// `(α/r)·B·A` (the merge increment of `W`).
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.matmul(&self.a)? * self.scale)?)
    }
}

/// A frozen linear with an optional adapter.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub base: Linear,
    pub lora: Option<LoraAdapter>,
}

impl LoraLinear {
    pub fn new(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb_frozen: VarBuilder,
        lora: Option<(&LoraConfig, VarBuilder)>,
    ) -> Result<Self> {
        let base = Linear::new(in_dim, out_dim, bias, vb_frozen)?;
        let lora = match lora {
            Some((cfg, vb)) => Some(LoraAdapter::new(in_dim, out_dim, cfg, vb)?),
            None => None,
        };
        Ok(Self { base, lora })
    }

    pub fn forward(&self, x: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        match &self.lora {
            Some(l) => {
                let d = l.delta(x, dropout_seed)?;
                let d = d.to_dtype(y.dtype())?;
                Ok((y + d)?)
            }
            None => Ok(y),
        }
    }

    /// Folds the adapter into the weight: `W' = W + (α/r)·B·A`; the adapter is removed.
    pub fn merge(&mut self) -> Result<()> {
        if let Some(l) = self.lora.take() {
            let dw = l
                .delta_weight()?
                .detach()
                .to_dtype(self.base.weight.dtype())?;
            self.base.weight = (self.base.weight.detach() + dw)?;
        }
        Ok(())
    }
}

/// Whether a SAM key is a LoRA adapter (`…lora_a`, `…lora_b`, §6.8).
pub fn is_lora_key(k: &str) -> bool {
    k.ends_with(".lora_a") || k.ends_with(".lora_b")
}

/// The encoder linear (below `image_encoder.blocks.{i}.`) that a LoRA target adapts.
fn target_linears(t: LoraTarget) -> &'static [&'static str] {
    match t {
        LoraTarget::Qkv => &["attn.qkv"],
        LoraTarget::Proj => &["attn.proj"],
        LoraTarget::Mlp => &["mlp.lin1", "mlp.lin2"],
    }
}

/// Checks adapter tensors found in a checkpoint (§6.5 keys, `…lora_a (r,in)` / `…lora_b (out,r)`) against the
/// adapters `cfg` builds on an encoder of `depth` blocks: every adapter must belong to a selected target, come in an
/// `a`/`b` pair and have rank `cfg.rank`. Targets without a stored adapter are initialised as usual.
pub fn check_adapter_tensors<'a>(
    adapters: impl IntoIterator<Item = (&'a String, &'a Tensor)>,
    cfg: &LoraConfig,
    depth: usize,
) -> Result<()> {
    let allowed: std::collections::HashSet<String> = (0..depth)
        .flat_map(|i| {
            cfg.targets.iter().flat_map(move |t| {
                target_linears(*t)
                    .iter()
                    .map(move |l| format!("image_encoder.blocks.{i}.{l}"))
            })
        })
        .collect();
    let adapters: Vec<(&String, &Tensor)> = adapters.into_iter().collect();
    let have: std::collections::HashSet<&str> = adapters.iter().map(|(k, _)| k.as_str()).collect();
    for (k, t) in &adapters {
        let (base, is_a) = match (k.strip_suffix(".lora_a"), k.strip_suffix(".lora_b")) {
            (Some(b), _) => (b, true),
            (_, Some(b)) => (b, false),
            _ => continue,
        };
        if !allowed.contains(base) {
            return Err(Error::Weights(format!(
                "LoRA adapter `{k}` is not among the selected --lora-targets"
            )));
        }
        let other = format!("{base}.{}", if is_a { "lora_b" } else { "lora_a" });
        if !have.contains(other.as_str()) {
            return Err(Error::Weights(format!(
                "LoRA adapter `{k}` has no `{other}`"
            )));
        }
        let r = t.dim(if is_a { 0 } else { 1 })?;
        if r != cfg.rank {
            return Err(Error::Weights(format!(
                "LoRA adapter `{k}` has rank {r}, --lora-rank is {}",
                cfg.rank
            )));
        }
    }
    Ok(())
}

/// Folds every adapter pair of a §6.5 tensor map into its weight, `W' = W + (α/r)·B·A` (the arithmetic of
/// [`LoraLinear::merge`], so the result equals a merged export), and removes the adapters. `r` is read from the
/// shapes, `alpha` is the training run's `--lora-alpha`. Returns the number of merged linears.
pub fn merge_adapter_tensors(
    tensors: &mut std::collections::HashMap<String, Tensor>,
    alpha: f64,
) -> Result<usize> {
    let mut bases: Vec<String> = tensors
        .keys()
        .filter(|k| is_lora_key(k))
        .map(|k| k[..k.len() - ".lora_a".len()].to_string())
        .collect();
    bases.sort();
    bases.dedup();
    for base in &bases {
        let get = |s: &str| {
            tensors
                .get(&format!("{base}.{s}"))
                .cloned()
                .ok_or_else(|| Error::Weights(format!("LoRA merge: `{base}.{s}` is missing")))
        };
        let (a, b, w) = (get("lora_a")?, get("lora_b")?, get("weight")?);
        let adapter = LoraAdapter {
            scale: alpha / a.dim(0)? as f64,
            a,
            b,
            dropout: 0.0,
        };
        let dw = adapter.delta_weight()?.detach().to_dtype(w.dtype())?;
        tensors.insert(format!("{base}.weight"), (w.detach() + dw)?);
        tensors.remove(&format!("{base}.lora_a"));
        tensors.remove(&format!("{base}.lora_b"));
    }
    Ok(bases.len())
}
