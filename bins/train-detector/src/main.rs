//! `train-detector`: trains RetinaNet. With no argument, on the built-in synthetic shapes with
//! `configs/default.toml`; `--config` for anything else.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use retinanet_train::config::DEFAULT_DETECTOR_TOML;
use retinanet_train::{DetectorRunConfig, RunOptions, parse_config, read_config, train_detector};

/// Train a RetinaNet detector.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Run config (TOML); default: the built-in synthetic-shapes config.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue the run's checkpoint (`runs/<name>/checkpoint.safetensors`).
    #[arg(long)]
    resume: bool,
    /// Override the config's device: cpu, cuda, cuda:N.
    #[arg(long)]
    device: Option<String>,
    /// Override the config's run name.
    #[arg(long)]
    name: Option<String>,
    /// Folder of run folders.
    #[arg(long, default_value = "runs")]
    runs_dir: PathBuf,
    /// Stop after this many steps in total (with a checkpoint).
    #[arg(long)]
    max_steps: Option<usize>,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
}

fn main() -> Result<()> {
    retinanet_train::init_runtime();
    let args = Args::parse();
    let mut cfg: DetectorRunConfig = match &args.config {
        Some(p) => read_config(p)?,
        None => parse_config(DEFAULT_DETECTOR_TOML)?,
    };
    if let Some(d) = args.device {
        cfg.device = d;
    }
    if let Some(n) = args.name {
        cfg.name = n;
    }
    let opts = RunOptions {
        runs_dir: args.runs_dir,
        resume: args.resume,
        quiet: args.quiet,
        max_steps: args.max_steps,
        ..Default::default()
    };
    opts.install_ctrlc()?;
    let s = train_detector(&cfg, &opts)?;
    if let Some(r) = &s.report {
        println!("{}", r.to_table());
    }
    let map = s
        .report
        .as_ref()
        .and_then(|r| r.map)
        .map_or("-".to_string(), |m| format!("{m:.4}"));
    println!(
        "{} after {} steps in {:.1} min: mAP@0.5 {map}; run folder {}",
        if s.stopped_early {
            "stopped"
        } else {
            "finished"
        },
        s.steps,
        s.seconds / 60.0,
        s.run.root.display()
    );
    Ok(())
}
