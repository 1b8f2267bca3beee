//! `pretrain`: classification pretraining of the extractor. With no argument, on the built-in
//! synthetic shapes with `configs/pretrain-default.toml`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use retinanet_train::config::DEFAULT_PRETRAIN_TOML;
use retinanet_train::{PretrainRunConfig, RunOptions, parse_config, pretrain, read_config};

/// Pretrain the ResNet extractor as a classifier.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Run config (TOML); default: the built-in synthetic-shapes config.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue the run's checkpoint.
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
    let mut cfg: PretrainRunConfig = match &args.config {
        Some(p) => read_config(p)?,
        None => parse_config(DEFAULT_PRETRAIN_TOML)?,
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
    let s = pretrain(&cfg, &opts)?;
    let acc = s
        .eval_accuracy
        .map_or("-".to_string(), |a| format!("{a:.3}"));
    println!(
        "pretrained {} steps in {:.1} min, eval accuracy {acc}; checkpoint {}",
        s.steps,
        s.seconds / 60.0,
        s.run.checkpoint().display()
    );
    Ok(())
}
