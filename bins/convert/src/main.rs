//! `convert`: weights in and out of the project.
//!
//! ```text
//! convert --extractor net_e.pkl --detector net_d.pkl [--names names.txt] --out model.safetensors
//! convert --checkpoint runs/default/checkpoint.safetensors --to tutorial --out exported/
//! convert --checkpoint runs/default/checkpoint.safetensors --to torchvision --format pth --out exported/
//! ```
//!
//! The first writes a checkpoint of this project from the tutorial's two PyTorch state dicts
//! (or a torchvision-named ResNet and the tutorial's detector), which `inspect`, `evaluate` and
//! `train-detector --config ... (train.pretrained)` then use. The others write a checkpoint's
//! weights under PyTorch names: the tutorial's (`net_e` / `net_d`) or torchvision's ResNet
//! (`resnet.*`, with `num_batches_tracked`) beside the tutorial's detector (`net_d`), as
//! `.pth` files `torch.load` reads and / or safetensors.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use candle_core::Device;
use clap::{Parser, ValueEnum};
use retinanet_train::interop::{
    Naming, export, load_state_dict_pair, save_as_checkpoint, write_pth,
};
use retinanet_train::load_checkpoint;

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

/// Convert weights between the tutorial's / torchvision's PyTorch files and this project's
/// checkpoints.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The tutorial's extractor state dict (`net_e.pkl`) or a torchvision ResNet, to import.
    #[arg(long, requires = "detector", conflicts_with = "checkpoint")]
    extractor: Option<PathBuf>,
    /// The tutorial's detector state dict (`net_d.pkl`), to import.
    #[arg(long, requires = "extractor")]
    detector: Option<PathBuf>,
    /// Class names (one per line) of an import; default for 20 classes: VOC's.
    #[arg(long)]
    names: Option<PathBuf>,
    /// A checkpoint of this project to export.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// The names to export under.
    #[arg(long, value_enum, default_value_t = To::Tutorial)]
    to: To,
    /// The file format of an export.
    #[arg(long, value_enum, default_value_t = Format::Both)]
    format: Format,
    /// Import: the checkpoint to write. Export: the folder to write into.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> Result<()> {
    let a = Args::parse();
    if let (Some(e), Some(d)) = (&a.extractor, &a.detector) {
        let names = a
            .names
            .as_ref()
            .map(|p| {
                retinanet_train::data::read_names_file(p)
                    .with_context(|| format!("--names {}", p.display()))
            })
            .transpose()?;
        let det = load_state_dict_pair(e, d, names, &Device::Cpu)?;
        save_as_checkpoint(&det, &a.out)?;
        println!(
            "wrote {} (ResNet-{} width {}, FPN {}, heads {}, {} classes)",
            a.out.display(),
            det.config.model.depth,
            det.config.model.base_width,
            det.config.model.fpn_channels,
            det.config.model.head_channels,
            det.class_names.len()
        );
        return Ok(());
    }
    let Some(ck) = &a.checkpoint else {
        bail!("pass --extractor and --detector (import), or --checkpoint (export)");
    };
    let c = load_checkpoint(ck, &Device::Cpu)?;
    let naming = match a.to {
        To::Tutorial => Naming::Tutorial,
        To::Torchvision => Naming::Torchvision,
    };
    let (ext, det) = export(&c.tensors, naming)?;
    let ext_name = match a.to {
        To::Tutorial => "net_e",
        To::Torchvision => "resnet",
    };
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    let mut written = Vec::new();
    for (stem, dict) in [(ext_name, &ext), ("net_d", &det)] {
        if dict.is_empty() {
            continue;
        }
        if matches!(a.format, Format::Pth | Format::Both) {
            // The tutorial saves with torch.save under `.pkl`.
            let ext = if a.to == To::Tutorial { "pkl" } else { "pth" };
            let p = a.out.join(format!("{stem}.{ext}"));
            write_pth(&p, dict)?;
            written.push(p);
        }
        if matches!(a.format, Format::Safetensors | Format::Both) {
            let p = a.out.join(format!("{stem}.safetensors"));
            let map: std::collections::HashMap<&String, candle_core::Tensor> =
                dict.iter().map(|(k, v)| (k, v.clone())).collect();
            candle_core::safetensors::save(&map, &p)
                .with_context(|| format!("cannot write {}", p.display()))?;
            written.push(p);
        }
    }
    for p in written {
        println!("wrote {}", p.display());
    }
    Ok(())
}
