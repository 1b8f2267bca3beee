//! The program the distributed tests start under `mpirun` (feature `distributed`):
//! `train-detector` and `pretrain` exactly as the binaries run them, sharded evaluation of a
//! checkpoint, and a run whose loss becomes NaN on one chosen rank only.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::{Parser, Subcommand};
use retinanet_train::cli::{RunArgs, main_on_ranks};
use retinanet_train::config::{DEFAULT_DETECTOR_TOML, DEFAULT_PRETRAIN_TOML};
use retinanet_train::engine::{Budget, Forward, Plan, StepContext, Task, Trainer};
use retinanet_train::schedule::LrSchedule;
use retinanet_train::{
    Communicator, DetectorRunConfig, PretrainRunConfig, RunOptions, Sgd, evaluate_sharded,
    load_detector, pretrain, read_config, train_detector,
};
use serde_json::{Map, Value};

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// As `train-detector`.
    TrainDetector {
        #[command(flatten)]
        run: RunArgs,
    },
    /// As `pretrain`.
    Pretrain {
        #[command(flatten)]
        run: RunArgs,
    },
    /// Evaluates a detector checkpoint on its config's evaluation split, shared over the ranks;
    /// rank 0 writes the report's JSON.
    Evaluate {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// A small run whose loss is NaN on rank `rank` at step `step` only.
    NanOnRank {
        #[arg(long)]
        rank: usize,
        #[arg(long)]
        step: usize,
        #[arg(long)]
        runs_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    retinanet_train::init_runtime();
    let args = Args::parse();
    main_on_ranks(|comm| {
        // The tests kill ranks by pid.
        if let Ok(dir) = std::env::var("RANK_RUNNER_PID_DIR") {
            std::fs::write(
                PathBuf::from(dir).join(format!("rank-{}.pid", comm.rank())),
                std::process::id().to_string(),
            )?;
        }
        match args.cmd {
            Cmd::TrainDetector { run } => {
                let cfg: DetectorRunConfig = run.load_config(DEFAULT_DETECTOR_TOML)?;
                train_detector(&cfg, &run.options(comm)?).map(|_| ())
            }
            Cmd::Pretrain { run } => {
                let cfg: PretrainRunConfig = run.load_config(DEFAULT_PRETRAIN_TOML)?;
                pretrain(&cfg, &run.options(comm)?).map(|_| ())
            }
            Cmd::Evaluate {
                checkpoint,
                config,
                out,
            } => evaluate(&*comm, &checkpoint, &config, &out),
            Cmd::NanOnRank {
                rank,
                step,
                runs_dir,
            } => nan_on_rank(comm, rank, step, runs_dir),
        }
    })
}

fn evaluate(
    comm: &dyn Communicator,
    checkpoint: &std::path::Path,
    config: &std::path::Path,
    out: &std::path::Path,
) -> Result<()> {
    let cfg: DetectorRunConfig = read_config(config)?;
    let det = load_detector(checkpoint, &Device::Cpu)?;
    let (_, eval_ds) = retinanet_train::data::open_detection(&cfg.data.source)?;
    let r = evaluate_sharded(
        &det.model,
        &det.encoder,
        &eval_ds,
        &cfg,
        &Device::Cpu,
        true,
        comm,
    )?;
    if let Some(r) = r {
        std::fs::write(out, r.to_json())?;
    }
    Ok(())
}

/// Fits `w` to zero (loss `sum(w^2)`), except that rank `rank` reports NaN at step `step`.
struct NanTask {
    w: Tensor,
    rank: usize,
    step: usize,
}

impl Task for NanTask {
    type Batch = usize;
    fn batches(
        &self,
        _epoch: usize,
        batch: usize,
    ) -> Box<dyn Iterator<Item = retinanet_dataset::Result<usize>>> {
        Box::new((batch..).map(Ok))
    }
    fn batch_index(b: &usize) -> usize {
        *b
    }
    fn batch_len(_: &usize) -> usize {
        1
    }
    fn forward(&mut self, ctx: &StepContext, _: usize) -> Result<Forward> {
        let mut loss = (self.w.sqr()?.sum_all()? / ctx.comm.size() as f64)?;
        if ctx.comm.rank() == self.rank && ctx.step == self.step {
            loss = (loss * f64::NAN)?;
        }
        Ok(Forward { loss, sums: vec![] })
    }
    fn record(&self, _: &[(&'static str, f64)], _: &mut Map<String, Value>) {}
    fn progress_message(&self, _: &Map<String, Value>) -> String {
        String::new()
    }
}

fn nan_on_rank(
    comm: Arc<dyn Communicator>,
    rank: usize,
    step: usize,
    runs_dir: PathBuf,
) -> Result<()> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let w = vb.get_with_hints(8, "w", candle_nn::Init::Const(1.0))?;
    let opt = Sgd::new(retinanet_train::model::trainable_vars(&varmap), 0.9, 0.0)?;
    let plan = Plan {
        kind: "detector",
        label: "nan",
        budget: Budget::Steps(20),
        per_epoch: 10,
        checkpoint_every: 2,
        save_at_epoch_end: false,
        time_limit_minutes: 0.0,
        lr: LrSchedule {
            lr: 0.1,
            boundaries: vec![],
            progress_boundaries: vec![],
            decay: 0.1,
            warmup_steps: 0,
            warmup_factor: 1.0,
        },
        grad_clip: None,
        seed: 0,
        name: "nan".into(),
        config_toml: String::new(),
        class_names: vec!["x".into()],
    };
    let opts = RunOptions {
        runs_dir,
        quiet: true,
        comm,
        ..Default::default()
    };
    let mut t = Trainer::start(
        &opts,
        plan,
        Device::Cpu,
        varmap,
        opt,
        |_| Ok(()),
        |_| Ok(()),
    )?;
    t.run(&mut NanTask { w, rank, step })?;
    Ok(())
}
