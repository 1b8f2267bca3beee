//! RetinaNet's feature pyramid and shared heads (the tutorial's detector), on candle.
//!
//! [`Detector`] turns the extractor's `out3, out4, out5` into pyramid levels P3..P6 and applies
//! two heads shared by all levels: `cls` (`anchors * C` logits per cell) and `reg`
//! (`anchors * 4` deltas per cell). Outputs are `[B, A, C]` and `[B, A, 4]` with `A` in the
//! anchors' order (level P3..P6, row, column, anchor), so they line up with
//! `retinanet_anchors::gen_anchors` for the same input size. [`RetinaNet`] is extractor plus
//! detector.
//!
//! Tensor names are the tutorial's (`conv_out6`, `prj_5`, `prj_4`, `prj_3`, `conv_4`, `conv_3`,
//! `conv_cls.{0,2,4,6}`, `conv_reg.{0,2,4,6}`) under the builder's prefix; the project uses
//! `detector.` (and `extractor.` for the ResNet). Weights:
//!
//! * whole project checkpoint: [`weights::save_varmap`] / [`weights::load_varmap`] (strict);
//! * a ResNet alone (torchvision or tutorial names, `.pth` or `.safetensors`, or a pretraining
//!   checkpoint): [`weights::load_resnet`]`(&varmap, path, "extractor.", skip_fc)`;
//! * the tutorial's detector state dict: [`load_detector`]`(&varmap, path, "detector.")`.
//!
//! Optimisers must skip the BatchNorm running statistics: filter the VarMap with
//! [`is_buffer`]. For inference use [`RetinaNet::infer`] (no graph kept, far less memory).
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use retinanet_detector::{RetinaNet, RetinaNetConfig};
//! use retinanet_extractor::{Depth, ResNetConfig};
//!
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let backbone = ResNetConfig { base_width: 8, ..ResNetConfig::new(Depth::R18, None) };
//! let mut cfg = RetinaNetConfig::new(backbone, 2);
//! cfg.detector.fpn_channels = 16;
//! cfg.detector.head_channels = 16;
//! let model = RetinaNet::new(vb, &cfg)?;
//! let x = Tensor::zeros((1, 3, 65, 65), DType::F32, &Device::Cpu)?;
//! let (cls, reg) = model.forward_t(&x, false)?;
//! // 3 anchors per cell on 9x9, 5x5, 3x3 and 2x2 grids.
//! assert_eq!(cls.dims(), &[1, 3 * (81 + 25 + 9 + 4), 2]);
//! assert_eq!(reg.dims(), &[1, 3 * (81 + 25 + 9 + 4), 4]);
//! # Ok::<(), candle_core::Error>(())
//! ```
//!
//! The `cuda` feature switches candle to its CUDA backend (see the extractor crate's docs for
//! getting `nvcc`); the default build is CPU only.

use candle_core::{Result, Tensor, bail};
use candle_nn::{Conv2d, Conv2dConfig, Init, VarBuilder, VarMap};
use retinanet_extractor::ResNet;
use retinanet_extractor::ops::{conv2d, conv2d_relu, upsample_bilinear_ac};
use retinanet_extractor::weights::{WeightsError, read_tensors, strip_module_prefix};
use std::collections::HashMap;
use std::path::Path;

pub use retinanet_extractor::{Depth, ResNet as Extractor, ResNetConfig, is_buffer, weights};

/// Configuration of a [`Detector`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DetectorConfig {
    /// Object classes `C` (background excluded).
    pub num_classes: usize,
    /// Anchors per cell (3).
    pub num_anchors: usize,
    /// Channels of the pyramid levels (256).
    pub fpn_channels: usize,
    /// Channels of the heads' hidden convolutions (256; 64 for small runs).
    pub head_channels: usize,
    /// Channels of out3, out4, out5 (from [`ResNet::out_channels`]).
    pub in_channels: [usize; 3],
}

impl DetectorConfig {
    /// The tutorial's detector (3 anchors, 256 channels) for an extractor with `in_channels`.
    pub fn new(num_classes: usize, in_channels: [usize; 3]) -> Self {
        Self {
            num_classes,
            num_anchors: 3,
            fpn_channels: 256,
            head_channels: 256,
            in_channels,
        }
    }
}

/// Prior probability of an object at initialisation: the last `cls` bias is `-ln((1 - π) / π)`.
const PRIOR: f64 = 0.01;

/// A 3x3 (padding 1) or 1x1 convolution with bias, initialised as the tutorial: N(0, 0.01)
/// weights and a constant bias.
fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    bias: f64,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let w = vb.get_with_hints(
        (cout, cin, k, k),
        "weight",
        Init::Randn {
            mean: 0.0,
            stdev: 0.01,
        },
    )?;
    let b = vb.get_with_hints(cout, "bias", Init::Const(bias))?;
    let cfg = Conv2dConfig {
        padding: k / 2,
        stride,
        ..Default::default()
    };
    Ok(Conv2d::new(w, Some(b), cfg))
}

/// One of the shared heads: `conv3x3 + ReLU` three times, then `conv3x3` to `cout`
/// (names `0, 2, 4, 6` as in the tutorial's `nn.Sequential`).
#[derive(Debug, Clone)]
struct Head {
    convs: [Conv2d; 4],
}

impl Head {
    fn new(cin: usize, hidden: usize, cout: usize, last_bias: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            convs: [
                conv(cin, hidden, 3, 1, 0.0, vb.pp("0"))?,
                conv(hidden, hidden, 3, 1, 0.0, vb.pp("2"))?,
                conv(hidden, hidden, 3, 1, 0.0, vb.pp("4"))?,
                conv(hidden, cout, 3, 1, last_bias, vb.pp("6"))?,
            ],
        })
    }

    fn detached(&self) -> Self {
        Self {
            convs: self.convs.each_ref().map(detach_conv),
        }
    }

    /// `[B, cin, H, W]` -> `[B, H * W * anchors, per_anchor]` in row, column, anchor order.
    fn forward(&self, x: &Tensor, per_anchor: usize) -> Result<Tensor> {
        let mut y = x.clone();
        for c in &self.convs[..3] {
            y = conv2d_relu(&y, c)?;
        }
        let y = conv2d(&y, &self.convs[3])?;
        let b = y.dim(0)?;
        // Channel index = anchor * per_anchor + value, as the tutorial's reshape assumes.
        y.permute((0, 2, 3, 1))?.reshape((b, (), per_anchor))
    }
}

/// The FPN and the two shared heads.
#[derive(Debug, Clone)]
pub struct Detector {
    conv_out6: Conv2d,
    prj_5: Conv2d,
    prj_4: Conv2d,
    prj_3: Conv2d,
    conv_4: Conv2d,
    conv_3: Conv2d,
    cls: Head,
    reg: Head,
    cfg: DetectorConfig,
}

impl Detector {
    /// Builds the detector from `vb` (new variables: weights N(0, 0.01), biases 0, the last
    /// `cls` bias `-ln(99)`).
    pub fn new(vb: VarBuilder, cfg: &DetectorConfig) -> Result<Self> {
        let DetectorConfig {
            num_classes,
            num_anchors,
            fpn_channels: f,
            head_channels: h,
            in_channels: [c3, c4, c5],
        } = *cfg;
        if num_classes == 0 || num_anchors == 0 || f == 0 || h == 0 {
            bail!("detector: classes, anchors and channel counts must be positive: {cfg:?}")
        }
        let cls_bias = -((1.0 - PRIOR) / PRIOR).ln();
        Ok(Self {
            conv_out6: conv(c5, f, 3, 2, 0.0, vb.pp("conv_out6"))?,
            prj_5: conv(c5, f, 1, 1, 0.0, vb.pp("prj_5"))?,
            prj_4: conv(c4, f, 1, 1, 0.0, vb.pp("prj_4"))?,
            prj_3: conv(c3, f, 1, 1, 0.0, vb.pp("prj_3"))?,
            conv_4: conv(f, f, 3, 1, 0.0, vb.pp("conv_4"))?,
            conv_3: conv(f, f, 3, 1, 0.0, vb.pp("conv_3"))?,
            cls: Head::new(f, h, num_anchors * num_classes, cls_bias, vb.pp("conv_cls"))?,
            reg: Head::new(f, h, num_anchors * 4, 0.0, vb.pp("conv_reg"))?,
            cfg: *cfg,
        })
    }

    /// A copy with the same weights not tracked for backprop (see [`ResNet::detached`]).
    pub fn detached(&self) -> Self {
        Self {
            conv_out6: detach_conv(&self.conv_out6),
            prj_5: detach_conv(&self.prj_5),
            prj_4: detach_conv(&self.prj_4),
            prj_3: detach_conv(&self.prj_3),
            conv_4: detach_conv(&self.conv_4),
            conv_3: detach_conv(&self.conv_3),
            cls: self.cls.detached(),
            reg: self.reg.detached(),
            cfg: self.cfg,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &DetectorConfig {
        &self.cfg
    }

    /// Pyramid levels `[P3, P4, P5, P6]` (after their ReLUs).
    pub fn pyramid(&self, feats: (&Tensor, &Tensor, &Tensor)) -> Result<[Tensor; 4]> {
        let (o3, o4, o5) = feats;
        let p6 = conv2d(o5, &self.conv_out6)?;
        let p5 = conv2d(o5, &self.prj_5)?;
        let q4 = conv2d(o4, &self.prj_4)?;
        let (_, _, h4, w4) = q4.dims4()?;
        let p4 = (upsample_bilinear_ac(&p5, h4, w4)? + q4)?;
        let q3 = conv2d(o3, &self.prj_3)?;
        let (_, _, h3, w3) = q3.dims4()?;
        let p3 = (upsample_bilinear_ac(&p4, h3, w3)? + q3)?;
        Ok([
            conv2d_relu(&p3, &self.conv_3)?,
            conv2d_relu(&p4, &self.conv_4)?,
            p5.relu()?,
            p6.relu()?,
        ])
    }

    /// `(cls [B, A, C] logits, reg [B, A, 4])` from `(out3, out4, out5)`, `A` in the anchors'
    /// order.
    pub fn forward(&self, feats: (&Tensor, &Tensor, &Tensor)) -> Result<(Tensor, Tensor)> {
        let levels = self.pyramid(feats)?;
        let mut cls = Vec::with_capacity(4);
        let mut reg = Vec::with_capacity(4);
        for p in &levels {
            cls.push(self.cls.forward(p, self.cfg.num_classes)?);
            reg.push(self.reg.forward(p, 4)?);
        }
        Ok((Tensor::cat(&cls, 1)?, Tensor::cat(&reg, 1)?))
    }
}

/// Configuration of a [`RetinaNet`]; `detector.in_channels` must equal the extractor's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetinaNetConfig {
    /// The ResNet.
    pub extractor: ResNetConfig,
    /// The FPN and heads.
    pub detector: DetectorConfig,
}

impl RetinaNetConfig {
    /// The tutorial's detector on `extractor`, for `num_classes` classes.
    pub fn new(extractor: ResNetConfig, num_classes: usize) -> Self {
        Self {
            extractor,
            detector: DetectorConfig::new(num_classes, extractor.out_channels()),
        }
    }
}

/// Extractor (`extractor.*`) and detector (`detector.*`).
#[derive(Debug, Clone)]
pub struct RetinaNet {
    /// The ResNet (`set_freeze_bn`, `classify_t`, ... are on it).
    pub extractor: ResNet,
    /// The FPN and heads.
    pub detector: Detector,
}

impl RetinaNet {
    /// Builds both parts under `extractor.` and `detector.` of `vb`.
    pub fn new(vb: VarBuilder, cfg: &RetinaNetConfig) -> Result<Self> {
        if cfg.detector.in_channels != cfg.extractor.out_channels() {
            bail!(
                "retinanet: detector in_channels {:?} differ from the extractor's outputs {:?}",
                cfg.detector.in_channels,
                cfg.extractor.out_channels()
            )
        }
        Ok(Self {
            extractor: ResNet::new(vb.pp("extractor"), &cfg.extractor)?,
            detector: Detector::new(vb.pp("detector"), &cfg.detector)?,
        })
    }

    /// `(cls [B, A, C] logits, reg [B, A, 4])` for images `[B, 3, H, W]`; `train` selects
    /// BatchNorm's training mode (unless the extractor's BN is frozen).
    pub fn forward_t(&self, images: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let (o3, o4, o5) = self.extractor.forward_t(images, train)?;
        self.detector.forward((&o3, &o4, &o5))
    }

    /// A copy with the same weights not tracked for backprop (see [`ResNet::detached`]); build
    /// it once per evaluation and reuse it.
    pub fn detached(&self) -> Self {
        Self {
            extractor: self.extractor.detached(),
            detector: self.detector.detached(),
        }
    }

    /// Evaluation-mode forward pass without backprop tracking: activations are freed as soon as
    /// they are used, which keeps inference memory low. Equal to `forward_t(images, false)`.
    pub fn infer(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        self.detached().forward_t(&images.detach(), false)
    }
}

/// A copy of `c` whose weights share storage but are not tracked for backprop.
fn detach_conv(c: &Conv2d) -> Conv2d {
    Conv2d::new(
        c.weight().detach(),
        c.bias().map(Tensor::detach),
        *c.config(),
    )
}

/// Loads the tutorial's detector state dict (`conv_out6.weight`, `conv_cls.0.bias`, ...;
/// `module.` prefixes allowed, a leading `prefix` too) into the variables under `prefix`
/// (e.g. `"detector."`), strictly.
pub fn load_detector(
    varmap: &VarMap,
    path: &Path,
    prefix: &str,
) -> std::result::Result<(), WeightsError> {
    let tensors = read_tensors(path)?;
    let renamed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| {
            let n = strip_module_prefix(&k);
            let n = n.strip_prefix(prefix).unwrap_or(n);
            (format!("{prefix}{n}"), t)
        })
        .collect();
    retinanet_extractor::weights::assign_strict(varmap, &renamed, prefix, path)
}
