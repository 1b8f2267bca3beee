//! Weights in and out of the project.
//!
//! In: the tutorial's pair of PyTorch state dicts (`net_e.pkl`: the extractor, with the
//! tutorial's or torchvision's ResNet names; `net_d.pkl`: the detector, the tutorial's names;
//! `module.` prefixes from `nn.DataParallel` accepted) become a detector for inference — depth,
//! widths, anchors per cell and class count read from the tensors' shapes — or a checkpoint of
//! this project ([`save_as_checkpoint`]).
//!
//! Out: a checkpoint's weights under PyTorch names ([`export`]): the tutorial's (`net_e` /
//! `net_d`, as its `load_state_dict` wants them) or torchvision's for the ResNet (with
//! `num_batches_tracked`, and `fc` only when the checkpoint has one), written as safetensors or
//! as a `.pth` that `torch.load` reads ([`write_pth`]; candle writes none).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use retinanet_extractor::weights::{
    load_resnet, read_tensors, resnet_layout, strip_module_prefix, tutorial_to_torchvision,
};

use crate::checkpoint::{CheckpointMeta, FORMAT, save_checkpoint};
use crate::config::{DEFAULT_DETECTOR_TOML, DetectorRunConfig, ModelConfig, parse_config, to_toml};
use crate::detect::{LoadedDetector, encoder_for};
use crate::model::{build_model, varmap_tensors};

/// The 20 Pascal VOC classes (the tutorial's `VOC_LABEL_NAMES` without the background): the
/// names a 20-class pair of state dicts gets when none are given.
pub use retinanet_dataset::VOC_CLASSES;

/// torchvision's COCO category names of its detection models, by label (91: `__background__`
/// at 0, `N/A` for the ids COCO left unused), the names a 91-class torchvision RetinaNet gets
/// when none are given; label `k` is COCO's category id `k`.
pub const TORCHVISION_COCO_CATEGORIES: [&str; 91] = [
    "__background__",
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "N/A",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "N/A",
    "backpack",
    "umbrella",
    "N/A",
    "N/A",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "N/A",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "N/A",
    "dining table",
    "N/A",
    "N/A",
    "toilet",
    "N/A",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "N/A",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
];

/// The detector tensors a state dict must hold (the tutorial's names), without `.weight` /
/// `.bias`.
const DETECTOR_LAYERS: [&str; 14] = [
    "conv_out6",
    "prj_5",
    "prj_4",
    "prj_3",
    "conv_4",
    "conv_3",
    "conv_cls.0",
    "conv_cls.2",
    "conv_cls.4",
    "conv_cls.6",
    "conv_reg.0",
    "conv_reg.2",
    "conv_reg.4",
    "conv_reg.6",
];

/// A state dict read from `path` with `module.` prefixes stripped.
fn read_state_dict(path: &Path) -> Result<HashMap<String, Tensor>> {
    let t = read_tensors(path)?;
    Ok(t.into_iter()
        .map(|(k, v)| (strip_module_prefix(&k).to_string(), v))
        .collect())
}

/// What a pair of state dicts describes: the model, its class count and anchors per cell.
#[derive(Clone, Debug, PartialEq)]
pub struct PairLayout {
    /// Depth and widths.
    pub model: ModelConfig,
    /// Object classes.
    pub num_classes: usize,
    /// Anchors per cell.
    pub num_anchors: usize,
}

/// Reads the model's shape from the tensors of the tutorial's two state dicts.
pub fn pair_layout(
    extractor: &HashMap<String, Tensor>,
    detector: &HashMap<String, Tensor>,
    (e_path, d_path): (&Path, &Path),
) -> Result<PairLayout> {
    let mapped: Vec<(String, Vec<usize>)> = extractor
        .iter()
        .map(|(k, v)| (tutorial_to_torchvision(k), v.dims().to_vec()))
        .collect();
    let layout = resnet_layout(mapped.iter().map(|(k, d)| (k.as_str(), d.as_slice())))
        .with_context(|| {
            format!(
                "{}: no ResNet tensors (`layerS.I...` or `resblockS_I...`): is it the extractor's state dict?",
                e_path.display()
            )
        })?;
    let depth = layout.depth().with_context(|| {
        format!(
            "{}: {} is not a ResNet-18/34/50/101",
            e_path.display(),
            layout.describe()
        )
    })?;
    let base_width = layout.base_width.with_context(|| {
        format!(
            "{}: no stem convolution (`conv_input` / `conv1`)",
            e_path.display()
        )
    })?;
    let detector_is_a_resnet = detector
        .keys()
        .any(|k| k.starts_with("resblock") || k.starts_with("layer1."));
    let dims = |name: &str| -> Result<&[usize]> {
        let w = format!("{name}.weight");
        match detector.get(&w) {
            Some(t) => Ok(t.dims()),
            None if detector_is_a_resnet => bail!(
                "{} holds a ResNet, not the detector (no `{w}`): give the extractor's state dict first, the detector's second",
                d_path.display()
            ),
            None => bail!(
                "{}: no tensor `{w}` (the tutorial's detector has conv_out6, prj_3..5, conv_3/4, conv_cls.0-6, conv_reg.0-6)",
                d_path.display()
            ),
        }
    };
    let fpn_channels = dims("prj_5")?[0];
    let head_channels = dims("conv_cls.0")?[0];
    let reg_out = dims("conv_reg.6")?[0];
    let cls_out = dims("conv_cls.6")?[0];
    if reg_out % 4 != 0 || reg_out == 0 {
        bail!(
            "{}: conv_reg.6 has {reg_out} outputs, not 4 per anchor",
            d_path.display()
        );
    }
    let num_anchors = reg_out / 4;
    if cls_out % num_anchors != 0 || cls_out == 0 {
        bail!(
            "{}: conv_cls.6 has {cls_out} outputs, not a multiple of {num_anchors} anchors",
            d_path.display()
        );
    }
    Ok(PairLayout {
        model: ModelConfig {
            depth,
            base_width,
            fpn_channels,
            head_channels,
            // The tutorial's: checked against the heads' outputs by the caller.
            anchors: Default::default(),
            variant: Default::default(),
            bn_eps: None,
        },
        num_classes: cls_out / num_anchors,
        num_anchors,
    })
}

/// The class names for a model of `num_classes`: `names` when given (they must be as many),
/// else the VOC classes for 20.
pub fn class_names_for(num_classes: usize, names: Option<Vec<String>>) -> Result<Vec<String>> {
    names_or_default(num_classes, names, &VOC_CLASSES, "the detector", "")
}

/// `names` when given (as many as `num_classes`), else `default` when it has that many; the
/// errors say what `model` predicts (`hint`: more on the names file's form).
fn names_or_default(
    num_classes: usize,
    names: Option<Vec<String>>,
    default: &[&str],
    model: &str,
    hint: &str,
) -> Result<Vec<String>> {
    match names {
        Some(n) if n.len() == num_classes => Ok(n),
        Some(n) => bail!(
            "the names file has {} names, {model} predicts {num_classes} classes",
            n.len()
        ),
        None if num_classes == default.len() => Ok(default.iter().map(|s| s.to_string()).collect()),
        None => bail!(
            "{model} predicts {num_classes} classes: pass their names (--names FILE, one per line{hint})"
        ),
    }
}

/// A detector for inference from the tutorial's two state dicts (`names`: the class names,
/// `None` for the VOC classes of a 20-class detector). The run config is the built-in
/// default's with the model read from the tensors; evaluation settings come from it.
pub fn load_state_dict_pair(
    extractor_path: &Path,
    detector_path: &Path,
    names: Option<Vec<String>>,
    device: &Device,
) -> Result<LoadedDetector> {
    let ext = read_state_dict(extractor_path)
        .with_context(|| format!("the extractor state dict {}", extractor_path.display()))?;
    let det = read_state_dict(detector_path)
        .with_context(|| format!("the detector state dict {}", detector_path.display()))?;
    let layout = pair_layout(&ext, &det, (extractor_path, detector_path))?;
    if layout.num_anchors != 3 {
        bail!(
            "{}: {} anchors per cell; this model has the tutorial's 3",
            detector_path.display(),
            layout.num_anchors
        );
    }
    let class_names = class_names_for(layout.num_classes, names)?;
    let mut config: DetectorRunConfig = parse_config(DEFAULT_DETECTOR_TOML)?;
    config.name = "imported".into();
    config.model = layout.model.clone();
    let (varmap, model) = build_model(&config.model, class_names.len(), 0, 0, device)?;
    load_resnet(&varmap, extractor_path, "extractor.", true)
        .with_context(|| format!("the extractor state dict {}", extractor_path.display()))?;
    // The detector strictly: every layer present with its shape, nothing left over.
    let mut unused: Vec<&String> = det
        .keys()
        .filter(|k| {
            !DETECTOR_LAYERS
                .iter()
                .any(|l| *k == &format!("{l}.weight") || *k == &format!("{l}.bias"))
        })
        .collect();
    unused.sort();
    if let Some(k) = unused.first() {
        bail!(
            "{}: tensor `{k}` is not part of the tutorial's detector",
            detector_path.display()
        );
    }
    let prefixed: HashMap<String, Tensor> = det
        .iter()
        .map(|(k, v)| (format!("detector.{k}"), v.clone()))
        .collect();
    retinanet_extractor::weights::assign_strict(&varmap, &prefixed, "detector.", detector_path)?;
    let encoder = encoder_for(&config, class_names.len())?;
    Ok(LoadedDetector {
        model,
        varmap,
        encoder,
        class_names,
        config,
        device: device.clone(),
    })
}

/// Writes `det` as a detector checkpoint of this project (step 0, its config and classes), so
/// every command can use it.
pub fn save_as_checkpoint(det: &LoadedDetector, path: &Path) -> Result<()> {
    let meta = CheckpointMeta {
        format: FORMAT.into(),
        kind: "detector".into(),
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        seed: det.config.seed,
        config: to_toml(&det.config)?,
        class_names: det.class_names.clone(),
        extra: serde_json::json!({"imported": true}),
        checksum: None,
    };
    save_checkpoint(path, &varmap_tensors(&det.varmap), &meta)
}

/// Which names an export uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Naming {
    /// The tutorial's (`conv_input`, `resblockS_I.conv_K`, ...; the detector's as it is).
    Tutorial,
    /// torchvision's ResNet names with `num_batches_tracked`; the detector keeps the tutorial's.
    Torchvision,
}

/// torchvision's ResNet name as the tutorial's (the inverse of [`tutorial_to_torchvision`]).
pub fn torchvision_to_tutorial(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("conv1.") {
        return format!("conv_input.{rest}");
    }
    if let Some(rest) = name.strip_prefix("bn1.") {
        return format!("bn_input.{rest}");
    }
    let parts: Vec<&str> = name.split('.').collect();
    if let [layer, i, module, rest @ ..] = parts.as_slice()
        && let (Some(s), Ok(i)) = (
            layer
                .strip_prefix("layer")
                .and_then(|s| s.parse::<usize>().ok()),
            i.parse::<usize>(),
        )
    {
        let m = match *module {
            "downsample" => match rest.first() {
                Some(&"0") => "conv_prj".to_string(),
                Some(&"1") => "bn_prj".to_string(),
                _ => return name.to_string(),
            },
            m => match m
                .strip_prefix("conv")
                .map(|k| ("conv", k))
                .or_else(|| m.strip_prefix("bn").map(|k| ("bn", k)))
            {
                Some((kind, k)) if k.parse::<usize>().is_ok() => format!("{kind}_{k}"),
                _ => return name.to_string(),
            },
        };
        let tail = if *module == "downsample" {
            &rest[1..]
        } else {
            rest
        };
        return format!("resblock{s}_{}.{m}.{}", i + 1, tail.join("."));
    }
    name.to_string()
}

/// A checkpoint's weights as two PyTorch state dicts, `(extractor, detector)`, under `naming`.
/// Optimizer state is left out.
pub fn export(
    tensors: &HashMap<String, Tensor>,
    naming: Naming,
) -> Result<(BTreeMap<String, Tensor>, BTreeMap<String, Tensor>)> {
    let mut ext = BTreeMap::new();
    let mut det = BTreeMap::new();
    for (k, v) in tensors {
        let v = v.to_device(&Device::Cpu)?;
        if let Some(n) = k.strip_prefix("extractor.") {
            let name = match naming {
                Naming::Tutorial => torchvision_to_tutorial(n),
                Naming::Torchvision => n.to_string(),
            };
            if naming == Naming::Torchvision && n.ends_with(".running_var") {
                // torchvision's strict load wants each BatchNorm's batch counter.
                let counter = n.trim_end_matches("running_var").to_string() + "num_batches_tracked";
                ext.insert(counter, Tensor::new(0i64, &Device::Cpu)?);
            }
            ext.insert(name, v);
        } else if let Some(n) = k.strip_prefix("detector.") {
            if n.starts_with("fpn.") || n.starts_with("head.") {
                bail!(
                    "tensor `{k}` is torchvision's RetinaNet: export it with export_torchvision_retinanet (convert export --to torchvision)"
                );
            }
            det.insert(n.to_string(), v);
        }
    }
    if ext.is_empty() {
        bail!("the checkpoint has no extractor weights");
    }
    Ok((ext, det))
}

/// Writes `tensors` as a PyTorch state dict that `torch.load` reads (the zip format of
/// `torch.save` since PyTorch 1.6: `data.pkl` — a pickled `OrderedDict` of tensors rebuilt by
/// `torch._utils._rebuild_tensor_v2` from persistent storages — plus one raw little-endian
/// file per storage). f32, f64, i64, u8 and u32 (as i64) tensors. Written atomically.
pub fn write_pth(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let archive = path
        .file_stem()
        .map(|s| {
            s.to_string_lossy()
                .replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "archive".into());
    let mut pkl = Pickle::default();
    let mut storages: Vec<(String, Vec<u8>)> = Vec::new();
    pkl.proto();
    pkl.global("collections", "OrderedDict");
    pkl.empty_tuple();
    pkl.reduce();
    pkl.mark();
    for (i, (name, t)) in tensors.iter().enumerate() {
        let (storage, bytes) = storage_of(t).with_context(|| format!("tensor `{name}`"))?;
        let key = i.to_string();
        pkl.unicode(name);
        pkl.global("torch._utils", "_rebuild_tensor_v2");
        pkl.mark();
        // The persistent id: ('storage', <type>, key, location, numel).
        pkl.mark();
        pkl.unicode("storage");
        pkl.global("torch", storage);
        pkl.unicode(&key);
        pkl.unicode("cpu");
        pkl.int(t.elem_count() as u64);
        pkl.tuple();
        pkl.binpersid();
        pkl.int(0);
        let dims = t.dims();
        let mut strides = vec![1u64; dims.len()];
        for d in (0..dims.len().saturating_sub(1)).rev() {
            strides[d] = strides[d + 1] * dims[d + 1] as u64;
        }
        pkl.int_tuple(&dims.iter().map(|&d| d as u64).collect::<Vec<_>>());
        pkl.int_tuple(&strides);
        pkl.newfalse();
        pkl.global("collections", "OrderedDict");
        pkl.empty_tuple();
        pkl.reduce();
        pkl.tuple();
        pkl.reduce();
        storages.push((key, bytes));
    }
    pkl.setitems();
    pkl.stop();

    crate::checkpoint::write_atomic(path, "", |f| {
        let mut z = zip::ZipWriter::new(f);
        let opts: zip::write::SimpleFileOptions = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored)
            .large_file(true);
        z.start_file(format!("{archive}/data.pkl"), opts)?;
        z.write_all(&pkl.out)?;
        z.start_file(format!("{archive}/byteorder"), opts)?;
        z.write_all(b"little")?;
        for (key, bytes) in &storages {
            z.start_file(format!("{archive}/data/{key}"), opts)?;
            z.write_all(bytes)?;
        }
        z.start_file(format!("{archive}/version"), opts)?;
        z.write_all(b"3\n")?;
        z.finish()?;
        Ok(())
    })
}

/// The storage class and little-endian bytes of a tensor's data.
fn storage_of(t: &Tensor) -> Result<(&'static str, Vec<u8>)> {
    let t = t.to_device(&Device::Cpu)?.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => (
            "FloatStorage",
            t.to_vec1::<f32>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::F64 => (
            "DoubleStorage",
            t.to_vec1::<f64>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::I64 => (
            "LongStorage",
            t.to_vec1::<i64>()?
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
        ),
        DType::U32 => (
            "LongStorage",
            t.to_vec1::<u32>()?
                .iter()
                .flat_map(|&x| (x as i64).to_le_bytes())
                .collect(),
        ),
        DType::U8 => ("ByteStorage", t.to_vec1::<u8>()?),
        d => bail!("cannot write {d:?} tensors to a .pth"),
    })
}

/// The few pickle (protocol 2) opcodes a state dict needs.
#[derive(Default)]
struct Pickle {
    out: Vec<u8>,
}

impl Pickle {
    fn proto(&mut self) {
        self.out.extend_from_slice(&[0x80, 2]);
    }
    fn global(&mut self, module: &str, name: &str) {
        self.out.push(b'c');
        self.out.extend_from_slice(module.as_bytes());
        self.out.push(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(b'\n');
    }
    fn empty_tuple(&mut self) {
        self.out.push(b')');
    }
    fn reduce(&mut self) {
        self.out.push(b'R');
    }
    fn mark(&mut self) {
        self.out.push(b'(');
    }
    fn tuple(&mut self) {
        self.out.push(b't');
    }
    fn binpersid(&mut self) {
        self.out.push(b'Q');
    }
    fn newfalse(&mut self) {
        self.out.push(0x89);
    }
    fn setitems(&mut self) {
        self.out.push(b'u');
    }
    fn stop(&mut self) {
        self.out.push(b'.');
    }
    fn unicode(&mut self, s: &str) {
        self.out.push(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, v: u64) {
        if v < 256 {
            self.out.extend_from_slice(&[b'K', v as u8]);
        } else if v < 65536 {
            self.out.push(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if v <= i32::MAX as u64 {
            self.out.push(b'J');
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            // LONG1: little-endian two's complement of the needed length.
            let mut b = v.to_le_bytes().to_vec();
            while b.len() > 1 && b[b.len() - 1] == 0 && b[b.len() - 2] & 0x80 == 0 {
                b.pop();
            }
            if b[b.len() - 1] & 0x80 != 0 {
                b.push(0);
            }
            self.out.extend_from_slice(&[0x8a, b.len() as u8]);
            self.out.extend_from_slice(&b);
        }
    }
    fn int_tuple(&mut self, v: &[u64]) {
        if v.is_empty() {
            self.empty_tuple();
            return;
        }
        self.mark();
        for &x in v {
            self.int(x);
        }
        self.tuple();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        for tv in [
            "conv1.weight",
            "bn1.running_mean",
            "layer1.0.conv1.weight",
            "layer3.5.bn3.bias",
            "layer2.0.downsample.0.weight",
            "layer4.0.downsample.1.running_var",
            "fc.weight",
        ] {
            let tut = torchvision_to_tutorial(tv);
            assert_eq!(tutorial_to_torchvision(&tut), tv, "{tv} -> {tut}");
        }
        assert_eq!(
            torchvision_to_tutorial("layer2.0.downsample.0.weight"),
            "resblock2_1.conv_prj.weight"
        );
        assert_eq!(
            torchvision_to_tutorial("layer1.1.bn2.bias"),
            "resblock1_2.bn_2.bias"
        );
    }

    #[test]
    fn class_names_come_from_the_file_or_voc() {
        assert_eq!(class_names_for(20, None).unwrap()[14], "person");
        let e = class_names_for(4, None).unwrap_err().to_string();
        assert!(e.contains("--names"), "{e}");
        let e = class_names_for(3, Some(vec!["a".into()]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("1 names") && e.contains("3 classes"), "{e}");
    }
}

/// What a torchvision RetinaNet state dict describes.
#[derive(Clone, Debug, PartialEq)]
pub struct TorchvisionLayout {
    /// The model (its variant from the tensors: v2 when the heads have GroupNorm and P6 comes
    /// from C5).
    pub model: ModelConfig,
    /// Classes of `cls_logits` (torchvision's COCO models: 91, the background's label 0
    /// included).
    pub num_classes: usize,
}

/// Reads a torchvision `retinanet_resnet50_fpn` / `_v2` state dict's layout (`backbone.body.*`
/// ResNet, `backbone.fpn.*`, `head.*`).
pub fn torchvision_layout(sd: &HashMap<String, Tensor>, path: &Path) -> Result<TorchvisionLayout> {
    let dims = |k: &str| -> Result<&[usize]> {
        sd.get(k).map(|t| t.dims()).with_context(|| {
            format!(
                "{}: no tensor `{k}`: not a torchvision RetinaNet state dict (backbone.body.*, backbone.fpn.*, head.*)",
                path.display()
            )
        })
    };
    let body: Vec<(&str, &[usize])> = sd
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("backbone.body.")?, v.dims())))
        .collect();
    let layout = resnet_layout(body.iter().copied())
        .with_context(|| format!("{}: no ResNet under backbone.body.", path.display()))?;
    let depth = layout.depth().with_context(|| {
        format!(
            "{}: backbone.body is {}, not a ResNet-18/34/50/101",
            path.display(),
            layout.describe()
        )
    })?;
    let base_width = layout
        .base_width
        .with_context(|| format!("{}: no backbone.body.conv1.weight", path.display()))?;
    let fpn = dims("backbone.fpn.inner_blocks.0.0.weight")?[0];
    let p6_in = dims("backbone.fpn.extra_blocks.p6.weight")?[1];
    let group_norm = sd.contains_key("head.classification_head.conv.0.1.weight");
    let v2 = match (p6_in == fpn, group_norm) {
        (true, false) => false,
        (false, true) => true,
        (from_p5, gn) => bail!(
            "{}: P6 from {} with{} GroupNorm in the heads is neither retinanet_resnet50_fpn (P6 from P5, no GroupNorm) nor _v2 (P6 from C5, GroupNorm)",
            path.display(),
            if from_p5 { "P5" } else { "C5" },
            if gn { "" } else { "out" }
        ),
    };
    let a4 = dims("head.regression_head.bbox_reg.weight")?[0];
    let ac = dims("head.classification_head.cls_logits.weight")?[0];
    if a4 != 36 {
        bail!(
            "{}: bbox_reg has {a4} outputs, not 4 for each of torchvision's 9 anchors per cell",
            path.display()
        );
    }
    if ac == 0 || ac % 9 != 0 {
        bail!(
            "{}: cls_logits has {ac} outputs, not a multiple of 9 anchors per cell",
            path.display()
        );
    }
    let mut model = ModelConfig::torchvision(depth, v2, None);
    model.base_width = base_width;
    model.fpn_channels = fpn;
    model.head_channels = fpn;
    Ok(TorchvisionLayout {
        model,
        num_classes: ac / 9,
    })
}

/// A torchvision `retinanet_resnet50_fpn` (v1) or `retinanet_resnet50_fpn_v2` state dict
/// (`.pth` or `.safetensors`, by torchvision's names; `module.` prefixes allowed) as a detector
/// for inference, with torchvision's transform (shorter side 800, longer at most 1333) and
/// post-processing (score > 0.05, 1000 candidates per level, per-class NMS at 0.5, 300
/// detections). `names`: the class names by label (default for 91 classes: torchvision's COCO
/// categories); `bn_eps`: the ResNet's BatchNorm eps (default: 0 for v1, as torchvision sets for
/// its COCO weights, 1e-5 for v2).
pub fn load_torchvision_retinanet(
    path: &Path,
    names: Option<Vec<String>>,
    bn_eps: Option<f64>,
    device: &Device,
) -> Result<LoadedDetector> {
    let sd = read_state_dict(path)
        .with_context(|| format!("the torchvision RetinaNet {}", path.display()))?;
    let sd = torchvision_current_names(sd);
    let layout = torchvision_layout(&sd, path)?;
    let class_names = names_or_default(
        layout.num_classes,
        names,
        &TORCHVISION_COCO_CATEGORIES,
        &path.display().to_string(),
        ", label 0 first",
    )?;
    let mut config: DetectorRunConfig = parse_config(DEFAULT_DETECTOR_TOML)?;
    config.name = "torchvision".into();
    config.model = layout.model;
    let v2 = config.model.variant == crate::config::Variant::TorchvisionV2;
    config.model.bn_eps = Some(bn_eps.unwrap_or(if v2 { 1e-5 } else { 0.0 }));
    torchvision_inference_settings(&mut config);
    crate::config::Validate::validate(&config.model)?;
    let (varmap, model) = build_model(&config.model, class_names.len(), 0, 0, device)?;
    // torchvision's names onto ours; BatchNorm's step counters are not weights.
    let mut mapped: HashMap<String, Tensor> = HashMap::new();
    for (k, v) in &sd {
        if k.ends_with("num_batches_tracked") {
            continue;
        }
        let ours = if let Some(r) = k.strip_prefix("backbone.body.") {
            format!("extractor.{r}")
        } else if let Some(r) = k.strip_prefix("backbone.fpn.") {
            format!("detector.fpn.{r}")
        } else if let Some(r) = k.strip_prefix("head.") {
            format!("detector.head.{r}")
        } else {
            bail!(
                "{}: tensor `{k}` is not part of torchvision's RetinaNet (backbone.body.*, backbone.fpn.*, head.*)",
                path.display()
            );
        };
        mapped.insert(ours, v.to_dtype(DType::F32)?);
    }
    retinanet_extractor::weights::assign_strict(&varmap, &mapped, "", path)?;
    let encoder = encoder_for(&config, class_names.len())?;
    Ok(LoadedDetector {
        model,
        varmap,
        encoder,
        class_names,
        config,
        device: device.clone(),
    })
}

/// torchvision's RetinaNet transform and post-processing in a run config: shorter side 800
/// (longer at most 1333), score > 0.05, 1000 candidates per level, per-class NMS at 0.5, 300
/// detections, whole images.
pub fn torchvision_inference_settings(config: &mut DetectorRunConfig) {
    config.data.eval_size = 800;
    config.data.eval_max_size = 1333;
    config.eval.mode = crate::config::EvalMode::Whole;
    config.eval.score_th = 0.05;
    config.eval.nms_th = 0.5;
    config.eval.class_agnostic = false;
    config.eval.pre_nms_top_k = 1000;
    config.eval.max_detections = 300;
}

/// torchvision's heads before its version 2 (the COCO v1 weights file) named the four head
/// convolutions `conv.0`, `conv.2`, `conv.4`, `conv.6`; since then `conv.{i}.0`. Renames the
/// old ones, as torchvision's `_load_from_state_dict` does.
fn torchvision_current_names(sd: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    sd.into_iter()
        .map(|(k, v)| {
            for head in [
                "head.classification_head.conv.",
                "head.regression_head.conv.",
            ] {
                if let Some(rest) = k.strip_prefix(head)
                    && let Some((n, leaf)) = rest.split_once('.')
                    && (leaf == "weight" || leaf == "bias")
                    && let Ok(n) = n.parse::<usize>()
                    && n % 2 == 0
                {
                    return (format!("{head}{}.0.{leaf}", n / 2), v);
                }
            }
            (k, v)
        })
        .collect()
}

/// A torchvision-variant checkpoint's weights as one torchvision RetinaNet state dict
/// (`backbone.body.*`, `backbone.fpn.*`, `head.*`), as `retinanet_resnet50_fpn` (`v2`:
/// `_v2`, whose BatchNorms also carry `num_batches_tracked`) loads it strictly.
pub fn export_torchvision_retinanet(
    tensors: &HashMap<String, Tensor>,
    v2: bool,
) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (k, v) in tensors {
        let v = v.to_device(&Device::Cpu)?;
        let name = if let Some(n) = k.strip_prefix("extractor.") {
            if n.starts_with("fc.") {
                continue;
            }
            if v2 && n.ends_with(".running_var") {
                let counter = n.trim_end_matches("running_var").to_string() + "num_batches_tracked";
                out.insert(
                    format!("backbone.body.{counter}"),
                    Tensor::new(0i64, &Device::Cpu)?,
                );
            }
            format!("backbone.body.{n}")
        } else if let Some(n) = k.strip_prefix("detector.fpn.") {
            format!("backbone.fpn.{n}")
        } else if let Some(n) = k.strip_prefix("detector.head.") {
            format!("head.{n}")
        } else if k.starts_with("detector.") {
            bail!(
                "tensor `{k}` is not part of torchvision's RetinaNet: is the checkpoint the tutorial's model?"
            )
        } else {
            continue;
        };
        out.insert(name, v);
    }
    if !out.keys().any(|k| k.starts_with("head.")) {
        bail!("the checkpoint has no torchvision RetinaNet heads");
    }
    Ok(out)
}
