//! SAM mask decoder (SPEC §6.4): two-way transformer, output upscaling, hypernetwork MLPs and IoU head.
//! Image embeddings and prompt sets are paired one-to-one (a single embedding is broadcast to all prompt sets).
use super::ops::{
    embedding, gelu, softmax_last, ConvTranspose2d, Exec, LayerNorm, LayerNorm2d, Linear,
};
use crate::config::SamConfig;
use crate::{Error, Result};
use candle_core::{IndexOp, Tensor};
use candle_nn::VarBuilder;

/// Two-way transformer LayerNorm epsilon (SPEC §6.1).
pub const TRANSFORMER_LN_EPS: f64 = 1e-5;
/// Output-upscaling LayerNorm2d epsilon.
pub const UPSCALE_LN_EPS: f64 = 1e-6;

/// Attention with optional internal down-projection (`q/k/v_proj: C → C/r`, `out_proj: C/r → C`).
#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub num_heads: usize,
}

impl Attention {
    pub fn new(dim: usize, num_heads: usize, downsample: usize, vb: VarBuilder) -> Result<Self> {
        let internal = dim / downsample;
        if !internal.is_multiple_of(num_heads) {
            return Err(Error::Config(format!(
                "attention dim {internal} not divisible by {num_heads} heads"
            )));
        }
        Ok(Self {
            q_proj: Linear::new(dim, internal, true, vb.pp("q_proj"))?,
            k_proj: Linear::new(dim, internal, true, vb.pp("k_proj"))?,
            v_proj: Linear::new(dim, internal, true, vb.pp("v_proj"))?,
            out_proj: Linear::new(internal, dim, true, vb.pp("out_proj"))?,
            num_heads,
        })
    }

    fn separate(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        Ok(x.reshape((b, n, self.num_heads, c / self.num_heads))?
            .transpose(1, 2)?
            .contiguous()?)
    }

    pub fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let q = self.separate(&self.q_proj.forward(q)?)?;
        let k = self.separate(&self.k_proj.forward(k)?)?;
        let v = self.separate(&self.v_proj.forward(v)?)?;
        let (b, h, n, d) = q.dims4()?;
        let attn = (q.matmul(&k.transpose(2, 3)?.contiguous()?)? / (d as f64).sqrt())?;
        let attn = softmax_last(&attn, Exec::Grad)?;
        let out = attn.matmul(&v)?; // (b,h,n,d)
        let out = out.transpose(1, 2)?.contiguous()?.reshape((b, n, h * d))?;
        self.out_proj.forward(&out)
    }
}

/// Two-layer MLP with ReLU (`lin1`, `lin2`) of the two-way transformer.
#[derive(Debug, Clone)]
pub struct MlpBlock {
    pub lin1: Linear,
    pub lin2: Linear,
}

impl MlpBlock {
    fn new(dim: usize, mlp: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            lin1: Linear::new(dim, mlp, true, vb.pp("lin1"))?,
            lin2: Linear::new(mlp, dim, true, vb.pp("lin2"))?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.lin2.forward(&crate::nn::relu(&self.lin1.forward(x)?)?)
    }
}

/// One two-way attention block.
#[derive(Debug, Clone)]
pub struct TwoWayAttentionBlock {
    pub self_attn: Attention,
    pub norm1: LayerNorm,
    pub cross_attn_token_to_image: Attention,
    pub norm2: LayerNorm,
    pub mlp: MlpBlock,
    pub norm3: LayerNorm,
    pub norm4: LayerNorm,
    pub cross_attn_image_to_token: Attention,
    pub skip_first_layer_pe: bool,
}

impl TwoWayAttentionBlock {
    fn new(cfg: &SamConfig, skip_first_layer_pe: bool, vb: VarBuilder) -> Result<Self> {
        let c = cfg.prompt_embed_dim;
        let h = cfg.decoder_num_heads;
        let r = cfg.decoder_attn_downsample;
        Ok(Self {
            self_attn: Attention::new(c, h, 1, vb.pp("self_attn"))?,
            norm1: LayerNorm::new(c, TRANSFORMER_LN_EPS, vb.pp("norm1"))?,
            cross_attn_token_to_image: Attention::new(c, h, r, vb.pp("cross_attn_token_to_image"))?,
            norm2: LayerNorm::new(c, TRANSFORMER_LN_EPS, vb.pp("norm2"))?,
            mlp: MlpBlock::new(c, cfg.decoder_mlp_dim, vb.pp("mlp"))?,
            norm3: LayerNorm::new(c, TRANSFORMER_LN_EPS, vb.pp("norm3"))?,
            norm4: LayerNorm::new(c, TRANSFORMER_LN_EPS, vb.pp("norm4"))?,
            cross_attn_image_to_token: Attention::new(c, h, r, vb.pp("cross_attn_image_to_token"))?,
            skip_first_layer_pe,
        })
    }

    fn forward(
        &self,
        queries: &Tensor,
        keys: &Tensor,
        query_pe: &Tensor,
        key_pe: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let g = Exec::Grad;
        let queries = if self.skip_first_layer_pe {
            self.self_attn.forward(queries, queries, queries)?
        } else {
            let q = (queries + query_pe)?;
            (queries + self.self_attn.forward(&q, &q, queries)?)?
        };
        let queries = self.norm1.forward(&queries, g)?;
        let q = (&queries + query_pe)?;
        let k = keys.broadcast_add(key_pe)?;
        let a = self.cross_attn_token_to_image.forward(&q, &k, keys)?;
        let queries = self.norm2.forward(&(queries + a)?, g)?;
        let m = self.mlp.forward(&queries)?;
        let queries = self.norm3.forward(&(queries + m)?, g)?;
        let q = (&queries + query_pe)?;
        let a = self.cross_attn_image_to_token.forward(&k, &q, &queries)?;
        let keys = self.norm4.forward(&(keys + a)?, g)?;
        Ok((queries, keys))
    }
}

/// The two-way transformer.
#[derive(Debug, Clone)]
pub struct TwoWayTransformer {
    pub layers: Vec<TwoWayAttentionBlock>,
    pub final_attn_token_to_image: Attention,
    pub norm_final_attn: LayerNorm,
}

impl TwoWayTransformer {
    fn new(cfg: &SamConfig, vb: VarBuilder) -> Result<Self> {
        let layers = (0..cfg.decoder_depth)
            .map(|i| TwoWayAttentionBlock::new(cfg, i == 0, vb.pp(format!("layers.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let c = cfg.prompt_embed_dim;
        Ok(Self {
            layers,
            final_attn_token_to_image: Attention::new(
                c,
                cfg.decoder_num_heads,
                cfg.decoder_attn_downsample,
                vb.pp("final_attn_token_to_image"),
            )?,
            norm_final_attn: LayerNorm::new(c, TRANSFORMER_LN_EPS, vb.pp("norm_final_attn"))?,
        })
    }

    /// `image (B,C,h,w)`, `pe (1|B,C,h,w)`, `tokens (B,N,C)` → `(queries (B,N,C), keys (B,hw,C))`.
    pub fn forward(
        &self,
        image: &Tensor,
        pe: &Tensor,
        tokens: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let keys0 = image.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        let key_pe = pe.flatten_from(2)?.transpose(1, 2)?.contiguous()?;
        let mut queries = tokens.clone();
        let mut keys = keys0;
        for l in &self.layers {
            let (q, k) = l.forward(&queries, &keys, tokens, &key_pe)?;
            queries = q;
            keys = k;
        }
        let q = (&queries + tokens)?;
        let k = keys.broadcast_add(&key_pe)?;
        let a = self.final_attn_token_to_image.forward(&q, &k, &keys)?;
        let queries = self.norm_final_attn.forward(&(queries + a)?, Exec::Grad)?;
        Ok((queries, keys))
    }
}

/// `MLP` of segment-anything: `layers.{0..n-1}` linears with ReLU between them, no output activation.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub layers: Vec<Linear>,
}

impl Mlp {
    pub fn new(
        input: usize,
        hidden: usize,
        output: usize,
        num_layers: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut layers = Vec::with_capacity(num_layers);
        for i in 0..num_layers {
            let a = if i == 0 { input } else { hidden };
            let b = if i + 1 == num_layers { output } else { hidden };
            layers.push(Linear::new(a, b, true, vb.pp(format!("layers.{i}")))?);
        }
        Ok(Self { layers })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        let n = self.layers.len();
        for (i, l) in self.layers.iter().enumerate() {
            x = l.forward(&x)?;
            if i + 1 < n {
                x = crate::nn::relu(&x)?;
            }
        }
        Ok(x)
    }
}

/// Decoder outputs: low-resolution mask logits `(B,K,4g,4g)` and IoU predictions `(B,K)`.
#[derive(Debug, Clone)]
pub struct DecoderOutput {
    pub masks: Tensor,
    pub iou: Tensor,
}

/// The SAM mask decoder.
#[derive(Debug, Clone)]
pub struct MaskDecoder {
    pub transformer: TwoWayTransformer,
    pub iou_token: Tensor,
    pub mask_tokens: Tensor,
    pub up0: ConvTranspose2d,
    pub up1: LayerNorm2d,
    pub up3: ConvTranspose2d,
    pub hypernetworks: Vec<Mlp>,
    pub iou_head: Mlp,
    pub num_mask_tokens: usize,
}

impl MaskDecoder {
    /// `vb` points at `mask_decoder` (trainable builder).
    pub fn new(cfg: &SamConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.prompt_embed_dim;
        if !c.is_multiple_of(8) {
            return Err(Error::Config(format!(
                "sam.prompt_embed_dim must be a multiple of 8, got {c}"
            )));
        }
        let nmt = cfg.num_multimask_outputs + 1;
        let transformer = TwoWayTransformer::new(cfg, vb.pp("transformer"))?;
        let iou_token = embedding(1, c, vb.pp("iou_token"))?;
        let mask_tokens = embedding(nmt, c, vb.pp("mask_tokens"))?;
        let up0 = ConvTranspose2d::new(c, c / 4, 2, 2, vb.pp("output_upscaling.0"))?;
        let up1 = LayerNorm2d::new(c / 4, UPSCALE_LN_EPS, vb.pp("output_upscaling.1"))?;
        let up3 = ConvTranspose2d::new(c / 4, c / 8, 2, 2, vb.pp("output_upscaling.3"))?;
        let hypernetworks = (0..nmt)
            .map(|i| {
                Mlp::new(
                    c,
                    c,
                    c / 8,
                    3,
                    vb.pp(format!("output_hypernetworks_mlps.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let iou_head = Mlp::new(
            c,
            cfg.iou_head_hidden_dim,
            nmt,
            cfg.iou_head_depth,
            vb.pp("iou_prediction_head"),
        )?;
        Ok(Self {
            transformer,
            iou_token,
            mask_tokens,
            up0,
            up1,
            up3,
            hypernetworks,
            iou_head,
            num_mask_tokens: nmt,
        })
    }

    /// All masks and IoU predictions (`(B, 1+multimask, 4g, 4g)`, `(B, 1+multimask)`).
    pub fn predict_masks(
        &self,
        image_embeddings: &Tensor,
        image_pe: &Tensor,
        sparse: &Tensor,
        dense: &Tensor,
    ) -> Result<DecoderOutput> {
        let b = sparse.dim(0)?;
        let (be, c, h, w) = image_embeddings.dims4()?;
        if dense.dims() != [b, c, h, w] {
            return Err(Error::msg(format!(
                "dense prompt embeddings {:?} do not match (B={b}, {c}, {h}, {w})",
                dense.dims()
            )));
        }
        if be != b && be != 1 {
            return Err(Error::msg(format!(
                "image embeddings batch {be} must equal the prompt batch {b} (or be 1)"
            )));
        }
        let out_tokens = Tensor::cat(&[&self.iou_token, &self.mask_tokens], 0)?; // (5,C)
        let out_tokens = out_tokens
            .unsqueeze(0)?
            .broadcast_as((b, self.num_mask_tokens + 1, c))?;
        let tokens = Tensor::cat(&[&out_tokens.contiguous()?, sparse], 1)?;
        let src = dense.broadcast_add(image_embeddings)?;
        let (hs, src) = self.transformer.forward(&src, image_pe, &tokens)?;
        let iou_out = hs.i((.., 0, ..))?;
        let src = src.transpose(1, 2)?.contiguous()?.reshape((b, c, h, w))?;
        let up = self.up0.forward(&src)?;
        let up = gelu(&self.up1.forward(&up, Exec::Grad)?)?;
        let up = gelu(&self.up3.forward(&up)?)?; // (B, C/8, 4h, 4w)
        let (_, cu, hu, wu) = up.dims4()?;
        let hyper = (0..self.num_mask_tokens)
            .map(|i| self.hypernetworks[i].forward(&hs.i((.., 1 + i, ..))?))
            .collect::<Result<Vec<_>>>()?;
        let hyper = Tensor::stack(&hyper, 1)?; // (B, T, C/8)
        let masks = hyper.matmul(&up.reshape((b, cu, hu * wu))?)?.reshape((
            b,
            self.num_mask_tokens,
            hu,
            wu,
        ))?;
        let iou = self.iou_head.forward(&iou_out)?;
        Ok(DecoderOutput { masks, iou })
    }

    /// SAM's `forward`: `multimask = true` → tokens 1..; `false` → token 0 only.
    pub fn forward(
        &self,
        image_embeddings: &Tensor,
        image_pe: &Tensor,
        sparse: &Tensor,
        dense: &Tensor,
        multimask: bool,
    ) -> Result<DecoderOutput> {
        let o = self.predict_masks(image_embeddings, image_pe, sparse, dense)?;
        let (start, len) = if multimask {
            (1, self.num_mask_tokens - 1)
        } else {
            (0, 1)
        };
        Ok(DecoderOutput {
            masks: o.masks.narrow(1, start, len)?,
            iou: o.iou.narrow(1, start, len)?,
        })
    }
}
