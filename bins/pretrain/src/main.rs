//! `pretrain`: classification pretraining of the extractor. With no argument, on the built-in
//! synthetic shapes with `configs/pretrain-default.toml`. Under `mpirun -n N` (a build with the
//! `distributed` feature) the N processes pretrain one model together, as the tutorial's
//! multi-GPU pretraining.

use std::process::ExitCode;

use clap::Parser;
use retinanet_train::cli::{RunArgs, main_on_ranks};
use retinanet_train::config::DEFAULT_PRETRAIN_TOML;
use retinanet_train::{PretrainRunConfig, pretrain};

/// Pretrain the ResNet extractor as a classifier.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    run: RunArgs,
}

fn main() -> ExitCode {
    retinanet_train::init_runtime();
    let args = Args::parse();
    main_on_ranks(|comm| {
        let cfg: PretrainRunConfig = args.run.load_config(DEFAULT_PRETRAIN_TOML)?;
        let root = comm.is_root();
        let s = pretrain(&cfg, &args.run.options(comm)?)?;
        if root {
            let acc = s
                .eval_accuracy
                .map_or("-".to_string(), |a| format!("{a:.3}"));
            println!(
                "pretrained {} steps in {:.1} min, eval accuracy {acc}; checkpoint {}",
                s.steps,
                s.seconds / 60.0,
                s.run.checkpoint().display()
            );
        }
        Ok(())
    })
}
