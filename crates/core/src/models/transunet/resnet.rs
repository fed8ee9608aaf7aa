//! ResNet-V2 hybrid backbone of R50-ViT-B/16 (SPEC §5.2): StdConv2d root + GroupNorm + ReLU, 3×3/s2 max-pool
//! without padding, three stages of (post-activation) bottleneck units, skip features with the 55→56 zero pad.
//!
//! Keys (SPEC §5.3) below `transformer.embeddings.hybrid_model`: `root.conv.weight`, `root.gn.{weight,bias}`,
//! `body.block{b}.unit{u}.{conv1,conv2,conv3}.weight`, `….{gn1,gn2,gn3}.{weight,bias}`,
//! `body.block{b}.unit1.downsample.weight`, `body.block{b}.unit1.gn_proj.{weight,bias}`.
use crate::config::TransUnetConfig;
use crate::nn::{self, GroupNorm, StdConv2d};
use crate::{Error, Result};
use candle_core::Tensor;
use candle_nn::VarBuilder;

/// GroupNorm eps of root/gn1/gn2/gn3.
pub const GN_EPS: f64 = 1e-6;
/// GroupNorm eps of the projection norm (PyTorch default, one channel per group).
pub const GN_PROJ_EPS: f64 = 1e-5;

/// One bottleneck unit ("PreActBottleneck" in the original, but post-activation).
#[derive(Debug, Clone)]
pub struct Bottleneck {
    conv1: StdConv2d,
    gn1: GroupNorm,
    conv2: StdConv2d,
    gn2: GroupNorm,
    conv3: StdConv2d,
    gn3: GroupNorm,
    proj: Option<(StdConv2d, GroupNorm)>,
}

impl Bottleneck {
    pub fn new(
        cin: usize,
        cout: usize,
        cmid: usize,
        stride: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let conv1 = StdConv2d::new(cin, cmid, 1, 1, 0, false, vb.pp("conv1"))?;
        let gn1 = GroupNorm::new(groups, cmid, GN_EPS, vb.pp("gn1"))?;
        let conv2 = StdConv2d::new(cmid, cmid, 3, stride, 1, false, vb.pp("conv2"))?;
        let gn2 = GroupNorm::new(groups, cmid, GN_EPS, vb.pp("gn2"))?;
        let conv3 = StdConv2d::new(cmid, cout, 1, 1, 0, false, vb.pp("conv3"))?;
        let gn3 = GroupNorm::new(groups, cout, GN_EPS, vb.pp("gn3"))?;
        let proj = if stride != 1 || cin != cout {
            let ds = StdConv2d::new(cin, cout, 1, stride, 0, false, vb.pp("downsample"))?;
            let gn = GroupNorm::new(cout, cout, GN_PROJ_EPS, vb.pp("gn_proj"))?;
            Some((ds, gn))
        } else {
            None
        };
        Ok(Self {
            conv1,
            gn1,
            conv2,
            gn2,
            conv3,
            gn3,
            proj,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let residual = match &self.proj {
            Some((ds, gn)) => gn.forward(&ds.forward(x)?)?,
            None => x.clone(),
        };
        let y = self.gn1.forward_relu(&self.conv1.forward(x)?)?;
        let y = self.gn2.forward_relu(&self.conv2.forward(&y)?)?;
        let y = self.gn3.forward(&self.conv3.forward(&y)?)?;
        nn::add_relu(&residual, &y)
    }
}

/// Output of the backbone: the block3 map and the skip features in decoder order `[f1, f2, f3]`
/// (block2 output, block1 output zero-padded to S/4, root output before the max-pool).
#[derive(Debug, Clone)]
pub struct ResNetOutput {
    pub x: Tensor,
    pub features: Vec<Tensor>,
}

/// ResNet-V2 hybrid backbone.
#[derive(Debug, Clone)]
pub struct ResNetV2 {
    root_conv: StdConv2d,
    root_gn: GroupNorm,
    blocks: Vec<Vec<Bottleneck>>,
}

impl ResNetV2 {
    /// `vb` points at `transformer.embeddings.hybrid_model`.
    pub fn new(cfg: &TransUnetConfig, vb: VarBuilder) -> Result<Self> {
        let w = cfg.resnet_width;
        let groups = cfg.gn_groups;
        let root_conv = StdConv2d::new(3, w, 7, 2, 3, false, vb.pp("root").pp("conv"))?;
        let root_gn = GroupNorm::new(groups, w, GN_EPS, vb.pp("root").pp("gn"))?;
        // (cin, cout, cmid, stride of the first unit) per stage.
        let stages = [
            (w, 4 * w, w, 1usize),
            (4 * w, 8 * w, 2 * w, 2),
            (8 * w, 16 * w, 4 * w, 2),
        ];
        let units = cfg.resnet_block_units;
        let body = vb.pp("body");
        let mut blocks = Vec::with_capacity(3);
        for (b, (&(cin, cout, cmid, stride), &n)) in stages.iter().zip(units.iter()).enumerate() {
            if n == 0 {
                return Err(Error::Config(format!(
                    "transunet.resnet_block_units[{b}] must be ≥ 1"
                )));
            }
            let bvb = body.pp(format!("block{}", b + 1));
            let mut block = Vec::with_capacity(n);
            for u in 0..n {
                let (ci, s) = if u == 0 { (cin, stride) } else { (cout, 1) };
                block.push(Bottleneck::new(
                    ci,
                    cout,
                    cmid,
                    s,
                    groups,
                    bvb.pp(format!("unit{}", u + 1)),
                )?);
            }
            blocks.push(block);
        }
        Ok(Self {
            root_conv,
            root_gn,
            blocks,
        })
    }

    /// `x`: `(B, 3, S, S)`.
    pub fn forward(&self, x: &Tensor) -> Result<ResNetOutput> {
        let (_, _, in_size, in_w) = x.dims4()?;
        if in_size != in_w {
            return Err(Error::msg(format!(
                "TransUNet input must be square, got {in_size}×{in_w}"
            )));
        }
        let mut features = Vec::with_capacity(3);
        let mut x = self.root_gn.forward_relu(&self.root_conv.forward(x)?)?;
        features.push(x.clone());
        x = nn::max_pool_3x3_s2(&x)?;
        let last = self.blocks.len() - 1;
        for (i, block) in self.blocks.iter().enumerate() {
            for unit in block {
                x = unit.forward(&x)?;
            }
            if i == last {
                break;
            }
            // Original: right_size = int(in_size / 4 / (i + 1)); pad by 1 or 2 at the bottom/right.
            let right = in_size / 4 / (i + 1);
            let have = x.dim(2)?;
            let feat = if have == right {
                x.clone()
            } else if have < right && right - have <= 2 {
                let pad = right - have;
                x.pad_with_zeros(2, 0, pad)?.pad_with_zeros(3, 0, pad)?
            } else {
                return Err(Error::msg(format!(
                    "TransUNet stage {} output is {have}×{have}, expected {right} (input {in_size}); a difference \
                     above 2 pixels cannot be padded",
                    i + 1
                )));
            };
            features.push(feat);
        }
        features.reverse();
        Ok(ResNetOutput { x, features })
    }
}
