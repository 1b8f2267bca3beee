//! `train-detector`: trains RetinaNet. With no argument, on the built-in synthetic shapes with
//! `configs/default.toml`; `--config` for anything else. Under `mpirun -n N` (a build with the
//! `distributed` feature) the N processes train one model together, data-parallel.
//! `--check-anchors` prints the anchor check of the run's training data and stops.

use std::process::ExitCode;

use clap::Parser;
use retinanet_train::cli::{RunArgs, main_on_ranks};
use retinanet_train::config::DEFAULT_DETECTOR_TOML;
use retinanet_train::detect::check_run_anchors;
use retinanet_train::{DetectorRunConfig, train_detector};

/// Train a RetinaNet detector.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    run: RunArgs,
    /// Only check the anchors against the training boxes (sizes, matched fraction, positives
    /// per box, a fitted layout) and stop; every run prints this check at its start.
    #[arg(long)]
    check_anchors: bool,
}

fn main() -> ExitCode {
    retinanet_train::init_runtime();
    let args = Args::parse();
    main_on_ranks(|comm| {
        let cfg: DetectorRunConfig = args.run.load_config(DEFAULT_DETECTOR_TOML)?;
        let root = comm.is_root();
        if args.check_anchors {
            if root {
                print!("{}", check_run_anchors(&cfg)?.to_text());
            }
            return Ok(());
        }
        let s = train_detector(&cfg, &args.run.options(comm)?)?;
        if !root {
            return Ok(());
        }
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
    })
}
