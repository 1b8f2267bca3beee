//! What the workspace-level tests share (the tests themselves are `pipelines.rs`, `faults.rs`,
//! with the `distributed` feature `distributed.rs` (and its `rank_runner.rs`), with the `cuda`
//! feature `cuda.rs`).

use std::path::Path;

/// A detector run config small enough for a test (ResNet-18 at width 8, 16-channel FPN and
/// heads, 65 px, 24 synthetic training scenes in `cache`, batch 4: 6 steps an epoch).
pub fn tiny_detector_toml(
    cache: &Path,
    name: &str,
    device: &str,
    pretrained: &str,
    epochs: usize,
    progress_boundaries: &str,
) -> String {
    format!(
        r#"
name = "{name}"
seed = 3
device = "{device}"
[model]
depth = 18
base_width = 8
fpn_channels = 16
head_channels = 16
[data]
size = 65
eval_size = 65
boxarea_th = 25.0
skip_bad_images = false
[data.source]
kind = "synthetic"
cache_dir = "{cache}"
num_train = 24
num_eval = 6
image_size = 72
max_objects = 3
object_size = [12.0, 36.0]
seed = 1
[train]
epochs = {epochs}
batch_size = 4
iou_th = [0.3, 0.5]
momentum = 0.9
weight_decay = 1e-4
grad_clip = 10.0
freeze_bn = false
frozen_stages = 0
pretrained = "{pretrained}"
checkpoint_every = 4
time_limit_minutes = 0.0
[train.lr]
lr = 0.01
boundaries = [10]
progress_boundaries = {progress_boundaries}
decay = 0.1
warmup_steps = 3
warmup_factor = 0.1
[eval]
every_epochs = 1
score_th = 0.05
nms_th = 0.5
class_agnostic = false
pre_nms_top_k = 100
max_detections = 20
max_images = 0
"#,
        cache = cache.display()
    )
}

/// A pretraining config small enough for a test (ResNet-18 at width 8, 32 px, 32 synthetic
/// images in `cache`, batch 8): `steps` steps, an evaluation batch and a checkpoint every
/// `every` steps.
pub fn tiny_pretrain_toml(
    cache: &Path,
    name: &str,
    steps: usize,
    every: usize,
    progress_boundaries: &str,
    sync_bn: bool,
) -> String {
    format!(
        r#"
name = "{name}"
seed = 5
device = "cpu"
depth = 18
base_width = 8
[data]
size = 32
skip_bad_images = false
[data.source]
kind = "synthetic"
cache_dir = "{cache}"
num_train = 32
num_eval = 16
image_size = 32
seed = 2
[train]
steps = {steps}
batch_size = 8
eval_batch_size = 16
eval_every = {every}
checkpoint_every = {every}
momentum = 0.9
weight_decay = 1e-4
time_limit_minutes = 0.0
sync_bn = {sync_bn}
[train.lr]
lr = 0.05
boundaries = [4]
progress_boundaries = {progress_boundaries}
decay = 0.1
warmup_steps = 0
warmup_factor = 1.0
"#,
        cache = cache.display()
    )
}

/// Run options for a test: runs under `runs`, no progress output; the process-wide runtime
/// settings made once, as the binaries do before their first candle operation.
pub fn quiet(runs: &Path) -> retinanet_train::RunOptions {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(retinanet_train::init_runtime);
    retinanet_train::RunOptions {
        runs_dir: runs.to_path_buf(),
        quiet: true,
        ..Default::default()
    }
}

/// The per-step losses of a detector run's training log (`train_log()`), in step order.
pub fn logged_losses(log: &Path) -> Vec<f64> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["loss"].as_f64().unwrap()
        })
        .collect()
}
