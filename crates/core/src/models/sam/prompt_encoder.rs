//! SAM prompt encoder (SPEC §6.3): random Fourier positional encoding, point/box sparse tokens (batched,
//! differentiable w.r.t. coordinates), dense mask prompt via `mask_downscaling`, `no_mask_embed`.
use super::ops::{embedding, gelu, Conv2d, Exec, LayerNorm2d};
use crate::config::SamConfig;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder};

/// Epsilon of the mask-downscaling LayerNorm2d layers (SPEC §6.1).
pub const MASK_LN_EPS: f64 = 1e-6;

/// `PositionEmbeddingRandom`: `e(c) = [sin(2π(2c−1)G), cos(2π(2c−1)G)]` with the buffer `G (2, C/2)`.
#[derive(Debug, Clone)]
pub struct PositionEmbeddingRandom {
    /// `positional_encoding_gaussian_matrix` (a buffer: never trained).
    pub gaussian: Tensor,
}

impl PositionEmbeddingRandom {
    /// Reads (or initialises N(0,1)) `positional_encoding_gaussian_matrix (2, num_pos_feats)`; the result is detached.
    pub fn new(num_pos_feats: usize, vb: VarBuilder) -> Result<Self> {
        let g = vb.get_with_hints(
            (2, num_pos_feats),
            "positional_encoding_gaussian_matrix",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0,
            },
        )?;
        Ok(Self {
            gaussian: g.detach(),
        })
    }

    /// `coords (..., 2)` in `[0,1]` → `(..., C)`.
    pub fn pe_encoding(&self, coords: &Tensor) -> Result<Tensor> {
        let c = ((coords * 2.0)? - 1.0)?;
        let dims = c.dims().to_vec();
        let lead: usize = dims[..dims.len() - 1].iter().product();
        let p = c.reshape((lead, 2))?.matmul(&self.gaussian)?;
        let p = (p * (2.0 * std::f64::consts::PI))?;
        let e = Tensor::cat(&[p.sin()?, p.cos()?], 1)?;
        let mut out = dims;
        *out.last_mut().expect("rank>0") = e.dim(1)?;
        Ok(e.reshape(out)?)
    }

    /// Dense PE of an `h×w` grid at cell centres: `(C, h, w)`.
    pub fn grid(&self, h: usize, w: usize, device: &Device) -> Result<Tensor> {
        let mut v = Vec::with_capacity(h * w * 2);
        for i in 0..h {
            for j in 0..w {
                v.push((j as f32 + 0.5) / w as f32);
                v.push((i as f32 + 0.5) / h as f32);
            }
        }
        let c = Tensor::from_vec(v, (h, w, 2), device)?.to_dtype(self.gaussian.dtype())?;
        Ok(self.pe_encoding(&c)?.permute((2, 0, 1))?.contiguous()?)
    }
}

/// The SAM prompt encoder.
#[derive(Debug, Clone)]
pub struct PromptEncoder {
    pub pe_layer: PositionEmbeddingRandom,
    /// `point_embeddings.{0..3}.weight`, each `(1, C)`: negative point, positive point, box TL, box BR.
    pub point_embeddings: Vec<Tensor>,
    pub not_a_point_embed: Tensor,
    pub no_mask_embed: Tensor,
    pub md0: Conv2d,
    pub md1: LayerNorm2d,
    pub md3: Conv2d,
    pub md4: LayerNorm2d,
    pub md6: Conv2d,
    pub embed_dim: usize,
    pub grid: usize,
    pub input_size: usize,
    pub mask_input_size: usize,
}

impl PromptEncoder {
    /// `vb` points at `prompt_encoder` of the trainable builder; `vb_buffers` at `prompt_encoder` of the builder that
    /// holds the Fourier buffer `pe_layer.positional_encoding_gaussian_matrix` (the frozen one, so that the buffer
    /// never becomes an optimiser variable).
    pub fn new(cfg: &SamConfig, vb: VarBuilder, vb_buffers: VarBuilder) -> Result<Self> {
        let c = cfg.prompt_embed_dim;
        if !c.is_multiple_of(2) {
            return Err(Error::Config(format!(
                "sam.prompt_embed_dim must be even, got {c}"
            )));
        }
        let pe_layer = PositionEmbeddingRandom::new(c / 2, vb_buffers.pp("pe_layer"))?;
        let point_embeddings = (0..4)
            .map(|i| embedding(1, c, vb.pp(format!("point_embeddings.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let not_a_point_embed = embedding(1, c, vb.pp("not_a_point_embed"))?;
        let no_mask_embed = embedding(1, c, vb.pp("no_mask_embed"))?;
        let mic = cfg.mask_in_chans;
        let md = vb.pp("mask_downscaling");
        let md0 = Conv2d::new(1, mic / 4, 2, 2, 0, true, md.pp("0"))?;
        let md1 = LayerNorm2d::new(mic / 4, MASK_LN_EPS, md.pp("1"))?;
        let md3 = Conv2d::new(mic / 4, mic, 2, 2, 0, true, md.pp("3"))?;
        let md4 = LayerNorm2d::new(mic, MASK_LN_EPS, md.pp("4"))?;
        let md6 = Conv2d::new(mic, c, 1, 1, 0, true, md.pp("6"))?;
        // The buffer may come from a builder of another dtype (e.g. a bf16 frozen encoder): use the prompt dtype.
        let pe_layer = PositionEmbeddingRandom {
            gaussian: pe_layer.gaussian.to_dtype(no_mask_embed.dtype())?,
        };
        Ok(Self {
            pe_layer,
            point_embeddings,
            not_a_point_embed,
            no_mask_embed,
            md0,
            md1,
            md3,
            md4,
            md6,
            embed_dim: c,
            grid: cfg.embed_grid(),
            input_size: cfg.img_size,
            mask_input_size: cfg.mask_input_size(),
        })
    }

    /// `get_dense_pe()`: `(1, C, g, g)`.
    pub fn get_dense_pe(&self) -> Result<Tensor> {
        Ok(self
            .pe_layer
            .grid(self.grid, self.grid, self.pe_layer.gaussian.device())?
            .unsqueeze(0)?)
    }

    fn embed_coords(&self, pts: &Tensor) -> Result<Tensor> {
        // pts already shifted by +0.5; normalise x by the input width and y by the height.
        let s = self.input_size as f64;
        self.pe_layer.pe_encoding(&(pts / s)?)
    }

    /// Points `(B,N,2)` (index coordinates) with labels `(B,N)` (1 positive, 0 negative, −1 padding) → `(B,N',C)`.
    /// `pad` appends the `(0,0)` padding point with label −1.
    pub fn embed_points(&self, points: &Tensor, labels: &Tensor, pad: bool) -> Result<Tensor> {
        let (b, n, two) = points.dims3()?;
        if two != 2 || labels.dims() != [b, n] {
            return Err(Error::msg(format!(
                "points must be (B,N,2) with labels (B,N), got {:?} and {:?}",
                points.dims(),
                labels.dims()
            )));
        }
        let dt = points.dtype();
        let mut pts = (points + 0.5)?;
        let mut labels = labels.to_dtype(dt)?.detach();
        if pad {
            let z = Tensor::zeros((b, 1, 2), dt, points.device())?;
            pts = Tensor::cat(&[&pts, &z], 1)?;
            let l = (Tensor::ones((b, 1), dt, points.device())? * -1.0)?;
            labels = Tensor::cat(&[&labels, &l], 1)?;
        }
        let pe = self.embed_coords(&pts)?; // (B,N',C)
        let m_pad = labels.eq(-1.0)?.to_dtype(dt)?.unsqueeze(2)?;
        let m_neg = labels.eq(0.0)?.to_dtype(dt)?.unsqueeze(2)?;
        let m_pos = labels.eq(1.0)?.to_dtype(dt)?.unsqueeze(2)?;
        let keep = (1.0 - &m_pad)?;
        let e = pe.broadcast_mul(&keep)?;
        let e = e.broadcast_add(&m_pad.broadcast_mul(&self.not_a_point_embed.unsqueeze(0)?)?)?;
        let e = e.broadcast_add(&m_neg.broadcast_mul(&self.point_embeddings[0].unsqueeze(0)?)?)?;
        let e = e.broadcast_add(&m_pos.broadcast_mul(&self.point_embeddings[1].unsqueeze(0)?)?)?;
        Ok(e)
    }

    /// Boxes `(B,4) = [x1,y1,x2,y2]` → corner tokens `(B,2,C)` (stacked, SPEC §6.3).
    pub fn embed_boxes(&self, boxes: &Tensor) -> Result<Tensor> {
        let (b, four) = boxes.dims2()?;
        if four != 4 {
            return Err(Error::msg(format!(
                "boxes must be (B,4), got {:?}",
                boxes.dims()
            )));
        }
        let corners = (boxes + 0.5)?.reshape((b, 2, 2))?;
        let pe = self.embed_coords(&corners)?; // (B,2,C)
        let add = Tensor::cat(&[&self.point_embeddings[2], &self.point_embeddings[3]], 0)?
            .unsqueeze(0)?; // (1,2,C)
        Ok(pe.broadcast_add(&add)?)
    }

    /// `mask_downscaling`: `(B,1,M,M)` logits → `(B,C,g,g)`.
    pub fn embed_masks(&self, masks: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) = masks.dims4()?;
        if c != 1 || h != self.mask_input_size || w != self.mask_input_size {
            return Err(Error::msg(format!(
                "mask prompt must be (B,1,{m},{m}), got {:?}",
                masks.dims(),
                m = self.mask_input_size
            )));
        }
        let x = self.md0.forward(masks)?;
        let x = gelu(&self.md1.forward(&x, Exec::Grad)?)?;
        let x = self.md3.forward(&x)?;
        let x = gelu(&self.md4.forward(&x, Exec::Grad)?)?;
        self.md6.forward(&x)
    }

    /// Full prompt encoding: returns `(sparse (B,N,C), dense (B,C,g,g))`. At least one prompt must fix the batch size
    /// (or pass `batch` explicitly via [`PromptEncoder::forward_batch`]).
    pub fn forward(
        &self,
        points: Option<(&Tensor, &Tensor)>,
        boxes: Option<&Tensor>,
        masks: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let b = if let Some((p, _)) = points {
            p.dim(0)?
        } else if let Some(bx) = boxes {
            bx.dim(0)?
        } else if let Some(m) = masks {
            m.dim(0)?
        } else {
            1
        };
        self.forward_batch(b, points, boxes, masks)
    }

    /// As [`PromptEncoder::forward`] with an explicit batch size (used when no prompt is given).
    pub fn forward_batch(
        &self,
        b: usize,
        points: Option<(&Tensor, &Tensor)>,
        boxes: Option<&Tensor>,
        masks: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let dev = self.no_mask_embed.device();
        let dt = self.no_mask_embed.dtype();
        let mut parts = Vec::new();
        if let Some((p, l)) = points {
            parts.push(self.embed_points(p, l, boxes.is_none())?);
        }
        if let Some(bx) = boxes {
            parts.push(self.embed_boxes(bx)?);
        }
        for p in &parts {
            if p.dim(0)? != b {
                return Err(Error::msg(format!(
                    "prompt batch sizes differ: {} vs {b}",
                    p.dim(0)?
                )));
            }
        }
        let sparse = if parts.is_empty() {
            Tensor::zeros((b, 0, self.embed_dim), dt, dev)?
        } else {
            Tensor::cat(&parts, 1)?
        };
        let dense = match masks {
            Some(m) => {
                if m.dim(0)? != b {
                    return Err(Error::msg(format!(
                        "mask prompt batch {} differs from {b}",
                        m.dim(0)?
                    )));
                }
                self.embed_masks(m)?
            }
            None => self
                .no_mask_embed
                .reshape((1, self.embed_dim, 1, 1))?
                .broadcast_as((b, self.embed_dim, self.grid, self.grid))?,
        };
        Ok((sparse, dense))
    }

    /// dtype of the parameters.
    pub fn dtype(&self) -> DType {
        self.no_mask_embed.dtype()
    }
}
