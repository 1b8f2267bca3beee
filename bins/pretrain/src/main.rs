//! `pretrain`: classification pretraining of the extractor. With no argument, on the built-in
//! synthetic shapes with `configs/pretrain-default.toml`.

use anyhow::Result;
use clap::Parser;
use retinanet_train::cli::RunArgs;
use retinanet_train::config::DEFAULT_PRETRAIN_TOML;
use retinanet_train::{PretrainRunConfig, pretrain};

/// Pretrain the ResNet extractor as a classifier.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    run: RunArgs,
}

fn main() -> Result<()> {
    retinanet_train::init_runtime();
    let args = Args::parse();
    let cfg: PretrainRunConfig = args.run.load_config(DEFAULT_PRETRAIN_TOML)?;
    let s = pretrain(&cfg, &args.run.options()?)?;
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
