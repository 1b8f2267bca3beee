//! Command-line arguments shared by the training binaries (`pretrain`, `train-detector`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;

use crate::dist::{Communicator, is_agreed};
use crate::run::RunOptions;
use crate::{parse_config, read_config};

/// The arguments of a training run: `#[command(flatten)]` them into a binary's parser.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Run config (TOML); default: the built-in synthetic-shapes config.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Continue the run's checkpoint (`<runs-dir>/<name>/checkpoint.safetensors`).
    #[arg(long)]
    pub resume: bool,
    /// Override the config's device: cpu, cuda, cuda:N.
    #[arg(long)]
    pub device: Option<String>,
    /// Override the config's precision (f32; tf32 on CUDA; bf16 on CPUs with AVX512-BF16).
    #[arg(long, value_enum)]
    pub precision: Option<crate::device::Precision>,
    /// Override the config's run name.
    #[arg(long)]
    pub name: Option<String>,
    /// Folder of run folders.
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
    /// Stop after this many steps in total (with a checkpoint).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// No progress output.
    #[arg(long, short)]
    pub quiet: bool,
}

/// A run config whose device and name the command line may override.
pub trait RunConfig: DeserializeOwned + crate::config::Validate {
    /// Sets the device.
    fn set_device(&mut self, device: String);
    /// Sets the run name.
    fn set_name(&mut self, name: String);
    /// Sets the precision.
    fn set_precision(&mut self, precision: crate::device::Precision);
}

impl RunConfig for crate::DetectorRunConfig {
    fn set_device(&mut self, device: String) {
        self.device = device;
    }
    fn set_name(&mut self, name: String) {
        self.name = name;
    }
    fn set_precision(&mut self, precision: crate::device::Precision) {
        self.precision = precision;
    }
}

impl RunConfig for crate::PretrainRunConfig {
    fn set_device(&mut self, device: String) {
        self.device = device;
    }
    fn set_name(&mut self, name: String) {
        self.name = name;
    }
    fn set_precision(&mut self, precision: crate::device::Precision) {
        self.precision = precision;
    }
}

impl RunArgs {
    /// The config (`--config`, else `default_toml`) with the command line's overrides.
    pub fn load_config<C: RunConfig>(&self, default_toml: &str) -> Result<C> {
        let mut cfg: C = match &self.config {
            Some(p) => read_config(p)?,
            None => parse_config(default_toml)?,
        };
        if let Some(d) = &self.device {
            cfg.set_device(d.clone());
        }
        if let Some(n) = &self.name {
            cfg.set_name(n.clone());
        }
        if let Some(p) = self.precision {
            cfg.set_precision(p);
        }
        cfg.validate().with_context(|| match &self.config {
            Some(p) => format!("config {}", p.display()),
            None => "the built-in config".to_string(),
        })?;
        Ok(cfg)
    }

    /// The run options on the ranks of `comm`, with a Ctrl-C handler installed.
    pub fn options(&self, comm: Arc<dyn Communicator>) -> Result<RunOptions> {
        let opts = RunOptions {
            runs_dir: self.runs_dir.clone(),
            resume: self.resume,
            quiet: self.quiet,
            max_steps: self.max_steps,
            comm,
            ..Default::default()
        };
        opts.install_ctrlc()?;
        Ok(opts)
    }
}

/// Runs a training binary's `body` on this process's rank (see [`crate::dist::from_env`]) and
/// ends the process the way its world needs: one process prints an error as usual; on several
/// ranks an error all ranks raised together is printed once by rank 0 and every rank ends
/// normally, while an error only this rank saw is printed with its rank and ends the whole job
/// at once (the other ranks would otherwise wait for it in their next collective).
pub fn main_on_ranks(body: impl FnOnce(Arc<dyn Communicator>) -> Result<()>) -> ExitCode {
    if let Err(e) = crate::runtime::check_settings() {
        eprintln!("Error: {e:#}");
        return ExitCode::FAILURE;
    }
    let comm = match crate::dist::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("Error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let r = body(comm.clone());
    let code = match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if comm.size() == 1 => {
            eprintln!("Error: {e:#}");
            ExitCode::FAILURE
        }
        Err(e) if is_agreed(&e) => {
            if comm.is_root() {
                eprintln!("Error: {e:#}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("rank {} of {}: error: {e:#}", comm.rank(), comm.size());
            comm.abort(1)
        }
    };
    // The last reference: MPI is finalised here, before the process ends.
    drop(comm);
    code
}

/// Where `inspect` and `evaluate` take the model from: a checkpoint of this project (default:
/// the latest `train-detector` run), or the tutorial's pair of PyTorch state dicts.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Detector checkpoint; default: the latest `train-detector` run.
    #[arg(long, conflicts_with_all = ["extractor", "detector", "torchvision"])]
    pub checkpoint: Option<PathBuf>,
    /// The tutorial's extractor state dict (`net_e.pkl`, or a torchvision-named ResNet `.pth` /
    /// `.safetensors`), with --detector.
    #[arg(long, requires = "detector")]
    pub extractor: Option<PathBuf>,
    /// The tutorial's detector state dict (`net_d.pkl`), with --extractor.
    #[arg(long, requires = "extractor")]
    pub detector: Option<PathBuf>,
    /// A torchvision `retinanet_resnet50_fpn` / `retinanet_resnet50_fpn_v2` state dict
    /// (`.pth` / `.safetensors`): run with torchvision's transform and post-processing.
    #[arg(long, conflicts_with_all = ["extractor", "detector"])]
    pub torchvision: Option<PathBuf>,
    /// The ResNet's BatchNorm eps for --torchvision (default: 0 for v1, as torchvision sets for
    /// its COCO weights; 1e-5 for v2).
    #[arg(long, requires = "torchvision")]
    pub bn_eps: Option<f64>,
    /// Folder of run folders (to find the latest run).
    #[arg(long, default_value = "runs")]
    pub runs_dir: PathBuf,
}

impl ModelArgs {
    /// The model on `device`; `names` (one per line) names the classes of a pair of state
    /// dicts (default for 20 classes: the VOC classes).
    pub fn load(
        &self,
        names: Option<&std::path::Path>,
        device: &candle_core::Device,
    ) -> Result<crate::LoadedDetector> {
        let read_names = || {
            names
                .map(|p| {
                    crate::data::read_names_file(p)
                        .with_context(|| format!("--names {}", p.display()))
                })
                .transpose()
        };
        if let Some(t) = &self.torchvision {
            if let Some(e) = self.bn_eps
                && !(e.is_finite() && (0.0..=1.0).contains(&e))
            {
                bail!("--bn-eps {e}: must lie in [0, 1]");
            }
            return crate::interop::load_torchvision_retinanet(
                t,
                read_names()?,
                self.bn_eps,
                device,
            );
        }
        if let (Some(e), Some(d)) = (&self.extractor, &self.detector) {
            return crate::interop::load_state_dict_pair(e, d, read_names()?, device);
        }
        let ck = match &self.checkpoint {
            Some(p) => p.clone(),
            None => crate::latest_run(&self.runs_dir, "detector")?.checkpoint(),
        };
        crate::load_detector(&ck, device)
    }

    /// The model's files, for messages.
    pub fn describe(&self) -> String {
        if let Some(t) = &self.torchvision {
            return format!("--torchvision {}", t.display());
        }
        match (&self.checkpoint, &self.extractor, &self.detector) {
            (_, Some(e), Some(d)) => {
                format!("--extractor {} --detector {}", e.display(), d.display())
            }
            (Some(c), _, _) => format!("the checkpoint {}", c.display()),
            _ => format!("the latest run's checkpoint in {}", self.runs_dir.display()),
        }
    }
}
