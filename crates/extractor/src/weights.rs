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
    /// The file is empty.
    #[error("{path} is empty (0 bytes), not a weights file (an interrupted download or copy?)")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The file was cut short (a zip archive without its end record, a safetensors file with
    /// less data than its header describes).
    #[error("{path} is truncated: {what}; download or copy it again")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// What is missing.
        what: String,
    },
    /// A `torch.save` file of PyTorch before 1.6 (not a zip archive), which cannot be read.
    #[error(
        "{path} is in PyTorch's legacy (pre-1.6, non-zip) format, which cannot be read here: re-save it with a current torch.save (`torch.save(torch.load(\"{file}\"), \"new.pth\")`) or convert it to safetensors",
        file = path.display()
    )]
    LegacyFormat {
        /// The file.
        path: PathBuf,
    },
    /// The file is neither a PyTorch `.pth` nor a safetensors file.
    #[error("{path} is not a PyTorch (.pth) or safetensors weights file: {what}")]
    NotWeights {
        /// The file.
        path: PathBuf,
        /// What it looks like instead.
        what: String,
    },
    /// The file's ResNet and the model's differ in depth or width.
    #[error("{path} holds a {file} but the model is a {model} (first difference: {first})")]
    Architecture {
        /// The file.
        path: PathBuf,
        /// The file's network, e.g. `ResNet-50 (bottleneck blocks [3, 4, 6, 3], base width 64)`.
        file: String,
        /// The model's network.
        model: String,
        /// The first tensor that differs, as the strict check found it.
        first: String,
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

/// Reads every tensor of a `.safetensors` file or a PyTorch `.pth`/`.pt`/`.bin` zip archive (a
/// plain state dict, or one under a `state_dict` or `model` key) onto the CPU.
///
/// The format is taken from the content, not the extension. An empty file, a truncated zip or
/// safetensors file, PyTorch's legacy (pre-1.6) format and anything else (a bare pickle, an
/// HTML page, a Git LFS pointer) each get their own error.
pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>, WeightsError> {
    let err = |source| WeightsError::Read {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
    match sniff(path).map_err(|e| err(candle_core::Error::from(e)))? {
        Format::Safetensors => read_safetensors(path),
        Format::Zip => read_pickle(path),
        Format::Bad(e) => Err(e),
    }
}

enum Format {
    Safetensors,
    Zip,
    Bad(WeightsError),
}

/// PyTorch's `MAGIC_NUMBER` as the legacy format pickles it first: `LONG1` of 10 bytes.
const TORCH_LEGACY_MAGIC: [u8; 12] = [
    0x8A, 0x0A, 0x6C, 0xFC, 0x9C, 0x46, 0xF9, 0x20, 0x6A, 0xA8, 0x50, 0x19,
];

/// Tells the formats apart from the file's first bytes (and a zip's end record).
fn sniff(path: &Path) -> std::io::Result<Format> {
    use std::io::{Read, Seek, SeekFrom};
    let p = || path.to_path_buf();
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    if len == 0 {
        return Ok(Format::Bad(WeightsError::Empty { path: p() }));
    }
    let mut head = Vec::with_capacity(512);
    (&mut f).take(512).read_to_end(&mut head)?;
    if head.starts_with(b"PK\x03\x04") {
        // A zip archive ends with its end-of-central-directory record (22 bytes, then a comment
        // of the length it gives); torch.save writes one. A cut file has none left.
        let tail_len = len.min(22 + 65_535);
        f.seek(SeekFrom::Start(len - tail_len))?;
        let mut tail = Vec::with_capacity(tail_len as usize);
        f.take(tail_len).read_to_end(&mut tail)?;
        let complete = tail.windows(4).enumerate().rev().any(|(i, w)| {
            w == b"PK\x05\x06"
                && i + 22 <= tail.len()
                && i + 22 + u16::from_le_bytes([tail[i + 20], tail[i + 21]]) as usize == tail.len()
        });
        return Ok(if complete {
            Format::Zip
        } else {
            Format::Bad(WeightsError::Truncated {
                path: p(),
                what: format!(
                    "a zip archive (torch.save's format) of {len} bytes without its end record"
                ),
            })
        });
    }
    if head.len() >= 14 && head[0] == 0x80 && head[2..14] == TORCH_LEGACY_MAGIC {
        return Ok(Format::Bad(WeightsError::LegacyFormat { path: p() }));
    }
    if head.len() >= 262 && &head[257..262] == b"ustar" {
        // torch.save before 0.1.10 wrote a tar archive.
        return Ok(Format::Bad(WeightsError::LegacyFormat { path: p() }));
    }
    if head.len() >= 9 && head[8] == b'{' {
        return Ok(Format::Safetensors);
    }
    let what = if head[0] == 0x80 && head.len() >= 2 && head[1] <= 5 {
        "a Python pickle without PyTorch's magic number (not written by torch.save)".to_string()
    } else if head.starts_with(b"version https://git-lfs") {
        "a Git LFS pointer, not the weights themselves (run `git lfs pull`)".to_string()
    } else if head
        .iter()
        .take(64)
        .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace())
    {
        let text = String::from_utf8_lossy(&head[..head.len().min(40)]);
        let hint = if text.trim_start().starts_with('<') {
            " (an HTML or XML page: a failed download?)"
        } else {
            ""
        };
        format!("it is text, starting {:?}{hint}", text.trim_end())
    } else {
        let hex: Vec<String> = head.iter().take(8).map(|b| format!("{b:02x}")).collect();
        format!("it starts with the bytes {}", hex.join(" "))
    };
    Ok(Format::Bad(WeightsError::NotWeights { path: p(), what }))
}

fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>, WeightsError> {
    use safetensors::SafeTensorError as S;
    let data = std::fs::read(path).map_err(|e| WeightsError::Read {
        path: path.to_path_buf(),
        source: Box::new(e.into()),
    })?;
    let header = data.get(..8).map_or(0, |b| {
        u64::from_le_bytes(b.try_into().expect("8 bytes")) as u128
    });
    candle_core::safetensors::load_buffer(&data, &Device::Cpu).map_err(|e| match e {
        candle_core::Error::SafeTensor(S::InvalidHeaderLength) if header + 8 > data.len() as u128 => {
            WeightsError::Truncated {
                path: path.to_path_buf(),
                what: format!(
                    "a safetensors file whose header alone is {header} bytes, in {} bytes",
                    data.len()
                ),
            }
        }
        candle_core::Error::SafeTensor(S::MetadataIncompleteBuffer) => WeightsError::Truncated {
            path: path.to_path_buf(),
            what: format!(
                "a safetensors file of {} bytes whose header describes another amount of tensor data",
                data.len()
            ),
        },
        e => WeightsError::Read {
            path: path.to_path_buf(),
            source: Box::new(e),
        },
    })
}

fn read_pickle(path: &Path) -> Result<HashMap<String, Tensor>, WeightsError> {
    let err = |source| WeightsError::Read {
        path: path.to_path_buf(),
        source: Box::new(source),
    };
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

/// The ResNet a set of tensors describes: blocks per stage, block type and base width.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResNetLayout {
    /// Blocks in `layer1..=layer4`.
    pub blocks: [usize; 4],
    /// Bottleneck blocks (a `conv3` in the blocks) rather than basic ones.
    pub bottleneck: bool,
    /// The stem's output channels (`conv1.weight`'s first dimension), when present.
    pub base_width: Option<usize>,
}

impl ResNetLayout {
    /// The standard depth of this layout (18, 34, 50, 101, 152), if it is one.
    pub fn depth(&self) -> Option<usize> {
        match (self.blocks, self.bottleneck) {
            ([2, 2, 2, 2], false) => Some(18),
            ([3, 4, 6, 3], false) => Some(34),
            ([3, 4, 6, 3], true) => Some(50),
            ([3, 4, 23, 3], true) => Some(101),
            ([3, 8, 36, 3], true) => Some(152),
            _ => None,
        }
    }

    /// Whether two layouts are different networks (widths compared only where both are known).
    pub fn differs_from(&self, other: &ResNetLayout) -> bool {
        self.blocks != other.blocks
            || self.bottleneck != other.bottleneck
            || matches!((self.base_width, other.base_width), (Some(a), Some(b)) if a != b)
    }

    /// E.g. `ResNet-50 (bottleneck blocks [3, 4, 6, 3], base width 64)`.
    pub fn describe(&self) -> String {
        let name = match self.depth() {
            Some(d) => format!("ResNet-{d}"),
            None => "ResNet".to_string(),
        };
        let kind = if self.bottleneck {
            "bottleneck"
        } else {
            "basic"
        };
        let width = self
            .base_width
            .map(|w| format!(", base width {w}"))
            .unwrap_or_default();
        format!("{name} ({kind} blocks {:?}{width})", self.blocks)
    }
}

/// The ResNet layout of tensors named as torchvision does (`layerS.I.convK.weight`,
/// `conv1.weight`, under any prefix); `None` when no `layerS.I` name is present.
pub fn resnet_layout<'a>(
    tensors: impl IntoIterator<Item = (&'a str, &'a [usize])>,
) -> Option<ResNetLayout> {
    let mut blocks = [0usize; 4];
    let mut bottleneck = false;
    let mut base_width = None;
    let mut any = false;
    for (name, dims) in tensors {
        let parts: Vec<&str> = name.split('.').collect();
        let stage = parts.iter().enumerate().find_map(|(j, p)| {
            let s = p.strip_prefix("layer")?.parse::<usize>().ok()?;
            let i = parts.get(j + 1)?.parse::<usize>().ok()?;
            ((1..=4).contains(&s)).then_some((j, s, i))
        });
        match stage {
            Some((j, s, i)) => {
                any = true;
                blocks[s - 1] = blocks[s - 1].max(i + 1);
                bottleneck |= parts.get(j + 2) == Some(&"conv3");
            }
            None => {
                // The stem's conv1 only: not a block's, not the detector's.
                let in_block = parts.iter().any(|p| {
                    p.strip_prefix("layer")
                        .is_some_and(|n| n.parse::<usize>().is_ok())
                });
                if parts.ends_with(&["conv1", "weight"])
                    && !in_block
                    && !parts.iter().any(|p| p.starts_with("detector"))
                {
                    base_width = dims.first().copied();
                }
            }
        }
    }
    any.then_some(ResNetLayout {
        blocks,
        bottleneck,
        base_width,
    })
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
    // A ResNet of another depth or width fails on some first tensor; say what differs instead.
    let diagnose = |first: WeightsError| -> WeightsError {
        let file = resnet_layout(mapped.iter().map(|(k, (_, t))| (k.as_str(), t.dims())));
        let model = resnet_layout(
            data.iter()
                .filter(|(k, _)| k.starts_with(scope))
                .map(|(k, v)| (k.as_str(), v.dims())),
        );
        match (file, model) {
            (Some(f), Some(m)) if f.differs_from(&m) => WeightsError::Architecture {
                path: p(),
                file: f.describe(),
                model: m.describe(),
                first: first_difference(&first),
            },
            _ => first,
        }
    };
    for (name, (original, t)) in &mapped {
        if !data.contains_key(name) {
            return Err(diagnose(WeightsError::Unexpected {
                path: p(),
                name: name.clone(),
                original: original.clone(),
                shape: t.dims().to_vec(),
            }));
        }
    }
    let mut names: Vec<&String> = data.keys().filter(|k| k.starts_with(scope)).collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let Some((_, t)) = mapped.get(name) else {
            return Err(diagnose(WeightsError::Missing {
                path: p(),
                name: name.clone(),
                expected: var.dims().to_vec(),
            }));
        };
        if t.dims() != var.dims() {
            return Err(diagnose(WeightsError::Shape {
                path: p(),
                name: name.clone(),
                expected: var.dims().to_vec(),
                found: t.dims().to_vec(),
            }));
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

/// The strict check's message without the file (the architecture error names it once).
fn first_difference(e: &WeightsError) -> String {
    match e {
        WeightsError::Unexpected { name, shape, .. } => {
            format!("the file has `{name}` {shape:?}, the model does not")
        }
        WeightsError::Missing { name, expected, .. } => {
            format!("the model needs `{name}` {expected:?}, the file lacks it")
        }
        WeightsError::Shape {
            name,
            expected,
            found,
            ..
        } => format!("`{name}` is {found:?} in the file, {expected:?} in the model"),
        other => other.to_string(),
    }
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
