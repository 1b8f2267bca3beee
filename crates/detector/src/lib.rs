//! RetinaNet's feature pyramid and shared heads (the tutorial's detector), on candle.
//!
//! [`Detector`] turns the extractor's `out3, out4, out5` into pyramid levels P3..P6 and applies
//! two heads shared by all levels: `cls` (`anchors * C` logits per cell) and `reg`
//! (`anchors * 4` deltas per cell). Outputs are `[B, A, C]` and `[B, A, 4]` with `A` in the
//! anchors' order (level P3..P6, row, column, anchor), so they line up with
//! `retinanet_anchors::gen_anchors` for the same input size. [`RetinaNet`] is extractor plus
//! detector.
//!
//! The levels are the tutorial's P3..P6 by default; [`DetectorConfig::first_level`] and
//! [`DetectorConfig::num_levels`] choose others for other anchor layouts: P2 (stride 4, from
//! `out2`, for small objects) and P7 (stride 128, a stride-2 convolution of `relu(P6)` as in the
//! RetinaNet paper), any contiguous run of P2..P7. The number of anchors per cell sets the
//! heads' output channels.
//!
//! Tensor names are the tutorial's (`conv_out6`, `prj_5`, `prj_4`, `prj_3`, `conv_4`, `conv_3`,
//! `conv_cls.{0,2,4,6}`, `conv_reg.{0,2,4,6}`) under the builder's prefix, with `prj_2`,
//! `conv_2` and `conv_out7` for the extra levels (a layer is only built when its level is
//! used); the project uses `detector.` (and `extractor.` for the ResNet). Weights:
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

pub mod torchvision;
use torchvision::TvParts;
pub use torchvision::{P6From, TvOptions};

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
    /// Channels of out2 (stride 4; [`ResNet::out2_channels`]), read only when the pyramid
    /// starts at P2.
    pub out2_channels: usize,
    /// The first pyramid level `k`: P`k` has stride `2^k` (3: P3, stride 8, the tutorial's).
    /// 2 to 5.
    pub first_level: usize,
    /// Pyramid levels from the first (4: P3..P6, the tutorial's); the last may be P7 at most.
    pub num_levels: usize,
    /// The tutorial's FPN and heads, or torchvision's.
    pub style: DetectorStyle,
}

/// The highest pyramid level a [`Detector`] builds (P7, stride 128).
pub const MAX_LEVEL: usize = 7;

impl DetectorConfig {
    /// The tutorial's detector (3 anchors, 256 channels, P3..P6) for an extractor with
    /// `in_channels` (out3, out4, out5; out2 taken as half of out3, as in every ResNet).
    pub fn new(num_classes: usize, in_channels: [usize; 3]) -> Self {
        Self {
            num_classes,
            num_anchors: 3,
            fpn_channels: 256,
            head_channels: 256,
            in_channels,
            out2_channels: in_channels[0] / 2,
            first_level: 3,
            num_levels: 4,
            style: DetectorStyle::Tutorial,
        }
    }

    /// The last pyramid level.
    pub fn last_level(&self) -> usize {
        self.first_level + self.num_levels - 1
    }

    /// The stride of the first level (`2^first_level`).
    pub fn first_stride(&self) -> usize {
        1 << self.first_level
    }

    /// The levels as the anchor generator counts them: `(first stride, number of levels)` for
    /// a stride in pixels, or an error naming what no detector can build.
    pub fn levels_for_stride(first_stride: usize, levels: usize) -> Result<(usize, usize)> {
        if !first_stride.is_power_of_two() || !(4..=32).contains(&first_stride) {
            bail!(
                "a first stride of {first_stride} px has no pyramid level: use 4 (P2), 8 (P3, the tutorial's), 16 (P4) or 32 (P5)"
            )
        }
        let first = first_stride.trailing_zeros() as usize;
        if levels == 0 || first + levels - 1 > MAX_LEVEL {
            bail!(
                "{levels} levels from P{first} (stride {first_stride}): the pyramid reaches P{MAX_LEVEL} (stride {}) at most, so use 1 to {} levels",
                1 << MAX_LEVEL,
                MAX_LEVEL + 1 - first
            )
        }
        Ok((first, levels))
    }
}

/// Prior probability of an object at initialisation: the last `cls` bias is `-ln((1 - π) / π)`.
pub(crate) const PRIOR: f64 = 0.01;

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

/// The tutorial's FPN and the two shared heads.
#[derive(Debug, Clone)]
struct TutorialDetector {
    conv_out6: Option<Conv2d>,
    conv_out7: Option<Conv2d>,
    prj_5: Conv2d,
    prj_4: Option<Conv2d>,
    prj_3: Option<Conv2d>,
    prj_2: Option<Conv2d>,
    conv_4: Option<Conv2d>,
    conv_3: Option<Conv2d>,
    conv_2: Option<Conv2d>,
    cls: Head,
    reg: Head,
    cfg: DetectorConfig,
}

impl TutorialDetector {
    fn new(vb: VarBuilder, cfg: &DetectorConfig) -> Result<Self> {
        let DetectorConfig {
            num_classes,
            num_anchors,
            fpn_channels: f,
            head_channels: h,
            in_channels: [c3, c4, c5],
            out2_channels: c2,
            first_level: first,
            num_levels,
            style: _,
        } = *cfg;
        if num_classes == 0 || num_anchors == 0 || f == 0 || h == 0 {
            bail!("detector: classes, anchors and channel counts must be positive: {cfg:?}")
        }
        if !(2..=5).contains(&first) || num_levels == 0 || first + num_levels - 1 > MAX_LEVEL {
            bail!(
                "detector: levels P{first} to P{} cannot be built (the first level is P2 to P5, the last P{MAX_LEVEL} at most)",
                first as isize + num_levels as isize - 1
            )
        }
        if first == 2 && c2 == 0 {
            bail!("detector: a pyramid from P2 needs out2_channels")
        }
        let last = cfg.last_level();
        let used = |k: usize| (first..=last).contains(&k);
        // A layer exists only if its level is an output or feeds one (the top-down path runs
        // from P5 down to the first level).
        let opt = |on: bool, cin: usize, k: usize, stride: usize, name: &str| -> Result<_> {
            on.then(|| conv(cin, f, k, stride, 0.0, vb.pp(name)))
                .transpose()
        };
        let cls_bias = -((1.0 - PRIOR) / PRIOR).ln();
        Ok(Self {
            conv_out6: opt(last >= 6, c5, 3, 2, "conv_out6")?,
            conv_out7: opt(last >= 7, f, 3, 2, "conv_out7")?,
            prj_5: conv(c5, f, 1, 1, 0.0, vb.pp("prj_5"))?,
            prj_4: opt(first <= 4, c4, 1, 1, "prj_4")?,
            prj_3: opt(first <= 3, c3, 1, 1, "prj_3")?,
            prj_2: opt(first <= 2, c2, 1, 1, "prj_2")?,
            conv_4: opt(used(4), f, 3, 1, "conv_4")?,
            conv_3: opt(used(3), f, 3, 1, "conv_3")?,
            conv_2: opt(used(2), f, 3, 1, "conv_2")?,
            cls: Head::new(f, h, num_anchors * num_classes, cls_bias, vb.pp("conv_cls"))?,
            reg: Head::new(f, h, num_anchors * 4, 0.0, vb.pp("conv_reg"))?,
            cfg: *cfg,
        })
    }

    fn detached(&self) -> Self {
        let d = |c: &Option<Conv2d>| c.as_ref().map(detach_conv);
        Self {
            conv_out6: d(&self.conv_out6),
            conv_out7: d(&self.conv_out7),
            prj_5: detach_conv(&self.prj_5),
            prj_4: d(&self.prj_4),
            prj_3: d(&self.prj_3),
            prj_2: d(&self.prj_2),
            conv_4: d(&self.conv_4),
            conv_3: d(&self.conv_3),
            conv_2: d(&self.conv_2),
            cls: self.cls.detached(),
            reg: self.reg.detached(),
            cfg: self.cfg,
        }
    }

    fn pyramid_levels(&self, feats: [&Tensor; 4]) -> Result<Vec<Tensor>> {
        let [o2, o3, o4, o5] = feats;
        let (first, last) = (self.cfg.first_level, self.cfg.last_level());
        let lateral = |p: &Tensor, c: &Option<Conv2d>, o: &Tensor| -> Result<Tensor> {
            let q = conv2d(o, c.as_ref().expect("built for this level"))?;
            let (_, _, h, w) = q.dims4()?;
            upsample_bilinear_ac(p, h, w)? + q
        };
        let p5 = conv2d(o5, &self.prj_5)?;
        let p4 = (first <= 4)
            .then(|| lateral(&p5, &self.prj_4, o4))
            .transpose()?;
        let p3 = match &p4 {
            Some(p4) if first <= 3 => Some(lateral(p4, &self.prj_3, o3)?),
            _ => None,
        };
        let p2 = match &p3 {
            Some(p3) if first <= 2 => Some(lateral(p3, &self.prj_2, o2)?),
            _ => None,
        };
        let p6 = self.conv_out6.as_ref().map(|c| conv2d(o5, c)).transpose()?;
        let smooth = |p: &Option<Tensor>, c: &Option<Conv2d>| -> Result<Tensor> {
            conv2d_relu(
                p.as_ref().expect("top-down level"),
                c.as_ref().expect("smoothing conv"),
            )
        };
        let mut out = Vec::with_capacity(self.cfg.num_levels);
        for k in first..=last {
            out.push(match k {
                2 => smooth(&p2, &self.conv_2)?,
                3 => smooth(&p3, &self.conv_3)?,
                4 => smooth(&p4, &self.conv_4)?,
                5 => p5.relu()?,
                6 => p6.as_ref().expect("conv_out6").relu()?,
                _ => {
                    let r6 = p6.as_ref().expect("conv_out6").relu()?;
                    conv2d(&r6, self.conv_out7.as_ref().expect("conv_out7"))?.relu()?
                }
            });
        }
        Ok(out)
    }

    fn heads(&self, levels: &[Tensor]) -> Result<(Tensor, Tensor)> {
        let mut cls = Vec::with_capacity(levels.len());
        let mut reg = Vec::with_capacity(levels.len());
        for p in levels {
            cls.push(self.cls.forward(p, self.cfg.num_classes)?);
            reg.push(self.reg.forward(p, 4)?);
        }
        Ok((Tensor::cat(&cls, 1)?, Tensor::cat(&reg, 1)?))
    }
}

/// Which FPN and heads a [`Detector`] has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DetectorStyle {
    /// The tutorial's (names `conv_out6`, `prj_5`, ..., `conv_cls.{0,2,4,6}`).
    #[default]
    Tutorial,
    /// torchvision's RetinaNet (names `fpn.*`, `head.*`; levels P3..P7; see [`torchvision`]).
    Torchvision(TvOptions),
}

#[derive(Debug, Clone)]
enum Parts {
    Tutorial(Box<TutorialDetector>),
    Torchvision(Box<TvParts>),
}

/// The FPN and the two shared heads: the tutorial's, or torchvision's
/// ([`DetectorConfig::style`]).
#[derive(Debug, Clone)]
pub struct Detector {
    parts: Parts,
    cfg: DetectorConfig,
}

impl Detector {
    /// Builds the detector from `vb` (new variables: the tutorial's weights N(0, 0.01), biases
    /// 0, the last `cls` bias `-ln(99)`; torchvision's initialisation for its layers).
    pub fn new(vb: VarBuilder, cfg: &DetectorConfig) -> Result<Self> {
        let parts = match cfg.style {
            DetectorStyle::Tutorial => Parts::Tutorial(Box::new(TutorialDetector::new(vb, cfg)?)),
            DetectorStyle::Torchvision(opts) => {
                if (cfg.first_level, cfg.num_levels) != (3, 5) {
                    bail!(
                        "detector: torchvision's RetinaNet has the levels P3..P7, not P{}..P{}",
                        cfg.first_level,
                        cfg.last_level()
                    )
                }
                if cfg.head_channels != cfg.fpn_channels {
                    bail!(
                        "detector: torchvision's heads run at the FPN's width: head_channels {} must equal fpn_channels {}",
                        cfg.head_channels,
                        cfg.fpn_channels
                    )
                }
                if cfg.num_classes == 0 || cfg.num_anchors == 0 || cfg.fpn_channels == 0 {
                    bail!("detector: classes, anchors and channel counts must be positive: {cfg:?}")
                }
                Parts::Torchvision(Box::new(TvParts::new(
                    vb,
                    cfg.num_classes,
                    cfg.num_anchors,
                    cfg.fpn_channels,
                    cfg.in_channels,
                    opts,
                )?))
            }
        };
        Ok(Self { parts, cfg: *cfg })
    }

    /// A copy with the same weights not tracked for backprop (see [`ResNet::detached`]).
    pub fn detached(&self) -> Self {
        let parts = match &self.parts {
            Parts::Tutorial(t) => Parts::Tutorial(Box::new(t.detached())),
            Parts::Torchvision(t) => Parts::Torchvision(Box::new(t.detached())),
        };
        Self {
            parts,
            cfg: self.cfg,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &DetectorConfig {
        &self.cfg
    }

    /// The pyramid levels `P{first_level}..` from the extractor's `[out2, out3, out4, out5]`
    /// (`out2` is read only for P2): after their ReLUs for the tutorial's, as they are for
    /// torchvision's.
    pub fn pyramid_levels(&self, feats: [&Tensor; 4]) -> Result<Vec<Tensor>> {
        match &self.parts {
            Parts::Tutorial(t) => t.pyramid_levels(feats),
            Parts::Torchvision(t) => t.pyramid(feats[1], feats[2], feats[3]),
        }
    }

    /// Pyramid levels (`[P3, P4, P5, P6]` for the tutorial's layout) from `(out3, out4, out5)`.
    pub fn pyramid(&self, feats: (&Tensor, &Tensor, &Tensor)) -> Result<Vec<Tensor>> {
        if self.cfg.first_level == 2 {
            bail!("detector: a pyramid from P2 needs out2: use pyramid_levels")
        }
        let (o3, o4, o5) = feats;
        // out2 is never read from P3 up.
        self.pyramid_levels([o3, o3, o4, o5])
    }

    /// `(cls [B, A, C] logits, reg [B, A, 4])` from the extractor's `[out2, out3, out4, out5]`,
    /// `A` in the anchors' order, `reg` as `(dy, dx, dh, dw)`.
    pub fn forward_features(&self, feats: [&Tensor; 4]) -> Result<(Tensor, Tensor)> {
        let levels = self.pyramid_levels(feats)?;
        match &self.parts {
            Parts::Tutorial(t) => t.heads(&levels),
            Parts::Torchvision(t) => t.heads(&levels),
        }
    }

    /// `(cls [B, A, C] logits, reg [B, A, 4])` from `(out3, out4, out5)`, `A` in the anchors'
    /// order (a pyramid from P2 needs [`Detector::forward_features`]).
    pub fn forward(&self, feats: (&Tensor, &Tensor, &Tensor)) -> Result<(Tensor, Tensor)> {
        let (o3, o4, o5) = feats;
        if self.cfg.first_level == 2 {
            bail!("detector: a pyramid from P2 needs out2: use forward_features")
        }
        self.forward_features([o3, o3, o4, o5])
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
        if cfg.detector.first_level == 2
            && cfg.detector.out2_channels != cfg.extractor.out2_channels()
        {
            bail!(
                "retinanet: detector out2_channels {} differ from the extractor's out2 {}",
                cfg.detector.out2_channels,
                cfg.extractor.out2_channels()
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
        let [o2, o3, o4, o5] = self.extractor.features_t(images, train)?;
        // out2 is the largest map: let it go at once when no level reads it.
        let o2 = if self.detector.cfg.first_level == 2 {
            o2
        } else {
            drop(o2);
            o3.clone()
        };
        self.detector.forward_features([&o2, &o3, &o4, &o5])
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
    /// they are used, which keeps inference memory low; the extractor runs with its BatchNorms
    /// folded into the convolutions ([`ResNet::folded`]). Equal to `forward_t(images, false)`
    /// up to float rounding. Folding reads every extractor weight once: for many batches, call
    /// this on a [`RetinaNet::for_inference`] copy, which is not folded again.
    pub fn infer(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        self.for_inference()?.forward_t(&images.detach(), false)
    }

    /// A copy for inference: not tracked for backprop, the extractor's BatchNorms folded into
    /// its convolutions and each residual add fused into the convolution before it. Build it
    /// once per evaluation (weights updated later do not show in it) and call
    /// [`RetinaNet::infer`] on it.
    pub fn for_inference(&self) -> Result<Self> {
        Ok(Self {
            extractor: self.extractor.folded()?,
            detector: self.detector.detached(),
        })
    }
}

/// A copy of `c` whose weights share storage but are not tracked for backprop.
pub(crate) fn detach_conv(c: &Conv2d) -> Conv2d {
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
