//! ViT encoder (SPEC §5.2): `num_layers` pre-LN blocks (`x += Attn(LN_a(x))`, `x += MLP(LN_f(x))`) and
//! `encoder_norm`; all LayerNorms eps 1e-6, generic (differentiable) softmax, exact GELU.
//! Keys below `transformer.encoder`: `layer.{i}.{attention_norm,ffn_norm}.*`, `layer.{i}.ffn.{fc1,fc2}.*`,
//! `layer.{i}.attn.{query,key,value,out}.*`, `encoder_norm.*`.
use super::layers::{linear, Dropout};
use crate::config::TransUnetConfig;
use crate::nn::{self, LayerNorm};
use crate::{Error, Result};
use candle_core::Tensor;
use candle_nn::{Init, Linear, VarBuilder};

pub const LN_EPS: f64 = 1e-6;

/// Multi-head self-attention with separate `query`, `key`, `value`, `out` projections.
#[derive(Debug, Clone)]
pub struct Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    out: Linear,
    num_heads: usize,
    head_dim: usize,
    attn_dropout: Dropout,
    proj_dropout: Dropout,
}

impl Attention {
    pub fn new(cfg: &TransUnetConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        let h = cfg.num_heads;
        if h == 0 || !d.is_multiple_of(h) {
            return Err(Error::Config(format!(
                "transunet.hidden_size {d} is not divisible by transunet.num_heads {h}"
            )));
        }
        Ok(Self {
            query: linear(d, d, vb.pp("query"))?,
            key: linear(d, d, vb.pp("key"))?,
            value: linear(d, d, vb.pp("value"))?,
            out: linear(d, d, vb.pp("out"))?,
            num_heads: h,
            head_dim: d / h,
            attn_dropout: Dropout::new(cfg.attention_dropout),
            proj_dropout: Dropout::new(cfg.attention_dropout),
        })
    }

    fn heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        Ok(x.reshape((b, n, self.num_heads, self.head_dim))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    /// `seeds`: dropout seeds of the attention-probability and output-projection dropouts.
    pub fn forward_t(&self, x: &Tensor, seeds: Option<(u64, u64)>) -> Result<Tensor> {
        let q = nn::linear_layer(&self.query, x)?;
        let k = nn::linear_layer(&self.key, x)?;
        let v = nn::linear_layer(&self.value, x)?;
        let prob_seed = seeds.map(|s| s.0);
        // One fused op on the CPU (no dropout inside it; every preset's attention dropout is 0).
        let ctx =
            if !self.attn_dropout.is_active(prob_seed) && nn::attention_supported(&[&q, &k, &v]) {
                nn::attention(&q, &k, &v, self.num_heads)?
            } else {
                self.attention_composed(&q, &k, &v, prob_seed)?
            };
        let out = nn::linear_layer(&self.out, &ctx)?;
        self.proj_dropout.forward_t(&out, seeds.map(|s| s.1))
    }

    /// `softmax(Q·Kᵀ/√d_h)·V` per head from candle ops, with dropout on the probabilities.
    fn attention_composed(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        prob_seed: Option<u64>,
    ) -> Result<Tensor> {
        let (b, n, d) = q.dims3()?;
        let (q, k, v) = (self.heads(q)?, self.heads(k)?, self.heads(v)?);
        let scores = (q.matmul(&k.t()?)? / (self.head_dim as f64).sqrt())?;
        let probs = nn::softmax(&scores, 3)?;
        let probs = self.attn_dropout.forward_t(&probs, prob_seed)?;
        Ok(probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, n, d))?)
    }
}

/// `fc1 → exact GELU → Dropout → fc2 → Dropout`; fc weights Xavier-uniform, biases `N(0, 1e-6)` (SPEC §5.4).
#[derive(Debug, Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    dropout: Dropout,
}

fn xavier_linear(fan_in: usize, fan_out: usize, vb: VarBuilder) -> Result<Linear> {
    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
    let w = vb.get_with_hints(
        (fan_out, fan_in),
        "weight",
        Init::Uniform {
            lo: -bound,
            up: bound,
        },
    )?;
    let b = vb.get_with_hints(
        fan_out,
        "bias",
        Init::Randn {
            mean: 0.0,
            stdev: 1e-6,
        },
    )?;
    Ok(Linear::new(w, Some(b)))
}

impl Mlp {
    pub fn new(cfg: &TransUnetConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: xavier_linear(cfg.hidden_size, cfg.mlp_dim, vb.pp("fc1"))?,
            fc2: xavier_linear(cfg.mlp_dim, cfg.hidden_size, vb.pp("fc2"))?,
            dropout: Dropout::new(cfg.dropout),
        })
    }

    pub fn forward_t(&self, x: &Tensor, seeds: Option<(u64, u64)>) -> Result<Tensor> {
        let y = self
            .dropout
            .forward_gelu_t(&nn::linear_layer(&self.fc1, x)?, seeds.map(|s| s.0))?;
        let y = nn::linear_layer(&self.fc2, &y)?;
        self.dropout.forward_t(&y, seeds.map(|s| s.1))
    }
}

/// One pre-LN transformer block.
#[derive(Debug, Clone)]
pub struct Block {
    attention_norm: LayerNorm,
    attn: Attention,
    ffn_norm: LayerNorm,
    ffn: Mlp,
}

impl Block {
    pub fn new(cfg: &TransUnetConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            attention_norm: LayerNorm::new(cfg.hidden_size, LN_EPS, vb.pp("attention_norm"))?,
            attn: Attention::new(cfg, vb.pp("attn"))?,
            ffn_norm: LayerNorm::new(cfg.hidden_size, LN_EPS, vb.pp("ffn_norm"))?,
            ffn: Mlp::new(cfg, vb.pp("ffn"))?,
        })
    }

    /// `seed`: per-block dropout seed; the four dropout sites derive their own streams from it.
    pub fn forward_t(&self, x: &Tensor, seed: Option<u64>) -> Result<Tensor> {
        let site = |s: u64, i: u64| crate::rng::mix(s, "dropout-site", &[i]);
        let attn_seeds = seed.map(|s| (site(s, 0), site(s, 1)));
        let mlp_seeds = seed.map(|s| (site(s, 2), site(s, 3)));
        let h = self
            .attn
            .forward_t(&self.attention_norm.forward(x)?, attn_seeds)?;
        let x = (x + h)?;
        let h = self.ffn.forward_t(&self.ffn_norm.forward(&x)?, mlp_seeds)?;
        Ok((x + h)?)
    }
}

/// The encoder stack plus `encoder_norm`.
#[derive(Debug, Clone)]
pub struct Encoder {
    layers: Vec<Block>,
    encoder_norm: LayerNorm,
}

impl Encoder {
    /// `vb` points at `transformer.encoder`.
    pub fn new(cfg: &TransUnetConfig, vb: VarBuilder) -> Result<Self> {
        let lvb = vb.pp("layer");
        let layers = (0..cfg.num_layers)
            .map(|i| Block::new(cfg, lvb.pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let encoder_norm = LayerNorm::new(cfg.hidden_size, LN_EPS, vb.pp("encoder_norm"))?;
        Ok(Self {
            layers,
            encoder_norm,
        })
    }

    /// `seed`: dropout seed of the encoder (None = no dropout); block `i` uses `mix(seed, "dropout-layer", [i])`.
    pub fn forward_t(&self, x: &Tensor, seed: Option<u64>) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            let s = seed.map(|s| crate::rng::mix(s, "dropout-layer", &[i as u64]));
            x = layer.forward_t(&x, s)?;
        }
        self.encoder_norm.forward(&x)
    }
}
