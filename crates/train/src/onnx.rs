//! ONNX export of a detector's inference graph (`convert onnx`).
//!
//! The graph is the project's evaluation-mode forward pass, op for op: ResNet stem, max-pool,
//! stages, the FPN of the detector's levels (P2..P7 as configured) and the two shared heads,
//! with every BatchNorm folded into the convolution before it (in f64, rounded once to f32).
//!
//! * input `image` `[1, 3, H, W]` f32, `H` and `W` symbolic: the pixels the project's inference
//!   feeds the network, RGB planes normalised as `(v / 255 - MEAN[c]) / STD[c]` with ImageNet's
//!   [`retinanet_dataset::MEAN`] / [`retinanet_dataset::STD`] (resizing, if any, is the caller's);
//! * output `cls` `[1, A, C]`: sigmoid scores `1 / (1 + exp(-logit))`, the probabilities the
//!   decoder thresholds; `cls_logits` `[1, A, C]`: the logits themselves (the network's `cls`);
//! * output `reg` `[1, A, 4]`: the box deltas `(dy, dx, dh, dw)`;
//! * output `anchors` `[A, 4]`: the anchors `(y, x, h, w)` (centre and size, pixels of the
//!   input), computed inside the graph from the input's shape exactly as
//!   [`retinanet_anchors::gen_anchors`] lays them out (level, row, column, anchor).
//!
//! `A` is the same for all three; a box is `y = dy * h + ay`, `x = dx * w + ax`,
//! `h' = exp(dh) * h`, `w' = exp(dw) * w`, `[y - h'/2, x - w'/2, y + h'/2, x + w'/2]`
//! (`ymin, xmin, ymax, xmax`), as `Encoder::decode` computes it before NMS.
//!
//! The bilinear upsampling of the top-down path (`align_corners = True`) is written as two
//! matrix products with interpolation matrices built in the graph from the two maps' shapes, as
//! the project computes it, rather than `Resize`: the spec's aligned-corners formula divides by
//! zero where an output side has length 1 (small inputs reach it), leaving that to each runtime.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::ops::RangeInclusive;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{Device, Tensor};
use rand::{SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, StandardNormal};
use retinanet_anchors::{AnchorConfig, gen_anchors};
use retinanet_detector::{Depth, DetectorConfig};

use crate::detect::LoadedDetector;
use crate::model::varmap_tensors;
use crate::onnx_proto::{Attr, Dim, FLOAT, INT64, Msg, model, node, tensor_f32, tensor_i64};

/// The opset `convert onnx` writes by default (tract and onnxruntime both run it).
pub const DEFAULT_OPSET: i64 = 17;

/// The opsets the exporter can write: no op the graph uses changed its signature or meaning
/// between them (it avoids `Squeeze` / `Unsqueeze`, whose axes became an input in 13), and IR
/// version 8 covers them all.
pub const OPSETS: RangeInclusive<i64> = 13..=18;

/// BatchNorm's epsilon in this project (PyTorch's default, as `BatchNorm2d`).
const BN_EPS: f64 = 1e-5;

/// Names of the graph's input and outputs.
pub const INPUT: &str = "image";
/// Sigmoid class scores `[1, A, C]`.
pub const CLS: &str = "cls";
/// Class logits `[1, A, C]`.
pub const CLS_LOGITS: &str = "cls_logits";
/// Box deltas `[1, A, 4]`.
pub const REG: &str = "reg";
/// Anchors `(y, x, h, w)` `[A, 4]`.
pub const ANCHORS: &str = "anchors";

/// What [`export_onnx`] wrote.
#[derive(Clone, Debug)]
pub struct OnnxSummary {
    /// Nodes in the graph.
    pub nodes: usize,
    /// Parameters (folded weights and biases).
    pub parameters: usize,
    /// File size in bytes.
    pub bytes: usize,
}

/// Writes the inference graph of `det` to `path` (atomically: a temporary file beside it,
/// then a rename) at `opset`. Every error names `path`.
pub fn export_onnx(det: &LoadedDetector, path: &Path, opset: i64) -> Result<OnnxSummary> {
    let (bytes, nodes, parameters) = onnx_model(det, opset)
        .with_context(|| format!("cannot export the model to {}", path.display()))?;
    crate::checkpoint::write_atomic(path, "", |f| Ok(f.write_all(&bytes)?))?;
    Ok(OnnxSummary {
        nodes,
        parameters,
        bytes: bytes.len(),
    })
}

/// The ONNX `ModelProto` bytes of `det`'s inference graph, with its node and parameter counts.
pub fn onnx_model(det: &LoadedDetector, opset: i64) -> Result<(Vec<u8>, usize, usize)> {
    if !OPSETS.contains(&opset) {
        bail!(
            "opset {opset} is not supported: use {} to {}",
            OPSETS.start(),
            OPSETS.end()
        );
    }
    let ecfg = *det.model.extractor.config();
    let dcfg = *det.model.detector.config();
    let anchors = det.config.model.anchor_layout()?;
    check_anchors(&anchors, &dcfg)?;
    let tensors = varmap_tensors(&det.varmap);
    let mut g = Graph::new(&tensors);
    g.bn_eps = det.config.model.bn_eps.unwrap_or(BN_EPS);

    let feats = g.extractor(INPUT, ecfg.depth)?;
    let (c, k) = (dcfg.num_classes, dcfg.num_anchors);
    let mut cls = Vec::new();
    let mut reg = Vec::new();
    let tv = match dcfg.style {
        retinanet_detector::DetectorStyle::Torchvision(o) => Some(o),
        retinanet_detector::DetectorStyle::Tutorial => None,
    };
    if let Some(o) = tv {
        for p in &g.tv_pyramid(&feats, o)? {
            let hc = "detector.head.classification_head";
            let hr = "detector.head.regression_head";
            cls.push(g.tv_head(p, hc, "cls_logits", c, o.head_group_norm)?);
            reg.push(g.tv_head(p, hr, "bbox_reg", 4, o.head_group_norm)?);
        }
    } else {
        for p in &g.pyramid(&feats, &dcfg)? {
            cls.push(g.head(p, "detector.conv_cls", c)?);
            reg.push(g.head(p, "detector.conv_reg", 4)?);
        }
    }
    let cls_refs: Vec<&str> = cls.iter().map(String::as_str).collect();
    let reg_refs: Vec<&str> = reg.iter().map(String::as_str).collect();
    g.node_to("Concat", CLS_LOGITS, &cls_refs, &[("axis", Attr::Int(1))]);
    if tv.is_some() {
        // torchvision predicts (dx, dy, dw, dh); the project's order is (dy, dx, dh, dw).
        let r = g.op("Concat", "reg", &reg_refs, &[("axis", Attr::Int(1))]);
        let yx = g.i64s(&[4], &[1, 0, 3, 2]);
        g.node_to("Gather", REG, &[&r, &yx], &[("axis", Attr::Int(2))]);
    } else {
        g.node_to("Concat", REG, &reg_refs, &[("axis", Attr::Int(1))]);
    }
    g.anchors(INPUT, &anchors, ANCHORS);
    g.node_to("Sigmoid", CLS, &[CLS_LOGITS], &[]);

    let f32s = |name: &str, shape: &[Dim]| crate::onnx_proto::value_info(name, FLOAT, shape);
    let a = Dim::Named("A");
    let inputs = [f32s(
        INPUT,
        &[
            Dim::Fixed(1),
            Dim::Fixed(3),
            Dim::Named("H"),
            Dim::Named("W"),
        ],
    )];
    let outputs = [
        f32s(CLS, &[Dim::Fixed(1), a.clone(), Dim::Fixed(c)]),
        f32s(REG, &[Dim::Fixed(1), a.clone(), Dim::Fixed(4)]),
        f32s(ANCHORS, &[a.clone(), Dim::Fixed(4)]),
        f32s(CLS_LOGITS, &[Dim::Fixed(1), a, Dim::Fixed(c)]),
    ];
    let m = &det.config.model;
    let doc = format!(
        "RetinaNet (ResNet-{} width {}, FPN {}, heads {}, P{}..P{}, {k} anchors per cell, {c} classes), \
         BatchNorm folded. Input `image` [1, 3, H, W]: RGB planes, (v / 255 - mean) / std with \
         mean {:?}, std {:?}. Outputs: `cls` [1, A, C] sigmoid scores, `cls_logits` [1, A, C], \
         `reg` [1, A, 4] deltas (dy, dx, dh, dw), `anchors` [A, 4] (y, x, h, w) in input pixels; \
         box = (dy * h + y, dx * w + x, exp(dh) * h, exp(dw) * w) as centre and size.",
        m.depth,
        m.base_width,
        m.fpn_channels,
        m.head_channels,
        dcfg.first_level,
        dcfg.last_level(),
        retinanet_dataset::MEAN,
        retinanet_dataset::STD,
    );
    let metadata = [
        ("class_names", serde_json::to_string(&det.class_names)?),
        ("input_mean", format!("{:?}", retinanet_dataset::MEAN)),
        ("input_std", format!("{:?}", retinanet_dataset::STD)),
        (
            "anchors",
            crate::config::to_toml(&det.config.model.anchors)?,
        ),
        (
            "box_convention",
            "ymin, xmin, ymax, xmax; anchors y, x, h, w".into(),
        ),
    ];
    let (nodes, parameters) = (g.nodes.len(), g.parameters);
    let bytes = model(
        "retinanet",
        &g.nodes,
        &g.inits,
        &inputs,
        &outputs,
        opset,
        &doc,
        &metadata,
    );
    Ok((bytes, nodes, parameters))
}

/// The anchors must be the ones the heads were built for.
fn check_anchors(anchors: &AnchorConfig, d: &DetectorConfig) -> Result<()> {
    if anchors.first_stride != d.first_stride()
        || anchors.scales != d.num_levels
        || anchors.anchors_per_cell() != d.num_anchors
    {
        bail!(
            "the anchor layout (first stride {}, {} levels, {} per cell) does not fit the heads (P{}, {} levels, {} anchors per cell)",
            anchors.first_stride,
            anchors.scales,
            anchors.anchors_per_cell(),
            d.first_level,
            d.num_levels,
            d.num_anchors
        );
    }
    Ok(())
}

/// The graph being built: nodes, initialisers, and the weights they come from.
struct Graph<'a> {
    tensors: &'a HashMap<String, Tensor>,
    /// The ResNet's BatchNorm eps (`model.bn_eps`).
    bn_eps: f64,
    nodes: Vec<Msg>,
    inits: Vec<Msg>,
    /// Initialisers made already (the heads' weights are shared by every level).
    made: HashSet<String>,
    parameters: usize,
    next: usize,
}

impl<'a> Graph<'a> {
    fn new(tensors: &'a HashMap<String, Tensor>) -> Self {
        Self {
            tensors,
            bn_eps: BN_EPS,
            nodes: Vec::new(),
            inits: Vec::new(),
            made: HashSet::new(),
            parameters: 0,
            next: 0,
        }
    }

    /// A node with one fresh output named after `hint`.
    fn op(&mut self, op: &str, hint: &str, inputs: &[&str], attrs: &[(&str, Attr)]) -> String {
        self.next += 1;
        let out = format!("{hint}:{}", self.next);
        self.nodes.push(node(op, &out, inputs, &[&out], attrs));
        out
    }

    /// A node writing the value `out` (a graph output).
    fn node_to(&mut self, op: &str, out: &str, inputs: &[&str], attrs: &[(&str, Attr)]) {
        self.nodes.push(node(op, out, inputs, &[out], attrs));
    }

    /// An int64 constant (scalar with `dims` empty).
    fn i64s(&mut self, dims: &[usize], data: &[i64]) -> String {
        self.next += 1;
        let name = format!("const_i64:{}", self.next);
        self.inits.push(tensor_i64(&name, dims, data));
        name
    }

    /// An f32 constant.
    fn f32s(&mut self, dims: &[usize], data: &[f32]) -> String {
        self.next += 1;
        let name = format!("const_f32:{}", self.next);
        self.inits.push(tensor_f32(&name, dims, data));
        name
    }

    fn weight(&self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let t = self
            .tensors
            .get(name)
            .with_context(|| format!("the model has no tensor `{name}`"))?;
        let t = t.to_device(&Device::Cpu)?;
        Ok((t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?))
    }

    /// Convolution `layer` (`layer.weight`, `layer.bias` if any) with stride `stride` and
    /// padding `k / 2`, as every convolution of the project; `bn` folded in; a ReLU after it
    /// when `relu`.
    fn conv(
        &mut self,
        x: &str,
        layer: &str,
        stride: usize,
        bn: Option<&str>,
        relu: bool,
    ) -> Result<String> {
        let wname = format!("{layer}.weight");
        let bname = format!("{layer}.bias");
        let (dims, _) = self.weight(&wname)?;
        if dims.len() != 4 || dims[2] != dims[3] {
            bail!("`{wname}` has shape {dims:?}, not a square 2-D convolution");
        }
        let (cout, k) = (dims[0], dims[2]);
        if !self.made.contains(&wname) {
            let (_, w) = self.weight(&wname)?;
            let b = match self.tensors.contains_key(&bname) {
                true => self.weight(&bname)?.1,
                false => vec![0.0; cout],
            };
            let (w, b) = match bn {
                Some(bn) => self.fold(&w, &b, bn)?,
                None => (w, b),
            };
            self.parameters += w.len() + b.len();
            self.inits.push(tensor_f32(&wname, &dims, &w));
            self.inits.push(tensor_f32(&bname, &[cout], &b));
            self.made.insert(wname.clone());
        }
        let p = (k / 2) as i64;
        let y = self.op(
            "Conv",
            layer,
            &[x, &wname, &bname],
            &[
                ("kernel_shape", Attr::Ints(vec![k as i64, k as i64])),
                ("strides", Attr::Ints(vec![stride as i64, stride as i64])),
                ("pads", Attr::Ints(vec![p, p, p, p])),
                ("dilations", Attr::Ints(vec![1, 1])),
                ("group", Attr::Int(1)),
            ],
        );
        Ok(if relu {
            self.op("Relu", layer, &[&y], &[])
        } else {
            y
        })
    }

    /// `bn(conv(x))` as one convolution: per output channel `s = gamma / sqrt(var + eps)`,
    /// weights `w * s`, bias `beta + (b - mean) * s`, in f64.
    fn fold(&self, w: &[f32], b: &[f32], bn: &str) -> Result<(Vec<f32>, Vec<f32>)> {
        let get = |leaf: &str| -> Result<Vec<f32>> {
            let (dims, v) = self.weight(&format!("{bn}.{leaf}"))?;
            if dims != [b.len()] {
                bail!(
                    "`{bn}.{leaf}` has shape {dims:?}, the convolution {} channels",
                    b.len()
                );
            }
            Ok(v)
        };
        let (gamma, beta) = (get("weight")?, get("bias")?);
        let (mean, var) = (get("running_mean")?, get("running_var")?);
        let per = w.len() / b.len();
        let mut wf = Vec::with_capacity(w.len());
        let mut bf = Vec::with_capacity(b.len());
        for o in 0..b.len() {
            let s = gamma[o] as f64 / (var[o] as f64 + self.bn_eps).sqrt();
            wf.extend(
                w[o * per..(o + 1) * per]
                    .iter()
                    .map(|&v| (v as f64 * s) as f32),
            );
            bf.push((beta[o] as f64 + (b[o] as f64 - mean[o] as f64) * s) as f32);
        }
        Ok((wf, bf))
    }

    /// The ResNet: `[out2, out3, out4, out5]` of `x`.
    fn extractor(&mut self, x: &str, depth: Depth) -> Result<[String; 4]> {
        let e = "extractor";
        let mut x = self.conv(x, &format!("{e}.conv1"), 2, Some(&format!("{e}.bn1")), true)?;
        x = self.op(
            "MaxPool",
            &format!("{e}.maxpool"),
            &[&x],
            &[
                ("kernel_shape", Attr::Ints(vec![3, 3])),
                ("strides", Attr::Ints(vec![2, 2])),
                ("pads", Attr::Ints(vec![1, 1, 1, 1])),
            ],
        );
        let convs = if depth.bottleneck() { 3 } else { 2 };
        // The stride sits in the first conv of a basic block, the 3x3 (second) of a bottleneck.
        let strided = if depth.bottleneck() { 2 } else { 1 };
        let mut outs = Vec::with_capacity(4);
        for (s, &n) in depth.blocks().iter().enumerate() {
            for i in 0..n {
                let b = format!("{e}.layer{}.{i}", s + 1);
                let stride = if s > 0 && i == 0 { 2 } else { 1 };
                let mut y = x.clone();
                for c in 1..=convs {
                    let st = if c == strided { stride } else { 1 };
                    y = self.conv(
                        &y,
                        &format!("{b}.conv{c}"),
                        st,
                        Some(&format!("{b}.bn{c}")),
                        c != convs,
                    )?;
                }
                let shortcut = if self
                    .tensors
                    .contains_key(&format!("{b}.downsample.0.weight"))
                {
                    self.conv(
                        &x,
                        &format!("{b}.downsample.0"),
                        stride,
                        Some(&format!("{b}.downsample.1")),
                        false,
                    )?
                } else {
                    x.clone()
                };
                let sum = self.op("Add", &b, &[&y, &shortcut], &[]);
                x = self.op("Relu", &b, &[&sum], &[]);
            }
            outs.push(x.clone());
        }
        Ok(outs.try_into().expect("four stages"))
    }

    /// `Gather(Shape(x), axis)` as an int64 scalar.
    fn dim(&mut self, x: &str, axis: i64) -> String {
        let shape = self.op("Shape", "shape", &[x], &[]);
        let i = self.i64s(&[], &[axis]);
        self.op("Gather", "dim", &[&shape, &i], &[("axis", Attr::Int(0))])
    }

    /// `Cast(Range(0, n, 1), float)`: `[n]` values `0, 1, ..., n - 1`.
    fn iota(&mut self, n: &str) -> String {
        let (zero, one) = (self.i64s(&[], &[0]), self.i64s(&[], &[1]));
        let r = self.op("Range", "range", &[&zero, n, &one], &[]);
        self.op("Cast", "range_f", &[&r], &[("to", Attr::Int(FLOAT))])
    }

    /// The `[n_out, n_in]` matrix of 1-D linear interpolation with aligned corners (the
    /// project's `interp_matrix`): output `o` samples `src = o (n_in - 1) / max(n_out - 1, 1)`
    /// with the hat weights `max(0, 1 - |src - i|)` — `1 - l` and `l` on its two neighbours.
    fn interp(&mut self, n_in: &str, n_out: &str) -> String {
        let one = self.f32s(&[], &[1.0]);
        let fin = self.op("Cast", "n_in", &[n_in], &[("to", Attr::Int(FLOAT))]);
        let fout = self.op("Cast", "n_out", &[n_out], &[("to", Attr::Int(FLOAT))]);
        let num = self.op("Sub", "interp", &[&fin, &one], &[]);
        let den = self.op("Sub", "interp", &[&fout, &one], &[]);
        let den = self.op("Max", "interp", &[&den, &one], &[]);
        let o = self.iota(n_out);
        // o * (n_in - 1) is an exact integer: one rounding, in the division.
        let o = self.op("Mul", "interp", &[&o, &num], &[]);
        let src = self.op("Div", "interp", &[&o, &den], &[]);
        let col = self.i64s(&[2], &[-1, 1]);
        let src = self.op("Reshape", "interp", &[&src, &col], &[]);
        let i = self.iota(n_in);
        let row = self.i64s(&[2], &[1, -1]);
        let i = self.op("Reshape", "interp", &[&i, &row], &[]);
        let d = self.op("Sub", "interp", &[&src, &i], &[]);
        let d = self.op("Abs", "interp", &[&d], &[]);
        let w = self.op("Sub", "interp", &[&one, &d], &[]);
        self.op("Relu", "interp", &[&w], &[])
    }

    /// Bilinear resize (aligned corners) of `p` to the spatial size of `like`:
    /// `My · p · Mxᵀ`, as the project's `upsample_bilinear_ac`.
    fn upsample_like(&mut self, p: &str, like: &str) -> String {
        let (h, w) = (self.dim(p, 2), self.dim(p, 3));
        let (oh, ow) = (self.dim(like, 2), self.dim(like, 3));
        let mx = self.interp(&w, &ow);
        let mxt = self.op(
            "Transpose",
            "upsample",
            &[&mx],
            &[("perm", Attr::Ints(vec![1, 0]))],
        );
        let my = self.interp(&h, &oh);
        let cols = self.op("MatMul", "upsample", &[p, &mxt], &[]);
        self.op("MatMul", "upsample", &[&my, &cols], &[])
    }

    /// The pyramid levels `P{first}..P{last}` after their ReLUs (the detector's
    /// `pyramid_levels`).
    fn pyramid(&mut self, feats: &[String; 4], cfg: &DetectorConfig) -> Result<Vec<String>> {
        let d = "detector";
        let [o2, o3, o4, o5] = feats;
        let (first, last) = (cfg.first_level, cfg.last_level());
        let p5 = self.conv(o5, &format!("{d}.prj_5"), 1, None, false)?;
        let lateral = |g: &mut Self, p: &str, o: &str, k: usize| -> Result<String> {
            let q = g.conv(o, &format!("{d}.prj_{k}"), 1, None, false)?;
            let up = g.upsample_like(p, &q);
            Ok(g.op("Add", &format!("{d}.p{k}"), &[&up, &q], &[]))
        };
        let p4 = (first <= 4)
            .then(|| lateral(self, &p5, o4, 4))
            .transpose()?;
        let p3 = match &p4 {
            Some(p4) if first <= 3 => Some(lateral(self, p4, o3, 3)?),
            _ => None,
        };
        let p2 = match &p3 {
            Some(p3) if first <= 2 => Some(lateral(self, p3, o2, 2)?),
            _ => None,
        };
        let p6 = (last >= 6)
            .then(|| self.conv(o5, &format!("{d}.conv_out6"), 2, None, false))
            .transpose()?;
        let mut out = Vec::with_capacity(cfg.num_levels);
        for k in first..=last {
            let smooth = |g: &mut Self, p: &Option<String>| {
                g.conv(
                    p.as_ref().expect("top-down level"),
                    &format!("{d}.conv_{k}"),
                    1,
                    None,
                    true,
                )
            };
            out.push(match k {
                2 => smooth(self, &p2)?,
                3 => smooth(self, &p3)?,
                4 => smooth(self, &p4)?,
                5 => self.op("Relu", "detector.p5", &[&p5], &[]),
                6 => self.op("Relu", "detector.p6", &[p6.as_ref().expect("P6")], &[]),
                _ => {
                    let r6 = self.op("Relu", "detector.p6", &[p6.as_ref().expect("P6")], &[]);
                    self.conv(&r6, &format!("{d}.conv_out7"), 2, None, true)?
                }
            });
        }
        Ok(out)
    }

    /// A shared head on level `p`: conv + ReLU three times, a conv, then `[1, C*K, h, w]` to
    /// `[1, h * w * K, per_anchor]` in row, column, anchor order.
    fn head(&mut self, p: &str, name: &str, per_anchor: usize) -> Result<String> {
        let mut y = p.to_string();
        for i in [0, 2, 4, 6] {
            y = self.conv(&y, &format!("{name}.{i}"), 1, None, i != 6)?;
        }
        Ok(self.anchor_rows(&y, name, per_anchor))
    }

    /// A head's output `[1, C*K, h, w]` as `[1, h * w * K, per_anchor]`, in row, column, anchor
    /// order.
    fn anchor_rows(&mut self, y: &str, name: &str, per_anchor: usize) -> String {
        let t = self.op(
            "Transpose",
            name,
            &[y],
            &[("perm", Attr::Ints(vec![0, 2, 3, 1]))],
        );
        let shape = self.i64s(&[3], &[0, -1, per_anchor as i64]);
        self.op("Reshape", name, &[&t, &shape], &[])
    }

    /// PyTorch's `interpolate(mode="nearest")` of `p` to the spatial size of `like`: source
    /// index `floor(dst * (in / out))` in f32, at most `in - 1`, by Gather on each axis.
    fn nearest_like(&mut self, p: &str, like: &str) -> String {
        let mut y = p.to_string();
        for axis in [2i64, 3] {
            let n_in = self.dim(p, axis);
            let n_out = self.dim(like, axis);
            let fin = self.op("Cast", "n_in", &[&n_in], &[("to", Attr::Int(FLOAT))]);
            let fout = self.op("Cast", "n_out", &[&n_out], &[("to", Attr::Int(FLOAT))]);
            let scale = self.op("Div", "nearest", &[&fin, &fout], &[]);
            let o = self.iota(&n_out);
            let src = self.op("Mul", "nearest", &[&o, &scale], &[]);
            let src = self.op("Floor", "nearest", &[&src], &[]);
            let src = self.op("Cast", "nearest", &[&src], &[("to", Attr::Int(INT64))]);
            let one = self.i64s(&[], &[1]);
            let last = self.op("Sub", "nearest", &[&n_in, &one], &[]);
            let idx = self.op("Min", "nearest", &[&src, &last], &[]);
            y = self.op(
                "Gather",
                "nearest",
                &[&y, &idx],
                &[("axis", Attr::Int(axis))],
            );
        }
        y
    }

    /// torchvision's FPN: P3..P7 from C3..C5 (`feats[1..]`).
    fn tv_pyramid(
        &mut self,
        feats: &[String; 4],
        o: retinanet_detector::TvOptions,
    ) -> Result<Vec<String>> {
        let f = "detector.fpn";
        let c = [&feats[1], &feats[2], &feats[3]];
        let mut last = self.conv(c[2], &format!("{f}.inner_blocks.2.0"), 1, None, false)?;
        let mut out = vec![self.conv(&last, &format!("{f}.layer_blocks.2.0"), 1, None, false)?];
        for i in (0..2).rev() {
            let lat = self.conv(c[i], &format!("{f}.inner_blocks.{i}.0"), 1, None, false)?;
            let up = self.nearest_like(&last, &lat);
            last = self.op("Add", "fpn", &[&lat, &up], &[]);
            let p = self.conv(&last, &format!("{f}.layer_blocks.{i}.0"), 1, None, false)?;
            out.insert(0, p);
        }
        let p6_in = match o.p6_from {
            retinanet_detector::P6From::P5 => out[2].clone(),
            retinanet_detector::P6From::C5 => c[2].clone(),
        };
        let p6 = self.conv(&p6_in, &format!("{f}.extra_blocks.p6"), 2, None, false)?;
        let r6 = self.op("Relu", "fpn", &[&p6], &[]);
        let p7 = self.conv(&r6, &format!("{f}.extra_blocks.p7"), 2, None, false)?;
        out.push(p6);
        out.push(p7);
        Ok(out)
    }

    /// GroupNorm `name` (`name.weight`, `name.bias`) with `groups` groups and eps 1e-5, as
    /// InstanceNormalization over `[1, groups, C / groups * H * W]` and the per-channel affine.
    fn group_norm(&mut self, x: &str, name: &str, groups: usize) -> Result<String> {
        let (gdims, gamma) = self.weight(&format!("{name}.weight"))?;
        let (_, beta) = self.weight(&format!("{name}.bias"))?;
        let ch = gdims[0];
        let shape = self.op("Shape", "gn", &[x], &[]);
        let grouped = self.i64s(&[3], &[0, groups as i64, -1]);
        let r = self.op("Reshape", "gn", &[x, &grouped], &[]);
        let ones = self.f32s(&[groups], &vec![1.0; groups]);
        let zeros = self.f32s(&[groups], &vec![0.0; groups]);
        let n = self.op(
            "InstanceNormalization",
            "gn",
            &[&r, &ones, &zeros],
            &[("epsilon", Attr::Float(1e-5))],
        );
        let n = self.op("Reshape", "gn", &[&n, &shape], &[]);
        let g = self.f32s(&[ch, 1, 1], &gamma);
        let b = self.f32s(&[ch, 1, 1], &beta);
        self.parameters += 2 * ch;
        let y = self.op("Mul", "gn", &[&n, &g], &[]);
        Ok(self.op("Add", "gn", &[&y, &b], &[]))
    }

    /// A torchvision head on level `p`: four 3x3 convolutions (each with ReLU, after GroupNorm
    /// in v2), the output convolution `out`, then `[1, h * w * K, per_anchor]`.
    fn tv_head(
        &mut self,
        p: &str,
        name: &str,
        out: &str,
        per_anchor: usize,
        groups: Option<usize>,
    ) -> Result<String> {
        let mut y = p.to_string();
        for i in 0..4 {
            let conv = format!("{name}.conv.{i}.0");
            y = match groups {
                None => self.conv(&y, &conv, 1, None, true)?,
                Some(gr) => {
                    let c = self.conv(&y, &conv, 1, None, false)?;
                    let n = self.group_norm(&c, &format!("{name}.conv.{i}.1"), gr)?;
                    self.op("Relu", name, &[&n], &[])
                }
            };
        }
        let y = self.conv(&y, &format!("{name}.{out}"), 1, None, false)?;
        Ok(self.anchor_rows(&y, name, per_anchor))
    }

    /// The anchors `(y, x, h, w)` of the input `x`'s size into `out`, as `gen_anchors`: level
    /// `s` with nominal stride `t` has a `((H - 1) / t + 1) x ((W - 1) / t + 1)` grid, points
    /// every `t` pixels (torchvision's style: every `H // rows`, `W // cols`), and the level's
    /// cell boxes, in level, row, column, anchor order.
    fn anchors(&mut self, x: &str, cfg: &AnchorConfig, out: &str) {
        let tv = matches!(
            cfg.style,
            retinanet_anchors::AnchorStyle::Torchvision { .. }
        );
        let (h, w) = (self.dim(x, 2), self.dim(x, 3));
        let k = cfg.anchors_per_cell();
        let one = self.i64s(&[], &[1]);
        let vec1 = self.i64s(&[1], &[1]);
        let k1 = self.i64s(&[1], &[k as i64]);
        let mut levels = Vec::with_capacity(cfg.scales);
        for s in 0..cfg.scales {
            let t = self.i64s(&[], &[cfg.stride(s) as i64]);
            // Points row * stride in int64, then one exact conversion (as the f64 -> f32 of
            // gen_anchors for any size below 2^24).
            let points = |g: &mut Self, side: &str, shape: [i64; 4]| {
                let m = g.op("Sub", "anchors", &[side, &one], &[]);
                let n = g.op("Div", "anchors", &[&m, &t], &[]);
                let n = g.op("Add", "anchors", &[&n, &one], &[]);
                let stride = if tv {
                    // side // rows through f32 (exact below 2^16 pixels): tract cannot divide
                    // symbolic sizes by symbolic grid sizes.
                    let fs = g.op("Cast", "anchors", &[side], &[("to", Attr::Int(FLOAT))]);
                    let fn_ = g.op("Cast", "anchors", &[&n], &[("to", Attr::Int(FLOAT))]);
                    let q = g.op("Div", "anchors", &[&fs, &fn_], &[]);
                    let q = g.op("Floor", "anchors", &[&q], &[]);
                    g.op("Cast", "anchors", &[&q], &[("to", Attr::Int(INT64))])
                } else {
                    t.clone()
                };
                let (zero, step) = (g.i64s(&[], &[0]), g.i64s(&[], &[1]));
                let r = g.op("Range", "anchors", &[&zero, &n, &step], &[]);
                let c = g.op("Mul", "anchors", &[&r, &stride], &[]);
                let c = g.op("Cast", "anchors", &[&c], &[("to", Attr::Int(FLOAT))]);
                let sh = g.i64s(&[4], &shape);
                let c = g.op("Reshape", "anchors", &[&c, &sh], &[]);
                let n1 = g.op("Reshape", "anchors", &[&n, &vec1], &[]);
                (c, n1)
            };
            let (ys, fh) = points(self, &h, [-1, 1, 1, 1]);
            let (xs, fw) = points(self, &w, [1, -1, 1, 1]);
            let grid1 = self.op(
                "Concat",
                "anchors",
                &[&fh, &fw, &k1, &vec1],
                &[("axis", Attr::Int(0))],
            );
            let two = self.i64s(&[1], &[2]);
            let grid2 = self.op(
                "Concat",
                "anchors",
                &[&fh, &fw, &k1, &two],
                &[("axis", Attr::Int(0))],
            );
            let ys = self.op("Expand", "anchors", &[&ys, &grid1], &[]);
            let xs = self.op("Expand", "anchors", &[&xs, &grid1], &[]);
            let zero = self.f32s(&[1, 1, 1, 2], &[0.0, 0.0]);
            let zeros = self.op("Expand", "anchors", &[&zero, &grid2], &[]);
            let points = self.op(
                "Concat",
                "anchors",
                &[&ys, &xs, &zeros],
                &[("axis", Attr::Int(3))],
            );
            // Per cell box: (centre offset y, x, h, w), each exact in f32 (the tutorial's
            // offsets are 0 and its sides rounded once from f64; torchvision's are whole or
            // half pixels).
            let cell: Vec<f32> = cfg
                .cell_boxes(s)
                .iter()
                .flat_map(|b| {
                    let (bh, bw) = ((b[2] - b[0]) as f32, (b[3] - b[1]) as f32);
                    [b[0] as f32 + 0.5 * bh, b[1] as f32 + 0.5 * bw, bh, bw]
                })
                .collect();
            let cell = self.f32s(&[1, 1, k, 4], &cell);
            let a = self.op("Add", "anchors", &[&points, &cell], &[]);
            let flat = self.i64s(&[2], &[-1, 4]);
            levels.push(self.op("Reshape", "anchors", &[&a, &flat], &[]));
        }
        let refs: Vec<&str> = levels.iter().map(String::as_str).collect();
        self.node_to("Concat", out, &refs, &[("axis", Attr::Int(0))]);
    }
}

/// Inputs of the sizes `sizes` (`(H, W)`, seeded normal values) with the project's outputs on
/// them, for checking an export in another runtime: `image_{i}`, `cls_{i}` (sigmoid scores),
/// `cls_logits_{i}`, `reg_{i}` and `anchors_{i}` (`(y, x, h, w)`), f32, written as safetensors
/// to `path` (errors name it).
pub fn write_check_data(det: &LoadedDetector, sizes: &[(usize, usize)], path: &Path) -> Result<()> {
    let tensors = check_data(det, sizes, 0)?;
    candle_core::safetensors::save(&tensors, path)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// What [`write_check_data`] writes, by name.
pub fn check_data(
    det: &LoadedDetector,
    sizes: &[(usize, usize)],
    seed: u64,
) -> Result<HashMap<String, Tensor>> {
    let anchors = det.config.model.anchor_layout()?;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = HashMap::new();
    for (i, &(h, w)) in sizes.iter().enumerate() {
        if h == 0 || w == 0 {
            bail!("check size {h}x{w} is empty");
        }
        let v: Vec<f32> = (0..3 * h * w)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let x = Tensor::from_vec(v, (1, 3, h, w), &Device::Cpu)?;
        let (cls, reg) = det.model.infer(&x.to_device(&det.device)?)?;
        let (cls, reg) = (cls.to_device(&Device::Cpu)?, reg.to_device(&Device::Cpu)?);
        let a = gen_anchors(&anchors, (h, w));
        let a: Vec<f32> = a.yxhw.iter().flatten().copied().collect();
        let n = a.len() / 4;
        out.insert(
            format!("anchors_{i}"),
            Tensor::from_vec(a, (n, 4), &Device::Cpu)?,
        );
        out.insert(format!("cls_{i}"), sigmoid(&cls)?);
        out.insert(format!("cls_logits_{i}"), cls);
        out.insert(format!("reg_{i}"), reg);
        out.insert(format!("image_{i}"), x);
    }
    Ok(out)
}

/// The decoder's sigmoid, `1 / (1 + exp(-x))`, element by element.
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    let v: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let s: Vec<f32> = v.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect();
    Ok(Tensor::from_vec(s, x.dims(), &Device::Cpu)?)
}
