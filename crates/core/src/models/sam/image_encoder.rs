//! SAM ViT image encoder (SPEC §6.2) with two execution paths from one definition (SPEC §6.9, §16.3):
//! [`ImageEncoder::forward_frozen`] (plain tensors, fused kernels, detached output) and
//! [`ImageEncoder::forward_trainable`] (differentiable ops; used with LoRA).
use super::lora::{LoraConfig, LoraLinear, LoraTarget};
use super::ops::{gelu, Conv2d, Exec, LayerNorm, LayerNorm2d};
use crate::config::SamConfig;
use crate::{Error, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{Init, VarBuilder};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Image-encoder LayerNorm and LayerNorm2d epsilon (SPEC §6.1).
pub const ENCODER_LN_EPS: f64 = 1e-6;

/// One-dimensional linear resampling of a relative-position table along its first axis to `n_out` rows with the
/// SPEC §0 `bilinear(ac=false)` rule (scale rounded to f32, positions in f32), as an `(n_out, n_in)` matrix.
pub fn linear_resample_matrix(n_in: usize, n_out: usize, device: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; n_out * n_in];
    let r = n_in as f32 / n_out as f32;
    for o in 0..n_out {
        let s = (r * (o as f32 + 0.5) - 0.5).max(0.0);
        let i0 = (s.floor() as usize).min(n_in - 1);
        let i1 = (i0 + 1).min(n_in - 1);
        let lam = s - i0 as f32;
        m[o * n_in + i0] += 1.0 - lam;
        m[o * n_in + i1] += lam;
    }
    Ok(Tensor::from_vec(m, (n_out, n_in), device)?)
}

/// `get_rel_pos` of segment-anything: relative-position embeddings `(q_size, k_size, C)` for a query/key axis,
/// resampling the table linearly when its length differs from `2·max(q,k) − 1`.
pub fn get_rel_pos(q_size: usize, k_size: usize, rel_pos: &Tensor) -> Result<Tensor> {
    let max_rel_dist = 2 * q_size.max(k_size) - 1;
    let (len, c) = rel_pos.dims2()?;
    let table = if len != max_rel_dist {
        let m = linear_resample_matrix(len, max_rel_dist, rel_pos.device())?
            .to_dtype(rel_pos.dtype())?;
        m.matmul(rel_pos)?
    } else {
        rel_pos.clone()
    };
    let qs = (k_size as f64 / q_size as f64).max(1.0);
    let ks = (q_size as f64 / k_size as f64).max(1.0);
    let mut idx = Vec::with_capacity(q_size * k_size);
    for i in 0..q_size {
        for j in 0..k_size {
            let v = i as f64 * qs - j as f64 * ks + (k_size as f64 - 1.0) * ks;
            idx.push(v as u32);
        }
    }
    let idx = Tensor::from_vec(idx, q_size * k_size, rel_pos.device())?;
    Ok(table.index_select(&idx, 0)?.reshape((q_size, k_size, c))?)
}

/// `(h·w, h + w + pad)` one-hot rows: key `(kh, kw)` (row `kh·w + kw`) has a 1 in column `kh` and in column
/// `h + kw`; the last `pad` columns are zero.
fn key_position_selectors(
    h: usize,
    w: usize,
    pad: usize,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let kh: Vec<u32> = (0..h * w).map(|j| (j / w) as u32).collect();
    let kw: Vec<u32> = (0..h * w).map(|j| (h + j % w) as u32).collect();
    let col = Tensor::arange(0u32, (h + w + pad) as u32, device)?.unsqueeze(0)?;
    let kh = Tensor::from_vec(kh, (h * w, 1), device)?;
    let kw = Tensor::from_vec(kw, (h * w, 1), device)?;
    let sel = (col.broadcast_eq(&kh)?.to_dtype(DType::F32)?
        + col.broadcast_eq(&kw)?.to_dtype(DType::F32)?)?;
    Ok(sel.to_dtype(dtype)?)
}

/// Multi-head attention with decomposed relative positions (SPEC §6.2 item 4).
#[derive(Debug, Clone)]
pub struct EncoderAttention {
    pub qkv: LoraLinear,
    pub proj: LoraLinear,
    pub rel_pos_h: Tensor,
    pub rel_pos_w: Tensor,
    pub num_heads: usize,
}

impl EncoderAttention {
    fn new(
        dim: usize,
        num_heads: usize,
        input_size: usize,
        vb: VarBuilder,
        lora: Option<(&LoraConfig, VarBuilder)>,
    ) -> Result<Self> {
        let head_dim = dim / num_heads;
        let lq = lora
            .as_ref()
            .filter(|(c, _)| c.has(LoraTarget::Qkv))
            .map(|(c, v)| (*c, v.pp("qkv")));
        let lp = lora
            .as_ref()
            .filter(|(c, _)| c.has(LoraTarget::Proj))
            .map(|(c, v)| (*c, v.pp("proj")));
        let qkv = LoraLinear::new(dim, 3 * dim, true, vb.pp("qkv"), lq)?;
        let proj = LoraLinear::new(dim, dim, true, vb.pp("proj"), lp)?;
        let n = 2 * input_size - 1;
        let rel_pos_h = vb.get_with_hints((n, head_dim), "rel_pos_h", Init::Const(0.0))?;
        let rel_pos_w = vb.get_with_hints((n, head_dim), "rel_pos_w", Init::Const(0.0))?;
        Ok(Self {
            qkv,
            proj,
            rel_pos_h,
            rel_pos_w,
            num_heads,
        })
    }

    /// `x (B,H,W,C)` → `(B,H,W,C)`.
    fn forward(&self, x: &Tensor, exec: Exec, seeds: Option<(u64, u64)>) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let nh = self.num_heads;
        let hd = c / nh;
        let bh = b * nh;
        let qkv = self.qkv.forward(x, seeds.map(|s| s.0))?; // (B,H,W,3C)
        let qkv = qkv
            .reshape((b, h * w, 3, nh, hd))?
            .permute((2, 0, 3, 1, 4))?
            .reshape((3, bh, h * w, hd))?;
        let q = qkv.i(0)?.contiguous()?;
        let k = qkv.i(1)?.contiguous()?;
        let v = qkv.i(2)?.contiguous()?;
        let scale = (hd as f64).powf(-0.5);

        // Decomposed relative positions with the unscaled q: rel_h[q, kh] = q·Rh[qh, kh], rel_w[q, kw] = q·Rw[qw, kw].
        let rh = get_rel_pos(h, h, &self.rel_pos_h)?.to_dtype(q.dtype())?; // (h, h, hd)
        let rw = get_rel_pos(w, w, &self.rel_pos_w)?.to_dtype(q.dtype())?; // (w, w, hd)
        let r_q = q.reshape((bh, h, w, hd))?;
        let rel_h = r_q
            .permute((1, 0, 2, 3))?
            .contiguous()?
            .reshape((h, bh * w, hd))?
            .matmul(&rh.transpose(1, 2)?.contiguous()?)?
            .reshape((h, bh, w, h))?
            .permute((1, 0, 2, 3))?
            .contiguous()?
            .reshape((bh, h * w, h))?; // (bh, hw, kh)
        let rel_w = r_q
            .permute((2, 0, 1, 3))?
            .contiguous()?
            .reshape((w, bh * h, hd))?
            .matmul(&rw.transpose(1, 2)?.contiguous()?)?
            .reshape((w, bh, h, w))?
            .permute((1, 2, 0, 3))?
            .contiguous()?
            .reshape((bh, h * w, w))?; // (bh, hw, kw)
                                       // attn[q, (kh,kw)] = scale·q·k + rel_h[q, kh] + rel_w[q, kw] as ONE product of augmented operands:
                                       // [scale·q | rel_h | rel_w] · [k | onehot(kh) | onehot(kw)]ᵀ. Adding the two bias terms to the (hw × hw)
                                       // scores by broadcasting instead costs two strided passes over the largest tensor of the model: 73% of the
                                       // bf16 encoder's GPU time at 1024² (ncu, H200), against a 3× wider but tensor-core matmul here.
                                       // Zero columns pad the contraction to a multiple of 8 (aligned tensor-core tiles; 92 → 96 for 14² windows).
        let pad = (8 - (hd + h + w) % 8) % 8;
        let mut q_parts = vec![(&q * scale)?, rel_h, rel_w];
        if pad > 0 {
            q_parts.push(Tensor::zeros((bh, h * w, pad), q.dtype(), q.device())?);
        }
        let q_aug = Tensor::cat(&q_parts, 2)?; // (bh, hw, hd+h+w+pad)
        let sel = key_position_selectors(h, w, pad, q.dtype(), q.device())?; // (hw, h+w+pad)
        let sel = sel
            .unsqueeze(0)?
            .broadcast_as((bh, h * w, h + w + pad))?
            .contiguous()?;
        let k_aug = Tensor::cat(&[&k, &sel], 2)?;
        let attn = q_aug.matmul(&k_aug.t()?)?; // (bh, hw, hw)
        let attn = super::ops::softmax_last(&attn, exec)?;
        let out = attn.matmul(&v)?; // (bh, hw, hd)
        let out = out
            .reshape((b, nh, h, w, hd))?
            .permute((0, 2, 3, 1, 4))?
            .contiguous()?
            .reshape((b, h, w, c))?;
        self.proj.forward(&out, seeds.map(|s| s.1))
    }
}

/// ViT block with optional window attention.
#[derive(Debug, Clone)]
pub struct EncoderBlock {
    pub norm1: LayerNorm,
    pub attn: EncoderAttention,
    pub norm2: LayerNorm,
    pub lin1: LoraLinear,
    pub lin2: LoraLinear,
    /// 0 = global attention.
    pub window_size: usize,
}

/// Zero-pads `(B,H,W,C)` at the bottom/right to multiples of `ws` and partitions into `(B·nw, ws, ws, C)` windows.
pub fn window_partition(x: &Tensor, ws: usize) -> Result<(Tensor, (usize, usize))> {
    let (b, h, w, c) = x.dims4()?;
    let ph = (ws - h % ws) % ws;
    let pw = (ws - w % ws) % ws;
    let x = if ph > 0 {
        x.pad_with_zeros(1, 0, ph)?
    } else {
        x.clone()
    };
    let x = if pw > 0 {
        x.pad_with_zeros(2, 0, pw)?
    } else {
        x
    };
    let (hp, wp) = (h + ph, w + pw);
    let win = x
        .reshape((b, hp / ws, ws, wp / ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((b * (hp / ws) * (wp / ws), ws, ws, c))?;
    Ok((win, (hp, wp)))
}

/// Inverse of [`window_partition`], cropping back to `(h, w)`.
pub fn window_unpartition(
    win: &Tensor,
    ws: usize,
    pad_hw: (usize, usize),
    hw: (usize, usize),
) -> Result<Tensor> {
    let (hp, wp) = pad_hw;
    let (h, w) = hw;
    let nw = (hp / ws) * (wp / ws);
    let (bn, _, _, c) = win.dims4()?;
    let b = bn / nw;
    let x = win
        .reshape((b, hp / ws, wp / ws, ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((b, hp, wp, c))?;
    let x = if hp > h || wp > w {
        x.narrow(1, 0, h)?.narrow(2, 0, w)?.contiguous()?
    } else {
        x
    };
    Ok(x)
}

impl EncoderBlock {
    fn new(
        cfg: &SamConfig,
        idx: usize,
        vb: VarBuilder,
        lora: Option<(&LoraConfig, VarBuilder)>,
    ) -> Result<Self> {
        let dim = cfg.encoder_embed_dim;
        let global = cfg.encoder_global_attn_indexes.contains(&idx);
        let window_size = if global { 0 } else { cfg.encoder_window_size };
        let input_size = if global {
            cfg.embed_grid()
        } else {
            cfg.encoder_window_size
        };
        let norm1 = LayerNorm::new(dim, ENCODER_LN_EPS, vb.pp("norm1"))?;
        let attn = EncoderAttention::new(
            dim,
            cfg.encoder_num_heads,
            input_size,
            vb.pp("attn"),
            lora.as_ref().map(|(c, v)| (*c, v.pp("attn"))),
        )?;
        let norm2 = LayerNorm::new(dim, ENCODER_LN_EPS, vb.pp("norm2"))?;
        let mlp_dim = cfg.encoder_mlp_dim();
        let lm = lora.as_ref().filter(|(c, _)| c.has(LoraTarget::Mlp));
        let lin1 = LoraLinear::new(
            dim,
            mlp_dim,
            true,
            vb.pp("mlp.lin1"),
            lm.map(|(c, v)| (*c, v.pp("mlp.lin1"))),
        )?;
        let lin2 = LoraLinear::new(
            mlp_dim,
            dim,
            true,
            vb.pp("mlp.lin2"),
            lm.map(|(c, v)| (*c, v.pp("mlp.lin2"))),
        )?;
        Ok(Self {
            norm1,
            attn,
            norm2,
            lin1,
            lin2,
            window_size,
        })
    }

    fn forward(&self, x: &Tensor, exec: Exec, seed: Option<(u64, usize)>) -> Result<Tensor> {
        let s = |k: u64| seed.map(|(s, i)| crate::rng::mix(s, "lora-dropout", &[i as u64, k]));
        let shortcut = x;
        let y = self.norm1.forward(x, exec)?;
        let (_, h, w, _) = y.dims4()?;
        let y = if self.window_size > 0 {
            let (win, pad) = window_partition(&y, self.window_size)?;
            let a = self.attn.forward(&win, exec, s(0).zip(s(1)))?;
            window_unpartition(&a, self.window_size, pad, (h, w))?
        } else {
            self.attn.forward(&y, exec, s(0).zip(s(1)))?
        };
        let x = (shortcut + y)?;
        let m = self.norm2.forward(&x, exec)?;
        let m = self.lin1.forward(&m, s(2))?;
        let m = self.lin2.forward(&gelu(&m)?, s(3))?;
        Ok((x + m)?)
    }
}

/// The SAM image encoder. Weights are whatever the frozen builder holds (plain tensors); LoRA adapters, when present,
/// come from the trainable builder.
#[derive(Debug, Clone)]
pub struct ImageEncoder {
    pub patch_embed: Conv2d,
    pub pos_embed: Tensor,
    pub blocks: Vec<EncoderBlock>,
    pub neck0: Conv2d,
    pub neck1: LayerNorm2d,
    pub neck2: Conv2d,
    pub neck3: LayerNorm2d,
    pub img_size: usize,
    forwards: Arc<AtomicUsize>,
}

impl ImageEncoder {
    /// `vb` points at `image_encoder` of the frozen (plain-tensor) builder; `lora` gives the LoRA configuration and a
    /// builder at `image_encoder` of the trainable `VarMap`.
    pub fn new(
        cfg: &SamConfig,
        vb: VarBuilder,
        lora: Option<(&LoraConfig, VarBuilder)>,
    ) -> Result<Self> {
        if let Some((l, _)) = &lora {
            l.validate()?;
        }
        let dim = cfg.encoder_embed_dim;
        if !dim.is_multiple_of(cfg.encoder_num_heads) {
            return Err(Error::Config(format!(
                "sam.encoder_embed_dim {dim} is not divisible by encoder_num_heads {}",
                cfg.encoder_num_heads
            )));
        }
        let g = cfg.embed_grid();
        let patch_embed = Conv2d::new(
            3,
            dim,
            cfg.patch_size,
            cfg.patch_size,
            0,
            true,
            vb.pp("patch_embed.proj"),
        )?;
        let pos_embed = vb.get_with_hints((1, g, g, dim), "pos_embed", Init::Const(0.0))?;
        let mut blocks = Vec::with_capacity(cfg.encoder_depth);
        for i in 0..cfg.encoder_depth {
            let lb = lora
                .as_ref()
                .map(|(c, v)| (*c, v.pp(format!("blocks.{i}"))));
            blocks.push(EncoderBlock::new(cfg, i, vb.pp(format!("blocks.{i}")), lb)?);
        }
        let out = cfg.prompt_embed_dim;
        let neck0 = Conv2d::new(dim, out, 1, 1, 0, false, vb.pp("neck.0"))?;
        let neck1 = LayerNorm2d::new(out, ENCODER_LN_EPS, vb.pp("neck.1"))?;
        let neck2 = Conv2d::new(out, out, 3, 1, 1, false, vb.pp("neck.2"))?;
        let neck3 = LayerNorm2d::new(out, ENCODER_LN_EPS, vb.pp("neck.3"))?;
        let mut enc = Self {
            patch_embed,
            pos_embed,
            blocks,
            neck0,
            neck1,
            neck2,
            neck3,
            img_size: cfg.img_size,
            forwards: Arc::new(AtomicUsize::new(0)),
        };
        enc.detach_frozen();
        Ok(enc)
    }

    /// Makes every frozen weight a plain tensor (SPEC §16.3: the encoder is never built over `Var`s, even if the
    /// builder handed some out); LoRA adapters are left untouched.
    fn detach_frozen(&mut self) {
        let d = |t: &mut Tensor| *t = t.detach();
        d(&mut self.patch_embed.weight);
        if let Some(b) = self.patch_embed.bias.as_mut() {
            d(b);
        }
        d(&mut self.pos_embed);
        for b in self.blocks.iter_mut() {
            for ln in [&mut b.norm1, &mut b.norm2] {
                d(&mut ln.weight);
                d(&mut ln.bias);
            }
            d(&mut b.attn.rel_pos_h);
            d(&mut b.attn.rel_pos_w);
            for l in [&mut b.attn.qkv, &mut b.attn.proj, &mut b.lin1, &mut b.lin2] {
                d(&mut l.base.weight);
                if let Some(bb) = l.base.bias.as_mut() {
                    d(bb);
                }
            }
        }
        d(&mut self.neck0.weight);
        d(&mut self.neck2.weight);
        for ln in [&mut self.neck1, &mut self.neck3] {
            d(&mut ln.weight);
            d(&mut ln.bias);
        }
    }

    /// dtype of the weights (f32, or bf16 for the `--encoder-dtype bf16` frozen path).
    pub fn dtype(&self) -> DType {
        self.patch_embed.weight.dtype()
    }

    /// Number of images encoded so far by this encoder (and its clones); the embedding cache test counts with it.
    pub fn forward_count(&self) -> usize {
        self.forwards.load(Ordering::Relaxed)
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        let (_, c, h, w) = x.dims4()?;
        if c != 3 || h != self.img_size || w != self.img_size {
            return Err(Error::msg(format!(
                "image encoder expects (B,3,{s},{s}) normalised images, got {:?}",
                x.dims(),
                s = self.img_size
            )));
        }
        Ok(())
    }

    fn forward_impl(&self, x: &Tensor, exec: Exec, seed: Option<u64>) -> Result<Tensor> {
        self.check_input(x)?;
        self.forwards.fetch_add(x.dim(0)?, Ordering::Relaxed);
        let x = self.patch_embed.forward(x)?.permute((0, 2, 3, 1))?; // (B,g,g,C)
        let mut x = x.broadcast_add(&self.pos_embed)?;
        for (i, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(&x, exec, seed.map(|s| (s, i)))?;
        }
        let x = x.permute((0, 3, 1, 2))?.contiguous()?;
        let x = self.neck0.forward(&x)?;
        let x = self.neck1.forward(&x, exec)?;
        let x = self.neck2.forward(&x)?;
        self.neck3.forward(&x, exec)
    }

    /// Frozen, no-grad path (the default): the input is detached and cast to the weight dtype, fused inference kernels
    /// are used, and the `(B, out, g, g)` output is detached and cast to f32.
    pub fn forward_frozen(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.detach().to_dtype(self.dtype())?;
        let y = self.forward_impl(&x, Exec::Fast, None)?;
        Ok(y.detach().to_dtype(DType::F32)?)
    }

    /// Differentiable path (used with LoRA): only differentiable ops; gradients reach the LoRA `Var`s.
    /// `dropout_seed`: `Some(seed)` enables LoRA dropout with the project RNG (training), `None` = evaluation.
    pub fn forward_trainable(&self, x: &Tensor, dropout_seed: Option<u64>) -> Result<Tensor> {
        let x = x.detach().to_dtype(self.dtype())?;
        let y = self.forward_impl(&x, Exec::Grad, dropout_seed)?;
        Ok(y.to_dtype(DType::F32)?)
    }

    /// Whether any block carries LoRA adapters.
    pub fn has_lora(&self) -> bool {
        self.blocks.iter().any(|b| {
            b.attn.qkv.lora.is_some()
                || b.attn.proj.lora.is_some()
                || b.lin1.lora.is_some()
                || b.lin2.lora.is_some()
        })
    }

    /// Folds every LoRA adapter into its frozen weight (`W' = W + (α/r)·B·A`, SPEC §6.8).
    pub fn merge_lora(&mut self) -> Result<()> {
        for b in self.blocks.iter_mut() {
            b.attn.qkv.merge()?;
            b.attn.proj.merge()?;
            b.lin1.merge()?;
            b.lin2.merge()?;
        }
        Ok(())
    }

    /// All encoder tensors under their §6.5 names (without the `image_encoder.` prefix), LoRA adapters excluded.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![
            ("pos_embed".to_string(), self.pos_embed.clone()),
            (
                "patch_embed.proj.weight".into(),
                self.patch_embed.weight.clone(),
            ),
        ];
        if let Some(b) = &self.patch_embed.bias {
            v.push(("patch_embed.proj.bias".into(), b.clone()));
        }
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("blocks.{i}");
            v.push((format!("{p}.norm1.weight"), b.norm1.weight.clone()));
            v.push((format!("{p}.norm1.bias"), b.norm1.bias.clone()));
            v.push((format!("{p}.attn.rel_pos_h"), b.attn.rel_pos_h.clone()));
            v.push((format!("{p}.attn.rel_pos_w"), b.attn.rel_pos_w.clone()));
            for (n, l) in [
                ("attn.qkv", &b.attn.qkv),
                ("attn.proj", &b.attn.proj),
                ("mlp.lin1", &b.lin1),
                ("mlp.lin2", &b.lin2),
            ] {
                v.push((format!("{p}.{n}.weight"), l.base.weight.clone()));
                if let Some(bb) = &l.base.bias {
                    v.push((format!("{p}.{n}.bias"), bb.clone()));
                }
            }
            v.push((format!("{p}.norm2.weight"), b.norm2.weight.clone()));
            v.push((format!("{p}.norm2.bias"), b.norm2.bias.clone()));
        }
        v.push(("neck.0.weight".into(), self.neck0.weight.clone()));
        v.push(("neck.1.weight".into(), self.neck1.weight.clone()));
        v.push(("neck.1.bias".into(), self.neck1.bias.clone()));
        v.push(("neck.2.weight".into(), self.neck2.weight.clone()));
        v.push(("neck.3.weight".into(), self.neck3.weight.clone()));
        v.push(("neck.3.bias".into(), self.neck3.bias.clone()));
        v
    }

    /// BLAKE3 fingerprint of all encoder tensors in sorted key order (SPEC §6.9): for each tensor, the key, the
    /// dtype, the shape and the raw little-endian bytes of its f32 values.
    pub fn fingerprint(&self) -> Result<String> {
        let mut named = self.named_tensors();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let mut h = blake3::Hasher::new();
        for (k, t) in named {
            h.update(k.as_bytes());
            h.update(format!("{:?}", t.dims()).as_bytes());
            let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            for x in v {
                h.update(&x.to_le_bytes());
            }
        }
        Ok(h.finalize().to_hex().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rel_pos_resampling_follows_the_bilinear_rule() {
        let dev = Device::Cpu;
        // 3 → 5 rows: scale 0.6, s = 0.6(o+0.5) − 0.5 clamped at 0 → [0, 0.4, 1.0, 1.6, 2.2→2].
        let t = Tensor::new(&[[0f32], [1.], [2.]], &dev).unwrap();
        let m = linear_resample_matrix(3, 5, &dev).unwrap();
        let r: Vec<f32> = m
            .matmul(&t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let want = [0.0, 0.4, 1.0, 1.6, 2.0];
        for (a, b) in r.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{r:?}");
        }
        // get_rel_pos(3,3) needs 5 rows; R[i][j] = table[i − j + 2].
        let rp = get_rel_pos(3, 3, &t).unwrap();
        assert_eq!(rp.dims(), &[3, 3, 1]);
        let v: Vec<f32> = rp.flatten_all().unwrap().to_vec1().unwrap();
        let exp: Vec<f32> = (0..3)
            .flat_map(|i| (0..3).map(move |j| want[i + 2 - j]))
            .collect();
        assert!(
            v.iter().zip(&exp).all(|(a, b)| (a - b).abs() < 1e-6),
            "{v:?} vs {exp:?}"
        );
        // Exact length: plain lookup, no resampling.
        let t5 = Tensor::new(&[[0f32], [1.], [2.], [3.], [4.]], &dev).unwrap();
        let v: Vec<f32> = get_rel_pos(3, 3, &t5)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(v, vec![2., 1., 0., 3., 2., 1., 4., 3., 2.]);
    }

    #[test]
    fn window_partition_pads_with_zeros_and_round_trips() {
        let dev = Device::Cpu;
        let x = Tensor::arange(1f32, (2 * 5 * 5 * 3 + 1) as f32, &dev)
            .unwrap()
            .reshape((2, 5, 5, 3))
            .unwrap();
        let (win, pad) = window_partition(&x, 3).unwrap();
        assert_eq!(pad, (6, 6));
        assert_eq!(win.dims(), &[8, 3, 3, 3]);
        // The last window of each image holds padded zeros in its last row/column.
        let last: Vec<f32> = win
            .get(3)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(last.iter().filter(|v| **v == 0.0).count(), 5 * 3);
        let back = window_unpartition(&win, 3, pad, (5, 5)).unwrap();
        let d = (back - &x)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(d, 0.0);
    }
}
