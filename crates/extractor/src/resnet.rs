//! ResNet-18/34/50/101 with torchvision's tensor names.

use crate::bn::BatchNorm2d;
use crate::ops::{conv2d, conv2d_add_relu, conv2d_relu, kernel_params, max_pool2d};
use candle_core::{Module, Result, Tensor, bail};
use candle_nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use candle_nn::{Conv2d, Conv2dConfig, Init, Linear, VarBuilder};

/// ResNet depth: the block type and the number of blocks per stage follow from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// Basic blocks 2, 2, 2, 2.
    R18,
    /// Basic blocks 3, 4, 6, 3.
    R34,
    /// Bottlenecks 3, 4, 6, 3 (the tutorial's extractor).
    R50,
    /// Bottlenecks 3, 4, 23, 3.
    R101,
}

impl Depth {
    /// Parses 18, 34, 50 or 101.
    pub fn from_layers(n: usize) -> Option<Self> {
        match n {
            18 => Some(Self::R18),
            34 => Some(Self::R34),
            50 => Some(Self::R50),
            101 => Some(Self::R101),
            _ => None,
        }
    }

    /// Blocks per stage.
    pub fn blocks(self) -> [usize; 4] {
        match self {
            Self::R18 => [2, 2, 2, 2],
            Self::R34 | Self::R50 => [3, 4, 6, 3],
            Self::R101 => [3, 4, 23, 3],
        }
    }

    /// Whether the stages use bottleneck blocks (expansion 4) rather than basic blocks.
    pub fn bottleneck(self) -> bool {
        matches!(self, Self::R50 | Self::R101)
    }

    fn expansion(self) -> usize {
        if self.bottleneck() { 4 } else { 1 }
    }
}

/// Configuration of a [`ResNet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResNetConfig {
    /// Depth (block type and counts).
    pub depth: Depth,
    /// Stem width and width of the first stage (64 standard; 32 gives a half-width net).
    pub base_width: usize,
    /// Classes of the classification head (`fc`) used for pretraining; `None` builds no head.
    pub num_classes: Option<usize>,
    /// Parts frozen (no gradient; their BatchNorms stay in evaluation mode): 0 none, 1 the stem,
    /// `k` in 2..=5 the stem and the stages `layer1..layer(k-1)`.
    pub frozen_stages: usize,
}

impl ResNetConfig {
    /// The standard-width network of `depth`, with an optional classification head.
    pub fn new(depth: Depth, num_classes: Option<usize>) -> Self {
        Self {
            depth,
            base_width: 64,
            num_classes,
            frozen_stages: 0,
        }
    }

    /// ResNet-50 without a classification head.
    pub fn resnet50() -> Self {
        Self::new(Depth::R50, None)
    }

    /// ResNet-18 without a classification head.
    pub fn resnet18() -> Self {
        Self::new(Depth::R18, None)
    }

    /// Channels of out3, out4, out5 (e.g. 512/1024/2048 for ResNet-50, 128/256/512 for 18/34).
    pub fn out_channels(&self) -> [usize; 3] {
        let e = self.depth.expansion();
        let w = self.base_width;
        [2 * w * e, 4 * w * e, 8 * w * e]
    }

    /// Channels of out2, the first stage's output at stride 4 (256 for ResNet-50, 64 for 18/34).
    pub fn out2_channels(&self) -> usize {
        self.base_width * self.depth.expansion()
    }
}

/// Kaiming normal, fan-out, ReLU gain: torchvision's ResNet convolution init.
const KAIMING_FAN_OUT: Init = Init::Kaiming {
    dist: NormalOrUniform::Normal,
    fan: FanInOut::FanOut,
    non_linearity: NonLinearity::ReLU,
};

fn conv(
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let w = vb.get_with_hints((cout, cin, k, k), "weight", KAIMING_FAN_OUT)?;
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    Ok(Conv2d::new(w, None, cfg))
}

/// A copy of `c` whose weights share storage but are not tracked for backprop.
pub(crate) fn detach_conv(c: &Conv2d) -> Conv2d {
    Conv2d::new(
        c.weight().detach(),
        c.bias().map(Tensor::detach),
        *c.config(),
    )
}

/// Conv + BN of the projection shortcut (`downsample.0` / `downsample.1`).
#[derive(Debug, Clone)]
struct Downsample {
    conv: Conv2d,
    bn: BatchNorm2d,
}

impl Downsample {
    fn new(cin: usize, cout: usize, stride: usize, vb: VarBuilder) -> Result<Option<Self>> {
        if stride == 1 && cin == cout {
            return Ok(None);
        }
        Ok(Some(Self {
            conv: conv(cin, cout, 1, stride, 0, vb.pp("0"))?,
            bn: BatchNorm2d::new(cout, vb.pp("1"))?,
        }))
    }

    fn detached(&self) -> Self {
        Self {
            conv: detach_conv(&self.conv),
            bn: self.bn.detached(),
        }
    }

    fn forward(ds: &Option<Self>, x: &Tensor, train: bool, folded: bool) -> Result<Tensor> {
        match ds {
            Some(d) if folded => conv2d(x, &d.conv),
            Some(d) => conv_bn(x, &d.conv, &d.bn, train, false),
            None => Ok(x.clone()),
        }
    }

    fn folded(&self) -> Result<Self> {
        Ok(Self {
            conv: fold_bn(&self.conv, &self.bn)?,
            bn: self.bn.detached(),
        })
    }
}

/// `bn(conv(x))`, then a ReLU when `relu`. With BN in evaluation mode (inference, frozen BN)
/// the BN is folded into the convolution — weights scaled per output channel, the shift as its
/// bias — so the layer is one pass over its output instead of three; autograd still reaches the
/// convolution and BN parameters through the scaling. The weights are scaled on every call, so
/// a layer is folded only where its weights are smaller than its output (not ResNet-50's last
/// stages at small batches, where scaling 2.4M weights would cost more than it saves).
fn conv_bn(
    x: &Tensor,
    conv: &Conv2d,
    bn: &BatchNorm2d,
    bn_train: bool,
    relu: bool,
) -> Result<Tensor> {
    let out_elems: usize = retinanet_kernels::conv2d_out_dims(
        x.dims(),
        conv.weight().dims(),
        kernel_params(conv.config()),
    )?
    .iter()
    .product();
    if bn_train || conv.bias().is_some() || conv.weight().elem_count() > out_elems {
        return bn.forward_act(&conv2d(x, conv)?, bn_train, relu);
    }
    let (scale, shift) = bn.eval_affine()?;
    let w = conv
        .weight()
        .broadcast_mul(&scale.reshape((scale.dim(0)?, 1, 1, 1))?)?;
    let folded = Conv2d::new(w, Some(shift), *conv.config());
    if relu {
        conv2d_relu(x, &folded)
    } else {
        conv2d(x, &folded)
    }
}

/// `conv` with `bn` (evaluation mode) folded in, detached: weights `w * scale` per output
/// channel, bias `b * scale + shift` (`shift` alone without a bias), computed once.
fn fold_bn(conv: &Conv2d, bn: &BatchNorm2d) -> Result<Conv2d> {
    let (scale, shift) = bn.eval_affine()?;
    let (scale, shift) = (scale.detach(), shift.detach());
    let w = conv
        .weight()
        .detach()
        .broadcast_mul(&scale.reshape((scale.dim(0)?, 1, 1, 1))?)?;
    let b = match conv.bias() {
        Some(b) => ((b.detach() * &scale)? + shift)?,
        None => shift,
    };
    Ok(Conv2d::new(w, Some(b), *conv.config()))
}

/// A residual block: basic (two 3x3 convs) or bottleneck (1x1, 3x3 with the stride, 1x1).
#[derive(Debug, Clone)]
struct Block {
    convs: Vec<(Conv2d, BatchNorm2d)>,
    downsample: Option<Downsample>,
}

impl Block {
    fn new(
        bottleneck: bool,
        cin: usize,
        planes: usize,
        stride: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        // (in, out, kernel, stride, padding) per conv.
        let specs: Vec<(usize, usize, usize, usize, usize)> = if bottleneck {
            vec![
                (cin, planes, 1, 1, 0),
                (planes, planes, 3, stride, 1),
                (planes, planes * 4, 1, 1, 0),
            ]
        } else {
            vec![(cin, planes, 3, stride, 1), (planes, planes, 3, 1, 1)]
        };
        let cout = specs.last().map_or(planes, |s| s.1);
        let mut convs = Vec::with_capacity(specs.len());
        for (i, &(a, b, k, s, p)) in specs.iter().enumerate() {
            convs.push((
                conv(a, b, k, s, p, vb.pp(format!("conv{}", i + 1)))?,
                BatchNorm2d::new(b, vb.pp(format!("bn{}", i + 1)))?,
            ));
        }
        let downsample = Downsample::new(cin, cout, stride, vb.pp("downsample"))?;
        Ok(Self { convs, downsample })
    }

    fn detached(&self) -> Self {
        Self {
            convs: self
                .convs
                .iter()
                .map(|(c, bn)| (detach_conv(c), bn.detached()))
                .collect(),
            downsample: self.downsample.as_ref().map(Downsample::detached),
        }
    }

    fn forward_t(&self, x: &Tensor, train: bool, folded: bool) -> Result<Tensor> {
        let last = self.convs.len() - 1;
        let mut y = x.clone();
        if folded {
            // BN lives in the convolutions' weights and biases; the shortcut is ready before the
            // last convolution, which adds it and applies the ReLU as it writes its output.
            for (c, _) in &self.convs[..last] {
                y = conv2d_relu(&y, c)?;
            }
            let shortcut = Downsample::forward(&self.downsample, x, false, true)?;
            return conv2d_add_relu(&y, &self.convs[last].0, &shortcut);
        }
        for (c, bn) in &self.convs[..last] {
            y = conv_bn(&y, c, bn, train, true)?;
        }
        let shortcut = Downsample::forward(&self.downsample, x, train, false)?;
        let (c, bn) = &self.convs[last];
        if train {
            // BN, the addition and the ReLU in one op (one pass each way, one gradient fewer
            // for candle to accumulate).
            return bn.forward_add_relu(&conv2d(&y, c)?, &shortcut, true);
        }
        retinanet_kernels::add_relu(&conv_bn(&y, c, bn, false, false)?, &shortcut)
    }

    fn folded(&self) -> Result<Self> {
        Ok(Self {
            convs: self
                .convs
                .iter()
                .map(|(c, bn)| Ok((fold_bn(c, bn)?, bn.detached())))
                .collect::<Result<_>>()?,
            downsample: self
                .downsample
                .as_ref()
                .map(Downsample::folded)
                .transpose()?,
        })
    }
}

/// A ResNet feature extractor with torchvision's layout and names (`conv1`, `bn1`,
/// `layer{1..4}.{i}.conv{k}/bn{k}/downsample.{0,1}`, `fc`).
#[derive(Debug, Clone)]
pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm2d,
    stages: [Vec<Block>; 4],
    fc: Option<Linear>,
    cfg: ResNetConfig,
    freeze_bn: bool,
    /// Every BatchNorm folded into its convolution ([`ResNet::folded`]): inference only.
    folded: bool,
}

impl ResNet {
    /// Builds the network from `vb` (new variables get torchvision's init: Kaiming normal
    /// fan-out for convolutions, BN weight 1 / bias 0, PyTorch's default for `fc`).
    pub fn new(vb: VarBuilder, cfg: &ResNetConfig) -> Result<Self> {
        if cfg.base_width == 0 {
            bail!("resnet: base_width must be positive")
        }
        if cfg.frozen_stages > 5 {
            bail!("resnet: frozen_stages is {}, at most 5", cfg.frozen_stages)
        }
        let w = cfg.base_width;
        let conv1 = conv(3, w, 7, 2, 3, vb.pp("conv1"))?;
        let bn1 = BatchNorm2d::new(w, vb.pp("bn1"))?;
        let bottleneck = cfg.depth.bottleneck();
        let exp = cfg.depth.expansion();
        let mut cin = w;
        let mut stages: [Vec<Block>; 4] = Default::default();
        for (s, (&n, stage)) in cfg.depth.blocks().iter().zip(stages.iter_mut()).enumerate() {
            let planes = w << s;
            let vbs = vb.pp(format!("layer{}", s + 1));
            for i in 0..n {
                let stride = if s > 0 && i == 0 { 2 } else { 1 };
                stage.push(Block::new(bottleneck, cin, planes, stride, vbs.pp(i))?);
                cin = planes * exp;
            }
        }
        let fc = match cfg.num_classes {
            Some(n) => Some(candle_nn::linear(cin, n, vb.pp("fc"))?),
            None => None,
        };
        Ok(Self {
            conv1,
            bn1,
            stages,
            fc,
            cfg: *cfg,
            freeze_bn: false,
            folded: false,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ResNetConfig {
        &self.cfg
    }

    /// Channels of out3, out4, out5.
    pub fn out_channels(&self) -> [usize; 3] {
        self.cfg.out_channels()
    }

    /// Channels of out2.
    pub fn out2_channels(&self) -> usize {
        self.cfg.out2_channels()
    }

    /// A copy for inference: the same weights (shared storage, so later training updates show)
    /// but not tracked for backprop, so a forward pass frees its activations as it goes instead
    /// of keeping the whole graph alive (candle tracks every op that touches a variable).
    pub fn detached(&self) -> Self {
        Self {
            conv1: detach_conv(&self.conv1),
            bn1: self.bn1.detached(),
            stages: self
                .stages
                .each_ref()
                .map(|s| s.iter().map(Block::detached).collect()),
            fc: self
                .fc
                .as_ref()
                .map(|l| Linear::new(l.weight().detach(), l.bias().map(Tensor::detach))),
            cfg: self.cfg,
            freeze_bn: self.freeze_bn,
            folded: self.folded,
        }
    }

    /// A copy for inference with every BatchNorm folded into the convolution before it, once
    /// (weights scaled per output channel, the shift as the bias; PyTorch's
    /// `fuse_conv_bn_eval`), and each residual block's add and ReLU fused into its last
    /// convolution: one pass over each layer's output. Not tracked for backprop; equal to
    /// evaluation mode up to float rounding. The BatchNorms' `eps` and statistics are read
    /// now: fold again after changing them. Training a folded copy is refused.
    pub fn folded(&self) -> Result<Self> {
        if self.folded {
            return Ok(self.clone());
        }
        let mut f = self.detached();
        f.conv1 = fold_bn(&self.conv1, &self.bn1)?;
        for (dst, src) in f.stages.iter_mut().zip(&self.stages) {
            *dst = src.iter().map(Block::folded).collect::<Result<_>>()?;
        }
        f.folded = true;
        Ok(f)
    }

    /// Whether this is a [`ResNet::folded`] copy.
    pub fn is_folded(&self) -> bool {
        self.folded
    }

    /// Keeps every BatchNorm in evaluation mode (running statistics, no update) even when
    /// `train` is true — the tutorial's `freeze_bn` for detector training.
    pub fn set_freeze_bn(&mut self, freeze: bool) {
        self.freeze_bn = freeze;
    }

    /// Takes every BatchNorm's training statistics over the batches of all ranks of a
    /// data-parallel run (`Some`: SyncBatchNorm) or of this process (`None`, the default).
    pub fn set_sync_bn(
        &mut self,
        reducer: Option<std::sync::Arc<dyn retinanet_kernels::SumReducer>>,
    ) {
        self.bn1.set_sync(reducer.clone());
        for block in self.stages.iter_mut().flatten() {
            for (_, bn) in &mut block.convs {
                bn.set_sync(reducer.clone());
            }
            if let Some(d) = &mut block.downsample {
                d.bn.set_sync(reducer.clone());
            }
        }
    }

    /// Sets every BatchNorm's `eps` (see [`crate::BatchNorm2d::set_eps`]).
    pub fn set_bn_eps(&mut self, eps: f64) {
        self.bn1.set_eps(eps);
        for block in self.stages.iter_mut().flatten() {
            for (_, bn) in &mut block.convs {
                bn.set_eps(eps);
            }
            if let Some(d) = &mut block.downsample {
                d.bn.set_eps(eps);
            }
        }
    }

    /// Whether BatchNorm is frozen (see [`ResNet::set_freeze_bn`]).
    pub fn freeze_bn(&self) -> bool {
        self.freeze_bn
    }

    /// Sets how many leading parts are frozen (see [`ResNetConfig::frozen_stages`]).
    pub fn set_frozen_stages(&mut self, n: usize) -> Result<()> {
        if n > 5 {
            bail!("resnet: frozen_stages is {n}, at most 5")
        }
        self.cfg.frozen_stages = n;
        Ok(())
    }

    /// `[out2, out3, out4, out5]` at strides 4, 8, 16, 32: the four stages' outputs. `train`
    /// selects batch statistics for BatchNorm (unless frozen).
    pub fn features_t(&self, x: &Tensor, train: bool) -> Result<[Tensor; 4]> {
        self.features(x, train)
    }

    /// Runs the stem and stages; returns `[out2, out3, out4, out5]`.
    fn features(&self, x: &Tensor, train: bool) -> Result<[Tensor; 4]> {
        let frozen = self.cfg.frozen_stages;
        // BN of part `p` (0 = stem) trains only if neither BN nor that part is frozen.
        let bn_train = |p: usize| train && !self.freeze_bn && p >= frozen;
        let folded = self.folded;
        if folded && (0..5).any(bn_train) {
            bail!("resnet: a folded copy (BatchNorm inside the convolutions) is for inference only")
        }
        let mut x = if folded {
            conv2d_relu(x, &self.conv1)?
        } else {
            conv_bn(x, &self.conv1, &self.bn1, bn_train(0), true)?
        };
        x = max_pool2d(&x, 3, 2, 1)?;
        if frozen >= 1 {
            x = x.detach();
        }
        let mut outs: Vec<Tensor> = Vec::with_capacity(4);
        for (s, stage) in self.stages.iter().enumerate() {
            for b in stage {
                x = b.forward_t(&x, bn_train(s + 1), folded)?;
            }
            if frozen >= s + 2 {
                x = x.detach();
            }
            outs.push(x.clone());
        }
        let [o2, o3, o4, o5]: [Tensor; 4] = outs
            .try_into()
            .map_err(|_| candle_core::Error::Msg("resnet: expected four stages".into()))?;
        Ok([o2, o3, o4, o5])
    }

    /// `(out3, out4, out5)` at strides 8, 16, 32. `train` selects batch statistics for
    /// BatchNorm (unless frozen).
    pub fn forward_t(&self, x: &Tensor, train: bool) -> Result<(Tensor, Tensor, Tensor)> {
        let [_, o3, o4, o5] = self.features(x, train)?;
        Ok((o3, o4, o5))
    }

    /// Evaluation-mode [`ResNet::forward_t`].
    pub fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        self.forward_t(x, false)
    }

    /// Classification logits `[B, num_classes]`: global average pool of out5 and `fc`.
    /// Errors when the network was built without a head.
    pub fn classify_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let Some(fc) = &self.fc else {
            bail!("resnet: no classification head (num_classes is None)")
        };
        let [_, _, _, o5] = self.features(x, train)?;
        fc.forward(&o5.mean((2, 3))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    #[test]
    fn folded_batch_norm_equals_conv_then_batch_norm() -> Result<()> {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let c = conv(3, 5, 3, 2, 1, vb.pp("c"))?;
        let bn = BatchNorm2d::new(5, vb.pp("bn"))?;
        // BN weight, bias and running statistics away from the identity (all positive).
        for (name, v) in vm.data().lock().unwrap().iter() {
            if name.starts_with("bn.") {
                v.set(&Tensor::arange(0f32, 5., &dev)?.affine(0.3, 0.5)?)?;
            }
        }
        let x = Tensor::randn(0f32, 1., (2, 3, 9, 7), &dev)?;
        let r = Tensor::randn(0f32, 1., (2, 5, 5, 4), &dev)?;
        for relu in [false, true] {
            let folded = conv_bn(&x, &c, &bn, false, relu)?;
            let mut plain = bn.forward_t(&conv2d(&x, &c)?, false)?;
            if relu {
                plain = plain.relu()?;
            }
            let diff = (&folded - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "relu {relu}: values differ by {diff}");
            let g1 = (&folded * &r)?.sum_all()?.backward()?;
            let g2 = (&plain * &r)?.sum_all()?.backward()?;
            for (name, v) in vm.data().lock().unwrap().iter() {
                if name.contains("running") {
                    continue;
                }
                let (a, b) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let s = b.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    d <= 1e-4 * s.max(1.0),
                    "relu {relu}: grad of {name} differs by {d}"
                );
            }
        }
        Ok(())
    }

    /// Every BatchNorm as its own op after its convolution (batch statistics when `train`) and
    /// candle's addition and ReLU: the unfused network, for comparison.
    fn unfolded_features(net: &ResNet, x: &Tensor, train: bool) -> Result<Vec<Tensor>> {
        let cb = |x: &Tensor, c: &Conv2d, bn: &BatchNorm2d| bn.forward_t(&conv2d(x, c)?, train);
        let mut x = cb(x, &net.conv1, &net.bn1)?.relu()?;
        x = max_pool2d(&x, 3, 2, 1)?;
        let mut outs = Vec::new();
        for stage in &net.stages {
            for b in stage {
                let mut y = x.clone();
                for (i, (c, bn)) in b.convs.iter().enumerate() {
                    y = cb(&y, c, bn)?;
                    if i + 1 < b.convs.len() {
                        y = y.relu()?;
                    }
                }
                let sc = match &b.downsample {
                    Some(d) => cb(&x, &d.conv, &d.bn)?,
                    None => x.clone(),
                };
                x = (y + sc)?.relu()?;
            }
            outs.push(x.clone());
        }
        Ok(outs)
    }

    /// A ResNet of `depth` and base width `width` with fresh weights, and its variables.
    fn test_net(depth: Depth, width: usize, dev: &Device) -> Result<(VarMap, ResNet)> {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
        let cfg = ResNetConfig {
            base_width: width,
            ..ResNetConfig::new(depth, None)
        };
        let net = ResNet::new(vb, &cfg)?;
        Ok((vm, net))
    }

    /// In training mode (batch statistics) the fused residual ends — BN, addition and ReLU in one
    /// op — give the unfused network's features and gradients of every parameter and the input.
    #[test]
    fn fused_training_blocks_equal_unfused() -> Result<()> {
        let dev = Device::Cpu;
        for (depth, width, size) in [(Depth::R18, 8, 41), (Depth::R50, 4, 33)] {
            let (vm, net) = test_net(depth, width, &dev)?;
            // BN weights and biases away from (1, 0), so a swapped or dropped one shows.
            for (i, (name, v)) in vm.data().lock().unwrap().iter().enumerate() {
                if name.contains("bn") && !name.contains("running") {
                    let u = Tensor::rand(0f32, 1., v.elem_count(), &dev)?;
                    v.set(&u.affine(0.8, 0.3 + 0.02 * (i % 5) as f64)?)?;
                }
            }
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 3, size, size + 2), &dev)?)?;
            let got = net.features_t(&x, true)?;
            let want = unfolded_features(&net, &x, true)?;
            // One random weighting of every output for both.
            let rs = got
                .iter()
                .map(|o| Tensor::rand(-1f32, 1., o.dims(), &dev))
                .collect::<Result<Vec<_>>>()?;
            let loss = |outs: &[Tensor]| -> Result<Tensor> {
                let mut l = Tensor::zeros((), DType::F32, &dev)?;
                for (o, r) in outs.iter().zip(&rs) {
                    l = (l + (o * r)?.sum_all()?)?;
                }
                Ok(l)
            };
            let g1 = loss(&got)?.backward()?;
            let g2 = loss(&want)?.backward()?;
            for (k, (a, b)) in got.iter().zip(&want).enumerate() {
                let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let s = b.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    s > 0.1 && d <= 1e-5 * s,
                    "{depth:?} out{}: {d} (scale {s})",
                    k + 2
                );
            }
            let mut vars: Vec<(String, Tensor)> = vm
                .data()
                .lock()
                .unwrap()
                .iter()
                .filter(|(n, _)| !n.contains("running"))
                .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                .collect();
            vars.push(("input".into(), x.as_tensor().clone()));
            for (name, v) in vars {
                let (Some(a), Some(b)) = (g1.get(&v), g2.get(&v)) else {
                    panic!("{depth:?} {name}: no gradient");
                };
                let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let s = b.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(
                    d <= 1e-4 * s.max(1e-3),
                    "{depth:?} {name}: grads differ by {d} (scale {s})"
                );
            }
        }
        Ok(())
    }

    /// The folded inference copy equals the unfolded network in evaluation mode to 1e-5
    /// relative, for basic blocks and bottlenecks, with BatchNorm weights, biases and running
    /// statistics drawn away from the identity; it refuses training, and folding it again is a
    /// no-op.
    #[test]
    fn folded_network_equals_unfolded() -> Result<()> {
        let dev = Device::Cpu;
        for (depth, width, size) in [(Depth::R18, 16, 45), (Depth::R50, 8, 37)] {
            let (vm, net) = test_net(depth, width, &dev)?;
            for (i, (name, v)) in vm.data().lock().unwrap().iter().enumerate() {
                if !name.contains("bn") {
                    continue;
                }
                let n = v.elem_count();
                let u = Tensor::rand(0f32, 1., n, &dev)?;
                let t = match name.rsplit('.').next() {
                    Some("running_var") => u.affine(1.5, 0.2)?,
                    Some("running_mean") => u.affine(0.6, -0.3)?,
                    Some("weight") => u.affine(1.0, 0.4 + 0.01 * (i % 7) as f64)?,
                    _ => u.affine(0.4, -0.2)?,
                };
                v.set(&t)?;
            }
            let x = Tensor::randn(0f32, 1., (2, 3, size, size + 4), &dev)?;
            let want = unfolded_features(&net, &x, false)?;
            let folded = net.folded()?;
            assert!(folded.is_folded() && !net.is_folded());
            let got = folded.features_t(&x, false)?;
            for (k, (a, b)) in got.iter().zip(&want).enumerate() {
                let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
                let s = b.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(s > 0.1, "{depth:?} out{}: all but zero", k + 2);
                assert!(
                    d <= 1e-5 * s,
                    "{depth:?} out{}: differs by {d} (scale {s})",
                    k + 2
                );
            }
            let again = folded.folded()?.features_t(&x, false)?;
            let d = (&again[3] - &got[3])?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "folding twice changed the output");
            let e = folded.features_t(&x, true).unwrap_err();
            assert!(e.to_string().contains("inference only"), "{e}");
        }
        Ok(())
    }
}
