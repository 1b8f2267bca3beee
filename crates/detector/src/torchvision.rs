//! torchvision's RetinaNet FPN and heads (`retinanet_resnet50_fpn` and `_v2`), under
//! torchvision's own names, so its state dicts load as they are.
//!
//! * FPN (`fpn.*`, torchvision's `backbone.fpn.*`): 1x1 `inner_blocks.{0,1,2}.0` on C3..C5, a
//!   top-down path with nearest-neighbour upsampling to each lateral's size, 3x3
//!   `layer_blocks.{0,1,2}.0`, and `extra_blocks.p6` (stride 2, from P5 in v1, from C5 in v2)
//!   and `extra_blocks.p7` (stride 2 on `relu(P6)`). No activation on the levels.
//! * heads (`head.*`): `classification_head` / `regression_head`, each four 3x3 convolutions
//!   `conv.{i}.0` (with bias, or followed by GroupNorm `conv.{i}.1` in v2) and ReLU, then
//!   `cls_logits` / `bbox_reg`.
//!
//! The regression head predicts `(dx, dy, dw, dh)`; [`TvParts::forward`] returns it reordered
//! to the project's `(dy, dx, dh, dw)` so the encoder, the loss and the decoder are shared.

use candle_core::{D, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, Init, VarBuilder};
use retinanet_extractor::ops::{conv2d, conv2d_relu};

/// Where torchvision's P6 comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum P6From {
    /// P5 (`LastLevelP6P7(256, 256)`: `retinanet_resnet50_fpn`, v1).
    P5,
    /// C5, the ResNet's last stage (`LastLevelP6P7(2048, 256)`: `retinanet_resnet50_fpn_v2`).
    C5,
}

/// The torchvision variant's options (v1: P6 from P5, no head norm; v2: from C5, GroupNorm 32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TvOptions {
    /// P6's input.
    pub p6_from: P6From,
    /// GroupNorm with this many groups after each head convolution (v2: 32); `None`: none.
    pub head_group_norm: Option<usize>,
}

impl TvOptions {
    /// `retinanet_resnet50_fpn`.
    pub const V1: TvOptions = TvOptions {
        p6_from: P6From::P5,
        head_group_norm: None,
    };
    /// `retinanet_resnet50_fpn_v2`.
    pub const V2: TvOptions = TvOptions {
        p6_from: P6From::C5,
        head_group_norm: Some(32),
    };
}

/// A convolution with padding `k / 2`; `bias` off for convolutions followed by GroupNorm.
fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    bias: Option<f64>,
    init: Init,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let w = vb.get_with_hints((cout, cin, k, k), "weight", init)?;
    let b = bias
        .map(|v| vb.get_with_hints(cout, "bias", Init::Const(v)))
        .transpose()?;
    let cfg = Conv2dConfig {
        padding: k / 2,
        stride,
        ..Default::default()
    };
    Ok(Conv2d::new(w, b, cfg))
}

/// torchvision's `kaiming_uniform_(a=1)` of the FPN layers.
const FPN_INIT: Init = Init::Kaiming {
    dist: candle_nn::init::NormalOrUniform::Uniform,
    fan: candle_nn::init::FanInOut::FanIn,
    non_linearity: candle_nn::init::NonLinearity::Linear,
};

/// The heads' `normal_(std=0.01)`.
const HEAD_INIT: Init = Init::Randn {
    mean: 0.0,
    stdev: 0.01,
};

/// One of the two heads.
#[derive(Debug, Clone)]
struct TvHead {
    convs: Vec<(Conv2d, Option<GroupNorm>)>,
    out: Conv2d,
}

impl TvHead {
    fn new(
        ch: usize,
        cout: usize,
        out_name: &str,
        out_bias: f64,
        groups: Option<usize>,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mut convs = Vec::with_capacity(4);
        for i in 0..4 {
            let vi = vb.pp("conv").pp(i.to_string());
            let c = conv(
                ch,
                ch,
                3,
                1,
                groups.is_none().then_some(0.0),
                HEAD_INIT,
                vi.pp("0"),
            )?;
            let gn = groups
                .map(|g| -> Result<GroupNorm> {
                    let v = vi.pp("1");
                    let w = v.get_with_hints(ch, "weight", Init::Const(1.0))?;
                    let b = v.get_with_hints(ch, "bias", Init::Const(0.0))?;
                    GroupNorm::new(w, b, ch, g, 1e-5)
                })
                .transpose()?;
            convs.push((c, gn));
        }
        let out = conv(ch, cout, 3, 1, Some(out_bias), HEAD_INIT, vb.pp(out_name))?;
        Ok(Self { convs, out })
    }

    fn detached(&self) -> Self {
        Self {
            convs: self
                .convs
                .iter()
                .map(|(c, g)| (crate::detach_conv(c), g.clone()))
                .collect(),
            out: crate::detach_conv(&self.out),
        }
    }

    /// `[B, ch, H, W]` -> `[B, H * W * anchors, per_anchor]`.
    fn forward(&self, x: &Tensor, per_anchor: usize) -> Result<Tensor> {
        let mut y = x.clone();
        for (c, gn) in &self.convs {
            y = match gn {
                None => conv2d_relu(&y, c)?,
                Some(g) => g.forward(&conv2d(&y, c)?)?.relu()?,
            };
        }
        let y = conv2d(&y, &self.out)?;
        let b = y.dim(0)?;
        // torchvision's view(N, A, K, H, W).permute(0, 3, 4, 1, 2): channel = anchor * K + k.
        y.permute((0, 2, 3, 1))?.reshape((b, (), per_anchor))
    }
}

/// Nearest-neighbour resize to `(h, w)` as PyTorch's `interpolate(mode="nearest")`: source
/// index `floor(dst * (in / out))` in f32, at most `in - 1`.
fn upsample_nearest_torch(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, ih, iw) = x.dims4()?;
    if (ih, iw) == (h, w) {
        return Ok(x.clone());
    }
    let idx = |n_in: usize, n_out: usize| -> Result<Tensor> {
        let scale = n_in as f32 / n_out as f32;
        let v: Vec<u32> = (0..n_out)
            .map(|i| (((i as f32) * scale).floor() as usize).min(n_in - 1) as u32)
            .collect();
        Tensor::from_vec(v, n_out, x.device())
    };
    x.index_select(&idx(ih, h)?, 2)?
        .index_select(&idx(iw, w)?, 3)
}

/// The torchvision FPN and heads.
#[derive(Debug, Clone)]
pub struct TvParts {
    inner: [Conv2d; 3],
    layer: [Conv2d; 3],
    p6: Conv2d,
    p7: Conv2d,
    cls: TvHead,
    reg: TvHead,
    opts: TvOptions,
    num_classes: usize,
}

impl TvParts {
    /// Builds the layers for C3..C5 of `in_channels`, `f` FPN (= head) channels.
    pub(crate) fn new(
        vb: VarBuilder,
        num_classes: usize,
        num_anchors: usize,
        f: usize,
        in_channels: [usize; 3],
        opts: TvOptions,
    ) -> Result<Self> {
        if let Some(g) = opts.head_group_norm
            && (g == 0 || !f.is_multiple_of(g))
        {
            candle_core::bail!(
                "detector: GroupNorm with {g} groups needs a channel count divisible by it, the heads have {f}"
            )
        }
        let fpn = vb.pp("fpn");
        let lateral = |i: usize, cin: usize| {
            conv(
                cin,
                f,
                1,
                1,
                Some(0.0),
                FPN_INIT,
                fpn.pp("inner_blocks").pp(i.to_string()).pp("0"),
            )
        };
        let smooth = |i: usize| {
            conv(
                f,
                f,
                3,
                1,
                Some(0.0),
                FPN_INIT,
                fpn.pp("layer_blocks").pp(i.to_string()).pp("0"),
            )
        };
        let p6_in = match opts.p6_from {
            P6From::P5 => f,
            P6From::C5 => in_channels[2],
        };
        let extra = fpn.pp("extra_blocks");
        let head = vb.pp("head");
        let cls_bias = -((1.0 - crate::PRIOR) / crate::PRIOR).ln();
        Ok(Self {
            inner: [
                lateral(0, in_channels[0])?,
                lateral(1, in_channels[1])?,
                lateral(2, in_channels[2])?,
            ],
            layer: [smooth(0)?, smooth(1)?, smooth(2)?],
            p6: conv(p6_in, f, 3, 2, Some(0.0), FPN_INIT, extra.pp("p6"))?,
            p7: conv(f, f, 3, 2, Some(0.0), FPN_INIT, extra.pp("p7"))?,
            cls: TvHead::new(
                f,
                num_anchors * num_classes,
                "cls_logits",
                cls_bias,
                opts.head_group_norm,
                head.pp("classification_head"),
            )?,
            reg: TvHead::new(
                f,
                num_anchors * 4,
                "bbox_reg",
                0.0,
                opts.head_group_norm,
                head.pp("regression_head"),
            )?,
            opts,
            num_classes,
        })
    }

    pub(crate) fn detached(&self) -> Self {
        let d = crate::detach_conv;
        Self {
            inner: self.inner.each_ref().map(d),
            layer: self.layer.each_ref().map(d),
            p6: d(&self.p6),
            p7: d(&self.p7),
            cls: self.cls.detached(),
            reg: self.reg.detached(),
            opts: self.opts,
            num_classes: self.num_classes,
        }
    }

    /// The levels P3..P7 from C3..C5.
    pub(crate) fn pyramid(&self, c3: &Tensor, c4: &Tensor, c5: &Tensor) -> Result<Vec<Tensor>> {
        let c = [c3, c4, c5];
        let mut last = conv2d(c[2], &self.inner[2])?;
        let mut out = vec![conv2d(&last, &self.layer[2])?];
        for i in (0..2).rev() {
            let lat = conv2d(c[i], &self.inner[i])?;
            let (_, _, h, w) = lat.dims4()?;
            last = (lat + upsample_nearest_torch(&last, h, w)?)?;
            out.insert(0, conv2d(&last, &self.layer[i])?);
        }
        let p6 = match self.opts.p6_from {
            P6From::P5 => conv2d(&out[2], &self.p6)?,
            P6From::C5 => conv2d(c5, &self.p6)?,
        };
        let p7 = conv2d(&p6.relu()?, &self.p7)?;
        out.push(p6);
        out.push(p7);
        Ok(out)
    }

    /// `(cls [B, A, C] logits, reg [B, A, 4] as (dy, dx, dh, dw))` of the levels.
    pub(crate) fn heads(&self, levels: &[Tensor]) -> Result<(Tensor, Tensor)> {
        let mut cls = Vec::with_capacity(levels.len());
        let mut reg = Vec::with_capacity(levels.len());
        for p in levels {
            cls.push(self.cls.forward(p, self.num_classes)?);
            reg.push(self.reg.forward(p, 4)?);
        }
        let reg = Tensor::cat(&reg, 1)?;
        let yx = Tensor::from_vec(vec![1u32, 0, 3, 2], 4, reg.device())?;
        Ok((Tensor::cat(&cls, 1)?, reg.index_select(&yx, D::Minus1)?))
    }
}
