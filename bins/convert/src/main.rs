//! `convert`: weights and datasets in and out of the project.
//!
//! ```text
//! convert import --extractor net_e.pkl --detector net_d.pkl [--names names.txt] --out model.safetensors
//! convert import --torchvision retinanet_resnet50_fpn_coco-eeacb38b.pth --out model.safetensors
//! convert export --checkpoint runs/default/checkpoint.safetensors --to tutorial --out exported/
//! convert export --checkpoint runs/default/checkpoint.safetensors --to torchvision --format pth --out exported/
//! convert onnx --checkpoint runs/default/checkpoint.safetensors --out model.onnx [--opset 17] [--check-data check.safetensors]
//! convert data --yolo data.yaml --out lists/                     # YOLO -> list files
//! convert data --list train.txt --names names.txt --image-root images --out yolo/   # list -> YOLO
//! ```
//!
//! `import` writes a checkpoint of this project from the tutorial's two PyTorch state dicts (or
//! a torchvision-named ResNet and the tutorial's detector), or from torchvision's own
//! `retinanet_resnet50_fpn` / `_v2`, which `inspect`, `evaluate` and `train-detector` then use. `export` writes a checkpoint's weights under PyTorch names: the
//! tutorial's (`net_e` / `net_d`) or torchvision's ResNet (`resnet.*`, with
//! `num_batches_tracked`) beside the tutorial's detector (`net_d`), as `.pth` files
//! `torch.load` reads and / or safetensors. `onnx` writes the inference graph (BatchNorm folded,
//! outputs `cls`, `reg`, `anchors`, `cls_logits`, any image size) as an ONNX file, and with
//! `--check-data` inputs and the project's outputs on them for `crates/train/scripts/check_onnx.py`
//! (see `docs/interop.md`). `data` converts between YOLO datasets and the
//! tutorial's list files.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use clap::{Parser, Subcommand, ValueEnum};
use retinanet_train::cli::ModelArgs;
use retinanet_train::interop::{Naming, export, save_as_checkpoint, write_pth};
use retinanet_train::load_checkpoint;
use retinanet_train::onnx::{DEFAULT_OPSET, export_onnx, write_check_data};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum To {
    /// The tutorial's names (`net_e`, `net_d`).
    Tutorial,
    /// torchvision's ResNet names (`resnet`) and the tutorial's detector (`net_d`).
    Torchvision,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    /// `.pth` (PyTorch's zip format; the tutorial's files are named `.pkl`).
    Pth,
    /// `.safetensors`.
    Safetensors,
    /// Both.
    Both,
}

/// Convert weights and datasets between PyTorch / YOLO files and this project's.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The tutorial's state dicts (or a torchvision ResNet + the tutorial's detector), or a
    /// torchvision RetinaNet, to a checkpoint of this project.
    Import {
        /// The extractor state dict (`net_e.pkl`, or a torchvision ResNet `.pth`).
        #[arg(long, requires = "detector", required_unless_present = "torchvision")]
        extractor: Option<PathBuf>,
        /// The detector state dict (`net_d.pkl`).
        #[arg(long, requires = "extractor")]
        detector: Option<PathBuf>,
        /// A torchvision `retinanet_resnet50_fpn` / `retinanet_resnet50_fpn_v2` state dict
        /// (`.pth` / `.safetensors`), instead of --extractor / --detector.
        #[arg(long, conflicts_with_all = ["extractor", "detector"])]
        torchvision: Option<PathBuf>,
        /// The ResNet's BatchNorm eps for --torchvision (default: 0 for v1, as torchvision
        /// sets for its COCO weights; 1e-5 for v2).
        #[arg(long, requires = "torchvision")]
        bn_eps: Option<f64>,
        /// Class names (one per line); default for 20 classes: VOC's; for a torchvision
        /// RetinaNet of 91: torchvision's COCO categories.
        #[arg(long)]
        names: Option<PathBuf>,
        /// The checkpoint to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// A checkpoint of this project to PyTorch state dicts.
    Export {
        /// The checkpoint.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The names to export under.
        #[arg(long, value_enum, default_value_t = To::Tutorial)]
        to: To,
        /// The file format.
        #[arg(long, value_enum, default_value_t = Format::Both)]
        format: Format,
        /// The folder to write into.
        #[arg(long)]
        out: PathBuf,
    },
    /// A detector's inference graph to an ONNX file (BatchNorm folded; outputs `cls` scores,
    /// `reg` deltas, `anchors` and `cls_logits` for any image size).
    Onnx {
        #[command(flatten)]
        model: ModelArgs,
        /// Class names of a --extractor/--detector pair (one per line); default for 20
        /// classes: VOC's.
        #[arg(long)]
        names: Option<PathBuf>,
        /// The ONNX file to write.
        #[arg(long)]
        out: PathBuf,
        /// ONNX opset (13 to 18).
        #[arg(long, default_value_t = DEFAULT_OPSET)]
        opset: i64,
        /// Also write inputs and the project's outputs on them (safetensors) for
        /// `crates/train/scripts/check_onnx.py`.
        #[arg(long)]
        check_data: Option<PathBuf>,
        /// Sizes `HxW` of the check inputs, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "97x130,160x96")]
        check_sizes: Vec<String>,
    },
    /// A YOLO dataset to list files (one per split, and a names file), or a list file to a
    /// YOLO dataset (images linked or copied, labels, data.yaml).
    Data {
        /// The YOLO dataset's data.yaml, to convert to list files.
        #[arg(long, conflicts_with = "list")]
        yolo: Option<PathBuf>,
        /// A list file (`name ymin xmin ymax xmax class ...`), to convert to YOLO; repeat for
        /// more splits (`--list train.txt --list val.txt`: splits train, val, test in order).
        #[arg(long)]
        list: Vec<PathBuf>,
        /// The list files' names file.
        #[arg(long)]
        names: Option<PathBuf>,
        /// The folder the list files' image names are relative to.
        #[arg(long)]
        image_root: Option<PathBuf>,
        /// The folder to write into.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    match Args::parse().cmd {
        Cmd::Import {
            extractor,
            detector,
            torchvision,
            bn_eps,
            names,
            out,
        } => {
            let model = retinanet_train::cli::ModelArgs {
                checkpoint: None,
                extractor,
                detector,
                torchvision,
                bn_eps,
                runs_dir: PathBuf::new(),
            };
            import(&model, names, &out)
        }
        Cmd::Export {
            checkpoint,
            to,
            format,
            out,
        } => export_checkpoint(&checkpoint, to, format, &out),
        Cmd::Onnx {
            model,
            names,
            out,
            opset,
            check_data,
            check_sizes,
        } => onnx(&model, names, &out, opset, check_data, &check_sizes),
        Cmd::Data {
            yolo,
            list,
            names,
            image_root,
            out,
        } => data(yolo, &list, names, image_root, &out),
    }
}

fn import(
    model: &retinanet_train::cli::ModelArgs,
    names: Option<PathBuf>,
    out: &std::path::Path,
) -> Result<()> {
    let det = model.load(names.as_deref(), &Device::Cpu)?;
    save_as_checkpoint(&det, out)?;
    let m = &det.config.model;
    println!(
        "wrote {} ({:?} RetinaNet, ResNet-{} width {}, FPN {}, heads {}, {} classes)",
        out.display(),
        m.variant,
        m.depth,
        m.base_width,
        m.fpn_channels,
        m.head_channels,
        det.class_names.len()
    );
    Ok(())
}

fn export_checkpoint(
    checkpoint: &std::path::Path,
    to: To,
    format: Format,
    out: &std::path::Path,
) -> Result<()> {
    let c = load_checkpoint(checkpoint, &Device::Cpu)?;
    let variant = if c.meta.kind == "detector" {
        let cfg: retinanet_train::DetectorRunConfig = retinanet_train::parse_config(&c.meta.config)
            .with_context(|| format!("{}: the stored config", checkpoint.display()))?;
        cfg.model.variant
    } else {
        Default::default()
    };
    if variant.is_torchvision() {
        // One state dict by torchvision's names, as its RetinaNet loads it.
        if to != To::Torchvision {
            bail!(
                "{} is torchvision's RetinaNet (model.variant = {}): export it with --to torchvision",
                checkpoint.display(),
                variant.name()
            );
        }
        let v2 = variant == retinanet_train::config::Variant::TorchvisionV2;
        let dict = retinanet_train::interop::export_torchvision_retinanet(&c.tensors, v2)
            .with_context(|| checkpoint.display().to_string())?;
        return write_dicts(&[("retinanet", &dict)], "pth", format, out);
    }
    let naming = match to {
        To::Tutorial => Naming::Tutorial,
        To::Torchvision => Naming::Torchvision,
    };
    let (ext, det) = export(&c.tensors, naming)?;
    let ext_name = match to {
        To::Tutorial => "net_e",
        To::Torchvision => "resnet",
    };
    // The tutorial saves with torch.save under `.pkl`.
    let pth = if to == To::Tutorial { "pkl" } else { "pth" };
    write_dicts(&[(ext_name, &ext), ("net_d", &det)], pth, format, out)
}

/// Writes each non-empty state dict as `<stem>.<pth>` and / or `<stem>.safetensors` in `out`.
fn write_dicts(
    dicts: &[(
        &str,
        &std::collections::BTreeMap<String, candle_core::Tensor>,
    )],
    pth: &str,
    format: Format,
    out: &std::path::Path,
) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for &(stem, dict) in dicts {
        if dict.is_empty() {
            continue;
        }
        if matches!(format, Format::Pth | Format::Both) {
            let p = out.join(format!("{stem}.{pth}"));
            write_pth(&p, dict)?;
            println!("wrote {}", p.display());
        }
        if matches!(format, Format::Safetensors | Format::Both) {
            let p = out.join(format!("{stem}.safetensors"));
            let map: std::collections::HashMap<&String, candle_core::Tensor> =
                dict.iter().map(|(k, v)| (k, v.clone())).collect();
            candle_core::safetensors::save(&map, &p)
                .with_context(|| format!("cannot write {}", p.display()))?;
            println!("wrote {}", p.display());
        }
    }
    Ok(())
}

fn onnx(
    model: &ModelArgs,
    names: Option<PathBuf>,
    out: &std::path::Path,
    opset: i64,
    check_data: Option<PathBuf>,
    check_sizes: &[String],
) -> Result<()> {
    let sizes = check_sizes
        .iter()
        .map(|s| parse_size(s).with_context(|| format!("--check-sizes {s}")))
        .collect::<Result<Vec<_>>>()?;
    let det = model
        .load(names.as_deref(), &Device::Cpu)
        .with_context(|| format!("loading {}", model.describe()))?;
    let s =
        export_onnx(&det, out, opset).with_context(|| format!("exporting {}", model.describe()))?;
    let d = det.model.detector.config();
    println!(
        "wrote {} (opset {opset}, {} nodes, {} parameters, {} bytes; P{}..P{}, {} anchors per cell, {} classes)",
        out.display(),
        s.nodes,
        s.parameters,
        s.bytes,
        d.first_level,
        d.last_level(),
        d.num_anchors,
        d.num_classes
    );
    if let Some(p) = check_data {
        write_check_data(&det, &sizes, &p)?;
        println!(
            "wrote {} ({} inputs and their outputs)",
            p.display(),
            sizes.len()
        );
    }
    Ok(())
}

/// `HxW` (e.g. `97x130`) as `(H, W)`.
fn parse_size(s: &str) -> Result<(usize, usize)> {
    let (h, w) = s
        .split_once(['x', 'X'])
        .context("expected HxW, e.g. 97x130")?;
    let (h, w): (usize, usize) = (h.trim().parse()?, w.trim().parse()?);
    if h == 0 || w == 0 {
        bail!("sizes must be positive");
    }
    Ok((h, w))
}

fn data(
    yolo: Option<PathBuf>,
    lists: &[PathBuf],
    names: Option<PathBuf>,
    image_root: Option<PathBuf>,
    out: &std::path::Path,
) -> Result<()> {
    use retinanet_dataset::{DetectionDataset, OpenOptions, yolo as y};
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    if let Some(yaml) = yolo {
        let d = y::read_data_yaml(&yaml)?;
        let names_file = out.join("names.txt");
        for split in d.splits.keys() {
            let ds = DetectionDataset::open_yolo_data(&d, split, &OpenOptions::default())?;
            let list = out.join(format!("{split}.txt"));
            ds.write_list(&list, &names_file)?;
            println!("wrote {} ({} images)", list.display(), ds.len());
        }
        println!(
            "wrote {}; the image root is {}",
            names_file.display(),
            d.root.display()
        );
        return Ok(());
    }
    let (Some(names), Some(root)) = (names, image_root) else {
        bail!("pass --yolo data.yaml, or --list FILE with --names and --image-root");
    };
    if lists.is_empty() || lists.len() > 3 {
        bail!("pass one to three --list files (the train, val and test splits)");
    }
    let sets: Vec<DetectionDataset> = lists
        .iter()
        .map(|l| DetectionDataset::from_list(l, &names, &root))
        .collect::<std::result::Result<_, _>>()?;
    let splits: Vec<(
        &str,
        &[retinanet_dataset::annotations::DetectionRecord],
        &std::path::Path,
    )> = sets
        .iter()
        .zip(["train", "val", "test"])
        .map(|(ds, s)| (s, ds.records(), root.as_path()))
        .collect();
    let yaml = y::write_yolo(out, sets[0].class_names(), &splits)?;
    println!("wrote {}", yaml.display());
    Ok(())
}
