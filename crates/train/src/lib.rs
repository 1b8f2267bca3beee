//! What the RetinaNet binaries share: run configs, device selection, SGD with momentum and
//! weight decay, learning-rate schedules, atomic checkpoints, run folders and logs, progress
//! bars, plots, ONNX export ([`onnx`]), and the training / evaluation loops themselves — so
//! `pretrain`, `train-detector`, `inspect`, `evaluate` and `convert` stay thin.
//!
//! A detector run leaves in `runs/<name>/`: `checkpoint.safetensors` (weights, momentum buffers,
//! step, epoch, position, seed, config and class names), `config.toml`, `train.jsonl` (one line
//! per step), `eval.jsonl` (one line per evaluation), `report.txt` / `report.json` (the final
//! per-class table), `loss.png` and `map.png`.

pub mod anchor_report;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod detect;
pub mod device;
pub mod dist;
pub mod engine;
pub mod infer;
pub mod interop;
pub mod model;
pub mod onnx;
pub mod onnx_proto;
pub mod optim;
pub mod plot;
pub mod pretrain;
pub mod progress;
pub mod run;
pub mod runtime;
pub mod schedule;

pub use checkpoint::{Checkpoint, CheckpointMeta, load_checkpoint, save_checkpoint};
pub use config::{DetectorRunConfig, PretrainRunConfig, parse_config, read_config};
pub use detect::{
    LoadedDetector, TrainSummary, evaluate_model, evaluate_sharded, load_detector, train_detector,
};
pub use device::{Precision, parse_device};
pub use dist::Communicator;
pub use engine::{Task, Trainer};
pub use optim::Sgd;
pub use pretrain::{PretrainSummary, pretrain};
pub use run::{RunDir, RunOptions, latest_run};
pub use runtime::{check_settings, init_runtime};
pub use schedule::{LrSchedule, ProgressDecays, run_progress};
