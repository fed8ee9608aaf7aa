//! LoRA-adapted linear layer for the SAM image encoder (SPEC §6.8):
//! `y = W x + b + (α/r)·B(A(dropout(x)))`, with `W`, `b` frozen plain tensors and `A`, `B` trainable.
use super::dropout::Dropout;
use super::init::{torch_uniform, ZEROS};
use crate::{Error, Result};
use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarBuilder};

#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: Linear,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: f64,
    dropout: Dropout,
}

impl LoraLinear {
    /// Wraps the frozen `weight` `(out, in)` / `bias`. `vb` (a trainable `VarMap` builder at the layer's path) gets
    /// `lora_a` `(r, in)` ~ kaiming-uniform(a=√5) = `U(±1/√in)` and `lora_b` `(out, r)` = 0, so the adapted layer
    /// starts identical to the base layer.
    pub fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        rank: usize,
        alpha: f64,
        dropout: f64,
        vb: VarBuilder,
    ) -> Result<Self> {
        if rank == 0 {
            return Err(Error::Config(format!(
                "LoRA rank must be positive (layer `{}`)",
                vb.prefix()
            )));
        }
        let (out_dim, in_dim) = weight.dims2()?;
        let lora_a = vb.get_with_hints((rank, in_dim), "lora_a", torch_uniform(in_dim))?;
        let lora_b = vb.get_with_hints((out_dim, rank), "lora_b", ZEROS)?;
        // Frozen parts must never record a graph (SPEC §16.3).
        let base = Linear::new(weight.detach(), bias.map(|b| b.detach()));
        Ok(Self {
            base,
            lora_a,
            lora_b,
            scale: alpha / rank as f64,
            dropout: Dropout::new(dropout),
        })
    }

    /// `α/r`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    pub fn lora_a(&self) -> &Tensor {
        &self.lora_a
    }

    pub fn lora_b(&self) -> &Tensor {
        &self.lora_b
    }

    /// Training forward; `rng_seed` drives the LoRA input dropout (None = eval).
    pub fn forward_t(&self, x: &Tensor, rng_seed: Option<u64>) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        let xd = self.dropout.forward_t(x, rng_seed)?;
        let low = Linear::new(self.lora_a.clone(), None).forward(&xd)?;
        let delta = Linear::new(self.lora_b.clone(), None).forward(&low)?;
        Ok((y + (delta * self.scale)?)?)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_t(x, None)
    }

    /// `W' = W + (α/r)·B·A` as a plain (detached) tensor: what `best_sam.safetensors` stores.
    pub fn merge(&self) -> Result<Tensor> {
        let ba = self.lora_b.detach().matmul(&self.lora_a.detach())?;
        Ok((self.base.weight() + (ba * self.scale)?)?)
    }

    /// A plain `Linear` with the merged weight and the base bias (inference without the adapter branch).
    pub fn merged_linear(&self) -> Result<Linear> {
        Ok(Linear::new(self.merge()?, self.base.bias().cloned()))
    }
}
