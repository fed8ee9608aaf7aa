//! DecoderCup and segmentation head (SPEC §5.2).
//!
//! Keys: `decoder.conv_more.{0,1}.*`, `decoder.blocks.{i}.conv{1,2}.{0,1}.*` (index 0 = Conv3×3 without bias,
//! index 1 = BatchNorm2d with `running_mean`, `running_var`, `num_batches_tracked`), `segmentation_head.0.{weight,bias}`.
use super::layers::conv2d;
use crate::config::TransUnetConfig;
use crate::nn::{self, BatchNorm2d};
use crate::{Error, Result};
use candle_core::Tensor;
use candle_nn::{Conv2d, VarBuilder};

pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

/// `Conv3×3(pad 1, no bias) → BatchNorm2d → ReLU` ("Conv2dReLU" with batch norm; a Sequential in the original).
#[derive(Debug)]
pub struct Conv2dReLU {
    conv: Conv2d,
    bn: BatchNorm2d,
    prefix: String,
}

impl Conv2dReLU {
    pub fn new(cin: usize, cout: usize, vb: VarBuilder) -> Result<Self> {
        let conv = conv2d(cin, cout, 3, 1, 1, false, vb.pp("0"))?;
        let bn = BatchNorm2d::new(cout, BN_EPS, BN_MOMENTUM, vb.pp("1"))?;
        Ok(Self {
            conv,
            bn,
            prefix: vb.pp("1").prefix(),
        })
    }

    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let y = nn::conv2d_layer(&self.conv, x)?;
        self.bn.forward_relu_t(&y, train)
    }

    /// The BatchNorm module and its full key prefix (e.g. `decoder.conv_more.1`).
    pub fn bn(&self) -> (&str, &BatchNorm2d) {
        (&self.prefix, &self.bn)
    }
}

/// `×2 bilinear(ac=true) → [concat skip after x] → Conv2dReLU → Conv2dReLU`.
#[derive(Debug)]
pub struct DecoderBlock {
    conv1: Conv2dReLU,
    conv2: Conv2dReLU,
    skip_channels: usize,
}

impl DecoderBlock {
    pub fn new(cin: usize, cout: usize, skip_channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv1: Conv2dReLU::new(cin + skip_channels, cout, vb.pp("conv1"))?,
            conv2: Conv2dReLU::new(cout, cout, vb.pp("conv2"))?,
            skip_channels,
        })
    }

    pub fn forward_t(&self, x: &Tensor, skip: Option<&Tensor>, train: bool) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut x = nn::resize_bilinear(x, 2 * h, 2 * w, true)?;
        if let Some(s) = skip {
            if s.dim(1)? != self.skip_channels || s.dim(2)? != 2 * h || s.dim(3)? != 2 * w {
                return Err(Error::msg(format!(
                    "TransUNet decoder: skip feature {:?} does not fit the upsampled map {:?} ({} skip channels)",
                    s.dims(),
                    x.dims(),
                    self.skip_channels
                )));
            }
            x = Tensor::cat(&[&x, s], 1)?;
        }
        let x = self.conv1.forward_t(&x, train)?;
        self.conv2.forward_t(&x, train)
    }
}

/// DecoderCup: `(B, g², D)` → `(B, D, g, g)` → conv_more → 4 decoder blocks.
#[derive(Debug)]
pub struct DecoderCup {
    conv_more: Conv2dReLU,
    blocks: Vec<DecoderBlock>,
    n_skip: usize,
}

impl DecoderCup {
    /// `vb` points at `decoder`.
    pub fn new(cfg: &TransUnetConfig, vb: VarBuilder) -> Result<Self> {
        let head = cfg.decoder_head_channels;
        let conv_more = Conv2dReLU::new(cfg.hidden_size, head, vb.pp("conv_more"))?;
        let dc = cfg.decoder_channels;
        let skips = cfg.skip_channels();
        let bvb = vb.pp("blocks");
        let mut blocks = Vec::with_capacity(4);
        let mut cin = head;
        for (i, (&cout, &skip)) in dc.iter().zip(skips.iter()).enumerate() {
            blocks.push(DecoderBlock::new(cin, cout, skip, bvb.pp(i))?);
            cin = cout;
        }
        Ok(Self {
            conv_more,
            blocks,
            n_skip: cfg.n_skip,
        })
    }

    /// `features`: skip features in decoder order (`[f1, f2, f3]`).
    pub fn forward_t(&self, hidden: &Tensor, features: &[Tensor], train: bool) -> Result<Tensor> {
        let (b, n, d) = hidden.dims3()?;
        let g = (n as f64).sqrt().round() as usize;
        if g * g != n {
            return Err(Error::msg(format!(
                "TransUNet decoder: {n} tokens do not form a square grid"
            )));
        }
        let x = hidden
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, d, g, g))?;
        let mut x = self.conv_more.forward_t(&x, train)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let skip = if i < self.n_skip {
                features.get(i)
            } else {
                None
            };
            x = block.forward_t(&x, skip, train)?;
        }
        Ok(x)
    }

    /// Every BatchNorm of the decoder with its key prefix, in a fixed order.
    pub fn batch_norms(&self) -> Vec<(&str, &BatchNorm2d)> {
        let mut v = vec![self.conv_more.bn()];
        for b in &self.blocks {
            v.push(b.conv1.bn());
            v.push(b.conv2.bn());
        }
        v
    }
}

/// `segmentation_head.0`: Conv3×3(d3 → n_classes, pad 1, bias); no upsampling.
#[derive(Debug, Clone)]
pub struct SegmentationHead {
    conv: Conv2d,
}

impl SegmentationHead {
    /// `vb` points at `segmentation_head`.
    pub fn new(cfg: &TransUnetConfig, vb: VarBuilder) -> Result<Self> {
        let cin = cfg.decoder_channels[3];
        Ok(Self {
            conv: conv2d(cin, cfg.n_classes, 3, 1, 1, true, vb.pp("0"))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        nn::conv2d_layer(&self.conv, x)
    }
}
