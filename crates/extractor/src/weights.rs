//! Reading checkpoints and state dicts into a [`VarMap`], with strict name and shape checks.

use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Errors of weight loading and saving; each names the file or tensor at fault.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file could not be read or parsed.
    #[error("cannot read weights from {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: Box<candle_core::Error>,
    },
    /// The file could not be written.
    #[error("cannot write weights to {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: Box<candle_core::Error>,
    },
    /// The model needs a tensor the file does not have.
    #[error("{path}: missing tensor `{name}` (expected shape {expected:?})")]
    Missing {
        /// The file.
        path: PathBuf,
        /// The model's name of the tensor.
        name: String,
        /// Its shape in the model.
        expected: Vec<usize>,
    },
    /// The file has a tensor the model does not.
    #[error("{path}: unexpected tensor `{name}` (file name `{original}`, shape {shape:?})")]
    Unexpected {
        /// The file.
        path: PathBuf,
        /// The name after mapping to the model's names.
        name: String,
        /// The name in the file.
        original: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A tensor's shape differs from the model's.
    #[error("{path}: tensor `{name}` has shape {found:?}, the model expects {expected:?}")]
    Shape {
        /// The file.
        path: PathBuf,
        /// The model's name of the tensor.
        name: String,
        /// The model's shape.
        expected: Vec<usize>,
        /// The file's shape.
        found: Vec<usize>,
    },
    /// A tensor could not be converted or copied into the model.
    #[error("{path}: cannot set tensor `{name}`: {source}")]
    Set {
        /// The file.
        path: PathBuf,
        /// The model's name.
        name: String,
        /// The underlying error.
        source: Box<candle_core::Error>,
    },
}

/// Whether a variable name is a BatchNorm buffer (`running_mean`, `running_var`,
/// `num_batches_tracked`) rather than a trainable parameter: optimisers must neither update nor
/// weight-decay these.
pub fn is_buffer(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    matches!(last, "running_mean" | "running_var" | "num_batches_tracked")
}

/// Reads every tensor of a `.safetensors` file or a PyTorch `.pth`/`.pt`/`.bin` pickle (a plain
/// state dict, or one under a `state_dict` or `model` key) onto the CPU.
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>, WeightsError> {
    let err = |source| WeightsError::Read {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext.eq_ignore_ascii_case("safetensors") {
        return candle_core::safetensors::load(path, &Device::Cpu).map_err(err);
    }
    // A plain state dict first; a wrapped checkpoint (other objects next to the weights) may
    // fail to parse as one, so its error is kept only if no key works either.
    let plain = candle_core::pickle::read_all(path);
    let mut all = match &plain {
        Ok(v) => v.clone(),
        Err(_) => Vec::new(),
    };
    for key in ["state_dict", "model"] {
        if !all.is_empty() {
            break;
        }
        all = candle_core::pickle::read_all_with_key(path, Some(key)).unwrap_or_default();
    }
    if all.is_empty() {
        return Err(err(match plain {
            Err(e) => e,
            Ok(_) => candle_core::Error::Msg(
                "no tensors found (neither a state dict nor one under `state_dict`/`model`)".into(),
            ),
        }));
    }
    Ok(all.into_iter().collect())
}

/// Strips the `module.` prefixes that `nn.DataParallel` / DDP saves carry.
pub fn strip_module_prefix(name: &str) -> &str {
    let mut n = name;
    while let Some(rest) = n.strip_prefix("module.") {
        n = rest;
    }
    n
}

/// Maps one of the tutorial's extractor names to torchvision's: `conv_input` → `conv1`,
/// `bn_input` → `bn1`, `resblockS_I.conv_k` → `layerS.(I-1).convk`, `bn_k` → `bnk`,
/// `conv_prj` → `downsample.0`, `bn_prj` → `downsample.1`; `fc` unchanged. Other names (e.g.
/// already torchvision's) are returned as they are.
pub fn tutorial_to_torchvision(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("conv_input.") {
        return format!("conv1.{rest}");
    }
    if let Some(rest) = name.strip_prefix("bn_input.") {
        return format!("bn1.{rest}");
    }
    let Some(rest) = name.strip_prefix("resblock") else {
        return name.to_string();
    };
    let Some((block, tail)) = rest.split_once('.') else {
        return name.to_string();
    };
    let Some((s, i)) = block.split_once('_') else {
        return name.to_string();
    };
    let (Ok(s), Ok(i)) = (s.parse::<usize>(), i.parse::<usize>()) else {
        return name.to_string();
    };
    if i == 0 {
        return name.to_string();
    }
    let Some((layer, param)) = tail.split_once('.') else {
        return name.to_string();
    };
    let layer = match layer {
        "conv_prj" => "downsample.0".to_string(),
        "bn_prj" => "downsample.1".to_string(),
        l => match l.split_once('_') {
            Some((kind @ ("conv" | "bn"), k)) if k.parse::<usize>().is_ok() => format!("{kind}{k}"),
            _ => return name.to_string(),
        },
    };
    format!("layer{s}.{}.{layer}.{param}", i - 1)
}

/// Copies `tensors` into the variables of `varmap` whose names start with `scope`, strictly:
/// every such variable must be present with its shape, and every tensor must match a variable.
/// `path` is only used in error messages. Tensors are converted to the variables' dtype and
/// device.
pub fn assign_strict(
    varmap: &VarMap,
    tensors: &HashMap<String, Tensor>,
    scope: &str,
    path: &Path,
) -> Result<(), WeightsError> {
    assign_mapped(
        varmap,
        tensors
            .iter()
            .map(|(k, v)| (k.clone(), (k.clone(), v.clone())))
            .collect(),
        scope,
        path,
    )
}

/// `mapped`: model name -> (file name, tensor).
fn assign_mapped(
    varmap: &VarMap,
    mapped: BTreeMap<String, (String, Tensor)>,
    scope: &str,
    path: &Path,
) -> Result<(), WeightsError> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let p = || path.to_path_buf();
    for (name, (original, t)) in &mapped {
        if !data.contains_key(name) {
            return Err(WeightsError::Unexpected {
                path: p(),
                name: name.clone(),
                original: original.clone(),
                shape: t.dims().to_vec(),
            });
        }
    }
    let mut names: Vec<&String> = data.keys().filter(|k| k.starts_with(scope)).collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let Some((_, t)) = mapped.get(name) else {
            return Err(WeightsError::Missing {
                path: p(),
                name: name.clone(),
                expected: var.dims().to_vec(),
            });
        };
        if t.dims() != var.dims() {
            return Err(WeightsError::Shape {
                path: p(),
                name: name.clone(),
                expected: var.dims().to_vec(),
                found: t.dims().to_vec(),
            });
        }
        let set_err = |source| WeightsError::Set {
            path: p(),
            name: name.clone(),
            source: Box::new(source),
        };
        let t = t
            .to_dtype(var.dtype())
            .and_then(|t| t.to_device(var.device()))
            .map_err(set_err)?;
        var.set(&t).map_err(set_err)?;
    }
    Ok(())
}

/// Loads a ResNet state dict — torchvision names, the tutorial's names, or the extractor part
/// of a project checkpoint — into the variables under `prefix` (e.g. `"extractor."`).
///
/// `module.` prefixes are stripped, `num_batches_tracked` entries ignored, a leading `prefix`
/// in the file is accepted. With `skip_fc` the file's `fc.*` tensors are ignored and the model's
/// head (if any) keeps its values — for fine-tuning from an ImageNet checkpoint.
pub fn load_resnet(
    varmap: &VarMap,
    path: &Path,
    prefix: &str,
    skip_fc: bool,
) -> Result<(), WeightsError> {
    let tensors = read_tensors(path)?;
    let mut mapped = BTreeMap::new();
    for (original, t) in tensors {
        let n = strip_module_prefix(&original);
        let n = n.strip_prefix(prefix).unwrap_or(n);
        if n.ends_with("num_batches_tracked") {
            continue;
        }
        let n = tutorial_to_torchvision(n);
        if skip_fc && n.starts_with("fc.") {
            continue;
        }
        mapped.insert(format!("{prefix}{n}"), (original, t));
    }
    if skip_fc {
        // The model's head keeps its values: pretend the file has them.
        let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        for (k, v) in data.iter() {
            if k.starts_with(&format!("{prefix}fc.")) {
                mapped.insert(
                    k.clone(),
                    (
                        k.clone(),
                        v.as_tensor().copy().map_err(|source| WeightsError::Set {
                            path: path.to_path_buf(),
                            name: k.clone(),
                            source: Box::new(source),
                        })?,
                    ),
                );
            }
        }
    }
    assign_mapped(varmap, mapped, prefix, path)
}

/// Loads a whole project checkpoint (safetensors written by [`save_varmap`]) into `varmap`,
/// strictly (all variables present, no extra tensors, shapes equal). `module.` prefixes and
/// `num_batches_tracked` entries are tolerated.
pub fn load_varmap(varmap: &VarMap, path: &Path) -> Result<(), WeightsError> {
    let tensors = read_tensors(path)?;
    let mut mapped = BTreeMap::new();
    for (original, t) in tensors {
        let n = strip_module_prefix(&original).to_string();
        if n.ends_with("num_batches_tracked") {
            continue;
        }
        mapped.insert(n, (original, t));
    }
    assign_mapped(varmap, mapped, "", path)
}

/// Saves every variable of `varmap` (parameters and BatchNorm running statistics) as
/// safetensors.
pub fn save_varmap(varmap: &VarMap, path: &Path) -> Result<(), WeightsError> {
    varmap.save(path).map_err(|source| WeightsError::Write {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tutorial_names_map_to_torchvision() {
        let cases = [
            ("conv_input.weight", "conv1.weight"),
            ("bn_input.running_var", "bn1.running_var"),
            ("resblock1_1.conv_1.weight", "layer1.0.conv1.weight"),
            ("resblock3_6.bn_3.bias", "layer3.5.bn3.bias"),
            (
                "resblock2_1.conv_prj.weight",
                "layer2.0.downsample.0.weight",
            ),
            (
                "resblock4_1.bn_prj.running_mean",
                "layer4.0.downsample.1.running_mean",
            ),
            ("fc.weight", "fc.weight"),
            ("layer1.0.conv1.weight", "layer1.0.conv1.weight"),
            ("resblockx_1.conv_1.weight", "resblockx_1.conv_1.weight"),
        ];
        for (a, b) in cases {
            assert_eq!(tutorial_to_torchvision(a), b, "{a}");
        }
        assert_eq!(strip_module_prefix("module.module.fc.bias"), "fc.bias");
    }

    #[test]
    fn buffers_are_recognised() {
        assert!(is_buffer("extractor.layer1.0.bn1.running_mean"));
        assert!(is_buffer("bn1.running_var"));
        assert!(is_buffer("bn1.num_batches_tracked"));
        assert!(!is_buffer("extractor.layer1.0.bn1.weight"));
        assert!(!is_buffer("detector.prj_5.bias"));
    }
}
