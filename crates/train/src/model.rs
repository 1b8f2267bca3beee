//! Building models from configs, the seeded initialisation, and moving weights in and out of
//! checkpoints and pretrained files.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rand::{Rng, SeedableRng, rngs::StdRng};
use rand_distr::{Distribution, Normal};
use retinanet_detector::{DetectorConfig, RetinaNet, RetinaNetConfig};
use retinanet_extractor::{ResNet, ResNetConfig, is_buffer};

use crate::checkpoint::load_checkpoint;
use crate::config::{ModelConfig, depth_of};

/// The RetinaNet config of `model` for `num_classes` classes: its pyramid levels and anchors
/// per cell follow `model.anchors`, as the encoder's do.
pub fn retinanet_config(
    model: &ModelConfig,
    num_classes: usize,
    frozen_stages: usize,
) -> Result<RetinaNetConfig> {
    if num_classes == 0 {
        bail!("the data has no class");
    }
    let anchors = model.anchor_layout()?;
    let (first_level, num_levels) =
        DetectorConfig::levels_for_stride(anchors.first_stride, anchors.scales)?;
    let extractor = ResNetConfig {
        depth: model.depth()?,
        base_width: model.base_width,
        num_classes: None,
        frozen_stages,
    };
    let detector = DetectorConfig {
        num_classes,
        num_anchors: anchors.anchors_per_cell(),
        fpn_channels: model.fpn_channels,
        head_channels: model.head_channels,
        in_channels: extractor.out_channels(),
        out2_channels: extractor.out2_channels(),
        first_level,
        num_levels,
        style: model.variant.detector_style(),
    };
    Ok(RetinaNetConfig {
        extractor,
        detector,
    })
}

/// A RetinaNet with its variables, seeded.
pub fn build_retinanet(
    cfg: &RetinaNetConfig,
    seed: u64,
    device: &Device,
) -> Result<(VarMap, RetinaNet)> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = RetinaNet::new(vb, cfg).context("cannot build the RetinaNet")?;
    seeded_init(&varmap, seed)?;
    Ok((varmap, model))
}

/// The RetinaNet of a run's `model` for `num_classes` classes, seeded, with the model's
/// options that are not part of the layer shapes (the ResNet's BatchNorm eps) applied.
pub fn build_model(
    model: &ModelConfig,
    num_classes: usize,
    frozen_stages: usize,
    seed: u64,
    device: &Device,
) -> Result<(VarMap, RetinaNet)> {
    let cfg = retinanet_config(model, num_classes, frozen_stages)?;
    let (varmap, mut net) = build_retinanet(&cfg, seed, device)?;
    if let Some(e) = model.bn_eps {
        net.extractor.set_bn_eps(e);
    }
    Ok((varmap, net))
}

/// A ResNet with a classification head, seeded.
pub fn build_classifier(
    depth: usize,
    base_width: usize,
    classes: usize,
    seed: u64,
    device: &Device,
) -> Result<(VarMap, ResNet)> {
    let cfg = ResNetConfig {
        depth: depth_of(depth)?,
        base_width,
        num_classes: Some(classes),
        frozen_stages: 0,
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = ResNet::new(vb.pp("extractor"), &cfg).context("cannot build the ResNet")?;
    seeded_init(&varmap, seed)?;
    Ok((varmap, model))
}

/// Re-draws every variable from a generator seeded with `seed`, with the model crates'
/// distributions, so a run's initial weights depend on its seed alone (candle's CPU generator
/// cannot be seeded). Variables are visited in name order.
///
/// Extractor convolutions: Kaiming normal, fan-out, ReLU gain; BatchNorm: weight 1, bias 0,
/// running mean 0, variance 1; `fc`: uniform `±1/sqrt(fan_in)` (PyTorch's `Linear`); detector
/// convolutions: N(0, 0.01), bias 0, the last classification bias `-ln(99)`.
pub fn seeded_init(varmap: &VarMap, seed: u64) -> Result<()> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = StdRng::seed_from_u64(seed);
    let last_cls = last_cls_bias_name(&data);
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let n: usize = dims.iter().product();
        let leaf = name.rsplit('.').next().unwrap_or("");
        let is_bn = name.contains(".bn")
            || name.starts_with("extractor.bn")
            || name.contains("downsample.1.")
            // torchvision v2's head GroupNorms: `head.*.conv.{i}.1.*`.
            || (name.starts_with("detector.head.") && name.contains(".1."));
        let values: Vec<f32> = if leaf == "running_mean" {
            vec![0.0; n]
        } else if leaf == "running_var" {
            vec![1.0; n]
        } else if is_bn {
            vec![if leaf == "weight" { 1.0 } else { 0.0 }; n]
        } else if name.starts_with("extractor.fc.") {
            let fan_in = if leaf == "weight" {
                dims[1]
            } else {
                data["extractor.fc.weight"].dims()[1]
            };
            let b = 1.0 / (fan_in as f32).sqrt();
            (0..n).map(|_| rng.random_range(-b..b)).collect()
        } else if leaf == "bias" {
            let v = if Some(name) == last_cls.as_ref() {
                -(99f32).ln()
            } else {
                0.0
            };
            vec![v; n]
        } else if name.starts_with("extractor.") {
            // Conv weight [out, in, kh, kw]: std = sqrt(2 / fan_out).
            let fan_out = dims[0] * dims[2..].iter().product::<usize>();
            normal(&mut rng, n, (2.0 / fan_out as f64).sqrt())
        } else if name.starts_with("detector.fpn.") {
            // torchvision's FPN: kaiming_uniform_(a = 1), bound sqrt(3 / fan_in).
            let fan_in: usize = dims[1..].iter().product();
            let b = (3.0 / fan_in as f32).sqrt();
            (0..n).map(|_| rng.random_range(-b..b)).collect()
        } else {
            normal(&mut rng, n, 0.01)
        };
        var.set(&Tensor::from_vec(values, dims.as_slice(), var.device())?)
            .with_context(|| format!("initialising `{name}`"))?;
    }
    Ok(())
}

fn normal(rng: &mut StdRng, n: usize, std: f64) -> Vec<f32> {
    let d = Normal::new(0.0, std).expect("positive std");
    (0..n).map(|_| d.sample(rng) as f32).collect()
}

/// `detector.conv_cls.<last>.bias`: the classification head's output bias.
fn last_cls_bias_name(data: &HashMap<String, Var>) -> Option<String> {
    const TV: &str = "detector.head.classification_head.cls_logits.bias";
    if data.contains_key(TV) {
        return Some(TV.into());
    }
    data.keys()
        .filter_map(|k| {
            let rest = k
                .strip_prefix("detector.conv_cls.")?
                .strip_suffix(".bias")?;
            rest.parse::<usize>().ok().map(|i| (i, k.clone()))
        })
        .max()
        .map(|(_, k)| k)
}

/// The trainable variables (BatchNorm statistics excluded), by name.
pub fn trainable_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<(String, Var)> = data
        .iter()
        .filter(|(k, _)| !is_buffer(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// All variables as tensors, for a checkpoint.
pub fn varmap_tensors(varmap: &VarMap) -> HashMap<String, Tensor> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    data.iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

/// Sets every variable from `tensors` (other names, such as optimizer state, are ignored);
/// a missing or mis-shaped tensor is an error naming it.
pub fn assign_from(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    source: &Path,
) -> Result<()> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let Some(t) = tensors.get(name) else {
            bail!(
                "{}: no tensor `{name}` (the checkpoint is of another architecture)",
                source.display()
            );
        };
        if t.dims() != var.dims() {
            bail!(
                "{}: tensor `{name}` has shape {:?}, the model expects {:?} (another architecture or class count)",
                source.display(),
                t.dims(),
                var.dims()
            );
        }
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// Loads pretrained extractor weights into a detector's `extractor.*` variables: a `pretrain`
/// checkpoint of this project, or a torchvision / tutorial ResNet state dict (`.pth`,
/// `.safetensors`). The classification head of the file is ignored.
pub fn load_pretrained_extractor(varmap: &VarMap, path: &Path, device: &Device) -> Result<()> {
    if !path.exists() {
        bail!(
            "train.pretrained = {}: the file does not exist",
            path.display()
        );
    }
    if let Ok(ck) = load_checkpoint(path, device) {
        if ck.meta.kind != "extractor" {
            bail!(
                "{} is a `{}` checkpoint, not a pretrained extractor",
                path.display(),
                ck.meta.kind
            );
        }
        let wanted: HashMap<String, Tensor> = ck
            .tensors
            .into_iter()
            .filter(|(k, _)| k.starts_with("extractor.") && !k.starts_with("extractor.fc."))
            .collect();
        let sub = VarMap::new();
        {
            let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
            let mut sd = sub.data().lock().unwrap_or_else(|e| e.into_inner());
            for (k, v) in data.iter().filter(|(k, _)| k.starts_with("extractor.")) {
                sd.insert(k.clone(), v.clone());
            }
        }
        return assign_from(&sub, &wanted, path);
    }
    retinanet_extractor::weights::load_resnet(varmap, path, "extractor.", true)
        .context("train.pretrained")
}
